"""Speed and memory of BlossomRec attention backends on one GPU: the attention module and a whole training step.

Module: forward + backward of `BlossomRecAttention` (projections, compression MLP and gates included), hidden 128,
8 heads, 2 kv heads, bf16 autocast, 131,072 tokens per batch packed as B = 131072 // L histories of length L (the
layout `scripts/train.py` feeds): `blossom_triton` vs dense `sdpa` vs `blossom_torch`. Peak memory is the
allocator's peak during one step minus what was allocated before it.

Each step is timed in the modes a training loop can run it (median by `triton.testing.do_bench`):
- eager: what a plain PyTorch loop gets; short steps are bound by the host (Python, autograd, kernel launches).
- compiled: `torch.compile` of the module (--compile_mode, default PyTorch's), the step `--torch_compile` runs.
- graph: the eager step captured in a CUDA graph and replayed, the device-bound time with no host work per step.
- host: the host's own time to issue one eager step (three issued back to back while a sleep kernel holds the GPU,
  so the host never waits for it). A step that synchronises with the device (the eager model checks its input) would
  wait for the sleep there: it is issued from an idle GPU instead, one step at a time, so the time includes its own
  waits for the kernels it queued before a sync (an upper bound).
Whole model: one training step (forward, loss, backward, fused AdamW as train.py on a GPU) of
`BlossomRecForSequentialRecommendation` against the dense model, items per second, in the same modes, except that
its graph column is the model compiled in mode reduce-overhead (forward and backward replayed from CUDA graphs,
train.py --cuda_graph_step false on one GPU), with the host's share of that step ("g.host%"), and its "stepgr"
column train.py's default on one GPU (--cuda_graph_step): the whole step, AdamW included, replayed from one CUDA
graph ("s.host%": the host's share). No dropout anywhere (a CUDA graph capture that fails part-way would leave the
random generator unusable for the rows after it).

    python scripts/benchmark_attention.py [--lengths 50 200 ...] [--output-dir benchmarks/results]
"""

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import triton.testing

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
from blossomrec_hf.model.history_layout import HistoryLayout
from blossomrec_hf.model.rotary_embedding import rotary_tables
from blossomrec_hf.training.step_graph import CudaGraphStep, make_capturable

TOKENS = 131072
LENGTHS = [50, 200, 1024, 4096, 16384, 65536]
TARGETS = {200: 1.25, 1024: 1.0, 4096: 0.5, 16384: 0.2}
SLOW_SECONDS = 20.0
N_ITEMS = 20000
MODES = ("eager", "compiled", "graph")


def make_config(implementation: str, **overrides) -> BlossomRecConfig:
    # no dropout: a CUDA graph capture that fails part-way would leave the random generator unusable
    fields = dict(n_items=N_ITEMS, hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=256, hidden_dropout_prob=0.0, attention_type="dense" if implementation in ("sdpa", "eager") else "blossom")
    fields.update(overrides)
    config = BlossomRecConfig(**fields)
    config._attn_implementation = implementation
    return config


def packed_histories(length: int) -> dict:
    """input_ids and position_ids [1, T] of TOKENS // length histories of `length` items, back to back, with their
    boundaries (the flash-attention kwargs train.py's collator passes, so no step derives them on the device)."""
    batch = TOKENS // length
    # drawn on the CPU: a CUDA graph capture earlier in the run leaves the CUDA generator unusable for eager draws
    items = torch.randint(1, N_ITEMS + 1, (1, batch * length), generator=torch.Generator().manual_seed(length))
    return dict(input_ids=items.cuda(),
                position_ids=torch.arange(length, device="cuda").repeat(batch)[None],
                cu_seq_lens_q=torch.arange(0, batch * length + 1, length, device="cuda", dtype=torch.int32),
                max_length_q=length)


def measure(step, quick_first: bool):
    """(median ms, peak extra MiB, note) of `step`, or a note when it cannot run in reasonable time or memory."""
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


def host_ms(step, syncs: bool, steps: int = 3, repeats: int = 5) -> float:
    """The host's own time per step: `steps` steps issued back to back while a sleep kernel holds the GPU (so the
    host never waits for it), median over `repeats`. Few steps: CUDA queues about a thousand pending launches, and a
    host that fills the queue waits as if it synced (ten BlossomRec steps did, which read as 100 ms of host time).
    A step that `syncs` would wait for the sleep: it is issued one at a time from an idle GPU instead."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        if syncs:
            steps = 1
        else:
            torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time: far longer than issuing the steps takes
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) * 1e3 / steps)
        torch.cuda.synchronize()
    return statistics.median(times)


def host_sync(step) -> str:
    """Where `step` makes the host wait for the GPU (the first synchronising call in the package), or ""."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return ""
    except RuntimeError as error:
        if "synchroniz" not in str(error):
            raise
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "blossomrec_hf" in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "outside the package"
        return f"host sync at {where}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


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


def compiled_ms(make_step, compile_mode) -> tuple[float | None, str]:
    """Median ms of the step built around a torch.compile'd callable, or None and why it failed."""
    try:
        step = make_step(lambda fn: torch.compile(fn, mode=compile_mode))
        ms, _, note = measure(step, quick_first=False)
        return ms, note
    except Exception as error:  # a compile failure is reported, not fatal
        torch.cuda.synchronize()
        return None, f"compile failed: {type(error).__name__}: {str(error)[:120]}"


def module_step(implementation: str, length: int):
    """make_step(wrap) -> the module's forward + backward on a packed batch; `wrap` compiles the module or not."""
    torch.manual_seed(0)
    config = make_config(implementation)
    # the first attention module of a freshly initialised model (the model's initializer_range, not PyTorch defaults)
    model = BlossomRecForSequentialRecommendation(config)
    model.set_attn_implementation(implementation)
    module = model.model.layers[0].attention.cuda()
    batch = packed_histories(length)
    layout = HistoryLayout.from_inputs(batch["input_ids"], None, N_ITEMS, batch["position_ids"],
                                       batch["cu_seq_lens_q"], batch["max_length_q"])
    tokens = batch["input_ids"].shape[1]
    hidden = torch.randn(tokens, 128, device="cuda", requires_grad=True)
    grad = torch.randn(tokens, 128, device="cuda")
    cos, sin = rotary_tables(length, config.head_dim, config.rope_theta, "cuda", torch.float32)
    rotary = cos[layout.positions], sin[layout.positions]

    def make_step(wrap=lambda fn: fn):
        attention = wrap(module)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):  # no cast cache: capturable
                out = attention(hidden, layout, rotary)
            out.backward(grad)

        return step

    return make_step


def model_parts(implementation: str, length: int):
    """A fresh whole model on the GPU, train.py's optimizer there (fused AdamW), and the packed batch of `length`."""
    torch.manual_seed(0)
    model = BlossomRecForSequentialRecommendation(make_config(implementation, max_position_embeddings=length)).cuda()
    model.set_attn_implementation(implementation)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), packed_histories(length)


def optimizer_step(forward, optimizer):
    """step(batch) -> loss: forward with the batch's own items as labels, backward, AdamW (no zeroing)."""
    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = forward(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        return loss

    return step


def model_step(implementation: str, length: int):
    """make_step(wrap) -> one training step of the whole model on a packed batch; `wrap` compiles the model or not."""
    model, optimizer, batch = model_parts(implementation, length)

    def make_step(wrap=lambda fn: fn):
        train = optimizer_step(wrap(model), optimizer)

        def step():
            optimizer.zero_grad(set_to_none=False)
            train(batch)

        return step

    return make_step


def time_modes(make_step, *, quick_first: bool, compile_mode, modes) -> dict:
    """One implementation at one length: eager ms / peak MiB / host ms, then the compiled and graph modes."""
    step = make_step()
    ms, mib, note = measure(step, quick_first=quick_first)
    entry = {"ms": ms, "peak_mib": mib, "note": note, "host_ms": None}
    if ms is not None and not note:
        entry["note"] = host_sync(step)
        entry["host_ms"] = host_ms(step, syncs=bool(entry["note"]))
    if ms is not None and "graph" in modes:
        entry["graph_ms"], entry["graph_note"] = graph_ms(step)
    if ms is not None and "compiled" in modes:
        entry["compiled_ms"], entry["compiled_note"] = compiled_ms(make_step, compile_mode)
    return entry


def add_ratios(row: dict, dense: str, others) -> None:
    """Each implementation's time per mode and memory over the dense one's, in place."""
    for implementation in others:
        entry = row[implementation]
        for key, ratio in (("ms", "time_ratio"), ("graph_ms", "graph_time_ratio"),
                           ("step_graph_ms", "step_graph_time_ratio"),
                           ("compiled_ms", "compiled_time_ratio"), ("peak_mib", "memory_ratio")):
            if entry.get(key) is not None and row[dense].get(key):
                entry[ratio] = entry[key] / row[dense][key]


def fmt(value, spec):
    return format(value, spec) if value is not None else "-"


def run_module_table(lengths, *, with_reference: bool, compile_mode, modes):
    rows = []
    print(f"{'L':>6} {'B':>5} | {'impl':>14} {'eager ms':>9} {'host ms':>8} {'compiled':>9} {'graph':>8} "
          f"{'MiB':>7} | {'eager/d':>7} {'comp/d':>7} {'graph/d':>7} {'mem/d':>6} {'target':>6}")
    for length in lengths:
        row = {"length": length, "batch": TOKENS // length, "target_time_ratio": TARGETS.get(length)}
        implementations = ("sdpa", "blossom_triton") + (("blossom_torch",) if with_reference else ())
        for implementation in implementations:
            reference = implementation == "blossom_torch"
            row[implementation] = time_modes(module_step(implementation, length), quick_first=reference,
                                             compile_mode=compile_mode, modes=() if reference else modes)
        add_ratios(row, "sdpa", implementations[1:])
        rows.append(row)
        for implementation in implementations:
            e = row[implementation]
            print(f"{length:>6} {row['batch']:>5} | {implementation:>14} {fmt(e['ms'], '9.3f')} "
                  f"{fmt(e['host_ms'], '8.3f')} {fmt(e.get('compiled_ms'), '9.3f')} {fmt(e.get('graph_ms'), '8.3f')} "
                  f"{fmt(e['peak_mib'], '7.0f')} | {fmt(e.get('time_ratio'), '7.2f')} "
                  f"{fmt(e.get('compiled_time_ratio'), '7.2f')} {fmt(e.get('graph_time_ratio'), '7.2f')} "
                  f"{fmt(e.get('memory_ratio'), '6.2f')} {fmt(row['target_time_ratio'], '6.2f')} "
                  f"{e['note']} {e.get('compiled_note', '')} {e.get('graph_note', '')}", flush=True)
    return rows


def reduce_overhead_entry(make_step) -> dict:
    """The whole model's step as train.py --cuda_graph_step false runs it on one GPU: compiled in mode
    reduce-overhead, its forward and backward replayed from CUDA graphs (the optimizer step eager): median ms, and
    the host's ms per step and share of the step (the eager model cannot be captured whole: it checks its input on
    the host)."""
    try:
        step = make_step(lambda fn: torch.compile(fn, mode="reduce-overhead", fullgraph=True))
        ms, _, note = measure(step, quick_first=False)
        if ms is None:
            return {"graph_ms": None, "graph_note": note}
        sync = host_sync(step)
        host = host_ms(step, syncs=bool(sync))
        return {"graph_ms": ms, "graph_host_ms": host, "graph_host_share": host / ms, "graph_note": sync or note}
    except Exception as error:  # a compile failure is reported, not fatal
        torch.cuda.synchronize()
        return {"graph_ms": None, "graph_note": f"reduce-overhead failed: {type(error).__name__}: {str(error)[:120]}"}
    finally:
        torch._dynamo.reset()  # frees the CUDA graphs' memory pools before the next row


def step_graph_entry(implementation: str, length: int) -> dict:
    """The whole model's step as train.py runs it by default on one GPU (--cuda_graph_step): compiled in torch's
    default mode, forward, backward and the fused AdamW step captured in one CUDA graph after three ordinary steps and
    replayed per batch (the batch copied into the graph's buffers first): median ms, host ms and share of the step."""
    try:
        model, optimizer, batch = model_parts(implementation, length)
        make_capturable(optimizer)
        graph_step = CudaGraphStep(optimizer_step(torch.compile(model, fullgraph=True), optimizer), optimizer)

        def step():
            graph_step(batch)

        ms, _, note = measure(step, quick_first=False)
        if ms is None:
            return {"step_graph_ms": None, "step_graph_note": note}
        host = host_ms(step, syncs=False)
        return {"step_graph_ms": ms, "step_graph_host_ms": host, "step_graph_host_share": host / ms}
    except Exception as error:  # a capture failure is reported, not fatal
        torch.cuda.synchronize()
        return {"step_graph_ms": None,
                "step_graph_note": f"step graph failed: {type(error).__name__}: {str(error)[:120]}"}
    finally:
        torch._dynamo.reset()


def run_model_table(lengths, *, compile_mode, modes):
    rows = []
    print(f"\n{'L':>6} {'B':>5} | {'impl':>14} {'eager ms':>9} {'host ms':>8} {'host %':>6} {'compiled':>9} "
          f"{'graph':>8} {'g.host%':>7} {'stepgr':>8} {'s.host%':>7} {'items/s':>10} | {'eager/d':>7} {'comp/d':>7} "
          f"{'graph/d':>7} {'step/d':>7}")
    for length in lengths:
        row = {"length": length, "batch": TOKENS // length}
        for implementation in ("sdpa", "blossom_triton"):
            make_step = model_step(implementation, length)
            # graph: the step compiled in mode reduce-overhead (train.py --cuda_graph_step false), not a capture of the
            # eager step; stepgr: train.py's default
            entry = time_modes(make_step, quick_first=False, compile_mode=compile_mode,
                               modes=[mode for mode in modes if mode != "graph"])
            if entry["ms"] is not None and "graph" in modes:
                entry.update(reduce_overhead_entry(make_step))
                entry.update(step_graph_entry(implementation, length))
            if entry["ms"] is not None:
                entry["items_per_s"] = TOKENS // length * length / entry["ms"] * 1e3
                entry["host_share"] = entry["host_ms"] / entry["ms"] if entry["host_ms"] is not None else None
            row[implementation] = entry
        add_ratios(row, "sdpa", ("blossom_triton",))
        rows.append(row)
        for implementation in ("sdpa", "blossom_triton"):
            e = row[implementation]
            shares = [e.get(key) for key in ("host_share", "graph_host_share", "step_graph_host_share")]
            share, graph_share, step_share = (None if x is None else x * 100 for x in shares)
            print(f"{length:>6} {row['batch']:>5} | {implementation:>14} {fmt(e['ms'], '9.3f')} "
                  f"{fmt(e['host_ms'], '8.3f')} {fmt(share, '6.1f')} "
                  f"{fmt(e.get('compiled_ms'), '9.3f')} {fmt(e.get('graph_ms'), '8.3f')} {fmt(graph_share, '7.1f')} "
                  f"{fmt(e.get('step_graph_ms'), '8.3f')} {fmt(step_share, '7.1f')} "
                  f"{fmt(e.get('items_per_s'), '10.3g')} | {fmt(e.get('time_ratio'), '7.2f')} "
                  f"{fmt(e.get('compiled_time_ratio'), '7.2f')} {fmt(e.get('graph_time_ratio'), '7.2f')} "
                  f"{fmt(e.get('step_graph_time_ratio'), '7.2f')} "
                  f"{e['note']} {e.get('compiled_note', '')} {e.get('graph_note', '')} {e.get('step_graph_note', '')}",
                  flush=True)
    return rows


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for implementation, color in (("sdpa", "k"), ("blossom_triton", "b"), ("blossom_torch", "r")):
        for key, style, label in (("ms", "-o", "eager"), ("compiled_ms", "--s", "compiled"), ("graph_ms", ":^", "graph")):
            points = [(r["length"], r[implementation][key]) for r in rows
                      if implementation in r and r[implementation].get(key) is not None]
            if points:
                axes[0].plot(*zip(*points), color + style, label=f"{implementation} {label}")
        points = [(r["length"], r[implementation]["peak_mib"]) for r in rows
                  if implementation in r and r[implementation]["peak_mib"] is not None]
        if points:
            axes[1].plot(*zip(*points), color + "-o", label=implementation)
    for axis, label in zip(axes, ("forward + backward, ms", "peak extra memory, MiB")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("history length L (131,072 tokens per batch)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("BlossomRec attention module on one GPU (bf16 autocast, d=128, 8 heads, 2 kv heads)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


class Tee:
    """Standard output that is also kept, for the .txt copy of the tables."""

    def __init__(self, stream):
        self.stream, self.lines = stream, []

    def write(self, text):
        self.lines.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=LENGTHS, help="module table (none: skip it)")
    parser.add_argument("--model-lengths", type=int, nargs="*", default=[200, 4096])
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument("--skip-reference", action="store_true", help="leave out blossom_torch (slow)")
    parser.add_argument("--modes", nargs="*", default=list(MODES[1:]), choices=MODES[1:],
                        help="modes timed besides eager")
    parser.add_argument("--compile_mode", default=None, help="torch.compile mode of the compiled column")
    args = parser.parse_args()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tee = Tee(sys.stdout)
    sys.stdout = tee
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"python {' '.join(sys.argv)}")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  tokens_per_batch=TOKENS, compile_mode=args.compile_mode)
    result["module"] = run_module_table(args.lengths, with_reference=not args.skip_reference,
                                        compile_mode=args.compile_mode, modes=args.modes)
    save(result, tee, output)  # kept even if the model table fails
    result["model"] = run_model_table(args.model_lengths, compile_mode=args.compile_mode, modes=args.modes)
    save(result, tee, output)
    if result["module"]:
        plot(result["module"], output / "attention_benchmark.png")


def save(result: dict, tee: Tee, output: Path) -> None:
    (output / "attention_benchmark.json").write_text(json.dumps(result, indent=1))
    (output / "attention_benchmark.txt").write_text("".join(tee.lines))


if __name__ == "__main__":
    main()
