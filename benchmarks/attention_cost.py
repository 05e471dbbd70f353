"""What one attention step (forward + backward) has to compute, counted kernel by kernel: BlossomRec's five Triton
attention kernels, as their loops and the launch plan (`_Plan`, `TUNING`) make them, against dense causal flash
attention on the same packed batch (the module benchmark's: 131,072 tokens of equal histories, 8 heads, 2 kv heads,
head dim 16). No GPU needed: the counts come from the geometry.

Per kernel: score pairs (query row x key; what a tile computes, masked or not), matmul FLOPs on the tensor cores
(`tl.dot`) and on the CUDA cores (the gathered loops' elementwise products), exponentials, HBM bytes (each tensor the
kernel reads or writes, once) and the bytes the gathered loops load row by row (served by L1/L2). With `--profile`
(blossom_triton's output of `profile_attention.py` or `tune_kernels.py`, then sdpa's of `profile_attention.py`) it
adds each kernel's measured CUDA time, its rates, and (from profile_attention.py) the time outside the attention
kernels: projections, RoPE, compressor, gates, sort.

    python benchmarks/attention_cost.py [--lengths 1024 4096 16384] [--profile blossom.txt sdpa.txt]
"""

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from blossomrec_hf.model.blossom_attention_triton import TUNING, _Plan  # noqa: E402
from blossomrec_hf.model.configuration_blossomrec import BlossomRecConfig  # noqa: E402
from blossomrec_hf.model.sparse_patterns import SparseGeometry  # noqa: E402

TOKENS = 131_072
BF16, F32, I32 = 2, 4, 4
BLOSSOM_KERNELS = ("compressed_forward", "sparse_forward", "backward_dq", "sparse_backward_dkdv",
                   "compressed_backward_dkdv")
TUNE_COLUMNS = dict(cfwd="compressed_forward", sfwd="sparse_forward", dq="backward_dq", sdkdv="sparse_backward_dkdv",
                    cdkdv="compressed_backward_dkdv")
TARGETS = {1024: 1.0, 4096: 0.5, 16384: 0.2}  # the module's time over dense's, as issue 13 asks (graph mode)
DENSE_KERNEL = re.compile(r"sdpa|flash|fmha", re.IGNORECASE)


@dataclass
class Work:
    pairs: int = 0
    tensor_flops: int = 0
    core_flops: int = 0
    exps: int = 0
    hbm_bytes: int = 0
    gathered_bytes: int = 0

    def add(self, pairs: int, flops_per_pair: int, exps_per_pair: int = 1, tensor: bool = True) -> None:
        """`pairs` score pairs, each costing `flops_per_pair` matmul FLOPs and `exps_per_pair` exponentials."""
        self.pairs += pairs
        self.exps += pairs * exps_per_pair
        if tensor:
            self.tensor_flops += pairs * flops_per_pair
        else:
            self.core_flops += pairs * flops_per_pair

    def scaled(self, factor: int) -> "Work":
        return Work(**{f.name: getattr(self, f.name) * factor for f in fields(self)})

    def __add__(self, other: "Work") -> "Work":
        return Work(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


def make_plan(length: int, config: BlossomRecConfig) -> _Plan:
    """The launch plan the module builds for a packed batch of equal histories (tensors on the meta device)."""
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = torch.empty(TOKENS // length * length, heads, dim, dtype=torch.bfloat16, device="meta")
    k = torch.empty(q.shape[0], kv_heads, dim, dtype=torch.bfloat16, device="meta")
    cu = torch.empty(TOKENS // length + 1, dtype=torch.int32, device="meta")
    plan = _Plan(q, k, cu, cu, length, SparseGeometry.from_config(config))
    if plan.one_pass:
        raise SystemExit(f"attention_cost.py: L={length} takes the one-pass kernels, which are not counted here "
                         "(use L > 256)")
    return plan


def far_blocks(plan: _Plan, blocks_away: int) -> int:
    """How many of STIS's far block visits (P_FAR << i blocks away) fit within `blocks_away` blocks."""
    return sum((plan.stis["P_FAR"] << i) <= blocks_away for i in range(plan.stis["n_far"]))


def stis_visits(plan: _Plan, blk: int) -> int:
    """Key blocks before query block `blk` that its STIS tiles visit: the near ones, then the far powers of two."""
    return min(plan.stis["M_NEAR"], blk) + far_blocks(plan, blk)


def compressed_forward(plan: _Plan, length: int) -> Work:
    """Per history and kv head: pass 1 (the compressed branch) and pass 2 (selection scores, SPAN compressed tiles
    per selection tile, per head) for each program of BM positions x G heads."""
    work, d = Work(), plan.block_d
    (bm, bw), g, w_all = plan.forward_tile, plan.group, plan.num_compressed
    for m0 in range(0, length, bm):
        last = min(m0 + bm, length) - 1
        visible = min(last // plan.common["SEL_B"], w_all)
        work.add(g * bm * math.ceil(visible / bw) * bw, 4 * d)  # scores, p @ cv
        selectable = last // plan.common["SEL_B"]
        work.add(g * bm * math.ceil(selectable / bw) * bw * plan.span, 2 * d)  # scores again, per overlap
    return work


def query_block_work(plan: _Plan, flops: int) -> tuple[Work, int]:
    """What `sparse_forward` and `backward_dq` share per history and kv head, for `flops` per pair and head dim (4
    forward: scores, P V; 6 backward: scores, dP, dS K): each query block's gathered selected keys (CUDA cores), its
    own block (one score tile for two branches) and its STIS block visits; and the rows of a query block."""
    work, d, size = Work(), plan.block_d, plan.common["SEL_B"]
    rows = size * plan.group
    for blk in range(plan.num_blocks):
        work.add(rows * plan.num_selected * size, flops * d, tensor=False)
        work.add(rows * size, (2 * flops - 2) * d, exps_per_pair=2)  # the scores once, the rest per branch
        work.add(rows * size * stis_visits(plan, blk), flops * d)
    work.gathered_bytes = plan.num_blocks * rows * plan.num_selected * size * 2 * d * BF16
    return work, rows


def sparse_forward(plan: _Plan, length: int) -> Work:
    return query_block_work(plan, 4)[0]


def backward_dq(plan: _Plan, length: int) -> Work:
    """The forward's pairs again, plus the compressed keys that all rows of a query block see, in tiles of
    dq_keys."""
    work, rows = query_block_work(plan, 6)
    for blk in range(plan.num_blocks):
        visible = min(blk, plan.num_compressed)
        work.add(rows * math.ceil(visible / plan.dq_keys) * plan.dq_keys, 6 * plan.block_d)
    return work


def selections(plan: _Plan, length: int) -> int:
    """Valid selected blocks of one history and kv head: position t may select among its t // b earlier blocks."""
    size = plan.common["SEL_B"]
    return sum(min(plan.num_selected, t // size) for t in range(length))


def sparse_backward_dkdv(plan: _Plan, length: int) -> Work:
    """Per history and kv head, key-centric: each key block's own query block (LTIS and STIS: two tiles), the later
    query blocks whose STIS offsets reach it, and the queries that selected it (their q and dO rows gathered through
    the reverse index, in chunks whose last one is partly empty: not counted)."""
    work, d, size = Work(), plan.block_d, plan.common["SEL_B"]
    rows = size * plan.group
    for blk in range(plan.num_blocks):
        later = plan.num_blocks - 1 - blk
        work.add(rows * size * (2 + min(plan.stis["M_NEAR"], later) + far_blocks(plan, later)), 8 * d)
    selected = selections(plan, length)
    work.add(selected * plan.group * size, 8 * d)
    work.gathered_bytes = selected * plan.group * (2 * d * BF16 + 2 * F32)  # q, dO, lse, delta per selecting row
    return work


def compressed_backward_dkdv(plan: _Plan, length: int) -> Work:
    """Per history and kv head, key-centric: each tile of dkdv_keys compressed keys against the row tiles of the
    queries that see its first key (t >= (w0 + 1) b) up to the history's end (segment boundaries not counted)."""
    work, d, size = Work(), plan.block_d, plan.common["SEL_B"]
    bm, bw = plan.dkdv_tile
    for w0 in range(0, plan.num_compressed, bw):
        first = (w0 + 1) * size
        work.add(plan.group * bm * math.ceil(max(length - first, 0) / bm) * bw, 8 * d)
    return work


def blossom_bytes(plan: _Plan) -> dict[str, int]:
    """HBM bytes of each kernel over the batch: every tensor it reads or writes, once (compressed keys and the
    index tensors included; the gathered rows' repeated loads are `gathered_bytes`)."""
    t, h, hkv, n, d = plan.tokens, plan.heads, plan.kv_heads, plan.num_selected, plan.dim
    q = t * h * d * BF16
    kv = 2 * t * hkv * d * BF16
    ckv = 2 * plan.num_compressed * (t // plan.max_length) * hkv * d * BF16
    lse = t * h * F32
    index = t * hkv * n * I32
    csr = index + hkv * t * I32  # flat query list, offsets per (kv head, token row)
    return {
        "compressed_forward": q + ckv + q + lse + 2 * index,
        "sparse_forward": q + kv + index + 2 * (q + lse),
        "backward_dq": q + kv + index + ckv + 3 * (2 * q + 2 * lse) + q,  # O, dO, lse, delta per branch; dq
        "sparse_backward_dkdv": q + kv + 2 * (q + 2 * lse) + csr + kv,
        "compressed_backward_dkdv": q + ckv + q + 2 * lse + ckv,
    }


def blossom_work(length: int, config: BlossomRecConfig) -> dict[str, Work]:
    plan = make_plan(length, config)
    histories = TOKENS // length
    counters = dict(compressed_forward=compressed_forward, sparse_forward=sparse_forward, backward_dq=backward_dq,
                    sparse_backward_dkdv=sparse_backward_dkdv, compressed_backward_dkdv=compressed_backward_dkdv)
    work = {name: count(plan, length).scaled(histories * plan.kv_heads) for name, count in counters.items()}
    for name, size in blossom_bytes(plan).items():
        work[name].hbm_bytes = size
    return work


def dense_work(length: int, config: BlossomRecConfig) -> dict[str, Work]:
    """Flash attention's two kernels at their minimum: every causal pair once forward (scores, P V) and once
    backward (scores, dP, dV, dK, dQ), no masked pairs of the diagonal tiles."""
    d, h, hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    histories = TOKENS // length
    pairs = histories * h * length * (length + 1) // 2
    q, kv, lse = TOKENS * h * d * BF16, 2 * TOKENS * hkv * d * BF16, TOKENS * h * F32
    forward, backward = Work(), Work()
    forward.add(pairs, 4 * d)
    backward.add(pairs, 10 * d)
    forward.hbm_bytes = q + kv + q + lse
    backward.hbm_bytes = q + kv + 2 * q + 2 * lse + q + kv
    return {"flash_forward": forward, "flash_backward": backward}


def read_profile(path: Path) -> dict[tuple[int, bool], dict[str, float]]:
    """profile_attention.py's output -> {(L, compiled): {kernel: CUDA ms per step, 'total': ms}}; or
    tune_kernels.py's -> {(L, False): {kernel: ms}} from its `base` rows (the attention kernels alone)."""
    sections, current, columns = {}, None, None
    for line in path.read_text().splitlines():
        header = re.match(r"(?:== \S+ )?L=(\d+)( compiled)?:", line)
        if header:
            current = sections.setdefault((int(header.group(1)), bool(header.group(2))), {})
            continue
        if line.split()[:1] == ["variant"]:
            columns = [TUNE_COLUMNS.get(name, name) for name in line.split()[1:]]
        elif columns and line.split()[:1] == ["base"] and current is not None:
            current.update((name, float(ms)) for name, ms in zip(columns, line.split()[1:]) if name in BLOSSOM_KERNELS)
        row = re.match(r"\s*([\d.]+)\s+(?:\d+x\s+(.*)|total CUDA time)", line)
        if current is not None and row:
            current[row.group(2).strip() if row.group(2) else "total"] = float(row.group(1))
    return sections


def profiled_ms(sections, length: int, kernels) -> dict[str, float] | None:
    """Measured CUDA ms of `kernels` (names, or a pattern) at `length`, compiled where profiled, and of the rest."""
    found = sections.get((length, True)) or sections.get((length, False))
    if not found:
        return None
    pick = (lambda name: name in kernels) if isinstance(kernels, tuple) else (lambda name: bool(kernels.search(name)))
    times = {name: ms for name, ms in found.items() if name != "total" and pick(name)}
    if "total" in found:
        times["outside the attention kernels"] = found["total"] - sum(times.values())
    return times


def rows_for(length: int, config, profiles) -> list[dict]:
    blossom, dense = blossom_work(length, config), dense_work(length, config)
    measured = {"blossom": profiled_ms(profiles[0], length, BLOSSOM_KERNELS) if profiles else None,
                "dense": profiled_ms(profiles[1], length, DENSE_KERNEL) if len(profiles) > 1 else None}
    rows = [dict(model="blossom", kernel=name, **asdict(w)) for name, w in blossom.items()]
    rows += [dict(model="dense", kernel=name, **asdict(w)) for name, w in dense.items()]
    for model, times in measured.items():
        if times and model == "dense":  # the flash kernels' names vary by backend: one row for all of them
            total = sum(ms for name, ms in times.items() if name != "outside the attention kernels")
            for row in rows:
                if row["model"] == "dense":
                    row["ms"] = total * row["tensor_flops"] / sum(w.tensor_flops for w in dense.values())
        elif times:
            for row in rows:
                if row["model"] == model:
                    row["ms"] = times.get(row["kernel"])
        if times and "outside the attention kernels" in times:
            rows.append(dict(model=model, kernel="outside the attention kernels",
                             ms=times["outside the attention kernels"]))
    for row in rows:
        row["length"] = length
    return rows


def totals(rows: list[dict], model: str) -> dict:
    picked = [r for r in rows if r["model"] == model and "pairs" in r]
    total = {f.name: sum(r[f.name] for r in picked) for f in fields(Work)}
    whole = any("pairs" not in r for r in rows if r["model"] == model)  # the time outside the kernels is known
    total["ms"] = sum(r.get("ms") or 0 for r in rows if r["model"] == model) if whole else None
    total["kernel_ms"] = sum(r.get("ms") or 0 for r in picked) or None
    return total


def kernel_table(rows: list[dict]) -> list[str]:
    lines = ["| L | model | kernel | pairs M | tensor GFLOP | CUDA-core GFLOP | exp M | HBM MB | gathered MB | ms |"
             " tensor TFLOP/s | CUDA-core TFLOP/s |", "|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        ms = r.get("ms")
        if "pairs" not in r:
            lines.append(f"| {r['length']} | {r['model']} | {r['kernel']} |  |  |  |  |  |  | {ms:.3f} |  |  |")
            continue
        rate = (lambda flops: f"{flops / ms / 1e9:.1f}" if ms and flops else "")
        lines.append(f"| {r['length']} | {r['model']} | {r['kernel']} | {r['pairs'] / 1e6:.0f}"
                     f" | {r['tensor_flops'] / 1e9:.1f} | {r['core_flops'] / 1e9:.1f} | {r['exps'] / 1e6:.0f}"
                     f" | {r['hbm_bytes'] / 1e6:.0f} | {r['gathered_bytes'] / 1e6:.0f}"
                     f" | {'' if ms is None else f'{ms:.3f}'} | {rate(r['tensor_flops'])} | {rate(r['core_flops'])} |")
    return lines


def ratio_table(summaries: list[dict]) -> list[str]:
    keys = ("pairs", "tensor_flops", "all_flops", "exps", "hbm_bytes", "kernel_ms", "ms")
    lines = ["| L | pairs | tensor FLOPs | all FLOPs | exps | HBM bytes | kernel ms | module ms |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for s in summaries:
        lines.append(f"| {s['length']} | " + " | ".join(f"{s['ratios'][key]:.3f}" if key in s["ratios"] else ""
                                                        for key in keys) + " |")
    return lines


def summary(length: int, rows: list[dict]) -> dict:
    """BlossomRec over dense for each count, and for the measured kernel and whole-step times where profiled."""
    blossom, dense = totals(rows, "blossom"), totals(rows, "dense")
    ratios = {key: blossom[key] / dense[key] for key in ("pairs", "tensor_flops", "exps", "hbm_bytes")}
    ratios["all_flops"] = (blossom["tensor_flops"] + blossom["core_flops"]) / dense["tensor_flops"]
    if blossom["kernel_ms"] and dense["kernel_ms"]:
        ratios["kernel_ms"] = blossom["kernel_ms"] / dense["kernel_ms"]
    if blossom["ms"] and dense["ms"]:
        ratios["ms"] = blossom["ms"] / dense["ms"]
    return dict(length=length, blossom=blossom, dense=dense, ratios=ratios)


def plot(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    lengths = [s["length"] for s in summaries]
    for key, style in (("pairs", "-o"), ("all_flops", "-s"), ("exps", "-^"), ("kernel_ms", "--o"), ("ms", "--s")):
        points = [(s["length"], s["ratios"][key]) for s in summaries if key in s["ratios"]]
        if points:
            axis.plot(*zip(*points), style, label=key.replace("_", " "))
    targets = [(length, TARGETS[length]) for length in lengths if length in TARGETS]
    if targets:
        axis.plot(*zip(*targets), "k*", markersize=10, label="target (module time)")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks(lengths, [str(length) for length in lengths])
    axis.set_xlabel("history length L (131,072 tokens per batch)")
    axis.set_ylabel("BlossomRec / dense flash attention")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--profile", type=Path, nargs="+", default=[],
                        help="blossom_triton's profile_attention.py (or tune_kernels.py) output, then sdpa's")
    parser.add_argument("--output-dir", default="benchmarks/results")
    args = parser.parse_args()
    config = BlossomRecConfig()
    profiles = [read_profile(path) for path in args.profile]
    rows, summaries = [], []
    for length in args.lengths:
        found = rows_for(length, config, profiles)
        rows += found
        summaries.append(summary(length, found))
    text = "\n".join(kernel_table(rows) + ["", "BlossomRec / dense:", ""] + ratio_table(summaries)) + "\n"
    print(text, end="")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "attention_cost.json").write_text(json.dumps(dict(tuning=TUNING, rows=rows, summaries=summaries),
                                                           indent=1))
    (output / "attention_cost.txt").write_text(text)
    plot(summaries, output / "attention_cost.png")


if __name__ == "__main__":
    main()
