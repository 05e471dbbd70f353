"""Item-softmax loss, forward + backward, side by side: this project's fused kernels against kept libraries.

    PYTHONPATH=src python scripts/benchmark_loss.py [--output benchmarks/results/loss_benchmark.json]

For each (positions N, items V) it times, in one process on one GPU (`triton.testing.do_bench`, median), the mean
cross-entropy of hidden [N, 128] @ items [V, 128].T and the gradients of both, with bf16 operands:
- `fused`: this project's Triton kernels (`linear_cross_entropy`, the model's loss on CUDA);
- `chunked_fp32`: the PyTorch path it replaces (float32 chunks; the CPU fallback);
- `cce` / `cce_exact`: cut-cross-entropy with its default gradient filtering and with filtering off;
- `liger`: liger-kernel's fused linear cross-entropy;
- `plain_bf16`: bf16 logits + `F.cross_entropy` (only where its [N, V] logits fit).
Libraries that are not installed are skipped. For each it also reports the peak memory above the inputs and the
relative error of the loss and of both gradients against a float64 computation on the same bf16 values.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from blossomrec_hf.model.chunked_cross_entropy import chunked_linear_cross_entropy
from blossomrec_hf.model import fused_cross_entropy
from blossomrec_hf.model.fused_cross_entropy import linear_cross_entropy

# Launch settings tried by --tune (fused_cross_entropy.TUNING keys: rows, items, warps of each kernel)
TUNE_FORWARD = [(128, 64, 8), (128, 128, 8), (64, 128, 4), (128, 64, 4), (64, 64, 4)]
TUNE_GRADIENT = [(64, 128, 8), (128, 128, 8), (128, 64, 8), (64, 64, 4), (64, 128, 4)]
SHAPES = [(131072, 20001), (131072, 200001), (16384, 1000001)]
WITH_PADDING_COLUMN = ("fused", "chunked_fp32")  # this project's losses leave item 0 out themselves
DIM = 128


def library_losses() -> dict:
    """name -> loss(hidden, weight, targets), for the libraries installed here."""
    losses = {}
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        losses["cce"] = lambda h, w, t: cce(h, w, t)
        losses["cce_exact"] = lambda h, w, t: cce(h, w, t, filter_eps=None)
    except ImportError:
        pass
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def liger_loss(h, w, t):
            out = liger(w, h, t)
            return out[0] if isinstance(out, tuple) else out

        losses["liger"] = liger_loss
    except ImportError:
        pass
    return losses


def plain_bf16(h, w, t):
    return F.cross_entropy(h @ w.T, t)


def float64_reference(h, w, t):
    """Loss, d hidden, d weight in float64 over items 1.. (column 0, padding, left out), row chunk by row chunk."""
    h64, w64 = h.double(), w[1:].double()
    chunk = max(1, 2**28 // w64.shape[0])
    loss, grad_h, grad_w = 0.0, torch.empty_like(h64), torch.zeros_like(w64)
    for start in range(0, h.shape[0], chunk):
        logits = h64[start:start + chunk] @ w64.T
        lse = torch.logsumexp(logits, 1)
        rows = torch.arange(logits.shape[0], device=h.device)
        target = t[start:start + chunk] - 1
        loss += (lse - logits[rows, target]).sum().item()
        probs = torch.exp(logits - lse[:, None])
        probs[rows, target] -= 1
        probs /= h.shape[0]
        grad_h[start:start + chunk] = probs @ w64
        grad_w += probs.T @ h64[start:start + chunk]
    return loss / h.shape[0], grad_h, grad_w


def relative_error(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def measure(fn, h, w, t, reference, with_padding_column: bool) -> dict:
    """Time, peak memory and errors of one loss. Losses without a padding column get items 1.. and targets - 1, so
    every candidate computes the same function."""
    if not with_padding_column:
        w, t = w[1:], t - 1
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()

    def step():
        h.grad = w.grad = None
        fn(h, w, t).backward()

    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        loss = fn(h, w, t).item()
        errors = dict(loss=abs(loss - reference[0]) / abs(reference[0]),
                      grad_hidden=relative_error(h.grad, reference[1]),
                      grad_weight=relative_error(w.grad[-reference[2].shape[0]:], reference[2]))
        ms = triton.testing.do_bench(step, warmup=100, rep=500, return_mode="median")
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(ms=None, peak_gib=None, note="out of memory")
    return dict(ms=round(ms, 3), peak_gib=round(peak / 2**30, 3), errors=errors)


def tune(h, w, t, reference) -> list[dict]:
    """The fused loss under each launch setting of TUNE_FORWARD x TUNE_GRADIENT (pairs in order, then the best
    forward with every gradient setting)."""
    saved = dict(fused_cross_entropy.TUNING)
    results = []
    try:
        for forward in TUNE_FORWARD:
            for gradient in TUNE_GRADIENT[:1] if forward != TUNE_FORWARD[0] else TUNE_GRADIENT:
                fused_cross_entropy.TUNING.update(forward_rows=forward[0], forward_items=forward[1],
                                                  forward_warps=forward[2], gradient_rows=gradient[0],
                                                  gradient_items=gradient[1], gradient_warps=gradient[2])
                result = measure(linear_cross_entropy, h, w, t, reference, with_padding_column=True)
                results.append(dict(forward=forward, gradient=gradient, **result))
                print(f"  tune forward {forward} gradient {gradient}: {result['ms']} ms", flush=True)
    finally:
        fused_cross_entropy.TUNING.update(saved)
    return results


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for row in rows for name in row["results"]})
    figure, axis = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        values = [row["results"].get(name, {}).get("ms") or 0 for row in rows]
        axis.bar([i + index * width for i in range(len(rows))], values, width, label=name)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    axis.set_xticklabels([f"N={row['positions']:,}\nV={row['items']:,}" for row in rows])
    axis.set_yscale("log")
    axis.set_ylabel("forward + backward, ms (log)")
    axis.set_title(f"item-softmax loss, bf16 operands, d={DIM}, one {rows[0]['device']}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results/loss_benchmark.json")
    parser.add_argument("--plot_only", action="store_true", help="redraw the PNG from an existing JSON")
    parser.add_argument("--tune", action="store_true", help="also time the fused loss under other launch settings")
    parser.add_argument("--candidates", nargs="+", help="only these losses (default: all installed)")
    parser.add_argument("--items", nargs="+", type=int, help="only the shapes with these item counts")
    args = parser.parse_args()
    output = Path(args.output)
    if args.plot_only:
        plot(json.loads(output.read_text())["rows"], output.with_suffix(".png"))
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    candidates = {"fused": lambda h, w, t: linear_cross_entropy(h, w, t), **library_losses(),
                  "chunked_fp32": chunked_linear_cross_entropy, "plain_bf16": plain_bf16}
    candidates = {name: fn for name, fn in candidates.items() if not args.candidates or name in args.candidates}
    device = torch.cuda.get_device_name()
    rows = []
    for positions, items in SHAPES:
        if args.items and items not in args.items:
            continue
        generator = torch.Generator(device="cuda").manual_seed(positions + items)
        h = torch.randn(positions, DIM, device="cuda", generator=generator).bfloat16()  # LayerNorm-like states
        w = (0.2 * torch.randn(items, DIM, device="cuda", generator=generator)).bfloat16()  # score std ~2.3
        t = torch.randint(1, items, (positions,), device="cuda", generator=generator)
        reference = float64_reference(h, w, t)
        results = {}
        for name, fn in candidates.items():
            if name == "plain_bf16" and positions * items > 2**32:
                continue
            results[name] = measure(fn, h, w, t, reference, with_padding_column=name in WITH_PADDING_COLUMN)
            print(f"N={positions:>7,} V={items:>9,} {name:>12}: {results[name]}", flush=True)
        rows.append(dict(positions=positions, items=items, device=device, results=results,
                         tuning=tune(h, w, t, reference) if args.tune else None))
        output.write_text(json.dumps(dict(torch=torch.__version__, triton=triton.__version__, rows=rows), indent=1))
    plot(rows, output.with_suffix(".png"))
    names = list(candidates)
    print(f"\n{'N':>8} {'V':>10} " + " ".join(f"{n:>13}" for n in names) + "   (ms fwd+bwd; peak GiB; grad err)")
    for row in rows:
        cells = []
        for name in names:
            r = row["results"].get(name)
            cells.append("-" if not r or r["ms"] is None else f"{r['ms']:.1f}")
        print(f"{row['positions']:>8,} {row['items']:>10,} " + " ".join(f"{c:>13}" for c in cells))
        cells = []
        for name in names:
            r = row["results"].get(name)
            cells.append("-" if not r or r["ms"] is None else
                         f"{r['peak_gib']:.2f}/{max(r['errors']['grad_hidden'], r['errors']['grad_weight']):.0e}")
        print(f"{'':>19} " + " ".join(f"{c:>13}" for c in cells))


if __name__ == "__main__":
    main()
