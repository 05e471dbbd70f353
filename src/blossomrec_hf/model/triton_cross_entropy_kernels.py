"""Triton kernels of the fused item-softmax cross-entropy (used by fused_cross_entropy.py).

Scores are hidden [N, D] times item embeddings [V, D] transposed, computed tile by tile and never stored. Item 0 (the
padding id) is left out. Exponents are base 2 (scores scaled by log2 e), as in the attention kernels.

- `softmax_forward`: per row, the log-sum-exp over a range of items and, for training, the softmax-weighted sum of
  those items' embeddings (an online softmax, exactly as attention's forward, with the item embeddings as both keys
  and values). That sum is the part of d loss / d hidden that needs every item, so the forward is also the hidden
  state's backward: scores are computed once here.
- `item_gradient`: per tile of items, sum over a range of rows of (softmax - one-hot of the target) times hidden, the
  gradient of the item embeddings: scores are computed a second and last time here.

Both write per-range partial results; the caller adds them in a fixed order, so results are bitwise reproducible (no
atomics). Rows whose target is `ignore_index` get no gradient (the caller leaves them out of the loss): the model
passes every position, so that nothing has a data-dependent shape.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _row_block(H, stride_h, row0, N, BM: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows row0 .. row0 + BM of hidden [BM, BLOCK_D] (zeros past N and D), their ids and validity."""
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < N
    dofs = tl.arange(0, BLOCK_D)
    h = tl.load(H + rows[:, None].to(tl.int64) * stride_h + dofs[None, :],
                mask=row_ok[:, None] & (dofs < D)[None, :], other=0.0)
    return h, rows, row_ok


@triton.jit
def _scores(h, E, stride_e, item0, item_end, BV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
            DOT_PREC: tl.constexpr):
    """Base-2 scores [BM, BV] of items item0 .. item0 + BV (-inf past item_end), and those items' embeddings."""
    items = item0 + tl.arange(0, BV)
    item_ok = items < item_end
    dofs = tl.arange(0, BLOCK_D)
    e = tl.load(E + items[:, None].to(tl.int64) * stride_e + dofs[None, :],
                mask=item_ok[:, None] & (dofs < D)[None, :], other=0.0)
    s = tl.dot(h, tl.trans(e), input_precision=DOT_PREC) * LOG2E
    return tl.where(item_ok[None, :], s, NEG_INF), e, items


@triton.jit
def softmax_forward(
    H, E, TARGETS, LSE, TARGET_SCORE, WEIGHTED,
    N, V, items_per_split, stride_h, stride_e, ignore_index,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, WITH_GRAD: tl.constexpr,
    SUBTRACT_TARGET: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid (row blocks, item splits). LSE [splits, N]: base-2 log-sum-exp of the split's items (-inf if it has none).
    TARGET_SCORE [splits, N]: the base-2 score of the row's target if the split holds it, else 0. WEIGHTED [splits,
    N, D] (with WITH_GRAD): softmax over the split's items times their embeddings, float32, minus the target's
    embedding with SUBTRACT_TARGET (one split: the unscaled gradient of the loss in hidden); 0 on ignored rows."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    h, rows, row_ok = _row_block(H, stride_h, pid_m * BM, N, BM, D, BLOCK_D)
    first = 1 + split * items_per_split  # item 0 is padding, never a candidate
    end = tl.minimum(first + items_per_split, V)
    target = tl.load(TARGETS + rows, mask=row_ok, other=ignore_index)
    kept = target != ignore_index
    m = tl.full([BM], NEG_INF, tl.float32)
    total = tl.zeros([BM], tl.float32)
    target_score = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    for item0 in range(first, end, BV):
        s, e, items = _scores(h, E, stride_e, item0, end, BV, D, BLOCK_D, DOT_PREC)
        target_score += tl.sum(tl.where(items[None, :] == target[:, None], s, 0.0), 1)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        if WITH_GRAD:
            acc = acc * alpha[:, None] + tl.dot(p.to(e.dtype), e, input_precision=DOT_PREC)
        m = m_new
    has_items = total > 0
    lse = tl.where(has_items, m + tl.log2(tl.where(has_items, total, 1.0)), NEG_INF)
    tl.store(LSE + split * N + rows, lse, mask=row_ok)
    tl.store(TARGET_SCORE + split * N + rows, target_score, mask=row_ok)
    if WITH_GRAD:
        dofs = tl.arange(0, BLOCK_D)
        out = acc / tl.where(has_items, total, 1.0)[:, None]
        if SUBTRACT_TARGET:
            out -= tl.load(E + target[:, None].to(tl.int64) * stride_e + dofs[None, :],
                           mask=kept[:, None] & (dofs < D)[None, :], other=0.0).to(tl.float32)
        out = tl.where(kept[:, None], out, 0.0)
        offsets = (split * N + rows[:, None]).to(tl.int64) * D + dofs[None, :]
        tl.store(WEIGHTED + offsets, out, mask=row_ok[:, None] & (dofs < D)[None, :])


@triton.jit
def item_gradient(
    H, E, LSE, TARGETS, SCALE, GRAD,
    N, V, rows_per_split, stride_h, stride_e, ignore_index,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, PARTIAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Grid (item blocks, row splits). For items 1 + block * BV .., the sum over the split's kept rows of (softmax -
    one-hot target) times hidden, times SCALE (a device scalar: upstream gradient / kept rows) into GRAD [V, D] in its
    dtype, or with PARTIAL unscaled into GRAD [splits, V, D] float32. LSE [N] is the base-2 log-sum-exp over all
    items."""
    pid_v = tl.program_id(0)
    split = tl.program_id(1)
    item0 = 1 + pid_v * BV
    dofs = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BV, BLOCK_D], tl.float32)
    first = split * rows_per_split
    end = tl.minimum(first + rows_per_split, N)
    for row0 in range(first, end, BM):
        h, rows, row_ok = _row_block(H, stride_h, row0, end, BM, D, BLOCK_D)
        s, e, items = _scores(h, E, stride_e, item0, V, BV, D, BLOCK_D, DOT_PREC)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        target = tl.load(TARGETS + rows, mask=row_ok, other=ignore_index)
        p = tl.exp2(s - lse[:, None]) - (target[:, None] == items[None, :]).to(tl.float32)
        p = tl.where((target != ignore_index)[:, None], p, 0.0)  # rows past the end and ignored rows
        acc += tl.dot(tl.trans(p).to(h.dtype), h, input_precision=DOT_PREC)
    items = item0 + tl.arange(0, BV)
    offsets = (split * V + items[:, None]).to(tl.int64) * D + dofs[None, :]
    if not PARTIAL:
        acc *= tl.load(SCALE)
    tl.store(GRAD + offsets, acc.to(GRAD.dtype.element_ty), mask=(items < V)[:, None] & (dofs < D)[None, :])
