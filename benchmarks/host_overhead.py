"""The host's share of an eager attention module step, measured without a GPU: every Triton launch is stubbed out
(nothing runs, outputs stay unwritten) and the step runs on tiny CPU tensors, so what is timed is what the host pays
per step on any device (Python, the dispatcher, autograd, allocations, the custom operators' wrappers) plus a few
microseconds of CPU arithmetic. Also counts the aten calls of one forward + backward (TorchDispatchMode; a custom
operator counts once, the calls inside it not).

A proxy for the eager host time that `scripts/benchmark_attention.py` measures on the GPU (its "host" column): it
leaves out what a CUDA launch itself costs, and dense attention takes its CPU path (padding and
scaled_dot_product_attention) where a GPU runs varlen flash attention. Comparing commits on one machine is what it
is for:

    PYTHONPATH=src python benchmarks/host_overhead.py [--output benchmarks/results/host_overhead_cpu.json]
"""

import argparse
import collections
import json
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # the Triton paths are taken on CPU tensors (their launches are stubbed below)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation  # noqa: E402
from blossomrec_hf.model import block_compressor, blossom_attention_triton, rotary_embedding  # noqa: E402
from blossomrec_hf.model.history_layout import HistoryLayout  # noqa: E402
from blossomrec_hf.model.rotary_embedding import rotary_tables  # noqa: E402

KERNELS = {blossom_attention_triton: ("compressed_forward", "sparse_forward", "one_pass_forward", "backward_dq",
                                      "one_pass_backward_dq", "sparse_backward_dkdv", "one_pass_backward_dkdv",
                                      "compressed_backward_dkdv", "gated_sum_forward", "gated_sum_backward"),
           rotary_embedding: ("rotary_forward", "rotary_backward"),
           block_compressor: ("unfold_blocks", "fold_blocks")}
LENGTH, HISTORIES = 48, 2


class _NoLaunch:
    """Takes `kernel[grid](**arguments)` and runs nothing."""

    def __getitem__(self, grid):
        return lambda *arguments, **keywords: None


class _CountCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))


def module_step(implementation: str, autocast: bool):
    """The first attention module of a fresh model (the benchmark's shape: hidden 128, 8 heads, 2 kv heads; blocks
    of 16 so that the compressor's matmuls stay tiny), forward + backward on packed histories, in float32 or under
    bf16 autocast (as on the GPU, but a CPU casts and multiplies bf16 slowly: more arithmetic in the time)."""
    torch.manual_seed(0)
    config = BlossomRecConfig(n_items=100, hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                              compress_block_size=16, compress_stride=16, selection_block_size=16,
                              max_position_embeddings=LENGTH + 1, hidden_dropout_prob=0.0,
                              attention_type="dense" if implementation in ("sdpa", "eager") else "blossom")
    config._attn_implementation = implementation
    model = BlossomRecForSequentialRecommendation(config)
    model.set_attn_implementation(implementation)
    module = model.model.layers[0].attention
    tokens = LENGTH * HISTORIES
    layout = HistoryLayout.from_inputs(torch.ones(1, tokens, dtype=torch.long), None, 100,
                                       torch.arange(LENGTH).repeat(HISTORIES)[None],
                                       torch.arange(0, tokens + 1, LENGTH, dtype=torch.int32), LENGTH)
    hidden = torch.randn(tokens, 128, requires_grad=True)
    grad = torch.randn(tokens, 128)
    cos, sin = rotary_tables(LENGTH, config.head_dim, config.rope_theta, "cpu", torch.float32)
    rotary = cos[layout.positions], sin[layout.positions]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            out = module(hidden, layout, rotary)
        out.backward(grad)

    return step


def measure(implementation: str, steps: int, autocast: bool) -> dict:
    step = module_step(implementation, autocast)
    for _ in range(10):
        step()
    counter = _CountCalls()
    with counter:
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"implementation": implementation, "aten_calls": sum(counter.calls.values()),
            "host_us_median": statistics.median(times) * 1e6, "host_us_p10": sorted(times)[len(times) // 10] * 1e6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--implementations", nargs="+", default=["blossom_triton", "sdpa"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast (default: float32)")
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for module, names in KERNELS.items():
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _NoLaunch())
    rows = [measure(implementation, args.steps, args.autocast) for implementation in args.implementations]
    print(f"{'implementation':16} {'aten calls':>10} {'host us (median)':>17} {'host us (p10)':>14}")
    for row in rows:
        print(f"{row['implementation']:16} {row['aten_calls']:>10} {row['host_us_median']:>17.0f} "
              f"{row['host_us_p10']:>14.0f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"torch": torch.__version__, "length": LENGTH, "histories": HISTORIES,
                       "autocast": args.autocast, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
