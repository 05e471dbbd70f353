"""Triton kernels of the fused BlossomRec attention; `blossom_attention_triton.py` launches them.

Layout: packed histories, the varlen convention of flash attention. Queries, outputs and output gradients are dense
[T, H, D], keys and values [T, HKV, D]: history s is token rows cu_seqlens[s] .. cu_seqlens[s + 1] - 1, its
position p at row cu_seqlens[s] + p. Its compressed keys and values are rows cu_compressed[s] + w of dense
[Wt, HKV, D]. Per-token buffers are token-major: lse and delta [T, H], block indices and sort keys [T, HKV, N_SEL].
Grid dim 0 is (history, kv head), which has room for any number of histories (dim 1 is capped at 65,535 on CUDA);
dim 1 is a block or tile of positions sized for the longest history (and `compressed_backward_dkdv`'s dim 2 a
segment of query positions). A program whose block starts past its history's end returns at once, so no history is
padded in memory, and one compile serves every batch: lengths and token counts are loaded or not specialised on.

Notation: a kv head serves G query heads; `b` = selection block size = compressed stride; compressed block `w` is
visible to query `t` when `w < t // b`; selection block `j` gets the summed group probability of the compressed
blocks `j .. j + SPAN - 1` (those overlapping it) and is selectable when `j < t // b`. Positions count from each
history's first token. Scores are kept in base-2 units (`qk_scale` = log2(e) / sqrt(D)), so every log-sum-exp
(`lse`) below is base 2.

Forward: `compressed_forward` (compressed branch, its lse, and in-kernel top-n block selection) and
`sparse_forward` (selected blocks + own block + STIS, sharing the own block's scores between the two branches).
Backward, atomic-free and hence deterministic: `backward_dq` (query-centric, all branches),
`sparse_backward_dkdv` (key-centric: own block, STIS reverse offsets, CSR list of the queries that selected the block)
and `compressed_backward_dkdv` (key-centric over compressed keys). Short batches replace `sparse_forward`,
`backward_dq` and `sparse_backward_dkdv` with the one-pass kernels at the end of this file.
"""

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _history(CU, s):
    """First row (int64) and number of rows of history `s` in a packed tensor whose row offsets are CU [S + 1]."""
    start = tl.load(CU + s).to(tl.int64)
    return start, (tl.load(CU + s + 1) - start).to(tl.int32)


@triton.jit
def _program(CU_SEQLENS, HKV: tl.constexpr):
    """This program's history and kv head (grid dim 0), the history's first token row and its length."""
    pid = tl.program_id(0)
    start, length = _history(CU_SEQLENS, pid // HKV)
    return pid // HKV, pid % HKV, start, length


@triton.jit
def _at(base, row0, pos, head, NH: tl.constexpr, D: tl.constexpr, dofs):
    """Pointers [R, BD] to (position, head) pairs (`head` a vector or a scalar) of the history whose first row is
    `row0` in a dense [rows, NH, D] tensor: the history's offset is one int64 scalar, the rest int32 vectors."""
    return base + row0 * (NH * D) + _rows(pos, head, NH, D, dofs)


@triton.jit
def _rows(pos, head, NH: tl.constexpr, D: tl.constexpr, dofs):
    """int32 offsets [R, BD] of (position, head) pairs from a history's first row in a dense [rows, NH, D] tensor."""
    return (pos * NH + head)[:, None] * D + dofs[None, :]


@triton.jit
def _online_update(m, l, acc, s, p_values):
    """One online-softmax step: s [R, C] base-2 scores (-inf = not attended), p_values [R or 1, C, BD]."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * p_values, 1)
    return m_new, l, acc


@triton.jit
def _is_stis_offset(delta, WINDOW: tl.constexpr):
    """delta in {0 .. WINDOW-1} or a power of two (powers below WINDOW are in the window anyway)."""
    return (delta >= 0) & ((delta < WINDOW) | ((delta > 0) & ((delta & (delta - 1)) == 0)))


@triton.jit
def _merge_top_n(best_s, best_j, candidates, j, slots, N_SEL: tl.constexpr):
    """The running top-N_SEL list (best_s, best_j [rows, NS], best first) merged with one tile's candidates [rows, C]
    (blocks `j`, in increasing order and after every block of the list) by N_SEL extractions of the largest score,
    the earlier block on ties. Scores are >= 0; -1 marks no block, -2 one taken."""
    merged_s = tl.full(best_s.shape, -1.0, tl.float32)
    merged_j = tl.full(best_j.shape, -1, tl.int32)
    for i in tl.static_range(N_SEL):
        top_best = tl.max(best_s, 1)
        top_new = tl.max(candidates, 1)
        from_best = top_best >= top_new
        j_best = tl.min(tl.where(best_s == top_best[:, None], best_j, 2147483647), 1)
        j_new = tl.min(tl.where(candidates == top_new[:, None], j[None, :], 2147483647), 1)
        top = tl.where(from_best, top_best, top_new)
        chosen = tl.where(top >= 0, tl.where(from_best, j_best, j_new), -1)
        merged_s = tl.where(slots[None, :] == i, tl.where(top >= 0, top, -1.0)[:, None], merged_s)
        merged_j = tl.where(slots[None, :] == i, chosen[:, None], merged_j)
        best_s = tl.where(from_best[:, None] & (best_j == j_best[:, None]), -2.0, best_s)
        candidates = tl.where((~from_best)[:, None] & (j[None, :] == j_new[:, None]), -2.0, candidates)
    return merged_s, merged_j


# ------------------------------------------------------------------------------------------------------------------
# Compressed branch + block selection (forward)
# ------------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def compressed_forward(
    Q, CK, CV, OC, LSEC, BIDX, SKEYS, CU_SEQLENS, CU_COMPRESSED, T, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr,
    BW: tl.constexpr, SEL_B: tl.constexpr, SPAN: tl.constexpr, N_SEL: tl.constexpr, NS: tl.constexpr,
    HAS_CV: tl.constexpr, SORT_KEYS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Compressed branch and its lse for BM positions of one history, then their top-N_SEL block indices (-1 =
    none), and with SORT_KEYS their int32 sort keys for the backward's reverse index: the group of a selected block,
    h * T + (the block's first token row), and for an empty slot HKV * T, past every group."""
    hist, h, start, L = _program(CU_SEQLENS, HKV)
    m0 = tl.program_id(1) * BM
    if m0 >= L:
        return
    c_start, W = _history(CU_COMPRESSED, hist)
    H: tl.constexpr = HKV * G
    rows = tl.arange(0, G * BM)
    g = rows // BM
    pos = m0 + rows % BM
    row_ok = pos < L
    dofs = tl.arange(0, BLOCK_D)
    dmask = dofs < D
    q = tl.load(_at(Q, start, pos, h * G + g, H, D, dofs), mask=row_ok[:, None] & dmask[None, :], other=0.0)
    last = tl.minimum(m0 + BM, L) - 1
    n_visible = tl.minimum(last // SEL_B, W)
    own = pos // SEL_B
    wofs = tl.arange(0, BW)

    m_i = tl.full([G * BM], NEG_INF, tl.float32)
    l_i = tl.zeros([G * BM], tl.float32)
    acc = tl.zeros([G * BM, BLOCK_D], tl.float32)
    for w0 in range(0, n_visible, BW):
        w = w0 + wofs
        wmask = (w < W)[:, None] & dmask[None, :]
        ck = tl.load(_at(CK, c_start, w, h, HKV, D, dofs), mask=wmask, other=0.0)
        s = tl.dot(q, tl.trans(ck), input_precision=DOT_PREC) * qk_scale
        visible = (w[None, :] < own[:, None]) & (w[None, :] < W)
        s = tl.where(visible, s, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_CV:
            cv = tl.load(_at(CV, c_start, w, h, HKV, D, dofs), mask=wmask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(cv.dtype), cv, input_precision=DOT_PREC)
        m_i = m_new
    has_key = l_i > 0
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), 0.0)
    tl.store(LSEC + start * H + pos * H + h * G + g, lse, mask=row_ok)
    if HAS_CV:
        out = acc / tl.where(has_key, l_i, 1.0)[:, None]
        tl.store(_at(OC, start, pos, h * G + g, H, D, dofs), out.to(OC.dtype.element_ty),
                 mask=row_ok[:, None] & dmask[None, :])

    # Top-N_SEL per position, merged tile by tile in increasing block order (`_merge_top_n`): exactly the reference's
    # stable descending sort. Each head's probabilities come from its own score tile, reading back the lse stored
    # above. (One tile of all G heads' rows, or each key's probabilities computed once and shifted to its SPAN blocks
    # with tl.gather, compiled to more instructions per tile for sm_90: benchmarks/README.md, eighth session.)
    tl.debug_barrier()
    positions = m0 + tl.arange(0, BM)
    pmask = positions < L
    own_p = positions // SEL_B
    slots = tl.arange(0, NS)
    best_s = tl.full([BM, NS], -1.0, tl.float32)
    best_j = tl.full([BM, NS], -1, tl.int32)
    n_selectable = last // SEL_B
    for j0 in range(0, n_selectable, BW):
        j = j0 + wofs
        score = tl.zeros([BM, BW], tl.float32)
        for o in tl.static_range(SPAN):
            w = j + o
            ck = tl.load(_at(CK, c_start, w, h, HKV, D, dofs), mask=(w < W)[:, None] & dmask[None, :],
                         other=0.0)
            visible = (w[None, :] < own_p[:, None]) & (w[None, :] < W)
            group_prob = tl.zeros([BM, BW], tl.float32)
            for gg in tl.static_range(G):
                q_g = tl.load(_at(Q, start, positions, h * G + gg, H, D, dofs), mask=pmask[:, None] & dmask[None, :],
                              other=0.0)
                lse_g = tl.load(LSEC + start * H + positions * H + h * G + gg, mask=pmask, other=0.0)
                s = tl.dot(q_g, tl.trans(ck), input_precision=DOT_PREC) * qk_scale
                group_prob += tl.where(visible, tl.exp2(s - lse_g[:, None]), 0.0)
            score += group_prob
        candidates = tl.where(j[None, :] < own_p[:, None], score, -1.0)
        best_s, best_j = _merge_top_n(best_s, best_j, candidates, j, slots, N_SEL)
    slot_ofs = (positions * HKV + h)[:, None] * N_SEL + slots[None, :]
    slot_mask = pmask[:, None] & (slots[None, :] < N_SEL)
    tl.store(BIDX + start * HKV * N_SEL + slot_ofs, best_j, mask=slot_mask)
    if SORT_KEYS:
        group = tl.where(best_j >= 0, h * T + start.to(tl.int32) + best_j * SEL_B, HKV * T)
        tl.store(SKEYS + start * HKV * N_SEL + slot_ofs, group, mask=slot_mask)


# ------------------------------------------------------------------------------------------------------------------
# Selected blocks + own block + STIS (forward)
#
# STIS is computed block-wise on the tensor cores: the keys t - delta of a query block lie in its own block, the
# M_NEAR blocks before it (window and small powers), and the blocks exactly P_FAR << i blocks back (powers of two
# >= the block size are whole multiples of it); each visited key block gets one [rows, SEL_B] score tile with the
# exact STIS offset mask. The own block's scores serve both LTIS (causal mask) and STIS.
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _online_dot(m, l, acc, s, v, DOT_PREC: tl.constexpr):
    """Online-softmax step with a [SEL_B, BD] value block on the tensor cores; s [R, SEL_B], -inf = not attended."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l, acc


@triton.jit
def _load_block(base, kb, L, ROW: tl.constexpr, SEL_B: tl.constexpr, dofs, dmask):
    """Key (or value) block `kb` [SEL_B, BD] of a history whose position 0 is at `base` (rows ROW apart; zeros
    outside 0..L-1), and its positions."""
    kpos = kb * SEL_B + tl.arange(0, SEL_B)
    kmask = (kpos >= 0) & (kpos < L)
    return tl.load(base + kpos[:, None] * ROW + dofs[None, :], mask=kmask[:, None] & dmask[None, :],
                   other=0.0), kpos


@triton.jit
def _load_selected_chunk(k_base, v_base, sel, c0, cofs, dofs, dmask3, ROW: tl.constexpr, SEL_B: tl.constexpr):
    """Keys and values [rows, C, BD] (float32) of chunk `c0` of each row's selected block `sel` (-1 = none)."""
    kpos = sel[:, None] * SEL_B + c0 + cofs[None, :]
    valid = (sel >= 0)[:, None] & (kpos >= 0)
    mask = valid[:, :, None] & dmask3
    kk = tl.load(k_base + kpos[:, :, None] * ROW + dofs[None, None, :], mask=mask, other=0.0).to(tl.float32)
    vv = tl.load(v_base + kpos[:, :, None] * ROW + dofs[None, None, :], mask=mask, other=0.0).to(tl.float32)
    return kk, vv, valid


@triton.jit
def _stis_scores(q, k, kpos, pos, L, qk_scale, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    valid = _is_stis_offset(pos[:, None] - kpos[None, :], WINDOW) & ((kpos >= 0) & (kpos < L))[None, :]
    return s, valid


@triton.jit
def _query_block(Q, start, L, blk, h, HKV: tl.constexpr, G: tl.constexpr, SEL_B: tl.constexpr, D: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Query block `blk` of the history at token row `start` for the G heads of kv head `h`: rows are (position,
    head); returns each row's position, head and validity, the head-dim offsets and mask, and the q tile."""
    rows = tl.arange(0, SEL_B * G)
    pos = blk * SEL_B + rows // G
    head = h * G + rows % G
    row_ok = pos < L
    dofs = tl.arange(0, BLOCK_D)
    dmask = dofs < D
    q = tl.load(_at(Q, start, pos, head, HKV * G, D, dofs), mask=row_ok[:, None] & dmask[None, :], other=0.0)
    return pos, head, row_ok, dofs, dmask, q


@triton.jit
def _key_block_scores(q, k_base, v_base, kb, pos, L, qk_scale, ROW: tl.constexpr, SEL_B: tl.constexpr,
                      WINDOW: tl.constexpr, dofs, dmask, DOT_PREC: tl.constexpr):
    """Key and value block `kb`, the rows' base-2 scores against it and its STIS offset mask."""
    k, kpos = _load_block(k_base, kb, L, ROW, SEL_B, dofs, dmask)
    v, _ = _load_block(v_base, kb, L, ROW, SEL_B, dofs, dmask)
    s, stis_valid = _stis_scores(q, k, kpos, pos, L, qk_scale, WINDOW, DOT_PREC)
    return k, v, kpos, s, stis_valid


@triton.jit(do_not_specialize=["n_far"])
def sparse_forward(
    Q, K, V, BIDX, OS, OT, LSES, LSET, CU_SEQLENS, n_far, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SEL_B: tl.constexpr,
    N_SEL: tl.constexpr, WINDOW: tl.constexpr, M_NEAR: tl.constexpr, P_FAR: tl.constexpr, C: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One program = one selection block of one history's queries (all G heads of one kv head)."""
    _, h, start, L = _program(CU_SEQLENS, HKV)
    blk = tl.program_id(1)
    if blk * SEL_B >= L:
        return
    R: tl.constexpr = SEL_B * G
    ROW: tl.constexpr = HKV * D
    pos, head, row_ok, dofs, dmask, q = _query_block(Q, start, L, blk, h, HKV, G, SEL_B, D, BLOCK_D)
    qf = q.to(tl.float32) * qk_scale
    k_base = K + (start * HKV + h) * D
    v_base = V + (start * HKV + h) * D
    cofs = tl.arange(0, C)
    dmask3 = dmask[None, None, :]

    m_s = tl.full([R], NEG_INF, tl.float32)
    l_s = tl.zeros([R], tl.float32)
    acc_s = tl.zeros([R, BLOCK_D], tl.float32)
    m_t = tl.full([R], NEG_INF, tl.float32)
    l_t = tl.zeros([R], tl.float32)
    acc_t = tl.zeros([R, BLOCK_D], tl.float32)

    # LTIS: each position's selected blocks (gathered per row; they all end before the own block: no causal mask).
    # One online softmax per row, merged chunk by chunk: a softmax per key slot, merged once after the loop, compiled
    # to fewer instructions but ran 35 % slower on an H100 (benchmarks/README.md, thirteenth session).
    for i in range(N_SEL):
        sel = tl.load(BIDX + start * HKV * N_SEL + (pos * HKV + h) * N_SEL + i, mask=row_ok, other=-1)
        for c0 in range(0, SEL_B, C):
            kk, vv, valid = _load_selected_chunk(k_base, v_base, sel, c0, cofs, dofs, dmask3, ROW, SEL_B)
            s = tl.where(valid, tl.sum(qf[:, None, :] * kk, 2), NEG_INF)
            m_s, l_s, acc_s = _online_update(m_s, l_s, acc_s, s, vv)

    # the own block: LTIS (causal) and STIS share one score tile
    k, v, kpos, s, stis_valid = _key_block_scores(q, k_base, v_base, blk, pos, L, qk_scale, ROW, SEL_B, WINDOW,
                                                  dofs, dmask, DOT_PREC)
    m_s, l_s, acc_s = _online_dot(m_s, l_s, acc_s, tl.where(pos[:, None] >= kpos[None, :], s, NEG_INF), v, DOT_PREC)
    m_t, l_t, acc_t = _online_dot(m_t, l_t, acc_t, tl.where(stis_valid, s, NEG_INF), v, DOT_PREC)

    # STIS: the near blocks, then the far power-of-two blocks
    for mm in range(1, tl.minimum(M_NEAR, blk) + 1):
        k, v, kpos, s, valid = _key_block_scores(q, k_base, v_base, blk - mm, pos, L, qk_scale, ROW, SEL_B, WINDOW,
                                                 dofs, dmask, DOT_PREC)
        m_t, l_t, acc_t = _online_dot(m_t, l_t, acc_t, tl.where(valid, s, NEG_INF), v, DOT_PREC)
    for i in range(0, n_far):
        mm = P_FAR << i
        if mm <= blk:
            k, v, kpos, s, valid = _key_block_scores(q, k_base, v_base, blk - mm, pos, L, qk_scale, ROW, SEL_B,
                                                     WINDOW, dofs, dmask, DOT_PREC)
            m_t, l_t, acc_t = _online_dot(m_t, l_t, acc_t, tl.where(valid, s, NEG_INF), v, DOT_PREC)

    _store_branch(OS, LSES, m_s, l_s, acc_s, start, pos, head, row_ok, HKV * G, D, dofs, dmask)
    _store_branch(OT, LSET, m_t, l_t, acc_t, start, pos, head, row_ok, HKV * G, D, dofs, dmask)


@triton.jit
def _store_branch(O, LSE, m, l, acc, start, pos, head, row_ok, H: tl.constexpr, D: tl.constexpr, dofs, dmask):
    """One branch's normalised output rows and base-2 lse (0 for a row that attends to nothing)."""
    has = l > 0
    tl.store(O + start * (H * D) + _rows(pos, head, H, D, dofs),
             (acc / tl.where(has, l, 1.0)[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])
    tl.store(LSE + start * H + pos * H + head, tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), 0.0), mask=row_ok)


# ------------------------------------------------------------------------------------------------------------------
# Backward: dq (query-centric)
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _dq_step(dq, q, do, lse, delta, s_valid, kk, vv):
    """dq [R, C, BD] += dS K for one gathered chunk, per key slot (summed once after the loop, not per chunk across
    lanes); q is pre-scaled (base 2), kk/vv [R, C, BD]; dq stays unscaled."""
    s = tl.sum(q[:, None, :] * kk, 2)
    p = tl.where(s_valid, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.sum(do[:, None, :] * vv, 2)
    ds = p * (dp - delta[:, None])
    return dq + ds[:, :, None] * kk


@triton.jit
def _dq_dot(dq, s, valid, do, lse, delta, k, v, DOT_PREC: tl.constexpr):
    """dq += dS K for one key block on the tensor cores; s [R, SEL_B] base-2 scores."""
    p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)


@triton.jit(do_not_specialize=["n_far"])
def backward_dq(
    Q, K, V, BIDX, OS, OT, DOS, DOT, LSES, LSET, DELS, DELT, CK, CV, OC, DOC, LSEC, DELC, DQ,
    CU_SEQLENS, CU_COMPRESSED, n_far, qk_scale, sm_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SEL_B: tl.constexpr,
    N_SEL: tl.constexpr, WINDOW: tl.constexpr, M_NEAR: tl.constexpr, P_FAR: tl.constexpr, C: tl.constexpr,
    HAS_CV: tl.constexpr, BW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dq of every branch for one query block (mirror of `sparse_forward`, plus the compressed branch, whose keys
    all queries of a selection block see alike: w < block), and the rows' delta = dO . O of each branch."""
    hist, h, start, L = _program(CU_SEQLENS, HKV)
    blk = tl.program_id(1)
    if blk * SEL_B >= L:
        return
    R: tl.constexpr = SEL_B * G
    ROW: tl.constexpr = HKV * D
    pos, head, row_ok, dofs, dmask, q = _query_block(Q, start, L, blk, h, HKV, G, SEL_B, D, BLOCK_D)
    qf = q.to(tl.float32) * qk_scale
    do_s, lse_s, delta_s = _branch_rows(OS, DOS, LSES, DELS, start, pos, head, row_ok, HKV * G, D, dofs, dmask)
    do_t, lse_t, delta_t = _branch_rows(OT, DOT, LSET, DELT, start, pos, head, row_ok, HKV * G, D, dofs, dmask)
    do_sf = do_s.to(tl.float32)
    k_base = K + (start * HKV + h) * D
    v_base = V + (start * HKV + h) * D
    cofs = tl.arange(0, C)
    dmask3 = dmask[None, None, :]
    dq_c = tl.zeros([R, C, BLOCK_D], tl.float32)
    for i in range(N_SEL):
        sel = tl.load(BIDX + start * HKV * N_SEL + (pos * HKV + h) * N_SEL + i, mask=row_ok, other=-1)
        for c0 in range(0, SEL_B, C):
            kk, vv, valid = _load_selected_chunk(k_base, v_base, sel, c0, cofs, dofs, dmask3, ROW, SEL_B)
            dq_c = _dq_step(dq_c, qf, do_sf, lse_s, delta_s, valid, kk, vv)
    dq = tl.sum(dq_c, 1)

    k, v, kpos, s, stis_valid = _key_block_scores(q, k_base, v_base, blk, pos, L, qk_scale, ROW, SEL_B, WINDOW,
                                                  dofs, dmask, DOT_PREC)
    dq = _dq_dot(dq, s, pos[:, None] >= kpos[None, :], do_s, lse_s, delta_s, k, v, DOT_PREC)
    dq = _dq_dot(dq, s, stis_valid, do_t, lse_t, delta_t, k, v, DOT_PREC)
    for mm in range(1, tl.minimum(M_NEAR, blk) + 1):
        k, v, kpos, s, valid = _key_block_scores(q, k_base, v_base, blk - mm, pos, L, qk_scale, ROW, SEL_B, WINDOW,
                                                 dofs, dmask, DOT_PREC)
        dq = _dq_dot(dq, s, valid, do_t, lse_t, delta_t, k, v, DOT_PREC)
    for i in range(0, n_far):
        mm = P_FAR << i
        if mm <= blk:
            k, v, kpos, s, valid = _key_block_scores(q, k_base, v_base, blk - mm, pos, L, qk_scale, ROW, SEL_B,
                                                     WINDOW, dofs, dmask, DOT_PREC)
            dq = _dq_dot(dq, s, valid, do_t, lse_t, delta_t, k, v, DOT_PREC)
    if HAS_CV:
        dq = _compressed_dq(dq, q, CK, CV, OC, DOC, LSEC, DELC, CU_COMPRESSED, hist, h, blk, start, pos, head, row_ok,
                            qk_scale, HKV, G, D, BW, dofs, dmask, DOT_PREC)
    _store_dq(DQ, dq * sm_scale, start, pos, head, row_ok, HKV * G, D, dofs, dmask)


@triton.jit
def _branch_rows(O, DO, LSE, DELTA, start, pos, head, row_ok, H: tl.constexpr, D: tl.constexpr, dofs, dmask):
    """One branch's output gradient rows, their lse, and delta = dO . O, which is also stored for the dk/dv
    kernels."""
    ofs = start * (H * D) + _rows(pos, head, H, D, dofs)
    rmask = row_ok[:, None] & dmask[None, :]
    do = tl.load(DO + ofs, mask=rmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * tl.load(O + ofs, mask=rmask, other=0.0).to(tl.float32), 1)
    row = start * H + pos * H + head
    tl.store(DELTA + row, delta, mask=row_ok)
    return do, tl.load(LSE + row, mask=row_ok, other=0.0), delta


@triton.jit
def _compressed_dq(dq, q, CK, CV, OC, DOC, LSEC, DELC, CU_COMPRESSED, hist, h, blk, start, pos, head, row_ok,
                   qk_scale, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BW: tl.constexpr, dofs, dmask,
                   DOT_PREC: tl.constexpr):
    """dq += the compressed branch's part for the rows of query block `blk` (all see compressed keys w < blk). Only
    the last key tile needs a mask: a row past the history's end has zero dO, and its dq is not stored."""
    do_c, lse_c, delta_c = _branch_rows(OC, DOC, LSEC, DELC, start, pos, head, row_ok, HKV * G, D, dofs, dmask)
    c_start, W = _history(CU_COMPRESSED, hist)
    wofs = tl.arange(0, BW)
    n_visible = tl.minimum(blk, W)
    for w0 in range(0, n_visible, BW):
        w = w0 + wofs
        wmask = (w < n_visible)[:, None] & dmask[None, :]
        ck = tl.load(_at(CK, c_start, w, h, HKV, D, dofs), mask=wmask, other=0.0)
        cv = tl.load(_at(CV, c_start, w, h, HKV, D, dofs), mask=wmask, other=0.0)
        s_c = tl.dot(q, tl.trans(ck), input_precision=DOT_PREC) * qk_scale
        if w0 + BW > n_visible:
            s_c = tl.where((w < n_visible)[None, :], s_c, NEG_INF)
        dq = _dq_dot(dq, s_c, True, do_c, lse_c, delta_c, ck, cv, DOT_PREC)
    return dq


@triton.jit
def _store_dq(DQ, dq, start, pos, head, row_ok, H: tl.constexpr, D: tl.constexpr, dofs, dmask):
    tl.store(DQ + start * (H * D) + _rows(pos, head, H, D, dofs), dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & dmask[None, :])


# ------------------------------------------------------------------------------------------------------------------
# Backward: dk, dv (key-centric, no atomics)
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_dot(dk, dv, q, do, p, delta, v, DOT_PREC: tl.constexpr):
    """dk (unscaled) and dv of one key block from a tile of query rows; p [R, SEL_B] probabilities."""
    dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _stis_query_block(dk, dv, k, v, kpos, qb, Q, DOT, LSET, DELT, start, L, h, qk_scale, HKV: tl.constexpr,
                      G: tl.constexpr, SEL_B: tl.constexpr, WINDOW: tl.constexpr, D: tl.constexpr, dofs, dmask,
                      DOT_PREC: tl.constexpr):
    """STIS contribution to one key block from the queries of query block `qb` (all G heads) of the same history."""
    rows = tl.arange(0, SEL_B * G)
    head = h * G + rows // SEL_B
    qpos = qb * SEL_B + rows % SEL_B
    row_ok = qpos < L
    rmask = row_ok[:, None] & dmask[None, :]
    x0, r0 = start * (HKV * G * D), start * (HKV * G)
    ofs = _rows(qpos, head, HKV * G, D, dofs)
    q = tl.load(Q + x0 + ofs, mask=rmask, other=0.0)
    do = tl.load(DOT + x0 + ofs, mask=rmask, other=0.0)
    row = qpos * (HKV * G) + head
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    valid = _is_stis_offset(qpos[:, None] - kpos[None, :], WINDOW) & row_ok[:, None] & (kpos < L)[None, :]
    p = tl.where(valid, tl.exp2(s - tl.load(LSET + r0 + row, mask=row_ok, other=0.0)[:, None]), 0.0)
    return _dkdv_dot(dk, dv, q, do, p, tl.load(DELT + r0 + row, mask=row_ok, other=0.0), v, DOT_PREC)


@triton.jit
def _key_block_grads(K, V, start, h, blk, L, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     KEYS: tl.constexpr):
    """Head-dim offsets and mask, key and value tile `blk` of KEYS keys of kv head `h`, its positions, and zeroed
    dk, dv."""
    dofs = tl.arange(0, BLOCK_D)
    dmask = dofs < D
    k, kpos = _load_block(K + (start * HKV + h) * D, blk, L, HKV * D, KEYS, dofs, dmask)
    v = _load_block(V + (start * HKV + h) * D, blk, L, HKV * D, KEYS, dofs, dmask)[0]
    zeros = tl.zeros([KEYS, BLOCK_D], tl.float32)
    return dofs, dmask, k, v, kpos, zeros, zeros


@triton.jit
def _store_key_block_grads(DK, DV, dk, dv, start, kpos, h, L, HKV: tl.constexpr, D: tl.constexpr, dofs, dmask):
    omask = (kpos < L)[:, None] & dmask[None, :]
    tl.store(_at(DK, start, kpos, h, HKV, D, dofs), dk.to(DK.dtype.element_ty), mask=omask)
    tl.store(_at(DV, start, kpos, h, HKV, D, dofs), dv.to(DV.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["T", "n_far"])
def sparse_backward_dkdv(
    Q, K, V, DOS, DOT, LSES, LSET, DELS, DELT, CSR_OFFSETS, CSR_QUERIES, DK, DV, CU_SEQLENS, T, n_far, qk_scale,
    sm_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SEL_B: tl.constexpr,
    N_SEL: tl.constexpr, WINDOW: tl.constexpr, M_NEAR: tl.constexpr, P_FAR: tl.constexpr, QC: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dk, dv of one selection block of one history's keys from every query that reads it, in a fixed order: its
    own block's queries (LTIS causal + STIS), the later query blocks whose STIS offsets land on it, and the queries
    that selected it (CSR list of flat selection indices, built on the host from the sort keys of
    `compressed_forward`)."""
    _, h, start, L = _program(CU_SEQLENS, HKV)
    blk = tl.program_id(1)
    if blk * SEL_B >= L:
        return
    H: tl.constexpr = HKV * G
    x0, r0 = start * (H * D), start * H  # the history's first row in every [T, H, D] and [T, H] tensor
    n_blocks = (L + SEL_B - 1) // SEL_B
    dofs, dmask, k, v, kpos, dk, dv = _key_block_grads(K, V, start, h, blk, L, HKV, D, BLOCK_D, SEL_B)

    # (1) the own block's queries, all G heads: LTIS with the causal mask, STIS with the offset mask
    rows = tl.arange(0, SEL_B * G)
    head = h * G + rows // SEL_B
    qpos = blk * SEL_B + rows % SEL_B
    row_ok = qpos < L
    rmask = row_ok[:, None] & dmask[None, :]
    ofs = _rows(qpos, head, H, D, dofs)
    q = tl.load(Q + x0 + ofs, mask=rmask, other=0.0)
    do_s = tl.load(DOS + x0 + ofs, mask=rmask, other=0.0)
    row = qpos * H + head
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.where((qpos[:, None] >= kpos[None, :]) & row_ok[:, None],
                 tl.exp2(s - tl.load(LSES + r0 + row, mask=row_ok, other=0.0)[:, None]), 0.0)
    dk, dv = _dkdv_dot(dk, dv, q, do_s, p, tl.load(DELS + r0 + row, mask=row_ok, other=0.0), v, DOT_PREC)
    dk, dv = _stis_query_block(dk, dv, k, v, kpos, blk, Q, DOT, LSET, DELT, start, L, h, qk_scale, HKV, G, SEL_B,
                               WINDOW, D, dofs, dmask, DOT_PREC)

    # (2) STIS from later query blocks: the near ones, then the far power-of-two ones
    for mm in range(1, tl.minimum(M_NEAR, n_blocks - 1 - blk) + 1):
        dk, dv = _stis_query_block(dk, dv, k, v, kpos, blk + mm, Q, DOT, LSET, DELT, start, L, h, qk_scale, HKV, G,
                                   SEL_B, WINDOW, D, dofs, dmask, DOT_PREC)
    for i in range(0, n_far):
        qb = blk + (P_FAR << i)
        if qb < n_blocks:
            dk, dv = _stis_query_block(dk, dv, k, v, kpos, qb, Q, DOT, LSET, DELT, start, L, h, qk_scale, HKV, G,
                                       SEL_B, WINDOW, D, dofs, dmask, DOT_PREC)

    # (3) LTIS: the queries that selected this block (each query once; all G heads share its selection)
    qrows = tl.arange(0, QC * G)
    qi = qrows % QC
    qhead = h * G + qrows // QC
    csr = h * T.to(tl.int64) + start + blk * SEL_B
    first = tl.load(CSR_OFFSETS + csr)
    end = tl.load(CSR_OFFSETS + csr + 1)
    for i0 in range(first, end, QC):
        in_list = i0 + qi < end
        tpos = (tl.load(CSR_QUERIES + i0 + qi, mask=in_list, other=0) // (HKV * N_SEL) - start).to(tl.int32)
        qm = in_list[:, None] & dmask[None, :]
        sel_ofs = _rows(tpos, qhead, H, D, dofs)
        q_sel = tl.load(Q + x0 + sel_ofs, mask=qm, other=0.0)
        do_sel = tl.load(DOS + x0 + sel_ofs, mask=qm, other=0.0)
        row_sel = tpos * H + qhead
        s_sel = tl.dot(q_sel, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p_sel = tl.where(in_list[:, None],
                         tl.exp2(s_sel - tl.load(LSES + r0 + row_sel, mask=in_list, other=0.0)[:, None]), 0.0)
        dk, dv = _dkdv_dot(dk, dv, q_sel, do_sel, p_sel, tl.load(DELS + r0 + row_sel, mask=in_list, other=0.0),
                           v, DOT_PREC)

    _store_key_block_grads(DK, DV, dk * sm_scale, dv, start, kpos, h, L, HKV, D, dofs, dmask)


@triton.jit(do_not_specialize=["part_stride", "segment_length"])
def compressed_backward_dkdv(
    Q, CK, CV, DOC, LSEC, DELC, DCK, DCV, CU_SEQLENS, CU_COMPRESSED, part_stride, segment_length, qk_scale, sm_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr,
    BW: tl.constexpr, SEL_B: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dck, dcv of a tile of one history's compressed keys from the queries that see them (t >= (w + 1) * b) in one
    segment of `segment_length` positions (grid dim 2), in order. Segment s writes its part at DCK + s *
    part_stride: with several segments these are float32 parts that the caller sums, so that the first tiles, which
    every later query sees, do not leave one program per tile running long after the rest (at L = 16,384: 512 row
    tiles for the first key tile against one for the last)."""
    hist, h, start, L = _program(CU_SEQLENS, HKV)
    c_start, W = _history(CU_COMPRESSED, hist)
    w0 = tl.program_id(1) * BW
    if w0 >= W:
        return
    segment = tl.program_id(2)
    if segment * segment_length >= L:  # past the history's end: its part stays zero
        return
    end = tl.minimum(L, (segment + 1) * segment_length)
    H: tl.constexpr = HKV * G
    x0, r0 = start * (H * D), start * H
    w = w0 + tl.arange(0, BW)
    dofs = tl.arange(0, BLOCK_D)
    dmask = dofs < D
    kmask = (w < W)[:, None] & dmask[None, :]
    ck = tl.load(_at(CK, c_start, w, h, HKV, D, dofs), mask=kmask, other=0.0)
    cv = tl.load(_at(CV, c_start, w, h, HKV, D, dofs), mask=kmask, other=0.0)
    dck = tl.zeros([BW, BLOCK_D], tl.float32)
    dcv = tl.zeros([BW, BLOCK_D], tl.float32)
    rows = tl.arange(0, G * BM)
    head = h * G + rows // BM
    for m0 in range(tl.maximum((w0 + 1) * SEL_B, segment * segment_length), end, BM):
        pos = m0 + rows % BM
        row_ok = pos < end
        rmask = row_ok[:, None] & dmask[None, :]
        ofs = _rows(pos, head, H, D, dofs)
        q = tl.load(Q + x0 + ofs, mask=rmask, other=0.0)
        do = tl.load(DOC + x0 + ofs, mask=rmask, other=0.0)
        row = pos * H + head
        s = tl.dot(q, tl.trans(ck), input_precision=DOT_PREC) * qk_scale
        visible = (w[None, :] < (pos // SEL_B)[:, None]) & (w[None, :] < W) & row_ok[:, None]
        p = tl.where(visible, tl.exp2(s - tl.load(LSEC + r0 + row, mask=row_ok, other=0.0)[:, None]), 0.0)
        dcv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(cv).to(do.dtype), input_precision=DOT_PREC)
        ds = p * (dp - tl.load(DELC + r0 + row, mask=row_ok, other=0.0)[:, None])
        dck += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PREC)
    part = segment.to(tl.int64) * part_stride
    tl.store(_at(DCK + part, c_start, w, h, HKV, D, dofs), (dck * sm_scale).to(DCK.dtype.element_ty), mask=kmask)
    tl.store(_at(DCV + part, c_start, w, h, HKV, D, dofs), dcv.to(DCV.dtype.element_ty), mask=kmask)


# ------------------------------------------------------------------------------------------------------------------
# Short histories (at most 64 selection blocks): one pass over the causal key tiles
#
# Where a query's visible keys fit in a few tiles, visiting every causal key tile on the tensor cores costs less than
# gathering its selected blocks row by row and sorting the selection for the backward. Each tile of BK keys gets one
# score tile, masked twice: LTIS (a key in one of the row's selected blocks, kept as bits of an int64, or causal in
# the row's own block) and STIS (the exact offset mask). Same outputs, lse and gradients as the gathered kernels.
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _selection_bits(BIDX, start, pos, row_ok, h, HKV: tl.constexpr, N_SEL: tl.constexpr):
    """Each row's selected blocks as the set bits of an int64 (blocks 0..63; -1 slots add nothing)."""
    bits = tl.zeros(pos.shape, tl.int64)
    for i in tl.static_range(N_SEL):
        sel = tl.load(BIDX + start * HKV * N_SEL + (pos * HKV + h) * N_SEL + i, mask=row_ok, other=-1)
        bits |= tl.where(sel >= 0, tl.full(pos.shape, 1, tl.int64) << tl.maximum(sel, 0).to(tl.int64), 0)
    return bits


@triton.jit
def _one_pass_masks(bits, pos, kpos, blk, row_ok, L, SEL_B: tl.constexpr, WINDOW: tl.constexpr):
    """LTIS and STIS masks [rows, keys] of one score tile: rows at positions `pos` of query block `blk`."""
    kblk = kpos // SEL_B
    real = row_ok[:, None] & (kpos < L)[None, :]
    selected = ((bits[:, None] >> kblk[None, :].to(tl.int64)) & 1) != 0
    own = (kblk[None, :] == blk) & (pos[:, None] >= kpos[None, :])
    return (selected | own) & real, _is_stis_offset(pos[:, None] - kpos[None, :], WINDOW) & real


@triton.jit
def _key_tile_scores(q, K, V, start, h, kt, bits, pos, blk, row_ok, L, qk_scale, HKV: tl.constexpr, D: tl.constexpr,
                     BK: tl.constexpr, SEL_B: tl.constexpr, WINDOW: tl.constexpr, dofs, dmask, DOT_PREC: tl.constexpr):
    """Key and value tile `kt` (BK keys) of kv head `h` of the history at token row `start`, the rows' base-2 scores
    against it, and its LTIS and STIS masks."""
    k, kpos = _load_block(K + (start * HKV + h) * D, kt, L, HKV * D, BK, dofs, dmask)
    v = _load_block(V + (start * HKV + h) * D, kt, L, HKV * D, BK, dofs, dmask)[0]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    ltis, stis = _one_pass_masks(bits, pos, kpos, blk, row_ok, L, SEL_B, WINDOW)
    return k, v, s, ltis, stis


@triton.jit
def one_pass_forward(
    Q, K, V, BIDX, OS, OT, LSES, LSET, CU_SEQLENS, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SEL_B: tl.constexpr,
    N_SEL: tl.constexpr, WINDOW: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Selected + own block and STIS outputs of one selection block of queries (all G heads of one kv head)."""
    _, h, start, L = _program(CU_SEQLENS, HKV)
    blk = tl.program_id(1)
    if blk * SEL_B >= L:
        return
    R: tl.constexpr = SEL_B * G
    pos, head, row_ok, dofs, dmask, q = _query_block(Q, start, L, blk, h, HKV, G, SEL_B, D, BLOCK_D)
    bits = _selection_bits(BIDX, start, pos, row_ok, h, HKV, N_SEL)
    m_s = tl.full([R], NEG_INF, tl.float32)
    l_s = tl.zeros([R], tl.float32)
    acc_s = tl.zeros([R, BLOCK_D], tl.float32)
    m_t = tl.full([R], NEG_INF, tl.float32)
    l_t = tl.zeros([R], tl.float32)
    acc_t = tl.zeros([R, BLOCK_D], tl.float32)
    for kt in range(0, tl.cdiv(tl.minimum((blk + 1) * SEL_B, L), BK)):
        k, v, s, ltis, stis = _key_tile_scores(q, K, V, start, h, kt, bits, pos, blk, row_ok, L, qk_scale, HKV, D,
                                               BK, SEL_B, WINDOW, dofs, dmask, DOT_PREC)
        m_s, l_s, acc_s = _online_dot(m_s, l_s, acc_s, tl.where(ltis, s, NEG_INF), v, DOT_PREC)
        m_t, l_t, acc_t = _online_dot(m_t, l_t, acc_t, tl.where(stis, s, NEG_INF), v, DOT_PREC)
    _store_branch(OS, LSES, m_s, l_s, acc_s, start, pos, head, row_ok, HKV * G, D, dofs, dmask)
    _store_branch(OT, LSET, m_t, l_t, acc_t, start, pos, head, row_ok, HKV * G, D, dofs, dmask)


@triton.jit
def one_pass_backward_dq(
    Q, K, V, BIDX, OS, OT, DOS, DOT, LSES, LSET, DELS, DELT, CK, CV, OC, DOC, LSEC, DELC, DQ,
    CU_SEQLENS, CU_COMPRESSED, qk_scale, sm_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SEL_B: tl.constexpr,
    N_SEL: tl.constexpr, WINDOW: tl.constexpr, BK: tl.constexpr, HAS_CV: tl.constexpr, BW: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dq of every branch for one query block, the causal key tiles visited once (mirror of `one_pass_forward`),
    and the rows' delta = dO . O of each branch."""
    hist, h, start, L = _program(CU_SEQLENS, HKV)
    blk = tl.program_id(1)
    if blk * SEL_B >= L:
        return
    R: tl.constexpr = SEL_B * G
    pos, head, row_ok, dofs, dmask, q = _query_block(Q, start, L, blk, h, HKV, G, SEL_B, D, BLOCK_D)
    do_s, lse_s, delta_s = _branch_rows(OS, DOS, LSES, DELS, start, pos, head, row_ok, HKV * G, D, dofs, dmask)
    do_t, lse_t, delta_t = _branch_rows(OT, DOT, LSET, DELT, start, pos, head, row_ok, HKV * G, D, dofs, dmask)
    bits = _selection_bits(BIDX, start, pos, row_ok, h, HKV, N_SEL)
    dq = tl.zeros([R, BLOCK_D], tl.float32)
    for kt in range(0, tl.cdiv(tl.minimum((blk + 1) * SEL_B, L), BK)):
        k, v, s, ltis, stis = _key_tile_scores(q, K, V, start, h, kt, bits, pos, blk, row_ok, L, qk_scale, HKV, D,
                                               BK, SEL_B, WINDOW, dofs, dmask, DOT_PREC)
        ds = _branch_ds(s, ltis, do_s, lse_s, delta_s, v, DOT_PREC)[1] + \
            _branch_ds(s, stis, do_t, lse_t, delta_t, v, DOT_PREC)[1]
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    if HAS_CV:
        dq = _compressed_dq(dq, q, CK, CV, OC, DOC, LSEC, DELC, CU_COMPRESSED, hist, h, blk, start, pos, head, row_ok,
                            qk_scale, HKV, G, D, BW, dofs, dmask, DOT_PREC)
    _store_dq(DQ, dq * sm_scale, start, pos, head, row_ok, HKV * G, D, dofs, dmask)


@triton.jit
def _branch_ds(s, valid, do, lse, delta, v, DOT_PREC: tl.constexpr):
    """A branch's probabilities and score gradients [rows, keys] of one score tile."""
    p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
    return p, p * (tl.dot(do, tl.trans(v), input_precision=DOT_PREC) - delta[:, None])


@triton.jit
def one_pass_backward_dkdv(
    Q, K, V, BIDX, DOS, DOT, LSES, LSET, DELS, DELT, DK, DV, CU_SEQLENS, qk_scale, sm_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SEL_B: tl.constexpr,
    N_SEL: tl.constexpr, WINDOW: tl.constexpr, BKK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dk, dv of one tile of BKK keys (a multiple of SEL_B: one or more selection blocks) from every query block at
    or after its first, visited once in order (both branches from one score tile): no reverse index of the
    selection is needed."""
    _, h, start, L = _program(CU_SEQLENS, HKV)
    kt = tl.program_id(1)
    if kt * BKK >= L:
        return
    H: tl.constexpr = HKV * G
    dofs, dmask, k, v, kpos, dk, dv = _key_block_grads(K, V, start, h, kt, L, HKV, D, BLOCK_D, BKK)
    rows = tl.arange(0, SEL_B * G)
    for qb in range(kt * (BKK // SEL_B), tl.cdiv(L, SEL_B)):
        pos = qb * SEL_B + rows // G
        head = h * G + rows % G
        row_ok = pos < L
        ofs = start * (H * D) + _rows(pos, head, H, D, dofs)
        q = tl.load(Q + ofs, mask=row_ok[:, None] & dmask[None, :], other=0.0)
        do_s = tl.load(DOS + ofs, mask=row_ok[:, None] & dmask[None, :], other=0.0)
        do_t = tl.load(DOT + ofs, mask=row_ok[:, None] & dmask[None, :], other=0.0)
        row = start * H + pos * H + head
        bits = _selection_bits(BIDX, start, pos, row_ok, h, HKV, N_SEL)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        ltis, stis = _one_pass_masks(bits, pos, kpos, qb, row_ok, L, SEL_B, WINDOW)
        p_s, ds_s = _branch_ds(s, ltis, do_s, tl.load(LSES + row, mask=row_ok, other=0.0),
                               tl.load(DELS + row, mask=row_ok, other=0.0), v, DOT_PREC)
        p_t, ds_t = _branch_ds(s, stis, do_t, tl.load(LSET + row, mask=row_ok, other=0.0),
                               tl.load(DELT + row, mask=row_ok, other=0.0), v, DOT_PREC)
        dv += tl.dot(tl.trans(p_s).to(do_s.dtype), do_s, input_precision=DOT_PREC)
        dv += tl.dot(tl.trans(p_t).to(do_t.dtype), do_t, input_precision=DOT_PREC)
        dk += tl.dot(tl.trans(ds_s + ds_t).to(q.dtype), q, input_precision=DOT_PREC)
    _store_key_block_grads(DK, DV, dk * sm_scale, dv, start, kpos, h, L, HKV, D, dofs, dmask)


# ------------------------------------------------------------------------------------------------------------------
# Gated sum of the branches: out = sum_i sigmoid(z_i) * o_i (one pass each way instead of a dozen elementwise kernels)
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _gated_rows(row, L, H: tl.constexpr):
    """Flat row index over (batch, position, head) -> (batch, head, position)."""
    return row // (L * H), row % H, (row // H) % L


@triton.jit
def _gate(LOGITS, offsets, row_ok):
    """The gate of each row: sigmoid of its logit."""
    return tl.sigmoid(tl.load(LOGITS + offsets, mask=row_ok, other=0.0).to(tl.float32))


@triton.jit
def _branch(O, ofs, mask, dofs):
    return tl.load(O + ofs[:, None] + dofs[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["n_rows", "L"])
def gated_sum_forward(
    LOGITS, O0, O1, O2, OUT, slb, sll, so0b, so0h, so0l, so1b, so1h, so1l, so2b, so2h, so2l, soutb, south, soutl,
    n_rows, L, H: tl.constexpr, NB: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
):
    """LOGITS [B, L, H, NB] with any batch and position strides; branches and OUT [B, H, L, D] by their strides."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b, h, pos = _gated_rows(rows.to(tl.int64), L, H)
    dofs = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (dofs < D)[None, :]
    logit_row = b * slb + pos * sll + h * NB
    acc = _gate(LOGITS, logit_row, row_ok)[:, None] * _branch(O0, b * so0b + h * so0h + pos * so0l, mask, dofs)
    acc += _gate(LOGITS, logit_row + 1, row_ok)[:, None] * _branch(O1, b * so1b + h * so1h + pos * so1l, mask, dofs)
    if NB == 3:
        acc += _gate(LOGITS, logit_row + 2, row_ok)[:, None] * _branch(O2, b * so2b + h * so2h + pos * so2l, mask,
                                                                       dofs)
    tl.store(OUT + (b * soutb + h * south + pos * soutl)[:, None] + dofs[None, :], acc.to(OUT.dtype.element_ty),
             mask=mask)


@triton.jit
def _gated_branch_backward(LOGITS, DLOGITS, O, DO, logit_row, dlogit_row, do_out, branch_ofs, row_ok, mask, dofs):
    """Gradient of one branch (g dO) and of its gate logit (dO . o g (1 - g))."""
    g = _gate(LOGITS, logit_row, row_ok)
    o = _branch(O, branch_ofs, mask, dofs)
    tl.store(DLOGITS + dlogit_row, (tl.sum(do_out * o, 1) * g * (1.0 - g)).to(DLOGITS.dtype.element_ty), mask=row_ok)
    tl.store(DO + branch_ofs[:, None] + dofs[None, :], (g[:, None] * do_out).to(DO.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "L"])
def gated_sum_backward(
    LOGITS, DLOGITS, DOUT, O0, O1, O2, DO0, DO1, DO2, slb, sll, sdb, sdh, sdl, so0b, so0h, so0l, so1b, so1h, so1l,
    so2b, so2h, so2l, n_rows, L, H: tl.constexpr, NB: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Gradients of the gate logits (contiguous [B, L, H, NB]) and of each branch (sharing the branches' strides)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b, h, pos = _gated_rows(rows.to(tl.int64), L, H)
    dofs = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (dofs < D)[None, :]
    logit_row = b * slb + pos * sll + h * NB
    dlogit_row = rows.to(tl.int64) * NB
    do_out = tl.load(DOUT + (b * sdb + h * sdh + pos * sdl)[:, None] + dofs[None, :], mask=mask,
                     other=0.0).to(tl.float32)
    _gated_branch_backward(LOGITS, DLOGITS, O0, DO0, logit_row, dlogit_row, do_out, b * so0b + h * so0h + pos * so0l,
                           row_ok, mask, dofs)
    _gated_branch_backward(LOGITS, DLOGITS, O1, DO1, logit_row + 1, dlogit_row + 1, do_out,
                           b * so1b + h * so1h + pos * so1l, row_ok, mask, dofs)
    if NB == 3:
        _gated_branch_backward(LOGITS, DLOGITS, O2, DO2, logit_row + 2, dlogit_row + 2, do_out,
                               b * so2b + h * so2h + pos * so2l, row_ok, mask, dofs)
