"""Speed and memory of BlossomRec attention backends on one GPU: the attention module and a whole training step.

Module: forward + backward of `BlossomRecAttention` (projections, compression MLP and gates included), hidden 128,
8 heads, 2 kv heads, bf16 autocast, 131,072 tokens per batch (B = 131072 // L): `blossom_triton` vs dense `sdpa` vs
`blossom_torch`. Median time by `triton.testing.do_bench`; peak memory is the allocator's peak during one step
minus what was allocated before it. Short steps are bound by the host (Python, autograd and kernel launches), not
the GPU, so the step is also captured in a CUDA graph and its replay timed: the device-bound time that a training
loop under CUDA graphs would see. Whole model: one training step (forward, loss, backward, Adam) of
`BlossomRecForSequentialRecommendation` against the dense model, items per second.

    python scripts/benchmark_attention.py [--lengths 50 200 ...] [--output-dir benchmarks/results]
"""

import argparse
import json
import time
from pathlib import Path

import torch
import triton.testing

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
from blossomrec_hf.model.rotary_embedding import rotary_tables

TOKENS = 131072
LENGTHS = [50, 200, 1024, 4096, 16384, 65536]
TARGETS = {200: 1.25, 1024: 1.0, 4096: 0.5, 16384: 0.25}
SLOW_SECONDS = 20.0
N_ITEMS = 20000


def make_config(implementation: str, **overrides) -> BlossomRecConfig:
    fields = dict(n_items=N_ITEMS, hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=256, attention_type="dense" if implementation in ("sdpa", "eager") else "blossom")
    fields.update(overrides)
    config = BlossomRecConfig(**fields)
    config._attn_implementation = implementation
    return config


def measure(step, quick_first: bool):
    """(median ms, peak extra MiB) of `step`, or a note when it cannot run in reasonable time or memory."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        if quick_first and first > SLOW_SECONDS / 10:
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            again = time.perf_counter() - start
            if again > SLOW_SECONDS / 10:
                return again * 1e3, peak, "single timed run (slow)"
        return triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median"), peak, ""
    except torch.cuda.OutOfMemoryError:
        return None, None, "out of memory"


def graph_ms(step) -> tuple[float | None, str]:
    """Median ms of replaying `step` captured in a CUDA graph (no host work per step), or None and why not."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        ms = triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode="median")
        del graph
        return ms, ""
    except Exception as error:  # a capture failure is reported, not fatal: the eager timing still stands
        torch.cuda.synchronize()
        return None, f"graph capture failed: {type(error).__name__}: {str(error)[:80]}"


def module_step(implementation: str, length: int):
    torch.manual_seed(0)
    batch = TOKENS // length
    config = make_config(implementation)
    # the first attention module of a freshly initialised model (the model's initializer_range, not PyTorch defaults)
    model = BlossomRecForSequentialRecommendation(config)
    model.set_attn_implementation(implementation)
    module = model.model.layers[0].attention.cuda()
    hidden = torch.randn(batch, length, 128, device="cuda", requires_grad=True)
    grad = torch.randn(batch, length, 128, device="cuda")
    rotary = rotary_tables(length, config.head_dim, config.rope_theta, "cuda", torch.float32)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):  # no cast cache: graph-capturable
            out = module(hidden, rotary)
        out.backward(grad)

    return step, (module, hidden, grad, rotary)


def model_step(implementation: str, length: int):
    torch.manual_seed(0)
    batch = TOKENS // length
    model = BlossomRecForSequentialRecommendation(make_config(implementation, max_position_embeddings=length)).cuda()
    model.set_attn_implementation(implementation)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = torch.randint(1, N_ITEMS + 1, (batch, length), device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()

    return step, (model, optimizer, ids)


def run_module_table(lengths, with_reference: bool = True):
    rows = []
    print(f"{'L':>6} {'B':>5} | {'sdpa ms':>8} {'MiB':>7} | {'triton ms':>9} {'MiB':>7} {'t/dense':>7} {'m/dense':>7} "
          f"{'target':>6} | {'graph sdpa':>10} {'graph triton':>12} {'t/dense':>7} | {'torch ms':>9} {'MiB':>7} "
          f"{'t/dense':>7}")
    for length in lengths:
        row = {"length": length, "batch": TOKENS // length}
        for implementation in ("sdpa", "blossom_triton") + (("blossom_torch",) if with_reference else ()):
            step, keep = module_step(implementation, length)
            ms, mib, note = measure(step, quick_first=implementation == "blossom_torch")
            row[implementation] = {"ms": ms, "peak_mib": mib, "note": note}
            if implementation != "blossom_torch" and ms is not None:
                row[implementation]["graph_ms"], row[implementation]["graph_note"] = graph_ms(step)
            del step, keep
        dense = row["sdpa"]
        row.setdefault("blossom_torch", {"ms": None, "peak_mib": None, "note": "not run"})
        for implementation in ("blossom_triton", "blossom_torch"):
            entry = row[implementation]
            if entry["ms"] is not None and dense["ms"]:
                entry["time_ratio"] = entry["ms"] / dense["ms"]
                entry["memory_ratio"] = entry["peak_mib"] / dense["peak_mib"]
            if entry.get("graph_ms") and dense.get("graph_ms"):
                entry["graph_time_ratio"] = entry["graph_ms"] / dense["graph_ms"]
        row["target_time_ratio"] = TARGETS.get(length)
        rows.append(row)
        tri, ref = row["blossom_triton"], row["blossom_torch"]

        def fmt(value, spec):
            return format(value, spec) if value is not None else "-"

        print(f"{length:>6} {row['batch']:>5} | {fmt(dense['ms'], '8.3f')} {fmt(dense['peak_mib'], '7.0f')} | "
              f"{fmt(tri['ms'], '9.3f')} {fmt(tri['peak_mib'], '7.0f')} {fmt(tri.get('time_ratio'), '7.2f')} "
              f"{fmt(tri.get('memory_ratio'), '7.2f')} {fmt(row['target_time_ratio'], '6.2f')} | "
              f"{fmt(dense.get('graph_ms'), '10.3f')} {fmt(tri.get('graph_ms'), '12.3f')} "
              f"{fmt(tri.get('graph_time_ratio'), '7.2f')} | "
              f"{fmt(ref['ms'], '9.3f')} {fmt(ref['peak_mib'], '7.0f')} {fmt(ref.get('time_ratio'), '7.2f')} "
              f"{ref['note']} {dense.get('graph_note', '')} {tri.get('graph_note', '')}", flush=True)
    return rows


def run_model_table(lengths):
    rows = []
    print(f"\n{'L':>6} {'B':>5} | {'dense ms':>8} {'items/s':>10} | {'triton ms':>9} {'items/s':>10} {'ratio':>6}")
    for length in lengths:
        row = {"length": length, "batch": TOKENS // length}
        for implementation in ("sdpa", "blossom_triton"):
            step, keep = model_step(implementation, length)
            ms, mib, note = measure(step, quick_first=False)
            row[implementation] = {"ms": ms, "peak_mib": mib, "items_per_s": TOKENS // length * length / ms * 1e3}
            del step, keep
        row["items_per_s_ratio"] = row["blossom_triton"]["items_per_s"] / row["sdpa"]["items_per_s"]
        rows.append(row)
        print(f"{length:>6} {row['batch']:>5} | {row['sdpa']['ms']:>8.2f} {row['sdpa']['items_per_s']:>10.3g} | "
              f"{row['blossom_triton']['ms']:>9.2f} {row['blossom_triton']['items_per_s']:>10.3g} "
              f"{row['items_per_s_ratio']:>6.2f}", flush=True)
    return rows


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for implementation, style in (("sdpa", "k-o"), ("blossom_triton", "b-s"), ("blossom_torch", "r-^")):
        points = [(r["length"], r[implementation]["ms"], r[implementation]["peak_mib"]) for r in rows
                  if r[implementation]["ms"] is not None]
        if points:
            axes[0].plot([p[0] for p in points], [p[1] for p in points], style, label=implementation)
            axes[1].plot([p[0] for p in points], [p[2] for p in points], style, label=implementation)
    for axis, label in zip(axes, ("forward + backward, ms", "peak extra memory, MiB")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length L (131,072 tokens per batch)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle("BlossomRec attention module on one GPU (bf16 autocast, d=128, 8 heads, 2 kv heads)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--model-lengths", type=int, nargs="*", default=[200, 4096])
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument("--skip-reference", action="store_true", help="leave out blossom_torch (slow)")
    args = parser.parse_args()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    module_rows = run_module_table(args.lengths, with_reference=not args.skip_reference)
    model_rows = run_model_table(args.model_lengths)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  tokens_per_batch=TOKENS, module=module_rows, model=model_rows)
    (output / "attention_benchmark.json").write_text(json.dumps(result, indent=1))
    plot(module_rows, output / "attention_benchmark.png")


if __name__ == "__main__":
    main()
