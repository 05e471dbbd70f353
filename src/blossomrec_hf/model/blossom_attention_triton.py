"""Fused Triton BlossomRec attention (`attn_implementation="blossom_triton"`): exact, forward and backward.

Same contract as `blossom_attention_torch`: (selected, stis, compressed-or-None), each [B, H, L, D]. Two forward
launches (compressed branch + top-n block selection; selected blocks + own block + STIS) and four backward launches,
none with atomics, so gradients are bitwise reproducible run to run (deterministic mode is always on).

Triton is optional: without it the model refuses this backend. Shapes or devices the kernels do not cover (a
geometry other than compress_stride == selection_block_size with compress_block_size a multiple of it, head dims
outside 16..128, CPU tensors without TRITON_INTERPRET=1) fall back to the PyTorch reference with a one-time warning.
"""

import math
import os
import warnings

import torch

from .blossom_attention_torch import blossom_attention_torch
from .sparse_patterns import SparseGeometry

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
        sparse_backward_dkdv,
        sparse_forward,
    )

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Launch settings, measured with benchmarks/tune_kernels.py on an H200 (head dim 16, 4 heads per kv head): query
# rows per tile and compressed keys per tile of each compressed-branch kernel, elements per gathered chunk of the
# selected-block loop, warps per kernel. Tiles are halved for head dims above 64 (register and shared memory).
TUNING = dict(forward_rows=64, forward_keys=64, forward_keys_long=128, long_from=512, dq_keys=64, dkdv_rows=128,
              dkdv_keys=64, sparse_chunk_elements=8192, compressed_forward_warps=2, compressed_forward_long_warps=4,
              sparse_forward_warps=4, dq_warps=4, sparse_dkdv_warps=2, compressed_dkdv_warps=4)
_warned: set[str] = set()


def triton_unavailable_reason() -> str | None:
    """Why `blossom_triton` cannot be selected here, or None when it can."""
    if triton is None:
        return "triton is not installed (pip install triton)"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fallback_reason(q, k, ck, geometry: SparseGeometry) -> str | None:
    """Why these inputs go to the PyTorch path, or None when the kernels take them."""
    if triton is None:
        return triton_unavailable_reason()
    if not q.is_cuda and not _interpreting():
        return "tensors are on the CPU and TRITON_INTERPRET is not set"
    size = geometry.selection_block_size
    if geometry.compress_stride != size or geometry.compress_block_size % size:
        return ("the kernels need compress_stride == selection_block_size and compress_block_size a multiple of it, "
                f"got {geometry.compress_block_size}/{geometry.compress_stride}/{size}")
    if size < 16 or size & (size - 1):
        return f"the kernels need a power-of-two selection_block_size >= 16, got {size}"
    if geometry.num_selected_blocks > 16:
        return f"the kernels keep at most 16 selected blocks per query, got {geometry.num_selected_blocks}"
    if not 16 <= q.shape[-1] <= 128:
        return f"the kernels support head dims 16..128, got {q.shape[-1]}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {q.dtype}"
    if q.dtype == torch.float32 and (q.shape[1] // k.shape[1]) * _pow2(q.shape[-1]) > 512:
        return "float32 with (heads per kv head) x head dim > 512 needs more shared memory than a GPU block has"
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    if heads % kv_heads or group & (group - 1) or group > 8:
        return f"the kernels support query groups of 1, 2, 4 or 8 heads per kv head, got {heads}/{kv_heads}"
    return None


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"blossom_triton falls back to the PyTorch path: {reason}", stacklevel=3)


def _pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """The kernels read any layout whose last dim is contiguous (e.g. [B, L, H, D] memory seen as [B, H, L, D])."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _compact(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] in memory of its own: [B, L, H, D] or [B, H, L, D] order, kept; anything else (v, a view into
    the input projection's 216-wide rows) copied to [B, L, H, D] order. Measured on an H200: reading v in place
    costs 0.33 ms more per module step at L = 200 and 0.6 ms at 4,096-16,384 than this 8 MiB copy."""
    if x.is_contiguous() or x.transpose(1, 2).is_contiguous():
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _new_output(batch: int, heads: int, length: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] view of [B, L, H, D] memory: the model's transpose + reshape after attention is then free."""
    return torch.empty(batch, length, heads, dim, dtype=like.dtype, device=like.device).transpose(1, 2)


class _Plan:
    """Launch parameters shared by the forward and backward passes."""

    def __init__(self, q, k, ck, geometry: SparseGeometry):
        self.batch, self.heads, self.length, self.dim = q.shape
        self.kv_heads = k.shape[1]
        self.group = self.heads // self.kv_heads
        self.num_compressed = ck.shape[2]
        size = geometry.selection_block_size
        self.block = size
        self.span = geometry.compress_block_size // size
        self.num_blocks = geometry.num_selection_blocks(self.length)
        self.num_selected = geometry.num_selected_blocks
        self.window = geometry.stis_window
        # STIS block visits: the M_NEAR blocks before a query block hold its window (and powers of two below the
        # block size); a power of two >= the block size is exactly (power / block size) blocks back
        self.m_near = max(1, (self.window - 1 + size - 1) // size)
        self.p_far = _pow2(self.m_near + 1)
        self.n_far = 0
        while self.p_far << self.n_far < self.num_blocks:
            self.n_far += 1
        self.block_d = max(16, _pow2(self.dim))
        shrink = 1 if self.block_d <= 64 else 2
        long = self.num_compressed >= TUNING["long_from"]
        self.forward_tile = (max(1, TUNING["forward_rows"] // self.group),
                             TUNING["forward_keys_long" if long else "forward_keys"] // shrink)
        self.forward_warps = TUNING["compressed_forward_long_warps" if long else "compressed_forward_warps"]
        self.dq_keys = TUNING["dq_keys"] // shrink
        self.dkdv_tile = (max(1, TUNING["dkdv_rows"] // shrink // self.group), TUNING["dkdv_keys"] // shrink)
        rows = size * self.group
        self.chunk = max(1, min(size, _pow2(TUNING["sparse_chunk_elements"] // (rows * self.block_d) + 1) // 2))
        self.csr_chunk = max(1, 64 // self.group)
        self.sm_scale = 1.0 / math.sqrt(self.dim)
        self.qk_scale = self.sm_scale * math.log2(math.e)
        self.dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
        self.common = dict(HKV=self.kv_heads, G=self.group, D=self.dim, BLOCK_D=self.block_d)

    def query_grid(self, tile):
        return (triton.cdiv(self.length, tile[0]), self.batch * self.kv_heads)

    def sparse_grid(self):
        return (self.num_blocks, self.batch * self.kv_heads)


def _compressed_forward(plan: _Plan, q, ck, cv, sort_keys: bool):
    """Compressed-branch output (or None), its base-2 lse [B, H, L], the block indices [B, Hkv, L, n], and (with
    `sort_keys`) the selection's sort keys [B, Hkv, L, n] for `_selection_csr`."""
    length = plan.length
    out = _new_output(plan.batch, plan.heads, length, plan.dim, q) if cv is not None else None
    lse = torch.empty(plan.batch, plan.heads, length, dtype=torch.float32, device=q.device)
    block_indices = torch.empty(plan.batch, plan.kv_heads, length, plan.num_selected, dtype=torch.int32,
                                device=q.device)
    keys = torch.empty(block_indices.shape, dtype=torch.int64, device=q.device) if sort_keys else block_indices
    cv_arg = cv if cv is not None else ck
    out_arg = out if out is not None else lse
    out_strides = _strides(out) if out is not None else (0, 0, 0)
    compressed_forward[plan.query_grid(plan.forward_tile)](
        q, ck, cv_arg, out_arg, lse, block_indices, keys,
        *_strides(q), *_strides(ck), *_strides(cv_arg), *out_strides,
        length, plan.num_compressed, plan.num_blocks, plan.qk_scale,
        **plan.common, BM=plan.forward_tile[0], BW=plan.forward_tile[1], SEL_B=plan.block, SPAN=plan.span,
        N_SEL=plan.num_selected, NS=max(2, _pow2(plan.num_selected)), HAS_CV=cv is not None,
        SORT_KEYS=sort_keys, DOT_PREC=plan.dot_prec, num_warps=plan.forward_warps,
    )
    return out, lse, block_indices, (keys if sort_keys else None)


def _selection_csr(sort_keys: torch.Tensor, plan: _Plan):
    """Reverse index of the selection: for each (batch, kv head, key block), the ascending query positions that
    selected it, as offsets into the sorted keys (the kernel takes position = key % L). One sort and one binary
    search: deterministic, no host sync."""
    combined = torch.sort(sort_keys.flatten()).values
    groups = plan.batch * plan.kv_heads * plan.num_blocks
    boundaries = torch.arange(0, (groups + 1) * plan.length, plan.length, device=sort_keys.device)
    return torch.searchsorted(combined, boundaries), combined


class _BlossomAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ck, cv, geometry):
        plan = _Plan(q, k, ck, geometry)
        oc, lse_c, block_indices, sort_keys = _compressed_forward(plan, q, ck, cv, sort_keys=True)
        o_sel = _new_output(plan.batch, plan.heads, plan.length, plan.dim, q)
        o_stis = _new_output(plan.batch, plan.heads, plan.length, plan.dim, q)
        lse_sel = torch.empty_like(lse_c)
        lse_stis = torch.empty_like(lse_c)
        sparse_forward[plan.sparse_grid()](
            q, k, v, block_indices, o_sel, o_stis, lse_sel, lse_stis,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o_sel),
            plan.length, plan.n_far, plan.qk_scale,
            **plan.common, SEL_B=plan.block, N_SEL=plan.num_selected, WINDOW=plan.window, M_NEAR=plan.m_near,
            P_FAR=plan.p_far, C=plan.chunk, DOT_PREC=plan.dot_prec, num_warps=TUNING["sparse_forward_warps"],
        )
        ctx.plan = plan
        ctx.has_compressed = cv is not None
        saved = [q, k, v, ck, block_indices, sort_keys, o_sel, o_stis, lse_sel, lse_stis]
        if cv is not None:
            saved += [cv, oc, lse_c]
        ctx.save_for_backward(*saved)
        return (o_sel, o_stis, oc) if cv is not None else (o_sel, o_stis)

    @staticmethod
    def backward(ctx, do_sel, do_stis, do_c=None):
        plan: _Plan = ctx.plan
        q, k, v, ck, block_indices, sort_keys, o_sel, o_stis, lse_sel, lse_stis = ctx.saved_tensors[:10]
        do_sel, do_stis = _row_major(do_sel), _row_major(do_stis)
        delta_sel = torch.empty_like(lse_sel)
        delta_stis = torch.empty_like(lse_sel)
        if ctx.has_compressed:
            cv, oc, lse_c = ctx.saved_tensors[10:]
            do_c = _row_major(do_c)
            delta_c = torch.empty_like(lse_c)
        else:
            cv, oc, do_c, lse_c, delta_c = ck, o_sel, do_sel, lse_sel, delta_sel
        dq = _new_output(plan.batch, plan.heads, plan.length, plan.dim, q)
        backward_dq[plan.sparse_grid()](
            q, k, v, block_indices, o_sel, o_stis, do_sel, do_stis, lse_sel, lse_stis, delta_sel, delta_stis,
            ck, cv, oc, do_c, lse_c, delta_c, dq,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o_sel), *_strides(do_sel), *_strides(do_stis),
            *_strides(ck), *_strides(cv), *_strides(oc), *_strides(do_c), *_strides(dq),
            plan.length, plan.num_compressed, plan.n_far, plan.qk_scale, plan.sm_scale,
            **plan.common, SEL_B=plan.block, N_SEL=plan.num_selected, WINDOW=plan.window, M_NEAR=plan.m_near,
            P_FAR=plan.p_far, C=plan.chunk, HAS_CV=ctx.has_compressed, BW=plan.dq_keys, DOT_PREC=plan.dot_prec,
            num_warps=TUNING["dq_warps"],
        )
        offsets, queries = _selection_csr(sort_keys, plan)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        sparse_backward_dkdv[plan.sparse_grid()](
            q, k, v, do_sel, do_stis, lse_sel, lse_stis, delta_sel, delta_stis, offsets, queries, dk, dv,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do_sel), *_strides(do_stis),
            plan.length, plan.num_blocks, plan.n_far, plan.qk_scale, plan.sm_scale,
            **plan.common, SEL_B=plan.block, WINDOW=plan.window, M_NEAR=plan.m_near, P_FAR=plan.p_far,
            QC=plan.csr_chunk, DOT_PREC=plan.dot_prec, num_warps=TUNING["sparse_dkdv_warps"],
        )
        if not ctx.has_compressed:
            return dq, dk, dv, None, None, None
        dck = torch.empty(ck.shape, dtype=ck.dtype, device=ck.device)
        dcv = torch.empty(cv.shape, dtype=cv.dtype, device=cv.device)
        if plan.num_compressed:
            compressed_backward_dkdv[(triton.cdiv(plan.num_compressed, plan.dkdv_tile[1]),
                                      plan.batch * plan.kv_heads)](
                q, ck, cv, do_c, lse_c, delta_c, dck, dcv,
                *_strides(q), *_strides(ck), *_strides(cv), *_strides(do_c),
                plan.length, plan.num_compressed, plan.qk_scale, plan.sm_scale,
                **plan.common, BM=plan.dkdv_tile[0], BW=plan.dkdv_tile[1], SEL_B=plan.block,
                DOT_PREC=plan.dot_prec, num_warps=TUNING["compressed_dkdv_warps"],
            )
        return dq, dk, dv, dck, dcv, None


def _compute_dtype(*tensors) -> torch.dtype:
    """One dtype for every operand: autocast's where it is on, else the widest of the inputs."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def blossom_attention_triton(q, k, v, ck, cv, geometry: SparseGeometry):
    """All BlossomRec branches: (selected, stis, compressed) outputs, each [B, H, L, D]; compressed is None if cv is."""
    reason = fallback_reason(q, k, ck, geometry)
    if reason is not None:
        _warn_once(reason)
        return blossom_attention_torch(q, k, v, ck, cv, geometry)
    operands = [q, k, v, ck] + ([cv] if cv is not None else [])
    dtype = _compute_dtype(*operands)
    operands = [_compact(t.to(dtype)) for t in operands]
    if cv is None:
        operands.append(None)
    outputs = _BlossomAttention.apply(*operands, geometry)
    return (outputs[0], outputs[1], outputs[2] if cv is not None else None)


def select_blocks_triton(q, ck, geometry: SparseGeometry) -> torch.Tensor:
    """The kernel's block selection alone, [B, Hkv, L, n] (-1 = empty slot), for tests and checks."""
    q, ck = _row_major(q), _row_major(ck.to(q.dtype))
    plan = _Plan(q, ck, ck, geometry)
    return _compressed_forward(plan, q, ck, None, sort_keys=False)[2]


GATED_ROWS = 128


class _GatedSum(torch.autograd.Function):
    """out[b, h, l] = sum_i sigmoid(logits[b, l, h, i]) * branch_i[b, h, l] in one pass (and one pass back)."""

    @staticmethod
    def forward(ctx, logits, *branches):
        batch, heads, length, dim = branches[0].shape
        dtype = torch.result_type(logits, branches[0])
        out = torch.empty(batch, length, heads, dim, dtype=dtype, device=logits.device).transpose(1, 2)
        padded = list(branches) + [branches[0]] * (3 - len(branches))
        n_rows = batch * length * heads
        gated_sum_forward[(triton.cdiv(n_rows, GATED_ROWS),)](
            logits, *padded, out, logits.stride(0), logits.stride(1), *(s for b in padded for s in _strides(b)),
            *_strides(out), n_rows, length, H=heads, NB=len(branches), D=dim, BLOCK_D=_pow2(dim), ROWS=GATED_ROWS,
        )
        ctx.save_for_backward(logits, *branches)
        return out

    @staticmethod
    def backward(ctx, dout):
        logits, *branches = ctx.saved_tensors
        batch, heads, length, dim = branches[0].shape
        dout = _row_major(dout)
        dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grads = [torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device=b.device) for b in branches]
        padded = list(branches) + [branches[0]] * (3 - len(branches))
        padded_grads = grads + [grads[0]] * (3 - len(grads))
        n_rows = batch * length * heads
        gated_sum_backward[(triton.cdiv(n_rows, GATED_ROWS),)](
            logits, dlogits, dout, *padded, *padded_grads, logits.stride(0), logits.stride(1), *_strides(dout),
            *(s for b in padded for s in _strides(b)), n_rows, length, H=heads, NB=len(branches), D=dim,
            BLOCK_D=_pow2(dim), ROWS=GATED_ROWS,
        )
        return (dlogits, *grads)


def gated_sum(gate_logits: torch.Tensor, branches, fused: bool = True) -> torch.Tensor:
    """sum_i sigmoid(gate_logits[..., i]) * branch_i: logits [B, L, H, n_branches], branches [B, H, L, D].

    With `fused`, one Triton pass each way where the kernels run (same device rules); plain PyTorch otherwise.
    The logits may be a strided view (e.g. columns of the attention's input projection) whose last two dims are
    contiguous.
    """
    branches = [b for b in branches if b is not None]
    heads, num_branches = gate_logits.shape[2:]
    usable = fused and triton is not None and (gate_logits.is_cuda or _interpreting()) and len(branches) in (2, 3) \
        and all(b.stride(-1) == 1 and b.dtype == branches[0].dtype for b in branches) \
        and gate_logits.stride(3) == 1 and gate_logits.stride(2) == num_branches
    if not usable:
        weights = torch.sigmoid(gate_logits).permute(0, 2, 1, 3).unsqueeze(-1)
        return sum(weights[..., i, :] * branch for i, branch in enumerate(branches))
    return _GatedSum.apply(gate_logits, *branches)
