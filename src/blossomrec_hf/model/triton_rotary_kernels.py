"""Triton kernels of the fused rotary position embedding; `rotary_embedding.py` launches them.

Rows are (batch, position) pairs; each program rotates every head of `ROWS` rows. The input is the queries-and-keys
part of the attention's input projection, [B, L, H + HKV, D] with any batch and position strides; the outputs are
compact [B, L, H, D] queries and [B, L, HKV, D] keys. Head dim D = 2 * HALF: x = (x1, x2) rotates to
(x1 cos - x2 sin, x2 cos + x1 sin) with per-position tables; the backward applies the inverse rotation.
"""

import triton
import triton.language as tl


@triton.jit
def _rows_heads_pairs(L, H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                      BLOCK_HALF: tl.constexpr, ROWS: tl.constexpr, n_rows):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    heads = tl.arange(0, BLOCK_HEADS)
    pairs = tl.arange(0, BLOCK_HALF)
    mask = (rows < n_rows)[:, None, None] & (heads < H + HKV)[None, :, None] & (pairs < HALF)[None, None, :]
    return rows.to(tl.int64), heads, pairs, mask


@triton.jit
def _tables(COS, SIN, rows, pairs, L, HALF: tl.constexpr):
    """cos and sin [ROWS, 1, BLOCK_HALF] of each row's position (tables are [L, 2 * HALF], halves equal)."""
    ofs = (rows % L)[:, None] * (2 * HALF) + pairs[None, :]
    ok = pairs[None, :] < HALF
    cos = tl.load(COS + ofs, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(SIN + ofs, mask=ok, other=0.0).to(tl.float32)
    return cos[:, None, :], sin[:, None, :]


@triton.jit
def _split_offsets(rows, heads, pairs, H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr):
    """Offsets into the compact queries (heads < H) and keys (the rest), and which heads are queries."""
    is_query = (heads < H)[None, :, None]
    q_ofs = (rows[:, None, None] * H + heads[None, :, None]) * (2 * HALF) + pairs[None, None, :]
    k_ofs = (rows[:, None, None] * HKV + (heads - H)[None, :, None]) * (2 * HALF) + pairs[None, None, :]
    return is_query, q_ofs, k_ofs


@triton.jit(do_not_specialize=["n_rows", "L"])
def rotary_forward(X, COS, SIN, Q, K, sxb, sxl, n_rows, L, H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, ROWS: tl.constexpr):
    rows, heads, pairs, mask = _rows_heads_pairs(L, H, HKV, HALF, BLOCK_HEADS, BLOCK_HALF, ROWS, n_rows)
    x_ofs = ((rows // L) * sxb + (rows % L) * sxl)[:, None, None] + heads[None, :, None] * (2 * HALF) \
        + pairs[None, None, :]
    x1 = tl.load(X + x_ofs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_ofs + HALF, mask=mask, other=0.0).to(tl.float32)
    cos, sin = _tables(COS, SIN, rows, pairs, L, HALF)
    out1 = (x1 * cos - x2 * sin).to(Q.dtype.element_ty)
    out2 = (x2 * cos + x1 * sin).to(Q.dtype.element_ty)
    is_query, q_ofs, k_ofs = _split_offsets(rows, heads, pairs, H, HKV, HALF)
    tl.store(Q + q_ofs, out1, mask=mask & is_query)
    tl.store(Q + q_ofs + HALF, out2, mask=mask & is_query)
    tl.store(K + k_ofs, out1, mask=mask & ~is_query)
    tl.store(K + k_ofs + HALF, out2, mask=mask & ~is_query)


@triton.jit(do_not_specialize=["n_rows", "L"])
def rotary_backward(DQ, DK, COS, SIN, DX, sqb, sql, sqh, skb, skl, skh, n_rows, L, H: tl.constexpr,
                    HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    ROWS: tl.constexpr):
    """DQ [B, L, H, D] and DK [B, L, HKV, D] by their strides (last dim contiguous) -> compact DX."""
    rows, heads, pairs, mask = _rows_heads_pairs(L, H, HKV, HALF, BLOCK_HEADS, BLOCK_HALF, ROWS, n_rows)
    b, pos = (rows // L)[:, None, None], (rows % L)[:, None, None]
    is_query = (heads < H)[None, :, None]
    q_ofs = b * sqb + pos * sql + heads[None, :, None] * sqh + pairs[None, None, :]
    k_ofs = b * skb + pos * skl + (heads - H)[None, :, None] * skh + pairs[None, None, :]
    g1 = tl.where(is_query, tl.load(DQ + q_ofs, mask=mask & is_query, other=0.0).to(tl.float32),
                  tl.load(DK + k_ofs, mask=mask & ~is_query, other=0.0).to(tl.float32))
    g2 = tl.where(is_query, tl.load(DQ + q_ofs + HALF, mask=mask & is_query, other=0.0).to(tl.float32),
                  tl.load(DK + k_ofs + HALF, mask=mask & ~is_query, other=0.0).to(tl.float32))
    cos, sin = _tables(COS, SIN, rows, pairs, L, HALF)
    x_ofs = (rows[:, None, None] * (H + HKV) + heads[None, :, None]) * (2 * HALF) + pairs[None, None, :]
    tl.store(DX + x_ofs, (g1 * cos + g2 * sin).to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + x_ofs + HALF, (g2 * cos - g1 * sin).to(DX.dtype.element_ty), mask=mask)
