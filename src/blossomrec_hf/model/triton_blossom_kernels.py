"""Triton kernels of the fused BlossomRec attention; `blossom_attention_triton.py` launches them.

Notation: a kv head serves G query heads; `b` = selection block size = compressed stride; compressed block `w` is
visible to query `t` when `w < t // b`; selection block `j` gets the summed group probability of the compressed
blocks `j .. j + SPAN - 1` (those overlapping it) and is selectable when `j < t // b`. Scores are kept in base-2
units (`qk_scale` = log2(e) / sqrt(D)), so every log-sum-exp (`lse`) below is base 2.

Forward: `compressed_forward` (compressed branch, its lse, and in-kernel top-n block selection) and
`sparse_forward` (selected blocks + own block + STIS, sharing the own block's scores between the two branches).
Backward, atomic-free and hence deterministic: `sparse_backward_dq` and `compressed_backward_dq` (query-centric),
`sparse_backward_dkdv` (key-centric: own block, STIS reverse offsets, CSR list of the queries that selected the block)
and `compressed_backward_dkdv` (key-centric over compressed keys).
"""

import triton
import triton.language as tl

NEG_INF = float("-inf")


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
@triton.jit
def compressed_forward(
    Q, CK, CV, OC, LSEC, BIDX,
    sqb, sqh, sql, sckb, sckh, sckw, scvb, scvh, scvw, sob, soh, sol,
    L, W, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr,
    BW: tl.constexpr, SEL_B: tl.constexpr, SPAN: tl.constexpr, N_SEL: tl.constexpr, N_PAD: tl.constexpr,
    HAS_CV: tl.constexpr, SELECT: tl.constexpr, DOT_PREC: tl.constexpr,
):
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

    if SELECT:
        # Running top-N_SEL per position, merged tile by tile in increasing block order. A new block only replaces
        # the worst kept one when strictly larger, and within a tile the first maximum is taken first, so ties go
        # to the earlier block exactly as the reference's stable descending sort.
        positions = m0 + tl.arange(0, BM)
        own_p = positions // SEL_B
        slots = tl.arange(0, N_PAD)
        best = tl.where(slots[None, :] < N_SEL, NEG_INF, float("inf")) + tl.zeros([BM, N_PAD], tl.float32)
        best_idx = tl.full([BM, N_PAD], -1, tl.int32)
        n_selectable = last // SEL_B
        for j0 in range(0, n_selectable, BW):
            j = j0 + wofs
            score = tl.zeros([BM, BW], tl.float32)
            for o in tl.static_range(SPAN):
                w = j + o
                ck = tl.load(ck_base + w[:, None] * sckw + dofs[None, :], mask=(w < W)[:, None] & dmask[None, :],
                             other=0.0)
                s = tl.dot(q, tl.trans(ck), input_precision=DOT_PREC) * qk_scale
                visible = (w[None, :] < own[:, None]) & (w[None, :] < W)
                p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
                score += tl.sum(tl.reshape(p, (G, BM, BW)), 0)
            score = tl.where(j[None, :] < own_p[:, None], score, NEG_INF)
            for _ in tl.static_range(N_SEL):
                top = tl.max(score, 1)
                top_col = tl.argmax(score, 1, tie_break_left=True)
                worst = tl.min(best, 1)
                worst_key = tl.where(best == worst[:, None], best_idx, -2)
                worst_slot = tl.argmax(worst_key, 1, tie_break_left=True)
                replace = (slots[None, :] == worst_slot[:, None]) & (top > worst)[:, None]
                best = tl.where(replace, top[:, None], best)
                best_idx = tl.where(replace, (j0 + top_col)[:, None], best_idx)
                score = tl.where(wofs[None, :] == top_col[:, None], NEG_INF, score)
        bidx_ptr = BIDX + ((b * HKV + h) * L + positions)[:, None] * N_SEL + slots[None, :]
        tl.store(bidx_ptr, best_idx, mask=(positions < L)[:, None] & (slots[None, :] < N_SEL))


# ------------------------------------------------------------------------------------------------------------------
# Selected blocks + own block + STIS (forward)
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def sparse_forward(
    Q, K, V, BIDX, OS, OT, LSES, LSET,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
    L, n_powers, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SEL_B: tl.constexpr,
    N_SEL: tl.constexpr, WINDOW: tl.constexpr, POW0: tl.constexpr, C: tl.constexpr,
):
    """One program = one selection block of queries (all G heads of one kv head); rows are (position, head)."""
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    R: tl.constexpr = SEL_B * G
    rows = tl.arange(0, R)
    pos = blk * SEL_B + rows // G
    head = h * G + rows % G
    row_ok = pos < L
    dofs = tl.arange(0, BLOCK_D)
    dmask = dofs < D
    q = tl.load(Q + b * sqb + head[:, None] * sqh + pos[:, None] * sql + dofs[None, :],
                mask=row_ok[:, None] & dmask[None, :], other=0.0).to(tl.float32) * qk_scale
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

    # LTIS: the selected blocks (all end before the query's own block, so they need no causal mask)
    for i in range(N_SEL):
        sel = tl.load(BIDX + ((b * HKV + h) * L + pos) * N_SEL + i, mask=row_ok, other=-1)
        for c0 in range(0, SEL_B, C):
            kpos = sel[:, None] * SEL_B + c0 + cofs[None, :]
            valid = (sel >= 0)[:, None] & (kpos >= 0)
            kk = tl.load(k_base + kpos[:, :, None] * skl + dofs[None, None, :], mask=valid[:, :, None] & dmask3,
                         other=0.0).to(tl.float32)
            vv = tl.load(v_base + kpos[:, :, None] * svl + dofs[None, None, :], mask=valid[:, :, None] & dmask3,
                         other=0.0).to(tl.float32)
            s = tl.where(valid, tl.sum(q[:, None, :] * kk, 2), NEG_INF)
            m_s, l_s, acc_s = _online_update(m_s, l_s, acc_s, s, vv)

    # The own block: one score computation serves LTIS (causal) and STIS (offsets that land in the block)
    for c0 in range(0, SEL_B, C):
        kpos = blk * SEL_B + c0 + cofs
        kmask = (kpos < L)[:, None] & dmask[None, :]
        kk = tl.load(k_base + kpos[:, None] * skl + dofs[None, :], mask=kmask, other=0.0).to(tl.float32)
        vv = tl.load(v_base + kpos[:, None] * svl + dofs[None, :], mask=kmask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * kk[None, :, :], 2)
        delta = pos[:, None] - kpos[None, :]
        m_s, l_s, acc_s = _online_update(m_s, l_s, acc_s, tl.where(delta >= 0, s, NEG_INF), vv[None, :, :])
        m_t, l_t, acc_t = _online_update(m_t, l_t, acc_t, tl.where(_is_stis_offset(delta, WINDOW), s, NEG_INF),
                                         vv[None, :, :])

    # STIS keys before the own block: the window, then powers of two from POW0 (the first one >= WINDOW)
    block_start = blk * SEL_B
    for d0 in range(0, WINDOW, C):
        delta = d0 + cofs
        kpos = pos[:, None] - delta[None, :]
        valid = (delta < WINDOW)[None, :] & (kpos >= 0) & (kpos < block_start)
        kk = tl.load(k_base + kpos[:, :, None] * skl + dofs[None, None, :], mask=valid[:, :, None] & dmask3,
                     other=0.0).to(tl.float32)
        vv = tl.load(v_base + kpos[:, :, None] * svl + dofs[None, None, :], mask=valid[:, :, None] & dmask3,
                     other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(q[:, None, :] * kk, 2), NEG_INF)
        m_t, l_t, acc_t = _online_update(m_t, l_t, acc_t, s, vv)
    for e0 in range(0, n_powers, C):
        e = e0 + cofs
        delta = tl.where(e < n_powers, POW0 << tl.minimum(e, 30), 0)
        kpos = pos[:, None] - delta[None, :]
        valid = (e < n_powers)[None, :] & (kpos >= 0) & (kpos < block_start)
        kk = tl.load(k_base + kpos[:, :, None] * skl + dofs[None, None, :], mask=valid[:, :, None] & dmask3,
                     other=0.0).to(tl.float32)
        vv = tl.load(v_base + kpos[:, :, None] * svl + dofs[None, None, :], mask=valid[:, :, None] & dmask3,
                     other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(q[:, None, :] * kk, 2), NEG_INF)
        m_t, l_t, acc_t = _online_update(m_t, l_t, acc_t, s, vv)

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
    """dq += dS K for one chunk; q is pre-scaled (base 2), kk/vv [R or 1, C, BD]; returns the new dq (unscaled)."""
    s = tl.sum(q[:, None, :] * kk, 2)
    p = tl.where(s_valid, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.sum(do[:, None, :] * vv, 2)
    ds = p * (dp - delta[:, None])
    return dq + tl.sum(ds[:, :, None] * kk, 1)


@triton.jit
def sparse_backward_dq(
    Q, K, V, BIDX, OS, OT, DOS, DOT, LSES, LSET, DELS, DELT, DQ,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, sdsb, sdsh, sdsl, sdtb, sdth, sdtl,
    L, n_powers, qk_scale, sm_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SEL_B: tl.constexpr,
    N_SEL: tl.constexpr, WINDOW: tl.constexpr, POW0: tl.constexpr, C: tl.constexpr,
):
    """Mirror of `sparse_forward`: writes dq (float32, [B, H, L, D] contiguous) and the rows' delta = dO . O."""
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    R: tl.constexpr = SEL_B * G
    rows = tl.arange(0, R)
    pos = blk * SEL_B + rows // G
    head = h * G + rows % G
    row_ok = pos < L
    dofs = tl.arange(0, BLOCK_D)
    dmask = dofs < D
    rmask = row_ok[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + head[:, None] * sqh + pos[:, None] * sql + dofs[None, :],
                mask=rmask, other=0.0).to(tl.float32) * qk_scale
    out_ofs = b * sob + head[:, None] * soh + pos[:, None] * sol + dofs[None, :]
    do_s = tl.load(DOS + b * sdsb + head[:, None] * sdsh + pos[:, None] * sdsl + dofs[None, :], mask=rmask,
                   other=0.0).to(tl.float32)
    do_t = tl.load(DOT + b * sdtb + head[:, None] * sdth + pos[:, None] * sdtl + dofs[None, :], mask=rmask,
                   other=0.0).to(tl.float32)
    lse_row = (b * HKV * G + head) * L + pos
    delta_s = tl.sum(do_s * tl.load(OS + out_ofs, mask=rmask, other=0.0).to(tl.float32), 1)
    delta_t = tl.sum(do_t * tl.load(OT + out_ofs, mask=rmask, other=0.0).to(tl.float32), 1)
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
            kpos = sel[:, None] * SEL_B + c0 + cofs[None, :]
            valid = (sel >= 0)[:, None] & (kpos >= 0)
            kk = tl.load(K + b * skb + h * skh + kpos[:, :, None] * skl + dofs[None, None, :],
                         mask=valid[:, :, None] & dmask3, other=0.0).to(tl.float32)
            vv = tl.load(v_base + kpos[:, :, None] * svl + dofs[None, None, :], mask=valid[:, :, None] & dmask3,
                         other=0.0).to(tl.float32)
            dq = _dq_step(dq, q, do_s, lse_s, delta_s, valid, kk, vv)
    for c0 in range(0, SEL_B, C):
        kpos = blk * SEL_B + c0 + cofs
        kmask = (kpos < L)[:, None] & dmask[None, :]
        kk = tl.load(k_base + kpos[:, None] * skl + dofs[None, :], mask=kmask, other=0.0).to(tl.float32)[None, :, :]
        vv = tl.load(v_base + kpos[:, None] * svl + dofs[None, :], mask=kmask, other=0.0).to(tl.float32)[None, :, :]
        delta = pos[:, None] - kpos[None, :]
        dq = _dq_step(dq, q, do_s, lse_s, delta_s, delta >= 0, kk, vv)
        dq = _dq_step(dq, q, do_t, lse_t, delta_t, _is_stis_offset(delta, WINDOW), kk, vv)
    block_start = blk * SEL_B
    for d0 in range(0, WINDOW, C):
        delta = d0 + cofs
        kpos = pos[:, None] - delta[None, :]
        valid = (delta < WINDOW)[None, :] & (kpos >= 0) & (kpos < block_start)
        kk = tl.load(k_base + kpos[:, :, None] * skl + dofs[None, None, :], mask=valid[:, :, None] & dmask3,
                     other=0.0).to(tl.float32)
        vv = tl.load(v_base + kpos[:, :, None] * svl + dofs[None, None, :], mask=valid[:, :, None] & dmask3,
                     other=0.0).to(tl.float32)
        dq = _dq_step(dq, q, do_t, lse_t, delta_t, valid, kk, vv)
    for e0 in range(0, n_powers, C):
        e = e0 + cofs
        delta = tl.where(e < n_powers, POW0 << tl.minimum(e, 30), 0)
        kpos = pos[:, None] - delta[None, :]
        valid = (e < n_powers)[None, :] & (kpos >= 0) & (kpos < block_start)
        kk = tl.load(k_base + kpos[:, :, None] * skl + dofs[None, None, :], mask=valid[:, :, None] & dmask3,
                     other=0.0).to(tl.float32)
        vv = tl.load(v_base + kpos[:, :, None] * svl + dofs[None, None, :], mask=valid[:, :, None] & dmask3,
                     other=0.0).to(tl.float32)
        dq = _dq_step(dq, q, do_t, lse_t, delta_t, valid, kk, vv)
    tl.store(DQ + lse_row[:, None] * D + dofs[None, :], dq * sm_scale, mask=rmask)


@triton.jit
def compressed_backward_dq(
    Q, CK, CV, OC, DOC, LSEC, DELC, DQ_PARTIAL, DQ,
    sqb, sqh, sql, sckb, sckh, sckw, scvb, scvh, scvw, sob, soh, sol, sdob, sdoh, sdol, sdqb, sdqh, sdql,
    L, W, qk_scale, sm_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr,
    BW: tl.constexpr, SEL_B: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dq of the compressed branch added to the sparse branches' float32 dq; stores the final dq in q's dtype."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    m0 = pid_m * BM
    rows = tl.arange(0, G * BM)
    head = h * G + rows // BM
    pos = m0 + rows % BM
    row_ok = pos < L
    dofs = tl.arange(0, BLOCK_D)
    dmask = dofs < D
    rmask = row_ok[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + head[:, None] * sqh + pos[:, None] * sql + dofs[None, :], mask=rmask, other=0.0)
    do = tl.load(DOC + b * sdob + head[:, None] * sdoh + pos[:, None] * sdol + dofs[None, :], mask=rmask,
                 other=0.0)
    o = tl.load(OC + b * sob + head[:, None] * soh + pos[:, None] * sol + dofs[None, :], mask=rmask, other=0.0)
    lse_row = (b * HKV * G + head) * L + pos
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELC + lse_row, delta, mask=row_ok)
    lse = tl.load(LSEC + lse_row, mask=row_ok, other=0.0)
    ck_base = CK + b * sckb + h * sckh
    cv_base = CV + b * scvb + h * scvh
    last = tl.minimum(m0 + BM, L) - 1
    n_visible = tl.minimum(last // SEL_B, W)
    own = pos // SEL_B
    wofs = tl.arange(0, BW)
    dq = tl.zeros([G * BM, BLOCK_D], tl.float32)
    for w0 in range(0, n_visible, BW):
        w = w0 + wofs
        kmask = (w < W)[:, None] & dmask[None, :]
        ck = tl.load(ck_base + w[:, None] * sckw + dofs[None, :], mask=kmask, other=0.0)
        cv = tl.load(cv_base + w[:, None] * scvw + dofs[None, :], mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(ck), input_precision=DOT_PREC) * qk_scale
        visible = (w[None, :] < own[:, None]) & (w[None, :] < W)
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(cv).to(do.dtype), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(ck.dtype), ck, input_precision=DOT_PREC)
    partial = tl.load(DQ_PARTIAL + lse_row[:, None] * D + dofs[None, :], mask=rmask, other=0.0)
    tl.store(DQ + b * sdqb + head[:, None] * sdqh + pos[:, None] * sdql + dofs[None, :],
             (partial + dq * sm_scale).to(DQ.dtype.element_ty), mask=rmask)


# ------------------------------------------------------------------------------------------------------------------
# Backward: dk, dv (key-centric, no atomics)
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def sparse_backward_dkdv(
    Q, K, V, DOS, DOT, LSES, LSET, DELS, DELT, CSR_OFFSETS, CSR_QUERIES, DK, DV,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdsb, sdsh, sdsl, sdtb, sdth, sdtl,
    L, n_blocks, n_powers, qk_scale, sm_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SEL_B: tl.constexpr,
    WINDOW: tl.constexpr, POW0: tl.constexpr, QC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dk, dv of one selection block of keys from every query that reads it, in a fixed order:
    its own block's queries (LTIS causal + STIS), the later queries whose STIS offsets land on it, and the queries
    that selected it (CSR list built on the host from the block indices)."""
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    dofs = tl.arange(0, BLOCK_D)
    dmask = dofs < D
    kofs = tl.arange(0, SEL_B)
    kpos = blk * SEL_B + kofs
    kmask = (kpos < L)[:, None] & dmask[None, :]
    k = tl.load(K + b * skb + h * skh + kpos[:, None] * skl + dofs[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * svb + h * svh + kpos[:, None] * svl + dofs[None, :], mask=kmask, other=0.0)
    q_base = Q + b * sqb
    lse_base = b * HKV * G * L
    dk = tl.zeros([SEL_B, BLOCK_D], tl.float32)
    dv = tl.zeros([SEL_B, BLOCK_D], tl.float32)

    # (1) the own block's queries, all G heads: rows r = (head g, position)
    R: tl.constexpr = SEL_B * G
    rows = tl.arange(0, R)
    head = h * G + rows // SEL_B
    qpos = blk * SEL_B + rows % SEL_B
    row_ok = qpos < L
    rmask = row_ok[:, None] & dmask[None, :]
    qr = tl.load(q_base + head[:, None] * sqh + qpos[:, None] * sql + dofs[None, :], mask=rmask, other=0.0)
    do_s = tl.load(DOS + b * sdsb + head[:, None] * sdsh + qpos[:, None] * sdsl + dofs[None, :], mask=rmask,
                   other=0.0)
    do_t = tl.load(DOT + b * sdtb + head[:, None] * sdth + qpos[:, None] * sdtl + dofs[None, :], mask=rmask,
                   other=0.0)
    lse_row = lse_base + head * L + qpos
    s = tl.dot(qr, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    delta = qpos[:, None] - kpos[None, :]
    p_s = tl.where((delta >= 0) & row_ok[:, None],
                   tl.exp2(s - tl.load(LSES + lse_row, mask=row_ok, other=0.0)[:, None]), 0.0)
    p_t = tl.where(_is_stis_offset(delta, WINDOW) & row_ok[:, None],
                   tl.exp2(s - tl.load(LSET + lse_row, mask=row_ok, other=0.0)[:, None]), 0.0)
    dv += tl.dot(tl.trans(p_s).to(do_s.dtype), do_s, input_precision=DOT_PREC)
    dv += tl.dot(tl.trans(p_t).to(do_t.dtype), do_t, input_precision=DOT_PREC)
    dp_s = tl.dot(do_s, tl.trans(v).to(do_s.dtype), input_precision=DOT_PREC)
    dp_t = tl.dot(do_t, tl.trans(v).to(do_t.dtype), input_precision=DOT_PREC)
    ds = p_s * (dp_s - tl.load(DELS + lse_row, mask=row_ok, other=0.0)[:, None]) \
        + p_t * (dp_t - tl.load(DELT + lse_row, mask=row_ok, other=0.0)[:, None])
    dk += tl.dot(tl.trans(ds).to(qr.dtype), qr, input_precision=DOT_PREC)

    # (2) STIS from later blocks: key j is read by query j + delta; rows are (key, head g) in 3-D
    gofs = tl.arange(0, G)
    kf = k.to(tl.float32)
    vf = v.to(tl.float32)
    block_end = (blk + 1) * SEL_B
    n_offsets = WINDOW + n_powers
    for oi in range(0, n_offsets):
        off = tl.where(oi < WINDOW, oi, POW0 << tl.maximum(oi - WINDOW, 0))
        tpos = kpos + off
        valid = (tpos < L) & (tpos >= block_end) & (kpos < L)
        m3 = valid[:, None, None] & dmask[None, None, :]
        heads3 = (h * G + gofs)[None, :, None]
        q3 = tl.load(q_base + heads3 * sqh + tpos[:, None, None] * sql + dofs[None, None, :], mask=m3,
                     other=0.0).to(tl.float32)
        do3 = tl.load(DOT + b * sdtb + heads3 * sdth + tpos[:, None, None] * sdtl + dofs[None, None, :], mask=m3,
                      other=0.0).to(tl.float32)
        row2 = lse_base + (h * G + gofs)[None, :] * L + tpos[:, None]
        m2 = valid[:, None] & (gofs[None, :] >= 0)
        s3 = tl.sum(q3 * kf[:, None, :], 2) * qk_scale
        p3 = tl.where(m2, tl.exp2(s3 - tl.load(LSET + row2, mask=m2, other=0.0)), 0.0)
        dp3 = tl.sum(do3 * vf[:, None, :], 2)
        ds3 = p3 * (dp3 - tl.load(DELT + row2, mask=m2, other=0.0))
        dv += tl.sum(p3[:, :, None] * do3, 1)
        dk += tl.sum(ds3[:, :, None] * q3, 1)

    # (3) LTIS: the queries that selected this block (each query once; all G heads share its selection)
    RQ: tl.constexpr = QC * G
    qrows = tl.arange(0, RQ)
    qi = qrows % QC
    qhead = h * G + qrows // QC
    csr = pid_bh.to(tl.int64) * n_blocks + blk
    start = tl.load(CSR_OFFSETS + csr)
    end = tl.load(CSR_OFFSETS + csr + 1)
    for i0 in range(start, end, QC):
        in_list = i0 + qi < end
        tq = tl.load(CSR_QUERIES + i0 + qi, mask=in_list, other=0)
        qm = in_list[:, None] & dmask[None, :]
        qr = tl.load(q_base + qhead[:, None] * sqh + tq[:, None] * sql + dofs[None, :], mask=qm, other=0.0)
        do_s = tl.load(DOS + b * sdsb + qhead[:, None] * sdsh + tq[:, None] * sdsl + dofs[None, :], mask=qm,
                       other=0.0)
        row = lse_base + qhead * L + tq
        s = tl.dot(qr, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.where(in_list[:, None], tl.exp2(s - tl.load(LSES + row, mask=in_list, other=0.0)[:, None]), 0.0)
        dv += tl.dot(tl.trans(p).to(do_s.dtype), do_s, input_precision=DOT_PREC)
        dp = tl.dot(do_s, tl.trans(v).to(do_s.dtype), input_precision=DOT_PREC)
        ds = p * (dp - tl.load(DELS + row, mask=in_list, other=0.0)[:, None])
        dk += tl.dot(tl.trans(ds).to(qr.dtype), qr, input_precision=DOT_PREC)

    out = (b * HKV + h) * L * D + kpos[:, None] * D + dofs[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
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
