"""Triton kernels of the fused BlossomRec attention; `blossom_attention_triton.py` launches them.

Notation: a kv head serves G query heads; `b` = selection block size = compressed stride; compressed block `w` is
visible to query `t` when `w < t // b`; selection block `j` gets the summed group probability of the compressed
blocks `j .. j + SPAN - 1` (those overlapping it) and is selectable when `j < t // b`. Scores are kept in base-2
units (`qk_scale` = log2(e) / sqrt(D)), so every log-sum-exp (`lse`) below is base 2.

Forward: `compressed_forward` (compressed branch, its lse, and in-kernel top-n block selection) and
`sparse_forward` (selected blocks + own block + STIS, sharing the own block's scores between the two branches).
Backward, atomic-free and hence deterministic: `backward_dq` (query-centric, all branches),
`sparse_backward_dkdv` (key-centric: own block, STIS reverse offsets, CSR list of the queries that selected the block)
and `compressed_backward_dkdv` (key-centric over compressed keys). Lengths and counts are not specialised on (one
compile serves every sequence length).
"""

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))


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


# ------------------------------------------------------------------------------------------------------------------
# Compressed branch + block selection (forward)
# ------------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["L", "W", "n_blocks"])
def compressed_forward(
    Q, CK, CV, OC, LSEC, BIDX, SKEYS,
    sqb, sqh, sql, sckb, sckh, sckw, scvb, scvh, scvw, sob, soh, sol,
    L, W, n_blocks, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr,
    BW: tl.constexpr, SEL_B: tl.constexpr, SPAN: tl.constexpr, N_SEL: tl.constexpr, NS: tl.constexpr,
    HAS_CV: tl.constexpr, SORT_KEYS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Compressed branch and its lse, then the top-N_SEL block indices BIDX [B, HKV, L, N_SEL] (-1 = none), and
    with SORT_KEYS their keys for the backward's reverse index: (selection group) * L + position, where the
    group of block j of (b, kv head) is (b * HKV + h) * n_blocks + j and empty slots go past every group."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    m0 = pid_m * BM
    rows = tl.arange(0, G * BM)
    g = rows // BM
    pos = m0 + rows % BM
    row_ok = pos < L
    dofs = tl.arange(0, BLOCK_D)
    dmask = dofs < D
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + pos[:, None] * sql + dofs[None, :],
                mask=row_ok[:, None] & dmask[None, :], other=0.0)
    ck_base = CK + b * sckb + h * sckh
    cv_base = CV + b * scvb + h * scvh
    last = tl.minimum(m0 + BM, L) - 1
    n_visible = tl.minimum(last // SEL_B, W)
    own = pos // SEL_B
    wofs = tl.arange(0, BW)

    m_i = tl.full([G * BM], NEG_INF, tl.float32)
    l_i = tl.zeros([G * BM], tl.float32)
    acc = tl.zeros([G * BM, BLOCK_D], tl.float32)
    for w0 in range(0, n_visible, BW):
        w = w0 + wofs
        ck = tl.load(ck_base + w[:, None] * sckw + dofs[None, :], mask=(w < W)[:, None] & dmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(ck), input_precision=DOT_PREC) * qk_scale
        visible = (w[None, :] < own[:, None]) & (w[None, :] < W)
        s = tl.where(visible, s, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_CV:
            cv = tl.load(cv_base + w[:, None] * scvw + dofs[None, :], mask=(w < W)[:, None] & dmask[None, :],
                         other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(cv.dtype), cv, input_precision=DOT_PREC)
        m_i = m_new
    has_key = l_i > 0
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), 0.0)
    out_row = b * L * HKV * G + (h * G + g) * L + pos
    tl.store(LSEC + out_row, lse, mask=row_ok)
    if HAS_CV:
        out = acc / tl.where(has_key, l_i, 1.0)[:, None]
        tl.store(OC + b * sob + (h * G + g)[:, None] * soh + pos[:, None] * sol + dofs[None, :],
                 out.to(OC.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])

    # Top-N_SEL per position, merged tile by tile into a running best list ([BM, NS]: scores and block ids, best
    # first) by N_SEL extractions of the largest score, the earlier block on ties: exactly the reference's
    # stable descending sort. Scores are sums of probabilities (>= 0); -1 marks no block, -2 a taken one.
    # Tiles come in increasing block order, so on a tie the running list's block is always the earlier one.
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
            ck = tl.load(ck_base + w[:, None] * sckw + dofs[None, :], mask=(w < W)[:, None] & dmask[None, :],
                         other=0.0)
            visible = (w[None, :] < own_p[:, None]) & (w[None, :] < W)
            group_prob = tl.zeros([BM, BW], tl.float32)
            for gg in tl.static_range(G):
                row = b * L * HKV * G + (h * G + gg) * L + positions
                q_g = tl.load(Q + b * sqb + (h * G + gg) * sqh + positions[:, None] * sql + dofs[None, :],
                              mask=pmask[:, None] & dmask[None, :], other=0.0)
                lse_g = tl.load(LSEC + row, mask=pmask, other=0.0)
                s = tl.dot(q_g, tl.trans(ck), input_precision=DOT_PREC) * qk_scale
                group_prob += tl.where(visible, tl.exp2(s - lse_g[:, None]), 0.0)
            score += group_prob
        candidates = tl.where(j[None, :] < own_p[:, None], score, -1.0)
        merged_s = tl.full([BM, NS], -1.0, tl.float32)
        merged_j = tl.full([BM, NS], -1, tl.int32)
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
        best_s = merged_s
        best_j = merged_j
    slot_ofs = ((b * HKV + h) * L + positions)[:, None] * N_SEL + slots[None, :]
    slot_mask = pmask[:, None] & (slots[None, :] < N_SEL)
    tl.store(BIDX + slot_ofs, best_j, mask=slot_mask)
    if SORT_KEYS:
        group = tl.where(best_j >= 0, (b * HKV + h) * n_blocks + best_j, tl.num_programs(1).to(tl.int64) * n_blocks)
        tl.store(SKEYS + slot_ofs, group * L + positions[:, None], mask=slot_mask)


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
def _load_block(base, stride, kb, L, SEL_B: tl.constexpr, dofs, dmask):
    """Key (or value) block `kb` [SEL_B, BD] (zeros outside 0..L-1) and its positions."""
    kpos = kb * SEL_B + tl.arange(0, SEL_B)
    kmask = (kpos >= 0) & (kpos < L)
    return tl.load(base + kpos[:, None] * stride + dofs[None, :], mask=kmask[:, None] & dmask[None, :],
                   other=0.0), kpos


@triton.jit
def _load_selected_chunk(k_base, v_base, skl, svl, sel, c0, cofs, dofs, dmask3, SEL_B: tl.constexpr):
    """Keys and values [rows, C, BD] (float32) of chunk `c0` of each row's selected block `sel` (-1 = none)."""
    kpos = sel[:, None] * SEL_B + c0 + cofs[None, :]
    valid = (sel >= 0)[:, None] & (kpos >= 0)
    mask = valid[:, :, None] & dmask3
    kk = tl.load(k_base + kpos[:, :, None] * skl + dofs[None, None, :], mask=mask, other=0.0).to(tl.float32)
    vv = tl.load(v_base + kpos[:, :, None] * svl + dofs[None, None, :], mask=mask, other=0.0).to(tl.float32)
    return kk, vv, valid


@triton.jit
def _stis_scores(q, k, kpos, pos, L, qk_scale, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    valid = _is_stis_offset(pos[:, None] - kpos[None, :], WINDOW) & ((kpos >= 0) & (kpos < L))[None, :]
    return s, valid


@triton.jit
def _query_block(Q, sqb, sqh, sql, L, HKV: tl.constexpr, G: tl.constexpr, SEL_B: tl.constexpr, D: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """This program's selection block of queries and kv head: rows are (position, head) over the G heads of the kv
    head; returns the block, batch, kv head, each row's position, head and validity, the head-dim offsets and mask,
    and the q tile."""
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    rows = tl.arange(0, SEL_B * G)
    pos = blk * SEL_B + rows // G
    head = h * G + rows % G
    row_ok = pos < L
    dofs = tl.arange(0, BLOCK_D)
    dmask = dofs < D
    q = tl.load(Q + b * sqb + head[:, None] * sqh + pos[:, None] * sql + dofs[None, :],
                mask=row_ok[:, None] & dmask[None, :], other=0.0)
    return blk, b, h, pos, head, row_ok, dofs, dmask, q


@triton.jit
def _key_block_scores(q, k_base, v_base, skl, svl, kb, pos, L, qk_scale, SEL_B: tl.constexpr, WINDOW: tl.constexpr,
                      dofs, dmask, DOT_PREC: tl.constexpr):
    """Key and value block `kb`, the rows' base-2 scores against it and its STIS offset mask."""
    k, kpos = _load_block(k_base, skl, kb, L, SEL_B, dofs, dmask)
    v, _ = _load_block(v_base, svl, kb, L, SEL_B, dofs, dmask)
    s, stis_valid = _stis_scores(q, k, kpos, pos, L, qk_scale, WINDOW, DOT_PREC)
    return k, v, kpos, s, stis_valid


@triton.jit(do_not_specialize=["L", "n_far"])
def sparse_forward(
    Q, K, V, BIDX, OS, OT, LSES, LSET,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
    L, n_far, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SEL_B: tl.constexpr,
    N_SEL: tl.constexpr, WINDOW: tl.constexpr, M_NEAR: tl.constexpr, P_FAR: tl.constexpr, C: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One program = one selection block of queries (all G heads of one kv head); rows are (position, head)."""
    R: tl.constexpr = SEL_B * G
    blk, b, h, pos, head, row_ok, dofs, dmask, q = _query_block(Q, sqb, sqh, sql, L, HKV, G, SEL_B, D, BLOCK_D)
    qf = q.to(tl.float32) * qk_scale
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    cofs = tl.arange(0, C)
    dmask3 = dmask[None, None, :]

    m_s = tl.full([R], NEG_INF, tl.float32)
    l_s = tl.zeros([R], tl.float32)
    acc_s = tl.zeros([R, BLOCK_D], tl.float32)
    m_t = tl.full([R], NEG_INF, tl.float32)
    l_t = tl.zeros([R], tl.float32)
    acc_t = tl.zeros([R, BLOCK_D], tl.float32)

    # LTIS: each position's selected blocks (gathered per row; they all end before the own block: no causal mask)
    for i in range(N_SEL):
        sel = tl.load(BIDX + ((b * HKV + h) * L + pos) * N_SEL + i, mask=row_ok, other=-1)
        for c0 in range(0, SEL_B, C):
            kk, vv, valid = _load_selected_chunk(k_base, v_base, skl, svl, sel, c0, cofs, dofs, dmask3, SEL_B)
            s = tl.where(valid, tl.sum(qf[:, None, :] * kk, 2), NEG_INF)
            m_s, l_s, acc_s = _online_update(m_s, l_s, acc_s, s, vv)

    # the own block: LTIS (causal) and STIS share one score tile
    k, v, kpos, s, stis_valid = _key_block_scores(q, k_base, v_base, skl, svl, blk, pos, L, qk_scale, SEL_B, WINDOW,
                                                  dofs, dmask, DOT_PREC)
    m_s, l_s, acc_s = _online_dot(m_s, l_s, acc_s, tl.where(pos[:, None] >= kpos[None, :], s, NEG_INF), v, DOT_PREC)
    m_t, l_t, acc_t = _online_dot(m_t, l_t, acc_t, tl.where(stis_valid, s, NEG_INF), v, DOT_PREC)

    # STIS: the near blocks, then the far power-of-two blocks
    for mm in range(1, tl.minimum(M_NEAR, blk) + 1):
        k, v, kpos, s, valid = _key_block_scores(q, k_base, v_base, skl, svl, blk - mm, pos, L, qk_scale, SEL_B,
                                                 WINDOW, dofs, dmask, DOT_PREC)
        m_t, l_t, acc_t = _online_dot(m_t, l_t, acc_t, tl.where(valid, s, NEG_INF), v, DOT_PREC)
    for i in range(0, n_far):
        mm = P_FAR << i
        if mm <= blk:
            k, v, kpos, s, valid = _key_block_scores(q, k_base, v_base, skl, svl, blk - mm, pos, L, qk_scale, SEL_B,
                                                     WINDOW, dofs, dmask, DOT_PREC)
            m_t, l_t, acc_t = _online_dot(m_t, l_t, acc_t, tl.where(valid, s, NEG_INF), v, DOT_PREC)

    out_ptr = b * sob + head[:, None] * soh + pos[:, None] * sol + dofs[None, :]
    omask = row_ok[:, None] & dmask[None, :]
    lse_row = (b * HKV * G + head) * L + pos
    has_s = l_s > 0
    tl.store(OS + out_ptr, (acc_s / tl.where(has_s, l_s, 1.0)[:, None]).to(OS.dtype.element_ty), mask=omask)
    tl.store(LSES + lse_row, tl.where(has_s, m_s + tl.log2(tl.where(has_s, l_s, 1.0)), 0.0), mask=row_ok)
    has_t = l_t > 0
    tl.store(OT + out_ptr, (acc_t / tl.where(has_t, l_t, 1.0)[:, None]).to(OT.dtype.element_ty), mask=omask)
    tl.store(LSET + lse_row, tl.where(has_t, m_t + tl.log2(tl.where(has_t, l_t, 1.0)), 0.0), mask=row_ok)


# ------------------------------------------------------------------------------------------------------------------
# Backward: dq (query-centric)
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _dq_step(dq, q, do, lse, delta, s_valid, kk, vv):
    """dq += dS K for one gathered chunk; q is pre-scaled (base 2), kk/vv [R, C, BD]; dq stays unscaled."""
    s = tl.sum(q[:, None, :] * kk, 2)
    p = tl.where(s_valid, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.sum(do[:, None, :] * vv, 2)
    ds = p * (dp - delta[:, None])
    return dq + tl.sum(ds[:, :, None] * kk, 1)


@triton.jit
def _dq_dot(dq, s, valid, do, lse, delta, k, v, DOT_PREC: tl.constexpr):
    """dq += dS K for one key block on the tensor cores; s [R, SEL_B] base-2 scores."""
    p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)


@triton.jit(do_not_specialize=["L", "W", "n_far"])
def backward_dq(
    Q, K, V, BIDX, OS, OT, DOS, DOT, LSES, LSET, DELS, DELT, CK, CV, OC, DOC, LSEC, DELC, DQ,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, sdsb, sdsh, sdsl, sdtb, sdth, sdtl,
    sckb, sckh, sckw, scvb, scvh, scvw, socb, soch, socl, sdcb, sdch, sdcl, sdqb, sdqh, sdql,
    L, W, n_far, qk_scale, sm_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SEL_B: tl.constexpr,
    N_SEL: tl.constexpr, WINDOW: tl.constexpr, M_NEAR: tl.constexpr, P_FAR: tl.constexpr, C: tl.constexpr,
    HAS_CV: tl.constexpr, BW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dq of every branch for one query block (mirror of `sparse_forward`, plus the compressed branch, whose keys
    all queries of a selection block see alike: w < block), and the rows' delta = dO . O of each branch."""
    R: tl.constexpr = SEL_B * G
    blk, b, h, pos, head, row_ok, dofs, dmask, q = _query_block(Q, sqb, sqh, sql, L, HKV, G, SEL_B, D, BLOCK_D)
    rmask = row_ok[:, None] & dmask[None, :]
    qf = q.to(tl.float32) * qk_scale
    out_ofs = b * sob + head[:, None] * soh + pos[:, None] * sol + dofs[None, :]
    do_s = tl.load(DOS + b * sdsb + head[:, None] * sdsh + pos[:, None] * sdsl + dofs[None, :], mask=rmask,
                   other=0.0)
    do_t = tl.load(DOT + b * sdtb + head[:, None] * sdth + pos[:, None] * sdtl + dofs[None, :], mask=rmask,
                   other=0.0)
    do_sf = do_s.to(tl.float32)
    lse_row = (b * HKV * G + head) * L + pos
    delta_s = tl.sum(do_sf * tl.load(OS + out_ofs, mask=rmask, other=0.0).to(tl.float32), 1)
    delta_t = tl.sum(do_t.to(tl.float32) * tl.load(OT + out_ofs, mask=rmask, other=0.0).to(tl.float32), 1)
    tl.store(DELS + lse_row, delta_s, mask=row_ok)
    tl.store(DELT + lse_row, delta_t, mask=row_ok)
    lse_s = tl.load(LSES + lse_row, mask=row_ok, other=0.0)
    lse_t = tl.load(LSET + lse_row, mask=row_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    cofs = tl.arange(0, C)
    dmask3 = dmask[None, None, :]
    dq = tl.zeros([R, BLOCK_D], tl.float32)

    for i in range(N_SEL):
        sel = tl.load(BIDX + ((b * HKV + h) * L + pos) * N_SEL + i, mask=row_ok, other=-1)
        for c0 in range(0, SEL_B, C):
            kk, vv, valid = _load_selected_chunk(k_base, v_base, skl, svl, sel, c0, cofs, dofs, dmask3, SEL_B)
            dq = _dq_step(dq, qf, do_sf, lse_s, delta_s, valid, kk, vv)

    k, v, kpos, s, stis_valid = _key_block_scores(q, k_base, v_base, skl, svl, blk, pos, L, qk_scale, SEL_B, WINDOW,
                                                  dofs, dmask, DOT_PREC)
    dq = _dq_dot(dq, s, pos[:, None] >= kpos[None, :], do_s, lse_s, delta_s, k, v, DOT_PREC)
    dq = _dq_dot(dq, s, stis_valid, do_t, lse_t, delta_t, k, v, DOT_PREC)
    for mm in range(1, tl.minimum(M_NEAR, blk) + 1):
        k, v, kpos, s, valid = _key_block_scores(q, k_base, v_base, skl, svl, blk - mm, pos, L, qk_scale, SEL_B,
                                                 WINDOW, dofs, dmask, DOT_PREC)
        dq = _dq_dot(dq, s, valid, do_t, lse_t, delta_t, k, v, DOT_PREC)
    for i in range(0, n_far):
        mm = P_FAR << i
        if mm <= blk:
            k, v, kpos, s, valid = _key_block_scores(q, k_base, v_base, skl, svl, blk - mm, pos, L, qk_scale, SEL_B,
                                                     WINDOW, dofs, dmask, DOT_PREC)
            dq = _dq_dot(dq, s, valid, do_t, lse_t, delta_t, k, v, DOT_PREC)
    if HAS_CV:
        do_c = tl.load(DOC + b * sdcb + head[:, None] * sdch + pos[:, None] * sdcl + dofs[None, :], mask=rmask,
                       other=0.0)
        o_c = tl.load(OC + b * socb + head[:, None] * soch + pos[:, None] * socl + dofs[None, :], mask=rmask,
                      other=0.0)
        delta_c = tl.sum(do_c.to(tl.float32) * o_c.to(tl.float32), 1)
        tl.store(DELC + lse_row, delta_c, mask=row_ok)
        lse_c = tl.load(LSEC + lse_row, mask=row_ok, other=0.0)
        ck_base = CK + b * sckb + h * sckh
        cv_base = CV + b * scvb + h * scvh
        wofs = tl.arange(0, BW)
        n_visible = tl.minimum(blk, W)
        for w0 in range(0, n_visible, BW):
            w = w0 + wofs
            wmask = (w < n_visible)[:, None] & dmask[None, :]
            ck = tl.load(ck_base + w[:, None] * sckw + dofs[None, :], mask=wmask, other=0.0)
            cv = tl.load(cv_base + w[:, None] * scvw + dofs[None, :], mask=wmask, other=0.0)
            s_c = tl.dot(q, tl.trans(ck), input_precision=DOT_PREC) * qk_scale
            dq = _dq_dot(dq, s_c, (w < n_visible)[None, :] & row_ok[:, None], do_c, lse_c, delta_c, ck, cv,
                         DOT_PREC)
    tl.store(DQ + b * sdqb + head[:, None] * sdqh + pos[:, None] * sdql + dofs[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=rmask)


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
def _stis_query_block(dk, dv, k, v, kpos, qb, q_base, DOT, LSET, DELT, lse_base, h, sqh, sql, sdtb_ofs, sdth, sdtl,
                      L, qk_scale, G: tl.constexpr, SEL_B: tl.constexpr, WINDOW: tl.constexpr, dofs, dmask,
                      DOT_PREC: tl.constexpr):
    """STIS contribution to one key block from the queries of query block `qb` (all G heads)."""
    rows = tl.arange(0, SEL_B * G)
    head = h * G + rows // SEL_B
    qpos = qb * SEL_B + rows % SEL_B
    row_ok = qpos < L
    rmask = row_ok[:, None] & dmask[None, :]
    q = tl.load(q_base + head[:, None] * sqh + qpos[:, None] * sql + dofs[None, :], mask=rmask, other=0.0)
    do = tl.load(DOT + sdtb_ofs + head[:, None] * sdth + qpos[:, None] * sdtl + dofs[None, :], mask=rmask,
                 other=0.0)
    row = lse_base + head * L + qpos
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    valid = _is_stis_offset(qpos[:, None] - kpos[None, :], WINDOW) & row_ok[:, None] & (kpos < L)[None, :]
    p = tl.where(valid, tl.exp2(s - tl.load(LSET + row, mask=row_ok, other=0.0)[:, None]), 0.0)
    return _dkdv_dot(dk, dv, q, do, p, tl.load(DELT + row, mask=row_ok, other=0.0), v, DOT_PREC)


@triton.jit(do_not_specialize=["L", "n_blocks", "n_far"])
def sparse_backward_dkdv(
    Q, K, V, DOS, DOT, LSES, LSET, DELS, DELT, CSR_OFFSETS, CSR_QUERIES, DK, DV,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdsb, sdsh, sdsl, sdtb, sdth, sdtl,
    L, n_blocks, n_far, qk_scale, sm_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SEL_B: tl.constexpr,
    WINDOW: tl.constexpr, M_NEAR: tl.constexpr, P_FAR: tl.constexpr, QC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dk, dv of one selection block of keys from every query that reads it, in a fixed order: its own block's
    queries (LTIS causal + STIS), the later query blocks whose STIS offsets land on it, and the queries that
    selected it (CSR list built on the host from the block indices)."""
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    dofs = tl.arange(0, BLOCK_D)
    dmask = dofs < D
    k, kpos = _load_block(K + b * skb + h * skh, skl, blk, L, SEL_B, dofs, dmask)
    v, _ = _load_block(V + b * svb + h * svh, svl, blk, L, SEL_B, dofs, dmask)
    q_base = Q + b * sqb
    lse_base = b * HKV * G * L
    dk = tl.zeros([SEL_B, BLOCK_D], tl.float32)
    dv = tl.zeros([SEL_B, BLOCK_D], tl.float32)

    # (1) the own block's queries, all G heads: LTIS with the causal mask, STIS with the offset mask
    rows = tl.arange(0, SEL_B * G)
    head = h * G + rows // SEL_B
    qpos = blk * SEL_B + rows % SEL_B
    row_ok = qpos < L
    rmask = row_ok[:, None] & dmask[None, :]
    q = tl.load(q_base + head[:, None] * sqh + qpos[:, None] * sql + dofs[None, :], mask=rmask, other=0.0)
    do_s = tl.load(DOS + b * sdsb + head[:, None] * sdsh + qpos[:, None] * sdsl + dofs[None, :], mask=rmask,
                   other=0.0)
    row = lse_base + head * L + qpos
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.where((qpos[:, None] >= kpos[None, :]) & row_ok[:, None],
                 tl.exp2(s - tl.load(LSES + row, mask=row_ok, other=0.0)[:, None]), 0.0)
    dk, dv = _dkdv_dot(dk, dv, q, do_s, p, tl.load(DELS + row, mask=row_ok, other=0.0), v, DOT_PREC)
    dk, dv = _stis_query_block(dk, dv, k, v, kpos, blk, q_base, DOT, LSET, DELT, lse_base, h, sqh, sql, b * sdtb,
                               sdth, sdtl, L, qk_scale, G, SEL_B, WINDOW, dofs, dmask, DOT_PREC)

    # (2) STIS from later query blocks: the near ones, then the far power-of-two ones
    for mm in range(1, tl.minimum(M_NEAR, n_blocks - 1 - blk) + 1):
        dk, dv = _stis_query_block(dk, dv, k, v, kpos, blk + mm, q_base, DOT, LSET, DELT, lse_base, h, sqh, sql,
                                   b * sdtb, sdth, sdtl, L, qk_scale, G, SEL_B, WINDOW, dofs, dmask, DOT_PREC)
    for i in range(0, n_far):
        qb = blk + (P_FAR << i)
        if qb < n_blocks:
            dk, dv = _stis_query_block(dk, dv, k, v, kpos, qb, q_base, DOT, LSET, DELT, lse_base, h, sqh, sql,
                                       b * sdtb, sdth, sdtl, L, qk_scale, G, SEL_B, WINDOW, dofs, dmask, DOT_PREC)

    # (3) LTIS: the queries that selected this block (each query once; all G heads share its selection)
    qrows = tl.arange(0, QC * G)
    qi = qrows % QC
    qhead = h * G + qrows // QC
    csr = pid_bh.to(tl.int64) * n_blocks + blk
    start = tl.load(CSR_OFFSETS + csr)
    end = tl.load(CSR_OFFSETS + csr + 1)
    for i0 in range(start, end, QC):
        in_list = i0 + qi < end
        tq = (tl.load(CSR_QUERIES + i0 + qi, mask=in_list, other=0) % L).to(tl.int32)
        qm = in_list[:, None] & dmask[None, :]
        q_sel = tl.load(q_base + qhead[:, None] * sqh + tq[:, None] * sql + dofs[None, :], mask=qm, other=0.0)
        do_sel = tl.load(DOS + b * sdsb + qhead[:, None] * sdsh + tq[:, None] * sdsl + dofs[None, :], mask=qm,
                         other=0.0)
        row_sel = lse_base + qhead * L + tq
        s_sel = tl.dot(q_sel, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p_sel = tl.where(in_list[:, None],
                         tl.exp2(s_sel - tl.load(LSES + row_sel, mask=in_list, other=0.0)[:, None]), 0.0)
        dk, dv = _dkdv_dot(dk, dv, q_sel, do_sel, p_sel, tl.load(DELS + row_sel, mask=in_list, other=0.0), v,
                           DOT_PREC)

    out = (b * HKV + h) * L * D + kpos[:, None] * D + dofs[None, :]
    omask = (kpos < L)[:, None] & dmask[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=omask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["L", "W"])
def compressed_backward_dkdv(
    Q, CK, CV, DOC, LSEC, DELC, DCK, DCV,
    sqb, sqh, sql, sckb, sckh, sckw, scvb, scvh, scvw, sdob, sdoh, sdol,
    L, W, qk_scale, sm_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr,
    BW: tl.constexpr, SEL_B: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dck, dcv of a tile of compressed keys from every query that sees them (t >= (w + 1) * b), in order."""
    pid_w = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    w0 = pid_w * BW
    w = w0 + tl.arange(0, BW)
    dofs = tl.arange(0, BLOCK_D)
    dmask = dofs < D
    kmask = (w < W)[:, None] & dmask[None, :]
    ck = tl.load(CK + b * sckb + h * sckh + w[:, None] * sckw + dofs[None, :], mask=kmask, other=0.0)
    cv = tl.load(CV + b * scvb + h * scvh + w[:, None] * scvw + dofs[None, :], mask=kmask, other=0.0)
    dck = tl.zeros([BW, BLOCK_D], tl.float32)
    dcv = tl.zeros([BW, BLOCK_D], tl.float32)
    rows = tl.arange(0, G * BM)
    head = h * G + rows // BM
    lse_base = b * HKV * G * L
    for m0 in range((w0 + 1) * SEL_B, L, BM):
        pos = m0 + rows % BM
        row_ok = pos < L
        rmask = row_ok[:, None] & dmask[None, :]
        q = tl.load(Q + b * sqb + head[:, None] * sqh + pos[:, None] * sql + dofs[None, :], mask=rmask, other=0.0)
        do = tl.load(DOC + b * sdob + head[:, None] * sdoh + pos[:, None] * sdol + dofs[None, :], mask=rmask,
                     other=0.0)
        row = lse_base + head * L + pos
        s = tl.dot(q, tl.trans(ck), input_precision=DOT_PREC) * qk_scale
        visible = (w[None, :] < (pos // SEL_B)[:, None]) & (w[None, :] < W) & row_ok[:, None]
        p = tl.where(visible, tl.exp2(s - tl.load(LSEC + row, mask=row_ok, other=0.0)[:, None]), 0.0)
        dcv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(cv).to(do.dtype), input_precision=DOT_PREC)
        ds = p * (dp - tl.load(DELC + row, mask=row_ok, other=0.0)[:, None])
        dck += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PREC)
    out = (b * HKV + h) * W * D + w[:, None] * D + dofs[None, :]
    tl.store(DCK + out, (dck * sm_scale).to(DCK.dtype.element_ty), mask=kmask)
    tl.store(DCV + out, dcv.to(DCV.dtype.element_ty), mask=kmask)


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
