"""GPU correctness sweep of the fused Triton BlossomRec attention against a float64 reference.

For each case (batch, length, group size, head dim, compressed branch on/off, dtype) the kernel's outputs and the
gradients of q, k, v, ck, cv are compared with the exact sparse attention computed in float64 on the same input
values. The selected branch of the reference uses the kernel's own block indices (block selection is a top-n, so
a near-tie can legitimately flip between float32 and float64); how often the kernel's selection equals the float64
selection is reported separately. Tie cases give the compressed keys exactly tied scores (queries on a grid of eighths,
so every product is exact whatever the summation order; every block tied, or every fifth block tied above the
rest) at several key-tile sizes: the kernel's selection must equal the reference's, which breaks ties towards the
earlier block, for every query. Model-level cases run `BlossomRecForSequentialRecommendation` with
`blossom_triton` against `blossom_torch` on the same weights, left and right padding. Varlen cases pack 20-60
histories of heavy-tailed lengths (log-uniform in 1..4,100, some starting on a block boundary) into one token list
and compare `blossom_attention_triton_varlen` (forward and backward) with the float64 reference taken history by
history; they repeat with histories of at most 256 items, which run the one-pass kernels (what `blossom_attention_torch_varlen` computes), on the kernel's block indices as for kernel cases.

    python scripts/check_triton_attention.py [--workers 8] [--kind ties] [--output benchmarks/results/triton_correctness.json]
    python scripts/check_triton_attention.py --kind varlen --output benchmarks/results/triton_varlen.json \
        | tee benchmarks/results/triton_varlen.txt

Every kernel case also runs twice: outputs and gradients must be bitwise equal (the backward has no atomics).
Cases run in `--workers` processes on the one GPU: most of the time goes to compiling the kernels for each shape,
which is CPU work.
"""

import argparse
import json
import math
import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
from blossomrec_hf.model.blossom_attention_torch import (
    attend_gathered,
    select_blocks,
    compressed_probabilities,
    gather_positions,
    selected_keys,
    selection_scores,
    stis_keys,
    top_blocks,
)
from blossomrec_hf.model import blossom_attention_triton as triton_backend
from blossomrec_hf.model.blossom_attention_triton import (
    blossom_attention_triton,
    blossom_attention_triton_varlen,
    select_blocks_triton,
    select_blocks_triton_varlen,
)
from blossomrec_hf.model.sparse_patterns import SparseGeometry

GEOMETRY = SparseGeometry(compress_block_size=32, compress_stride=16, selection_block_size=16,
                          num_selected_blocks=4, stis_window=8)
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2}
KINDS = ["kernel", "ties", "model", "varlen"]
# varlen cases: dtype, compressed branch, heads per kv head, head dim (float32 keeps group x head dim <= 512)
SHORT_LONGEST = 256  # 16 selection blocks: the one-pass kernels' default limit
VARLEN_CASES = [("float32", True, 1, 128), ("float32", True, 4, 16), ("float32", False, 1, 32),
                ("float32", False, 4, 64), ("bfloat16", True, 1, 64), ("bfloat16", True, 4, 128),
                ("bfloat16", False, 1, 16), ("bfloat16", False, 4, 32)]


def reference_float64(q, k, v, ck, cv, geometry, block_indices):
    """Exact BlossomRec branches in float64 (unchunked), the selected branch on the given block indices."""
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.view(batch, kv_heads, heads // kv_heads, length, dim)
    positions = torch.arange(length, device=q.device)
    probs = compressed_probabilities(qg, ck, positions, geometry)
    key_positions, valid = selected_keys(block_indices.long(), positions, geometry)
    selected = attend_gathered(qg, gather_positions(k, key_positions), gather_positions(v, key_positions), valid)
    key_positions, valid = stis_keys(positions, length, geometry)
    stis = attend_gathered(qg, gather_positions(k, key_positions), gather_positions(v, key_positions), valid)
    outputs = [selected, stis] + ([torch.einsum("bhgcw,bhwd->bhgcd", probs, cv)] if cv is not None else [])
    with torch.no_grad():
        best = top_blocks(selection_scores(probs, positions, length, geometry), geometry.num_selected_blocks)
    return [o.reshape(batch, heads, length, dim) for o in outputs], best


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def same_sets(a, b):
    """Fraction of (batch, kv head, query) rows whose selected block sets agree."""
    width = max(a.shape[-1], b.shape[-1])
    a = torch.nn.functional.pad(a.long(), (0, width - a.shape[-1]), value=-1).sort(-1).values
    b = torch.nn.functional.pad(b.long(), (0, width - b.shape[-1]), value=-1).sort(-1).values
    return (a == b).all(-1).float().mean().item()


def kernel_case(batch, length, group, dim, compressed, dtype, seed, device):
    generator = torch.Generator(device=device).manual_seed(seed)
    kv_heads = 2
    heads = kv_heads * group
    width = GEOMETRY.num_compressed_blocks(length)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=generator).to(dtype)

    inputs = [rand(batch, heads, length, dim), rand(batch, kv_heads, length, dim), rand(batch, kv_heads, length, dim),
              rand(batch, kv_heads, width, dim)] + ([rand(batch, kv_heads, width, dim)] if compressed else [])
    kernel_inputs = [x.clone().requires_grad_() for x in inputs]
    q, k, v, ck = kernel_inputs[:4]
    cv = kernel_inputs[4] if compressed else None
    outputs = [o for o in blossom_attention_triton(q, k, v, ck, cv, GEOMETRY) if o is not None]
    block_indices = select_blocks_triton(q.detach(), ck.detach(), GEOMETRY)
    weights = [torch.randn(o.shape, device=device, generator=generator, dtype=torch.float64) for o in outputs]
    grads = torch.autograd.grad(sum((w * o.double()).sum() for w, o in zip(weights, outputs)), kernel_inputs,
                                allow_unused=True)
    repeat_outputs = [o for o in blossom_attention_triton(q, k, v, ck, cv, GEOMETRY) if o is not None]
    repeat_grads = torch.autograd.grad(sum((w * o.double()).sum() for w, o in zip(weights, repeat_outputs)),
                                       kernel_inputs, allow_unused=True)
    bitwise = all(torch.equal(a, b) for a, b in zip(outputs + list(grads), repeat_outputs + list(repeat_grads))
                  if a is not None)

    ref_inputs = [x.double().requires_grad_() for x in inputs]
    q64, k64, v64, ck64 = ref_inputs[:4]
    ref_outputs, ref_selection = reference_float64(q64, k64, v64, ck64, ref_inputs[4] if compressed else None,
                                                   GEOMETRY, block_indices)
    ref_grads = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, ref_outputs)), ref_inputs,
                                    allow_unused=True)
    errors = {name: relative_error(o, r) for name, o, r in zip(["selected", "stis", "compressed"], outputs,
                                                                  ref_outputs)}
    for name, g, r in zip(["dq", "dk", "dv", "dck", "dcv"], grads, ref_grads):
        if r is not None and r.norm() > 0:
            errors[name] = relative_error(g, r)
    return errors, same_sets(block_indices, ref_selection), bitwise


def packed_lengths(rng: random.Random, count: int, longest: int) -> list[int]:
    """Heavy-tailed history lengths, log-uniform in 1..longest, with one history of length 1 and one of `longest`;
    every fifth history is lengthened (by < one block) so that the next one starts on a block boundary."""
    lengths = [max(1, round(math.exp(rng.uniform(0, math.log(longest))))) for _ in range(count)]
    lengths[0], lengths[1] = 1, longest
    for index in range(2, count - 1, 5):
        lengths[index] += -sum(lengths[:index + 1]) % GEOMETRY.selection_block_size
    return lengths


def packed_float64_reference(inputs, weights, block_indices, lengths, counts):
    """Outputs and input gradients of packed histories in float64, each history alone (memory stays that of the
    longest), the selected branch on the kernel's block indices; and the share of (token, kv head) rows whose float64
    selection equals the kernel's."""
    outputs, grads, agreement = [], [], 0.0
    token, block = 0, 0
    for length, count in zip(lengths, counts):
        rows, blocks = slice(token, token + length), slice(block, block + count)
        token, block = token + length, block + count
        one = [x[r].double().transpose(0, 1)[None].requires_grad_()
               for x, r in zip(inputs, (rows, rows, rows, blocks, blocks))]
        chosen = block_indices[rows].transpose(0, 1)[None]
        history_outputs, best = reference_float64(*one[:4], one[4] if len(one) > 4 else None, GEOMETRY, chosen)
        history_outputs = [o[0].transpose(0, 1) for o in history_outputs]
        history_grads = torch.autograd.grad(sum((w[rows] * o).sum() for w, o in zip(weights, history_outputs)), one,
                                            allow_unused=True)
        outputs.append([o.detach() for o in history_outputs])
        grads.append([None if g is None else g[0].transpose(0, 1) for g in history_grads])
        agreement += same_sets(chosen, best) * length
    return ([torch.cat(parts) for parts in zip(*outputs)],
            [None if parts[0] is None else torch.cat(parts) for parts in zip(*grads)], agreement / sum(lengths))


def varlen_case(histories, longest, group, dim, compressed, dtype, seed, device):
    """Kernel errors, selection agreement and bitwise repeatability on one packed batch (see the module doc)."""
    lengths = packed_lengths(random.Random(seed), histories, longest)
    counts = [GEOMETRY.num_compressed_blocks(n) for n in lengths]
    sizes = dict(cu_seqlens=torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32),
                 cu_compressed=torch.tensor([0] + counts, device=device).cumsum(0).to(torch.int32),
                 max_length=max(lengths), geometry=GEOMETRY)
    generator = torch.Generator(device=device).manual_seed(seed)
    kv_heads = 2
    tokens, width = sum(lengths), sum(counts)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=generator).to(dtype)

    inputs = [rand(tokens, kv_heads * group, dim), rand(tokens, kv_heads, dim), rand(tokens, kv_heads, dim),
              rand(width, kv_heads, dim)] + ([rand(width, kv_heads, dim)] if compressed else [])
    kernel_inputs = [x.clone().requires_grad_() for x in inputs]
    weights = [torch.randn(tokens, kv_heads * group, dim, device=device, generator=generator, dtype=torch.float64)
               for _ in range(3)]

    def run():
        outputs = [o for o in blossom_attention_triton_varlen(*kernel_inputs[:4], kernel_inputs[4] if compressed
                                                              else None, **sizes) if o is not None]
        grads = torch.autograd.grad(sum((w * o.double()).sum() for w, o in zip(weights, outputs)), kernel_inputs,
                                    allow_unused=True)
        return outputs + list(grads)

    first, second = run(), run()
    bitwise = all(torch.equal(a, b) for a, b in zip(first, second) if a is not None)
    block_indices = select_blocks_triton_varlen(kernel_inputs[0].detach(), kernel_inputs[3].detach(), **sizes)
    ref_outputs, ref_grads, agreement = packed_float64_reference(inputs, weights, block_indices, lengths, counts)
    names = ["selected", "stis", "compressed"][:len(ref_outputs)] + ["dq", "dk", "dv", "dck", "dcv"]
    errors = {name: relative_error(got, want) for name, got, want in zip(names, first, ref_outputs + ref_grads)
              if want is not None and want.norm() > 0}
    return errors, agreement, bitwise, tokens, max(lengths)


def tie_case(batch, length, group, dim, dtype, key_tile, seed, device):
    """Fraction of queries whose kernel selection equals the reference's on exactly tied compressed scores.

    Compressed keys take a few exact values, so scores fall into classes of exact ties: row 0 all zero (every visible
    block ties), row 1 every fifth key 0.5 and the rest zero, row 2 also every third key -0.25. With `key_tile` keys
    per tile the running top-n merges many tiles, so ties span tiles. The reference is `select_blocks` in float64:
    a stable sort, the earlier block first on ties.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    kv_heads = 2
    width = GEOMETRY.num_compressed_blocks(length)
    q = torch.randint(-16, 17, (batch, kv_heads * group, length, dim), device=device, generator=generator) / 8
    ck = torch.zeros(batch, kv_heads, width, dim, device=device)
    ck[1:, :, ::5] = 0.5
    ck[2:, :, ::3] = -0.25
    previous = triton_backend.TUNING["forward_keys"], triton_backend.TUNING["forward_keys_long"]
    triton_backend.TUNING["forward_keys"] = triton_backend.TUNING["forward_keys_long"] = key_tile
    try:
        chosen = select_blocks_triton(q.to(dtype), ck.to(dtype), GEOMETRY)
    finally:
        triton_backend.TUNING["forward_keys"], triton_backend.TUNING["forward_keys_long"] = previous
    return same_sets(chosen, select_blocks(q.double(), ck.double(), GEOMETRY))


def model_loss_and_gradients(config, ids, implementation, dtype, seed):
    torch.manual_seed(seed)
    model = BlossomRecForSequentialRecommendation(config).to(ids.device).train()
    model.set_attn_implementation(implementation)
    with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def gradient_error(grads, reference) -> tuple[float, str]:
    """Worst relative error over the parameters, and which parameter.

    A gradient that is zero in exact arithmetic is rounding noise in both runs, so its relative error means nothing
    (the compressed keys' output bias shifts all compressed scores of a query equally: softmax ignores it, and
    selection is discrete); such gradients are measured against the scale of the largest one instead.
    """
    scale = max(g.norm().item() for g in reference.values())
    errors = {n: ((grads[n].double() - g.double()).norm() / max(g.norm().item(), 1e-6 * scale, 1e-300)).item()
              for n, g in reference.items()}
    worst = max(errors, key=errors.get)
    return errors[worst], worst


def model_case(length, side, dtype, seed, device):
    """Loss and every parameter's gradient of the whole model with blossom_triton, padding on `side`.

    float32: against blossom_torch in float32. bfloat16 (autocast): a bf16 model's gradients are themselves far from
    the float32 ones (blossom_torch in bf16 is 0.2-1.3 relative off its own float32 gradients at L >= 200, on the
    CPU too), so the two backends in bf16 are each compared with blossom_torch in float32, and the kernel passes when
    its error is within 1.5x the reference's (or 1e-2); the losses must agree within 1e-2.

    Weights are drawn 10x wider than the default initialisation (std 0.2, not 0.02): at the default, every query's
    compressed scores are nearly equal, so which blocks win the top-n is decided by rounding, and two exact
    implementations legitimately select different blocks for some queries (seen at L = 1000: float32 gradients then
    differ by ~4e-3 on the GPU and under the CPU interpreter alike, and by ~5e-5 with std 0.2).
    """
    config = BlossomRecConfig(n_items=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=128, hidden_dropout_prob=0.0,
                              initializer_range=0.2)
    ids = torch.randint(1, 501, (3, length), generator=torch.Generator().manual_seed(seed))
    for row, keep in enumerate([length, max(1, length // 2), max(1, length - 5)]):
        if side == "left":
            ids[row, :length - keep] = 0
        else:
            ids[row, keep:] = 0
    ids = ids.to(device)
    loss_ref, grads_ref = model_loss_and_gradients(config, ids, "blossom_torch", torch.float32, seed)
    loss, grads = model_loss_and_gradients(config, ids, "blossom_triton", dtype, seed)
    errors = {}
    errors["grads"], errors["worst_parameter"] = gradient_error(grads, grads_ref)
    if dtype == torch.float32:
        errors["loss"] = relative_error(loss, loss_ref)
        return errors, max(errors["loss"], errors["grads"]) <= TOLERANCE[dtype]
    loss_low, grads_low = model_loss_and_gradients(config, ids, "blossom_torch", dtype, seed)
    errors["loss"] = relative_error(loss, loss_low)
    errors["reference_grads"] = gradient_error(grads_low, grads_ref)[0]
    passed = errors["loss"] <= TOLERANCE[dtype] and errors["grads"] <= max(TOLERANCE[dtype],
                                                                           1.5 * errors["reference_grads"])
    return errors, passed


def cases(seed: int):
    """Every length in fp32 and bf16; group sizes and head dims cycle through a few pairs per dtype (each pair
    compiles the kernels once; lengths and batch sizes do not recompile). Exact (non-tf32) float32 dot products take
    one to two minutes to compile at head dims 48..128, which the worker processes absorb."""
    rng = random.Random(seed)
    lengths = [1, 2, 3, 7, 15, 16, 17, 31, 33, 50, 63, 100, 129, 200, 257, 511, 777, 1000, 1024, 1500, 2047, 2048]
    shapes = {torch.float32: [(4, 16), (1, 32), (8, 16), (2, 64), (1, 128), (2, 48)],
              torch.bfloat16: [(4, 16), (2, 48), (1, 64), (4, 128), (8, 32)]}
    for index, length in enumerate(lengths):
        for dtype in (torch.float32, torch.bfloat16):
            group, dim = shapes[dtype][index % len(shapes[dtype])]
            batch = rng.randint(1, 8) if length <= 1024 else rng.randint(1, 3)
            yield batch, length, group, dim, index % 4 != 3, dtype


def run_case(case):
    """One case in a worker process: its result row."""
    torch.set_float32_matmul_precision(case["float32_matmul_precision"])  # float32 dots: exact, or TF32 passes
    if case["kind"] == "kernel":
        start = time.time()
        dtype = getattr(torch, case["dtype"])
        errors, agreement, bitwise = kernel_case(case["batch"], case["length"], case["group"], case["head_dim"],
                                        case["compressed"], dtype, case["seed"], case["device"])
        return dict(case, errors=errors, selection_agreement=agreement, bitwise_repeatable=bitwise,
                    passed=max(errors.values()) <= TOLERANCE[dtype] and bitwise, seconds=round(time.time() - start, 2))
    dtype = getattr(torch, case["dtype"])
    if case["kind"] == "varlen":
        start = time.time()
        errors, agreement, bitwise, tokens, longest = varlen_case(
            case["histories"], case["longest"], case["group"], case["head_dim"], case["compressed"], dtype,
            case["seed"], case["device"])
        return dict(case, tokens=tokens, longest=longest, errors=errors, selection_agreement=agreement,
                    bitwise_repeatable=bitwise, passed=max(errors.values()) <= TOLERANCE[dtype] and bitwise,
                    seconds=round(time.time() - start, 2))
    if case["kind"] == "ties":
        agreement = tie_case(case["batch"], case["length"], case["group"], case["head_dim"], dtype, case["key_tile"],
                             case["seed"], case["device"])
        return dict(case, selection_agreement=agreement, passed=agreement == 1.0)
    errors, passed = model_case(case["length"], case["padding"], dtype, case["seed"], case["device"])
    return dict(case, errors=errors, passed=passed)


def all_cases(seed: int, device: str, limit: int | None) -> list[dict]:
    rows = [dict(kind="kernel", batch=batch, length=length, group=group, head_dim=dim, compressed=compressed,
                 dtype=str(dtype).removeprefix("torch."), seed=seed + index, device=device)
            for index, (batch, length, group, dim, compressed, dtype) in enumerate(cases(seed))]
    rows += [dict(kind="model", length=length, padding=side, dtype=str(dtype).removeprefix("torch."), seed=length,
                  device=device)
             for length in (13, 200, 1000) for side in ("left", "right") for dtype in (torch.float32, torch.bfloat16)]
    rows += [dict(kind="ties", batch=3, length=length, group=group, head_dim=dim, dtype=dtype, key_tile=tile,
                  seed=seed + length, device=device)
             for length, group, dim in ((300, 2, 16), (1000, 4, 16), (2048, 1, 64), (4100, 8, 32))
             for dtype in ("float32", "bfloat16") for tile in (16, 64)]
    rows = rows if limit is None else [r for r in rows if r.get("length", 0) <= limit]
    rng = random.Random(seed)
    # the gathered kernels (histories up to 4,100) and the one-pass kernels of short batches (up to 16 blocks)
    longest = [min(4100, limit or 4100), min(SHORT_LONGEST, limit or SHORT_LONGEST)]
    return rows + [dict(kind="varlen", histories=rng.randint(20, 60), longest=top, group=group, head_dim=dim,
                        compressed=compressed, dtype=dtype, seed=seed + 2000 + index, device=device)
                   for top in dict.fromkeys(longest)
                   for index, (dtype, compressed, group, dim) in enumerate(VARLEN_CASES)]


def print_row(row: dict) -> None:
    if row["kind"] == "varlen":
        worst = max(row["errors"], key=row["errors"].get)
        print(f"{'varlen':>6} {row['histories']:>2} {row['tokens']:>6} {row['longest']:>5} {row['group']:>2} "
              f"{row['head_dim']:>4} {str(row['compressed'])[0]:>4} {row['dtype']:>9} {row['errors'][worst]:>10.2e} "
              f"{worst:>10} {row['selection_agreement']:>8.4f} {str(row['bitwise_repeatable']):>7} "
              f"{str(row['passed']):>5}", flush=True)
    elif row["kind"] == "kernel":
        worst = max(row["errors"], key=row["errors"].get)
        print(f"{row['batch']:>2} {row['length']:>5} {row['group']:>2} {row['head_dim']:>4} "
              f"{str(row['compressed'])[0]:>4} {row['dtype']:>9} {row['errors'][worst]:>10.2e} {worst:>10} "
              f"{row['selection_agreement']:>8.4f} {str(row['bitwise_repeatable']):>7} {str(row['passed']):>5}",
              flush=True)
    elif row["kind"] == "ties":
        print(f"{'ties':>6} {row['batch']:>2} {row['length']:>5} {row['group']:>2} {row['head_dim']:>4} "
              f"{row['dtype']:>9} tile {row['key_tile']:>3} {'':>19} {row['selection_agreement']:>8.4f} {'':>7} "
              f"{str(row['passed']):>5}", flush=True)
    else:
        reference = row["errors"].get("reference_grads")
        print(f"{'model':>6} {row['length']:>5} {row['padding']:>5} {row['dtype']:>9} {row['errors']['loss']:>9.2e} "
              f"{row['errors']['grads']:>9.2e} {'-' if reference is None else format(reference, '.2e'):>9} "
              f"{str(row['passed']):>5}  {row['errors']['worst_parameter']}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results/triton_correctness.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=8, help="processes sharing the GPU (compiles run in parallel)")
    parser.add_argument("--device", default="cuda", help="cpu runs the kernels under TRITON_INTERPRET=1 (slow)")
    parser.add_argument("--max_length", type=int, default=None,
                        help="only the cases up to this length (varlen cases: the longest history, + < one block)")
    parser.add_argument("--kind", choices=KINDS, action="append",
                        help="only cases of this kind (repeatable); all kinds by default")
    parser.add_argument("--float32_matmul_precision", choices=["highest", "high", "medium"], default="highest",
                        help="torch's setting the float32 cases run at: the kernels' float32 dots are exact at "
                             "highest, three TF32 passes at high (train.py --tf32), one at medium")
    args = parser.parse_args()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    rows = []

    def save():
        name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
        output.write_text(json.dumps(dict(device=name, triton=triton.__version__, torch=torch.__version__, cases=rows),
                                     indent=1))

    print(f"{'B':>2} {'L':>5} {'G':>2} {'D':>4} {'cmp':>4} {'dtype':>9} {'worst err':>10} {'worst of':>10} "
          f"{'sel=f64':>8} {'bitwise':>7} {'pass':>5}")
    print("model rows: L, padding side, dtype, loss error (vs blossom_torch in the same dtype), worst parameter-gradient "
          "error vs blossom_torch in float32, the same for blossom_torch in bf16, pass, worst parameter")
    print("ties rows: B, L, G, D, dtype, key tile, share of queries selecting exactly the reference's tied blocks")
    print("varlen rows: histories, tokens, longest history, G, D, cmp, dtype, worst err, worst of, sel=f64, bitwise, "
          "pass")
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        kinds = args.kind or KINDS
        chosen = [dict(c, float32_matmul_precision=args.float32_matmul_precision)
                  for c in all_cases(args.seed, args.device, args.max_length) if c["kind"] in kinds]
        for row in pool.map(run_case, chosen):
            rows.append(row)
            print_row(row)
            save()
    passed = sum(r["passed"] for r in rows)
    print(f"\n{passed}/{len(rows)} cases pass (fp32 within 1e-3, bf16 within 1e-2 relative; ties: every query's "
          f"selection equal to the reference's)")


if __name__ == "__main__":
    main()
