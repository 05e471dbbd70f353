"""Fused Triton BlossomRec attention (`attn_implementation="blossom_triton"`): exact, forward and backward.

`blossom_attention_triton_varlen` takes packed histories (q [T, H, D], k, v [T, Hkv, D], bounded by cu_seqlens, the
varlen convention of flash attention) and reads them where they lie: no history is padded in memory. Same contract
as `blossom_attention_torch_varlen`; `blossom_attention_triton` is the [B, H, L, D] form of the same kernels (every
row one history of length L). Two forward launches (compressed branch + top-n block selection; selected blocks + own
block + STIS) and up to three backward kernels, none with atomics, so gradients are bitwise reproducible run to run
(deterministic mode is always on). Short batches (`uses_one_pass`) take one-pass kernels for the selected blocks and
STIS, which visit every causal key tile once; longer ones gather each query's blocks. Forward and backward are
custom operators (custom_ops.py), so torch.compile(fullgraph=True) traces through them: the forward also returns the
softmax statistics and the selected blocks, which the backward operator takes as arguments.

Triton is optional: without it the model refuses this backend. Shapes or devices the kernels do not cover (a
geometry other than compress_stride == selection_block_size with compress_block_size a multiple of it, head dims
outside 16..128, CPU tensors without TRITON_INTERPRET=1) fall back to the PyTorch reference with a one-time warning.
"""

import math
import warnings

import torch

from .blossom_attention_torch import blossom_attention_torch_varlen
from .custom_ops import compute_dtype, define_op, dot_precision, kernels_run_on
from .sparse_patterns import SparseGeometry
from .tile_fitting import fit_tiles

try:
    import triton
except ImportError:
    triton = None

if triton is not None:
    from .triton_blossom_kernels import (
        backward_dq,
        compressed_backward_dkdv,
        compressed_forward,
        gated_sum_backward,
        gated_sum_forward,
        one_pass_backward_dkdv,
        one_pass_backward_dq,
        one_pass_forward,
        sparse_backward_dkdv,
        sparse_forward,
    )

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Launch settings, measured with benchmarks/tune_kernels.py on an H200 (head dim 16, 4 heads per kv head): query
# rows per tile and compressed keys per tile of each compressed-branch kernel, elements per gathered chunk of the
# selected-block loop, warps per kernel. Tiles are halved for head dims above 64 (register and shared memory).
# Batches whose longest history has at most `one_pass_max_blocks` selection blocks (64 at most: a row's selection is
# kept as the bits of an int64) take the one-pass kernels, `one_pass_keys` keys per score tile. Measured on H100s
# (module forward + backward, 131,072 packed tokens; two runs whose sdpa graph time agreed, 2.31 ms): one pass is
# faster at L = 200 (13 blocks: 3.91 against 4.38 ms replayed from a CUDA graph) and slower at 1,024 (64 blocks: 6.89
# against 4.53 ms), where a query block visits every earlier key block; 16 blocks (L <= 256 at the default block
# size) keeps it where it was measured to win. The one-pass dk/dv takes `one_pass_dkdv_blocks` key blocks per program:
# 4 cut that kernel from 0.60 to 0.33 ms at L = 200 on an H100 (2: 0.37; benchmarks/tune_kernels.py, seventh session).
# Eighth session, on an H200 (tune_kernels.py at L = 4,096 / 16,384): the compressed dk/dv's queries split into
# segments of `compressed_dkdv_segment` positions took that kernel from 0.27 / 1.07 ms (one segment) to 0.22 / 0.67
# (1,024: no better); at most `compressed_dkdv_max_segments`, which bounds the float32 parts' memory. A whole block
# per gathered chunk took backward_dq from 0.87 / 1.07 to 0.80 / 1.03 ms but sparse_forward from 0.48 / 0.52 to
# 0.52 / 0.57, so the two kernels have their own budgets. backward_dq keeps a partial dq per key slot of the chunk,
# summed after its loop, so its chunk's elements also size that accumulator: 4 keys per chunk (4,096 elements) took
# it from 0.81 / 1.02 to 0.71 / 0.89 ms on an H100 (thirteenth session, with its compressed part's last-tile mask);
# the same per-slot softmax in sparse_forward took 0.48 / 0.51 to 0.64 / 0.68 ms and was not kept.
TUNING = dict(forward_rows=64, forward_keys=64, forward_keys_long=128, long_from=512, dq_keys=64, dkdv_rows=128,
              dkdv_keys=64, sparse_chunk_elements=8192, dq_chunk_elements=4096, compressed_forward_warps=2,
              compressed_forward_long_warps=4, sparse_forward_warps=4, dq_warps=4, sparse_dkdv_warps=2,
              compressed_dkdv_warps=4, one_pass_max_blocks=16, one_pass_keys=32, one_pass_forward_warps=4,
              one_pass_dq_warps=4, one_pass_dkdv_warps=4, one_pass_dkdv_blocks=4, compressed_dkdv_segment=2048,
              compressed_dkdv_max_segments=8)
ONE_PASS_BLOCK_LIMIT = 64
_RUNTIME_SIZES = ("T", "part_stride", "segment_length")  # kernel arguments that are not specialised on
# Query-block elements (rows x padded head width) the one-pass backward fits in an H100's shared memory, by operand
# size, compiled for sm_90 (tests/compile_kernels_for_hopper.py): float32 at three TF32 passes needs 147,456 bytes at
# 4,096 (16 rows x 2 heads x 128) and 245,760 (over the 232,448 there are) at 8,192; bf16 needs 106,496 at 8,192 and
# up to 217,088 at 16,384, too close to the limit for another Triton version. Larger blocks take the gathered
# kernels, whose tiles shrink to fit (`_Plan.launch`).
ONE_PASS_ELEMENTS = {2: 8192, 4: 4096}
_warned: set[str] = set()
Tensor = torch.Tensor


def triton_unavailable_reason() -> str | None:
    """Why `blossom_triton` cannot be selected here, or None when it can."""
    if triton is None:
        return "triton is not installed (pip install triton)"
    return None


def fallback_reason(q, k, ck, geometry: SparseGeometry) -> str | None:
    """Why these inputs go to the PyTorch path, or None when the kernels take them; q [B, H, L, D] or [T, H, D]."""
    if triton is None:
        return triton_unavailable_reason()
    if not kernels_run_on(q):
        return "tensors are on the CPU and TRITON_INTERPRET is not set"
    reason = shape_fallback_reason(geometry, head_dim=q.shape[-1], heads=q.shape[1], kv_heads=k.shape[1])
    if reason is not None:
        return reason
    if q.dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {q.dtype}"
    if q.dtype == torch.float32 and (q.shape[1] // k.shape[1]) * _pow2(q.shape[-1]) > 512:
        return "float32 with (heads per kv head) x head dim > 512 needs more shared memory than a GPU block has"
    return None


def shape_fallback_reason(geometry: SparseGeometry, *, head_dim: int, heads: int, kv_heads: int) -> str | None:
    """What of a model's shape (block geometry, head dim, heads per kv head) the kernels do not cover, or None."""
    size = geometry.selection_block_size
    if geometry.compress_stride != size or geometry.compress_block_size % size:
        return ("the kernels need compress_stride == selection_block_size and compress_block_size a multiple of it, "
                f"got {geometry.compress_block_size}/{geometry.compress_stride}/{size}")
    if size < 16 or size & (size - 1):
        return f"the kernels need a power-of-two selection_block_size >= 16, got {size}"
    if geometry.num_selected_blocks > 16:
        return f"the kernels keep at most 16 selected blocks per query, got {geometry.num_selected_blocks}"
    if not 16 <= head_dim <= 128:
        return f"the kernels support head dims 16..128, got {head_dim}"
    group = heads // kv_heads
    if heads % kv_heads or group & (group - 1) or group > 8:
        return f"the kernels support query groups of 1, 2, 4 or 8 heads per kv head, got {heads}/{kv_heads}"
    return None


def _warn_once(reason: str) -> None:
    """Warn once per reason; not while torch.compile traces (it cannot trace a warning, and a fullgraph compile
    would fail on it): the model warns about its shape when it picks this backend (`shape_fallback_reason`)."""
    if reason not in _warned and not torch.compiler.is_compiling():
        _warned.add(reason)
        warnings.warn(f"blossom_triton falls back to the PyTorch path: {reason}", stacklevel=3)


def _pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """The gated-sum kernels read any layout whose last dim is contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


class _Plan:
    """Launch parameters shared by the forward and backward passes.

    Grids: dim 0 is (history, kv head), dim 1 the blocks or tiles of the longest history (`max_length`), and the
    compressed dk/dv's dim 2 a segment of its query positions; the kernels load each history's bounds from
    cu_seqlens / cu_compressed and skip what lies past its end."""

    def __init__(self, q, k, cu_seqlens, cu_compressed, max_length: int, geometry: SparseGeometry,
                 one_pass: bool | None = None):
        self.tokens, self.heads, self.dim = q.shape
        self.dtype, self.device = q.dtype, q.device
        self.kv_heads = k.shape[1]
        self.group = self.heads // self.kv_heads
        self.programs = (cu_seqlens.shape[0] - 1) * self.kv_heads
        self.max_length = max_length
        self.num_compressed = geometry.num_compressed_blocks(max_length)  # the most compressed blocks of a history
        size = geometry.selection_block_size
        self.num_blocks = geometry.num_selection_blocks(max_length)
        self.num_selected = geometry.num_selected_blocks
        self.span = geometry.compress_block_size // size
        # STIS block visits: the M_NEAR blocks before a query block hold its window (and powers of two below the
        # block size); a power of two >= the block size is exactly (power / block size) blocks back
        window = geometry.stis_window
        m_near = max(1, (window - 1 + size - 1) // size)
        p_far = _pow2(m_near + 1)
        n_far = 0
        while p_far << n_far < self.num_blocks:
            n_far += 1
        self.stis = dict(n_far=n_far, WINDOW=window, M_NEAR=m_near, P_FAR=p_far)
        self.block_d = max(16, _pow2(self.dim))
        shrink = 1 if self.block_d <= 64 else 2
        long = self.num_compressed >= TUNING["long_from"]
        self.forward_tile = (max(1, TUNING["forward_rows"] // self.group),
                             TUNING["forward_keys_long" if long else "forward_keys"] // shrink)
        self.forward_warps = TUNING["compressed_forward_long_warps" if long else "compressed_forward_warps"]
        self.dq_keys = TUNING["dq_keys"] // shrink
        self.dkdv_tile = (max(1, TUNING["dkdv_rows"] // shrink // self.group), TUNING["dkdv_keys"] // shrink)
        per_key = size * self.group * self.block_d  # elements of a gathered chunk's [rows, keys, head dim] products
        self.gather = dict(N_SEL=self.num_selected, C=_keys_per_chunk(TUNING["sparse_chunk_elements"], per_key, size))
        self.dq_gather = dict(N_SEL=self.num_selected, C=_keys_per_chunk(TUNING["dq_chunk_elements"], per_key, size))
        self.csr_chunk = max(1, 64 // self.group)
        self.sm_scale = 1.0 / math.sqrt(self.dim)
        self.common = dict(CU_SEQLENS=cu_seqlens, qk_scale=self.sm_scale * math.log2(math.e), HKV=self.kv_heads,
                           G=self.group, D=self.dim, BLOCK_D=self.block_d, SEL_B=size,
                           DOT_PREC=dot_precision(q.dtype))
        self.cu_compressed = cu_compressed
        # the backward follows its forward (whatever TUNING says by then): one pass there left no sort keys
        self.one_pass = uses_one_pass(max_length, geometry, q, k) if one_pass is None else one_pass
        if self.one_pass:
            self.one_pass_common = dict(**self.common, N_SEL=self.num_selected, WINDOW=geometry.stis_window)

    def query_grid(self, rows_tile: int):
        return (self.programs, triton.cdiv(self.max_length, rows_tile))

    def sparse_grid(self):
        return (self.programs, self.num_blocks)

    def compressed_grid(self, keys_tile: int):
        return (self.programs, triton.cdiv(self.num_compressed, keys_tile))

    def launch(self, name: str, kernel, grid, tiles: dict[str, int], smallest: dict[str, int] | None = None,
               **arguments) -> None:
        """`kernel[grid(tiles)](**arguments, **tiles)`, with smaller tiles where the GPU lacks the shared memory for
        these (tile_fitting): by default at the least 16 keys, and rows tiles (BM, times the group's heads) of 16
        rows; `smallest` sets other floors."""
        smallest = {tile: max(1, 16 // self.group) if tile == "BM" else 16 for tile in tiles} | (smallest or {})
        # what sets the kernel's shared memory besides the tiles: its constexprs and warps (not the runtime sizes,
        # which change from batch to batch)
        settings = tuple(sorted((argument, value) for argument, value in arguments.items()
                                if isinstance(value, (bool, int, str)) and argument not in _RUNTIME_SIZES))
        key = (name, self.dtype, self.device, settings)
        fit_tiles(key, tiles, smallest, lambda fitted: kernel[grid(fitted)](**arguments, **fitted))


def _keys_per_chunk(elements: int, per_key: int, block: int) -> int:
    """Keys per chunk of the gathered kernels: the largest power of two, at most a block, whose products fit
    `elements`."""
    return max(1, min(block, _pow2(elements // per_key + 1) // 2))


def uses_one_pass(max_length: int, geometry: SparseGeometry, q: Tensor, k: Tensor) -> bool:
    """Whether a batch whose longest history is `max_length` takes the one-pass kernels: short histories, and a query
    block (a selection block of every head of a kv group) that their shared memory holds (`ONE_PASS_ELEMENTS`)."""
    limit = min(TUNING["one_pass_max_blocks"], ONE_PASS_BLOCK_LIMIT)
    block = geometry.selection_block_size * (q.shape[1] // k.shape[1]) * max(16, _pow2(q.shape[2]))
    return geometry.num_selection_blocks(max_length) <= limit and block <= ONE_PASS_ELEMENTS.get(q.element_size(), 0)


def _compressed_forward(plan: _Plan, q, ck, cv, sort_keys: bool):
    """Compressed-branch output [T, H, D] (or None), its base-2 lse [T, H], the block indices [T, Hkv, n], and (with
    `sort_keys`) the selection's sort keys [T, Hkv, n] (int32) for `_selection_csr`."""
    if sort_keys and plan.kv_heads * plan.tokens >= 2**31:
        raise ValueError(f"blossom_triton: a batch of {plan.tokens:,} tokens x {plan.kv_heads} kv heads is past its "
                         "int32 selection index (2^31 key-block groups); split the batch")
    out = torch.empty_like(q) if cv is not None else None
    lse = torch.empty(plan.tokens, plan.heads, dtype=torch.float32, device=q.device)
    block_indices = torch.empty(plan.tokens, plan.kv_heads, plan.num_selected, dtype=torch.int32, device=q.device)
    keys = torch.empty_like(block_indices) if sort_keys else block_indices
    plan.launch(
        "compressed_forward", compressed_forward, lambda tiles: plan.query_grid(tiles["BM"]),
        dict(BM=plan.forward_tile[0], BW=plan.forward_tile[1]),
        Q=q, CK=ck, CV=ck if cv is None else cv, OC=q if out is None else out, LSEC=lse, BIDX=block_indices,
        SKEYS=keys, CU_COMPRESSED=plan.cu_compressed, T=plan.tokens, **plan.common, SPAN=plan.span,
        N_SEL=plan.num_selected, NS=max(2, _pow2(plan.num_selected)),
        HAS_CV=cv is not None, SORT_KEYS=sort_keys, num_warps=plan.forward_warps,
    )
    return out, lse, block_indices, (keys if sort_keys else None)


def _selection_csr(sort_keys: torch.Tensor, plan: _Plan):
    """Reverse index of the selection: for each (kv head, key block) the queries that selected it in ascending token
    order, as offsets into a list of flat indices into the [T, Hkv, n] selection (the kernel takes the token row =
    index // (Hkv n)). A key block is named by its group h * T + its first token row, so the offsets span kv heads x
    tokens, not histories x the longest history. One stable sort of int32 groups (half the radix passes of the
    int64 keys group * T + row that it replaces) and one binary search: deterministic, no host sync."""
    groups, order = torch.sort(sort_keys.flatten(), stable=True)
    boundaries = torch.arange(plan.kv_heads * plan.tokens + 1, dtype=groups.dtype, device=groups.device)
    return torch.searchsorted(groups, boundaries), order


def _sparse_forward(plan: _Plan, q, k, v, block_indices):
    """Selected-branch and STIS outputs [T, H, D] and their base-2 lse [T, H]: the one-pass kernel for short
    histories, else the gathered one."""
    o_sel, o_stis = torch.empty_like(q), torch.empty_like(q)
    lse_sel = torch.empty(plan.tokens, plan.heads, dtype=torch.float32, device=q.device)
    lse_stis = torch.empty_like(lse_sel)
    tensors = dict(Q=q, K=k, V=v, BIDX=block_indices, OS=o_sel, OT=o_stis, LSES=lse_sel, LSET=lse_stis)
    if plan.one_pass:
        plan.launch("one_pass_forward", one_pass_forward, lambda tiles: plan.sparse_grid(),
                    dict(BK=TUNING["one_pass_keys"]), **tensors, **plan.one_pass_common,
                    num_warps=TUNING["one_pass_forward_warps"])
    else:
        sparse_forward[plan.sparse_grid()](**tensors, **plan.common, **plan.stis, **plan.gather,
                                           num_warps=TUNING["sparse_forward_warps"])
    return o_sel, o_stis, lse_sel, lse_stis


def _no_rows(x: Tensor) -> Tensor:
    """An empty [0, ...] stand-in for a result that does not exist (an operator cannot return None)."""
    return x.new_empty(0, *x.shape[1:])


def _forward(q: Tensor, k: Tensor, v: Tensor, ck: Tensor, cv: Tensor | None, cu_seqlens: Tensor,
             cu_compressed: Tensor, max_length: int, compress_block_size: int, compress_stride: int,
             selection_block_size: int, num_selected_blocks: int,
             stis_window: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Selected, STIS and compressed outputs [T, H, D] (compressed [0, H, D] without cv: an operator cannot return
    None), then what the backward reads, returned so that the backward operator can take it: the base-2 lse [T, H] of
    each branch, the block indices [T, Hkv, n] and their sort keys. q, k, v, ck, cv dense token-major ([T or Wt,
    heads, D] contiguous); the geometry comes as its fields (an operator takes no dataclass)."""
    geometry = SparseGeometry(compress_block_size, compress_stride, selection_block_size, num_selected_blocks,
                              stis_window)
    plan = _Plan(q, k, cu_seqlens, cu_compressed, max_length, geometry)
    oc, lse_c, block_indices, sort_keys = _compressed_forward(plan, q, ck, cv, sort_keys=not plan.one_pass)
    o_sel, o_stis, lse_sel, lse_stis = _sparse_forward(plan, q, k, v, block_indices)
    if plan.one_pass:  # no reverse index
        sort_keys = block_indices.new_empty((0, *block_indices.shape[1:]))
    return o_sel, o_stis, _no_rows(q) if oc is None else oc, lse_sel, lse_stis, lse_c, block_indices, sort_keys


def _forward_fake(q, k, v, ck, cv, cu_seqlens, cu_compressed, max_length, compress_block_size, compress_stride,
                  selection_block_size, num_selected_blocks, stis_window):
    tokens, heads, _ = q.shape
    selection = (tokens, k.shape[1], num_selected_blocks)
    geometry = SparseGeometry(compress_block_size, compress_stride, selection_block_size, num_selected_blocks,
                              stis_window)
    key_rows = 0 if uses_one_pass(max_length, geometry, q, k) else tokens
    return (torch.empty_like(q), torch.empty_like(q), _no_rows(q) if cv is None else torch.empty_like(q),
            *(q.new_empty(tokens, heads, dtype=torch.float32) for _ in range(3)),
            q.new_empty(selection, dtype=torch.int32), q.new_empty((key_rows, *selection[1:]), dtype=torch.int32))


def _backward_impl(q: Tensor, k: Tensor, v: Tensor, ck: Tensor, cv: Tensor | None, cu_seqlens: Tensor,
                   cu_compressed: Tensor, o_sel: Tensor, o_stis: Tensor, oc: Tensor, lse_sel: Tensor,
                   lse_stis: Tensor, lse_c: Tensor, block_indices: Tensor, sort_keys: Tensor, do_sel: Tensor,
                   do_stis: Tensor, do_c: Tensor, max_length: int, compress_block_size: int, compress_stride: int,
                   selection_block_size: int, num_selected_blocks: int,
                   stis_window: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, dck, dcv from the forward operator's inputs, outputs and output gradients (dck and dcv [0, Hkv, D]
    without cv: the selection is not differentiable)."""
    geometry = SparseGeometry(compress_block_size, compress_stride, selection_block_size, num_selected_blocks,
                              stis_window)
    plan = _Plan(q, k, cu_seqlens, cu_compressed, max_length, geometry, one_pass=sort_keys.shape[0] == 0)
    has_compressed = cv is not None
    do_sel, do_stis = do_sel.contiguous(), do_stis.contiguous()
    delta_sel, delta_stis = torch.empty_like(lse_sel), torch.empty_like(lse_sel)
    if has_compressed:
        do_c = do_c.contiguous()
        delta_c = torch.empty_like(lse_c)
    else:  # placeholders the kernel never reads (HAS_CV=False)
        cv, oc, do_c, lse_c, delta_c = ck, o_sel, do_sel, lse_sel, delta_sel
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    branches = dict(Q=q, OS=o_sel, OT=o_stis, DOS=do_sel, DOT=do_stis, LSES=lse_sel, LSET=lse_stis, DELS=delta_sel,
                    DELT=delta_stis)
    compressed = dict(K=k, V=v, BIDX=block_indices, CK=ck, CV=cv, OC=oc, DOC=do_c, LSEC=lse_c, DELC=delta_c, DQ=dq,
                      CU_COMPRESSED=plan.cu_compressed, sm_scale=plan.sm_scale, HAS_CV=has_compressed)
    dkdv = {name: branches[name] for name in ("Q", "DOS", "DOT", "LSES", "LSET", "DELS", "DELT")}
    if plan.one_pass:
        plan.launch("one_pass_backward_dq", one_pass_backward_dq, lambda tiles: plan.sparse_grid(),
                    dict(BK=TUNING["one_pass_keys"], BW=plan.dq_keys), **branches, **compressed,
                    **plan.one_pass_common, num_warps=TUNING["one_pass_dq_warps"])
        size = plan.common["SEL_B"]
        plan.launch("one_pass_backward_dkdv", one_pass_backward_dkdv,
                    lambda tiles: (plan.programs, triton.cdiv(plan.num_blocks * size, tiles["BKK"])),
                    dict(BKK=size * TUNING["one_pass_dkdv_blocks"]), smallest=dict(BKK=size), **dkdv, K=k, V=v,
                    BIDX=block_indices, DK=dk, DV=dv, sm_scale=plan.sm_scale, **plan.one_pass_common,
                    num_warps=TUNING["one_pass_dkdv_warps"])
    else:
        plan.launch("backward_dq", backward_dq, lambda tiles: plan.sparse_grid(), dict(BW=plan.dq_keys), **branches,
                    **compressed, **plan.common, **plan.stis, **plan.dq_gather, num_warps=TUNING["dq_warps"])
        offsets, queries = _selection_csr(sort_keys, plan)
        sparse_backward_dkdv[plan.sparse_grid()](
            **dkdv, K=k, V=v, CSR_OFFSETS=offsets, CSR_QUERIES=queries, DK=dk, DV=dv, T=plan.tokens,
            sm_scale=plan.sm_scale, **plan.common, **plan.stis, N_SEL=plan.num_selected, QC=plan.csr_chunk,
            num_warps=TUNING["sparse_dkdv_warps"])
    if not has_compressed:
        return dq, dk, dv, _no_rows(ck), _no_rows(ck)
    return dq, dk, dv, *_compressed_backward(plan, q, ck, cv, do_c, lse_c, delta_c)


def _compressed_backward(plan: _Plan, q, ck, cv, do_c, lse_c, delta_c) -> tuple[Tensor, Tensor]:
    """dck, dcv: the queries of each compressed key tile split into segments of `compressed_dkdv_segment`
    positions (longer where that would make more than `compressed_dkdv_max_segments`: the parts' memory stays within
    a few times dck's), whose float32 parts are summed here when there are several."""
    segment = max(TUNING["compressed_dkdv_segment"],
                  triton.cdiv(plan.max_length, TUNING["compressed_dkdv_max_segments"]))
    segments = triton.cdiv(plan.max_length, segment)
    # zeros: rows past cu_compressed[-1] (a static batch's spare rows) are not written by the kernel
    shape = (segments, *ck.shape) if segments > 1 else ck.shape
    dtype = torch.float32 if segments > 1 else ck.dtype
    dck, dcv = ck.new_zeros(shape, dtype=dtype), cv.new_zeros(shape, dtype=dtype)
    if plan.num_compressed:
        plan.launch(
            "compressed_backward_dkdv", compressed_backward_dkdv,
            lambda tiles: (*plan.compressed_grid(tiles["BW"]), segments),
            dict(BM=plan.dkdv_tile[0], BW=plan.dkdv_tile[1]), Q=q, CK=ck, CV=cv, DOC=do_c, LSEC=lse_c,
            DELC=delta_c, DCK=dck, DCV=dcv, CU_COMPRESSED=plan.cu_compressed, part_stride=ck.numel(),
            segment_length=segment, sm_scale=plan.sm_scale, **plan.common,
            num_warps=TUNING["compressed_dkdv_warps"])
    if segments > 1:
        return dck.sum(0).to(ck.dtype), dcv.sum(0).to(cv.dtype)
    return dck, dcv


def _backward_fake(q, k, v, ck, cv, *_):
    compressed = (_no_rows(ck), _no_rows(ck)) if cv is None else (torch.empty_like(ck), torch.empty_like(cv))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *compressed


def _setup_context(ctx, inputs, output):
    """Saves the tensors the backward operator takes (inputs, then outputs) and its int arguments; the lse are
    statistics, not results: no gradient flows back through them."""
    ctx.save_for_backward(*inputs[:7], *output)
    ctx.sizes = inputs[7:]
    ctx.has_compressed = inputs[4] is not None
    ctx.mark_non_differentiable(*output[3:6])
    ctx.set_materialize_grads(False)  # no zero gradients for the five statistics on every step


def _backward(ctx, do_sel, do_stis, do_c, *_):
    o_sel, o_stis, oc = ctx.saved_tensors[7:10]
    # an output left out of the loss (an ablation's unused branch) has no gradient
    do_sel, do_stis, do_c = (torch.zeros_like(o) if do is None else do
                             for o, do in ((o_sel, do_sel), (o_stis, do_stis), (oc, do_c)))
    dq, dk, dv, dck, dcv = _BACKWARD(*ctx.saved_tensors, do_sel, do_stis, do_c, *ctx.sizes)
    compressed = (dck, dcv) if ctx.has_compressed else (None, None)
    return dq, dk, dv, *compressed, None, None, *[None] * len(ctx.sizes)  # no gradient for bounds and sizes


_BACKWARD = define_op("blossom_attention_backward", _backward_impl, _backward_fake)
_FORWARD = define_op("blossom_attention_forward", _forward, _forward_fake, _backward, _setup_context)


def _geometry_fields(geometry: SparseGeometry) -> tuple[int, int, int, int, int]:
    return (geometry.compress_block_size, geometry.compress_stride, geometry.selection_block_size,
            geometry.num_selected_blocks, geometry.stis_window)


def _dense(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype` with dense token rows: the kernels compute row offsets from the head count. A strided view (v, a
    slice of the input projection's 216-wide rows) is copied: measured on an H200 (padded layout), reading v in place
    cost 0.33 ms more per module step at L = 200 and 0.6 ms at 4,096-16,384 than the copy."""
    return x.to(dtype).contiguous()


def blossom_attention_triton_varlen(q, k, v, ck, cv, *, cu_seqlens, cu_compressed, max_length, geometry):
    """All BlossomRec branches over packed histories: (selected, stis, compressed) outputs, each [T, H, D];
    compressed is None if cv is. Same arguments as `blossom_attention_torch_varlen`; cu_seqlens and cu_compressed
    (int32 or int64, on q's device) end at T and at most at Wt (static batches keep spare compressed rows, which
    get zero gradients). Never syncs with the host: grids are sized from
    `max_length`, and each program reads its history's bounds."""
    reason = fallback_reason(q, k, ck, geometry)
    if reason is not None:
        _warn_once(reason)
    if reason is not None or q.shape[0] == 0:  # no tokens: nothing to launch
        return blossom_attention_torch_varlen(q, k, v, ck, cv, cu_seqlens=cu_seqlens, cu_compressed=cu_compressed,
                                              max_length=max_length, geometry=geometry)
    dtype = compute_dtype(*(t for t in (q, k, v, ck, cv) if t is not None))
    operands = [_dense(t, dtype) if t is not None else None for t in (q, k, v, ck, cv)]
    o_sel, o_stis, oc = _FORWARD(*operands, cu_seqlens, cu_compressed, max_length, *_geometry_fields(geometry))[:3]
    return o_sel, o_stis, (oc if cv is not None else None)


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, D] -> [B * L, heads, D] (a view when the memory is [B, L, heads, D])."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def _padded_bounds(q: torch.Tensor, ck: torch.Tensor) -> dict:
    """cu_seqlens / cu_compressed / max_length of [B, H, L, D] inputs: every row one history of length L."""
    batch, length = q.shape[0], q.shape[2]
    rows = torch.arange(batch + 1, device=q.device, dtype=torch.int32)
    return dict(cu_seqlens=rows * length, cu_compressed=rows * ck.shape[2], max_length=max(length, 1))


def blossom_attention_triton(q, k, v, ck, cv, geometry: SparseGeometry):
    """All BlossomRec branches: (selected, stis, compressed) outputs, each [B, H, L, D]; compressed is None if cv is.
    The varlen kernels with every row one history; outputs are [B, H, L, D] views of [B, L, H, D] memory."""
    batch, _, length, _ = q.shape
    outputs = blossom_attention_triton_varlen(
        _as_tokens(q), _as_tokens(k), _as_tokens(v), _as_tokens(ck), None if cv is None else _as_tokens(cv),
        **_padded_bounds(q, ck), geometry=geometry)
    return tuple(None if o is None else o.view(batch, length, *o.shape[1:]).transpose(1, 2) for o in outputs)


def select_blocks_triton_varlen(q, ck, *, cu_seqlens, cu_compressed, max_length, geometry) -> torch.Tensor:
    """The kernel's block selection alone, [T, Hkv, n] (-1 = empty slot), for tests and checks."""
    q = q.contiguous()
    ck = _dense(ck, q.dtype)
    plan = _Plan(q, ck, cu_seqlens, cu_compressed, max_length, geometry)
    return _compressed_forward(plan, q, ck, None, sort_keys=False)[2]


def select_blocks_triton(q, ck, geometry: SparseGeometry) -> torch.Tensor:
    """The kernel's block selection for [B, H, L, D] queries, [B, Hkv, L, n] (-1 = empty slot)."""
    batch, _, length, _ = q.shape
    chosen = select_blocks_triton_varlen(_as_tokens(q), _as_tokens(ck), **_padded_bounds(q, ck), geometry=geometry)
    return chosen.view(batch, length, *chosen.shape[1:]).transpose(1, 2)


GATED_ROWS = 128


def _gate_rows(logits: Tensor) -> Tensor:
    """The kernels read logits [B, L, H, n] with any batch and position strides, each position's H x n gates dense."""
    return logits if logits.stride(3) == 1 and logits.stride(2) == logits.shape[3] else logits.contiguous()


def _gated_branches(o0: Tensor, o1: Tensor, o2: Tensor | None) -> list[Tensor]:
    return [_row_major(o) for o in (o0, o1, o2) if o is not None]


def _named_strides(prefix: str, x: Tensor) -> dict[str, int]:
    """The kernel's stride arguments of a [B, H, L, D] tensor: prefix + b, h, l."""
    return dict(zip((prefix + "b", prefix + "h", prefix + "l"), _strides(x)))


def _gated_launch(kernel, logits: Tensor, branches: list[Tensor], **arguments) -> None:
    """One gated-sum kernel over the (batch, position, head) rows of the branches [B, H, L, D]; without a third
    branch the first stands in for it (NB=2: never read). `arguments` are the kernel's own pointers and strides."""
    batch, heads, length, dim = branches[0].shape
    padded = branches + [branches[0]] * (3 - len(branches))
    n_rows = batch * length * heads
    kernel[(triton.cdiv(n_rows, GATED_ROWS),)](
        LOGITS=logits, O0=padded[0], O1=padded[1], O2=padded[2], slb=logits.stride(0), sll=logits.stride(1),
        **_named_strides("so0", padded[0]), **_named_strides("so1", padded[1]), **_named_strides("so2", padded[2]),
        **arguments, n_rows=n_rows, L=length, H=heads, NB=len(branches), D=dim, BLOCK_D=_pow2(dim), ROWS=GATED_ROWS,
    )


def _gated_output(logits: Tensor, o0: Tensor) -> Tensor:
    """[B, H, L, D] in the operands' promoted dtype: a view of [B, L, H, D] memory (the attention's token rows)."""
    batch, heads, length, dim = o0.shape
    dtype = torch.promote_types(logits.dtype, o0.dtype)
    return torch.empty(batch, length, heads, dim, dtype=dtype, device=logits.device).transpose(1, 2)


def _batched(logits: Tensor, *branches: Tensor | None) -> tuple[Tensor, ...]:
    """Token-major operands (logits [T, H, n], branches [T, H, D]) as one batch row of the kernels' layout, views;
    [B, L, H, n] and [B, H, L, D] ones as they are."""
    if logits.dim() == 4:
        return logits, *branches
    return logits.unsqueeze(0), *(None if b is None else b.unsqueeze(0).transpose(1, 2) for b in branches)


def _gated_forward(logits: Tensor, o0: Tensor, o1: Tensor, o2: Tensor | None) -> Tensor:
    """out[b, h, l] = sum_i sigmoid(logits[b, l, h, i]) * o_i[b, h, l] in one pass; o2 is None for two branches.
    Token-major operands (logits [T, H, n], o_i [T, H, D]) give a token-major out [T, H, D]."""
    batched_logits, *batched = _batched(logits, o0, o1, o2)
    batched_logits, branches = _gate_rows(batched_logits), _gated_branches(*batched)
    out = _gated_output(batched_logits, branches[0])
    _gated_launch(gated_sum_forward, batched_logits, branches, OUT=out, **_named_strides("sout", out))
    return out if logits.dim() == 4 else out.transpose(1, 2).squeeze(0)


def _gated_forward_fake(logits, o0, o1, o2):
    out = _gated_output(*_batched(logits, o0)[:2])
    return out if logits.dim() == 4 else out.transpose(1, 2).squeeze(0)


def _gated_grads(logits: Tensor, o0: Tensor, o1: Tensor, o2: Tensor | None) -> tuple[Tensor, list[Tensor]]:
    """Empty gradients: the logits' contiguous [B, L, H, n], each branch's with the strides the kernel reads it by."""
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return dlogits, [torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device=b.device)
                     for b in _gated_branches(o0, o1, o2)]


def _gated_backward_impl(logits: Tensor, o0: Tensor, o1: Tensor, o2: Tensor | None,
                         dout: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the logits and of each branch in one pass, shaped as they are (token-major ones too); the third
    is [0, ...] of o0 when o2 is None (an operator cannot return None)."""
    batched_logits, b0, b1, b2, dout_rows = _batched(logits, o0, o1, o2, dout)
    batched_logits, branches = _gate_rows(batched_logits), _gated_branches(b0, b1, b2)
    dout_rows = _row_major(dout_rows)
    dlogits, grads = _gated_grads(batched_logits, b0, b1, b2)
    padded = grads + [grads[0]] * (3 - len(grads))
    _gated_launch(gated_sum_backward, batched_logits, branches, DLOGITS=dlogits, DOUT=dout_rows, DO0=padded[0],
                  DO1=padded[1], DO2=padded[2], **_named_strides("sd", dout_rows))
    return _unbatched(logits, dlogits, grads) + ((_no_rows(o0),) if o2 is None else ())


def _gated_backward_fake(logits, o0, o1, o2, dout):
    batched_logits, b0, b1, b2 = _batched(logits, o0, o1, o2)
    dlogits, grads = _gated_grads(batched_logits, b0, b1, b2)
    return _unbatched(logits, dlogits, grads) + ((_no_rows(o0),) if o2 is None else ())


def _unbatched(logits: Tensor, dlogits: Tensor, grads: list[Tensor]) -> tuple[Tensor, ...]:
    """The gradients of `_batched` operands in their callers' shapes: token-major back to [T, ...] views."""
    if logits.dim() == 4:
        return dlogits, *grads
    return dlogits.squeeze(0), *(g.transpose(1, 2).squeeze(0) for g in grads)


def _gated_setup_context(ctx, inputs, output):
    """Saves the logits as a dense copy: as a view they are columns of the attention's input projection, and saving
    the view would keep that whole output alive until the backward (432 bytes a token and layer at the default size,
    against 48 for the copy)."""
    logits, *branches = inputs
    ctx.save_for_backward(logits.contiguous(), *branches)
    ctx.has_third = inputs[3] is not None


def _gated_backward(ctx, dout):
    dlogits, d0, d1, d2 = _GATED_BACKWARD(*ctx.saved_tensors, dout)
    return dlogits, d0, d1, (d2 if ctx.has_third else None)


_GATED_BACKWARD = define_op("gated_sum_backward", _gated_backward_impl, _gated_backward_fake)
_GATED_FORWARD = define_op("gated_sum_forward", _gated_forward, _gated_forward_fake, _gated_backward,
                           _gated_setup_context)


def gated_sum(gate_logits: torch.Tensor, branches, fused: bool = True) -> torch.Tensor:
    """sum_i sigmoid(gate_logits[..., i]) * branch_i: logits [B, L, H, n_branches] with branches [B, H, L, D], or
    token-major logits [T, H, n_branches] with branches [T, H, D] (the varlen attention's layout; out [T, H, D]).

    With `fused`, one Triton pass each way where the kernels run (same device rules): a custom operator
    (custom_ops.py), forward and backward, so torch.compile(fullgraph=True) traces through it; plain PyTorch
    otherwise. The logits may be a strided view (e.g. columns of the attention's input projection) whose last two dims
    are contiguous.
    """
    branches = [b for b in branches if b is not None]
    num_branches = gate_logits.shape[-1]
    usable = fused and triton is not None and kernels_run_on(gate_logits) and len(branches) in (2, 3) \
        and all(b.stride(-1) == 1 and b.dtype == branches[0].dtype for b in branches) \
        and gate_logits.stride(-1) == 1 and gate_logits.stride(-2) == num_branches
    if not usable:
        weights = torch.sigmoid(gate_logits).unsqueeze(-1)
        weights = weights.permute(0, 2, 1, 3, 4) if gate_logits.dim() == 4 else weights
        return sum(weights[..., i, :] * branch for i, branch in enumerate(branches))
    return _GATED_FORWARD(gate_logits, *branches, *([None] if len(branches) == 2 else []))
