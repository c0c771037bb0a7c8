"""Flash attention with a relative-position bias computed inside the tile (T5, DeBERTa).

The score of query ``i`` and key ``j`` (per batch ``b`` and head ``h``) is::

    s[i, j] = sm_scale * <q_i, k_j>
              + row_table[b, h, i, row_index[i - j + L - 1]]     (optional "row" term)
              + col_table[b, h, j, col_index[i - j + L - 1]]     (optional "column" term)

and ``j`` is dropped when ``key_padding_mask[b, j]`` is false. Both bias terms are functions of
the relative distance ``i - j`` looked up in small tables, which covers

- T5: ``table[h, bucket(j - i)]`` evaluated once per distance, a ``(1, H, 1, 2L - 1)`` row
  broadcast over batch and queries (:func:`biased_attention_triton`; its gradient is scattered per
  distance and reaches the bucket table by autograd);
- any caller's ``(batch, heads, seq, entries)`` row / column tables (the generic form).

DeBERTa-v2/v3 (:func:`disentangled_attention_triton`) builds no table: its terms
``c2p[i, j] = q_i . pos_key[c2p_index[i - j + L - 1]]`` and ``p2c[i, j] = k_j .
pos_query[p2c_index[..]]`` are computed inside each tile, which multiplies its queries / keys with
the relative embeddings its distances reach (window products) and gathers the diagonal; HF's
``/ scale`` is the kernel's single ``sm_scale`` multiply.

Forward: online softmax over key tiles; one log-sum-exp per query row is stored, never the
L x L matrix. Backward: DeBERTa runs three passes without an atomic: a column-parallel one
recomputes the scores once and gives dK, dV and the score gradient dS, stored in the inputs'
dtype (batch * heads * L^2: the backward's one L x L buffer, 48 MiB at DeBERTa-v3-base's 8 x
512 in bf16, freed when it returns); a row-parallel one gives dQ from dS; a distance-parallel one
sums the relative embeddings' gradients per distance over the batch (the host adds the
distances that share an embedding). T5's distance row and calls without a table run one fused
column-parallel pass (scores and probabilities recomputed once, dQ by fp32 atomics; T5's table
gradient summed per distance inside the tiles, then added per bucket by the host); fp32 T5 on
a GPU and the generic per-row / per-column
tables keep two passes, one column-parallel (dK, dV and the column-table gradient) and one
row-parallel (dQ and the row-table gradient), so dQ needs no atomics there. Generic table
gradients are scattered with fp32 atomics into per-batch buffers (several ``(i, j)`` pairs share
one table entry when distances share a bucket).

Dropout (on the probabilities, as Hugging Face does) draws one Philox ``tl.randint4x`` per eight
adjacent keys of ``(b, h, i)`` (16 bits per key) from a per-call seed tensor: the mask is a
function of ``(b, h, i, j)`` only, so the backward regenerates the forward's mask whatever its
tiles.

Contents: the ``@triton.jit`` kernels, their host launchers, the ``torch.library`` custom ops
with their autograd, and the triton tier's entry points. Input checks, the eager references, the
chunked PyTorch twin and the dispatch live in :mod:`fastcse.biased_attention`, which imports this
module only when the triton tier runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcse.kernels._triton_utils import dot_settings, draw_philox_seed, interpreted
from fastcse.kernels.philox_dropout import philox_keep


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _segment_span(SEG, CU, first, BLOCK: tl.constexpr, STEP: tl.constexpr, seqlen):
    """The other side's range a tile of packed rows ``first .. first + BLOCK - 1`` needs: from the
    start of its first row's sequence (rounded down to a multiple of STEP, so loop tiles stay
    aligned: the dropout counter needs keys from multiples of 8) to the end of its last row's."""
    lo = tl.load(CU + tl.load(SEG + first))
    hi = tl.load(CU + tl.load(SEG + tl.minimum(first + BLOCK, seqlen) - 1) + 1)
    return (lo // STEP) * STEP, hi


@triton.jit
def _window_rows(POS, IDX, h, stride_ph, stride_pe, d0, seqlen, offs_d, d_valid,
                 BLOCK_W: tl.constexpr, W_USED: tl.constexpr):
    """DeBERTa's relative embeddings for the distances ``d0 .. d0 + W_USED - 1`` (one tile's):
    row t is ``POS[h, IDX[d0 + t + L - 1]]`` (BLOCK_W x head_dim, zero outside), with the
    distance of each row and whether it exists."""
    offs_w = tl.arange(0, BLOCK_W)
    dist = d0 + offs_w
    w_ok = (offs_w < W_USED) & (dist > -seqlen) & (dist < seqlen)
    idx = tl.load(IDX + dist + seqlen - 1, mask=w_ok, other=0)
    rows = tl.load(POS + h * stride_ph + idx[:, None].to(tl.int64) * stride_pe + offs_d[None, :],
                   mask=w_ok[:, None] & d_valid[None, :], other=0.0)
    return rows, dist, w_ok


@triton.jit
def _bias_tile(
    b, h, qi, kj, mask, seqlen,
    ROW_T, ROW_I, stride_rtb, stride_rth, stride_rtm, stride_rtc,
    COL_T, COL_I, stride_ctb, stride_cth, stride_ctn, stride_ctc,
    HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
):
    """The relative bias in fp32 for query positions ``qi`` and key positions ``kj`` (broadcastable
    2-D tiles; the result has their broadcast shape), zero where ``mask`` is false."""
    dist = qi - kj + seqlen - 1
    bias = tl.zeros_like(dist).to(tl.float32)
    if HAS_ROW:
        ridx = tl.load(ROW_I + dist, mask=mask, other=0)
        row_base = ROW_T + b * stride_rtb + h * stride_rth
        bias += tl.load(row_base + qi * stride_rtm + ridx * stride_rtc, mask=mask, other=0.0).to(tl.float32)
    if HAS_COL:
        cidx = tl.load(COL_I + dist, mask=mask, other=0)
        col_base = COL_T + b * stride_ctb + h * stride_cth
        bias += tl.load(col_base + kj * stride_ctn + cidx * stride_ctc, mask=mask, other=0.0).to(tl.float32)
    return bias


@triton.jit
def _biased_attn_fwd_kernel(
    Q, K, V, O, LSE,
    ROW_T, ROW_I, COL_T, COL_I, KMASK, SEED,
    POSK, C2P_I, POSQ, P2C_I,
    sm_scale, dropout_p, seqlen, num_heads,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_rtb, stride_rth, stride_rtm, stride_rtc,
    stride_ctb, stride_cth, stride_ctn, stride_ctc,
    stride_kmb,
    stride_pkh, stride_pke, stride_pqh, stride_pqe,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    # constexpr flags compile away the bias terms, the mask and dropout when a call has none
    HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_KMASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    # the interpreter multiplies bf16 bit patterns in tl.dot: upcast tiles there (never on GPU)
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    # DeBERTa in the kernel: c2p = q_i . POSK[C2P_I[i - j + L - 1]] and p2c = k_j . POSQ[P2C_I[..]]
    # from the BLOCK_W >= BLOCK_M + BLOCK_N - 1 relative embeddings a tile's distances reach
    HAS_POSK: tl.constexpr = False, HAS_POSQ: tl.constexpr = False, BLOCK_W: tl.constexpr = 16,
    # packed sequences (one batch row of several): token i attends to j only when SEG[i] ==
    # SEG[j]; each query tile visits only the key tiles of its rows' sequences (CU: cu_seqlens)
    SEG=None, CU=None, HAS_SEG: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: b * stride_qb reaches B * H * L * D, past 2**31 for long batches (int32 would wrap)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < seqlen
    d_valid = offs_d < HEAD_DIM
    if HAS_SEG:
        seg_m = tl.load(SEG + offs_m, mask=m_valid, other=-1)
        start, stop = _segment_span(SEG, CU, pid_m * BLOCK_M, BLOCK_M, BLOCK_N, seqlen)
    else:
        start = 0
        stop = seqlen

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        drop_scale = 1.0 / (1.0 - dropout_p)
    # window column of score (i, j): t = (i - m0) - (j - n0) + BLOCK_N - 1, the same every tile
    t_idx = tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :] + (BLOCK_N - 1)

    qk_scale = sm_scale * 1.4426950408889634  # scores are kept in base 2 (exp2)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < seqlen
        mask_nd = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=mask_nd, other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=mask_nd, other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        mask_mn = m_valid[:, None] & n_valid[None, :]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        d0 = pid_m * BLOCK_M - start_n - (BLOCK_N - 1)  # distance of window row 0
        if HAS_POSK:
            wk, _, _ = _window_rows(POSK, C2P_I, h, stride_pkh, stride_pke, d0, seqlen, offs_d, d_valid,
                                    BLOCK_W, BLOCK_M + BLOCK_N - 1)
            if UPCAST_DOT:
                wk = wk.to(tl.float32)
            c2p = tl.dot(q, tl.trans(wk), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_W)
            s += tl.gather(c2p, t_idx, axis=1)
        if HAS_POSQ:
            wq, _, _ = _window_rows(POSQ, P2C_I, h, stride_pqh, stride_pqe, d0, seqlen, offs_d, d_valid,
                                    BLOCK_W, BLOCK_M + BLOCK_N - 1)
            if UPCAST_DOT:
                wq = wq.to(tl.float32)
            p2c = tl.dot(wq, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_W, BLOCK_N)
            s += tl.gather(p2c, t_idx, axis=0)
        s = s * qk_scale
        if HAS_ROW or HAS_COL:
            s += _bias_tile(b, h, offs_m[:, None], offs_n[None, :], mask_mn, seqlen,
                            ROW_T, ROW_I, stride_rtb, stride_rth, stride_rtm, stride_rtc,
                            COL_T, COL_I, stride_ctb, stride_cth, stride_ctn, stride_ctc,
                            HAS_ROW, HAS_COL) * 1.4426950408889634
        key_ok = n_valid
        if HAS_KMASK:
            key_ok = key_ok & (tl.load(KMASK + b * stride_kmb + offs_n, mask=n_valid, other=0) != 0)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        if HAS_SEG:
            s = tl.where(seg_m[:, None] == tl.load(SEG + offs_n, mask=n_valid, other=-2)[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row whose keys are all masked so far has m_new = -inf: subtract 0 instead (p = 0)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = philox_keep(seed, bh, offs_m, start_n, seqlen, dropout_p, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p * drop_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # rows with no valid key (a zero-length sequence) give 0 and lse = +inf (so p = 0 in backward)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + bh.to(tl.int64) * seqlen + offs_m, lse, mask=m_valid)


@triton.jit
def _biased_attn_bwd_delta_kernel(
    O, DO, DELTA, seqlen, num_heads,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta_i = sum_j P_ij dP_ij = <dO_i, O_i> (also with dropout, since O = dropout(P) V)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: b * stride_qb reaches B * H * L * D, past 2**31 for long batches (int32 would wrap)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * seqlen + offs_m, tl.sum(o * do, 1), mask=offs_m < seqlen)


@triton.jit
def _key_tile(K, V, KMASK, b, h, pid, seqlen, offs_d, d_valid, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_kmb,
              BLOCK_N: tl.constexpr, HAS_KMASK: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """A backward program's key tile ``pid``: its positions, which exist, the (BLOCK_N, head_dim)
    mask, K and V (fp32 when UPCAST_DOT) and which keys are real (padding mask applied)."""
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < seqlen
    mask_nd = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=mask_nd, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=mask_nd, other=0.0)
    if UPCAST_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    key_ok = n_valid
    if HAS_KMASK:
        key_ok = key_ok & (tl.load(KMASK + b * stride_kmb + offs_n, mask=n_valid, other=0) != 0)
    return offs_n, n_valid, mask_nd, k, v, key_ok


@triton.jit
def _fused_bwd_program(
    Q, K, V, DO, LSE, DELTA, DK, DV, ROW_T, ROW_I, COL_T, COL_I, KMASK, DROW, DCOL,
    POSK, C2P_I, POSQ, P2C_I, DQ_ACC, DS, SEG, CU,
    pid, bh, b, h, seed, drop_scale, sm_scale, dropout_p, seqlen,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_rtb, stride_rth, stride_rtm, stride_rtc, stride_ctb, stride_cth, stride_ctn, stride_ctc,
    stride_drb, stride_drh, stride_drm, stride_drc, stride_dcb, stride_dch, stride_dcn, stride_dcc,
    stride_kmb, stride_pkh, stride_pke, stride_pqh, stride_pqe,
    stride_dab, stride_dah, stride_dam, stride_sh, stride_sm,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_KMASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_POSK: tl.constexpr, HAS_POSQ: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_DIST: tl.constexpr,
    STORE_DS: tl.constexpr, HAS_SEG: tl.constexpr,
):
    """The single-pass backward of one key tile: loops over every query tile once, recomputes
    its scores once, and produces dK, dV (registers, stored at the end), dQ (fp32 atomics into
    DQ_ACC) and the generic tables' gradients (atomics, as the two-pass kernel).

    ROW_DIST (T5): the row table is broadcast over queries, a function of i - j only, and DROW is
    a per-distance (batch, heads, 1, 2 L - 1) buffer: each tile sums dS along its BLOCK_M +
    BLOCK_N - 1 diagonals (gathered BLOCK_M window columns at a time) and adds one value per
    distance, instead of one atomic per score; the host adds the distances that share a bucket.
    DeBERTa's window halves need square tiles; the other paths take any BLOCK_M x BLOCK_N.

    STORE_DS (DeBERTa's windows, which always take it): no dQ and no window gradients here,
    hence no atomics at all: the score gradient dS (sm_scale folded in, in the inputs' dtype) is
    stored to DS, (batch * heads, L, L), for :func:`_disentangled_dq_kernel` (dQ = dS K + G W_k,
    row-parallel) and :func:`_disentangled_window_grad_kernel` (the window gradients G^T Q and
    H K, distance-parallel), where G[i, t] = dS[i, j] at the window column t of (i, j) and H[t, j]
    = dS[i, j]; p2c's part of dK, H^T W_q, stays here."""
    tl.static_assert(STORE_DS or not (HAS_POSK or HAS_POSQ), "DeBERTa's windows take STORE_DS")
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    qk_scale = sm_scale * 1.4426950408889634
    offs_n, n_valid, mask_nd, k, v, key_ok = _key_tile(
        K, V, KMASK, b, h, pid, seqlen, offs_d, d_valid, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_kmb, BLOCK_N, HAS_KMASK, UPCAST_DOT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    ds_base = DS + bh.to(tl.int64) * stride_sh
    if HAS_SEG:  # packed sequences: only the query tiles of this key tile's sequences
        seg_n = tl.load(SEG + offs_n, mask=n_valid, other=-2)
        start, stop = _segment_span(SEG, CU, pid * BLOCK_N, BLOCK_N, BLOCK_M, seqlen)
    else:
        start = 0
        stop = seqlen
    for start_m in range(start, stop, BLOCK_M):
        # window column of score (i, j), and its inverses: the key of (i, t) and the query of
        # (t, j); rebuilt every iteration (a few integer ops) rather than held in registers
        t_idx = tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :] + (BLOCK_N - 1)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < seqlen
        mask_md = m_valid[:, None] & d_valid[None, :]
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=mask_md, other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                     mask=mask_md, other=0.0)
        if UPCAST_DOT:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + bh.to(tl.int64) * seqlen + offs_m, mask=m_valid, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * seqlen + offs_m, mask=m_valid, other=0.0)
        mask_mn = m_valid[:, None] & n_valid[None, :]

        # the forward's scores, once. The window (2 T distances, T = BLOCK_M = BLOCK_N) is taken
        # as two halves: the upper half of this query tile is the lower half of the next one, so
        # its embedding gradient is carried in registers and flushed once (half the atomics)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        d0 = start_m - pid * BLOCK_N - (BLOCK_N - 1)
        lo = t_idx < BLOCK_N
        t_lo = tl.minimum(t_idx, BLOCK_N - 1)
        t_hi = tl.maximum(t_idx - BLOCK_N, 0)
        if HAS_POSK:
            wk_lo, _, _ = _window_rows(POSK, C2P_I, h, stride_pkh, stride_pke, d0, seqlen, offs_d,
                                       d_valid, BLOCK_N, BLOCK_N)
            wk_hi, _, _ = _window_rows(POSK, C2P_I, h, stride_pkh, stride_pke, d0 + BLOCK_N, seqlen, offs_d,
                                       d_valid, BLOCK_N, BLOCK_N)
            if UPCAST_DOT:
                wk_lo = wk_lo.to(tl.float32)
                wk_hi = wk_hi.to(tl.float32)
            s += tl.where(lo, tl.gather(tl.dot(q, tl.trans(wk_lo), input_precision=DOT_PRECISION), t_lo, axis=1),
                          tl.gather(tl.dot(q, tl.trans(wk_hi), input_precision=DOT_PRECISION), t_hi, axis=1))
        if HAS_POSQ:
            wq_lo, _, _ = _window_rows(POSQ, P2C_I, h, stride_pqh, stride_pqe, d0, seqlen, offs_d,
                                       d_valid, BLOCK_N, BLOCK_N)
            wq_hi, _, _ = _window_rows(POSQ, P2C_I, h, stride_pqh, stride_pqe, d0 + BLOCK_N, seqlen, offs_d,
                                       d_valid, BLOCK_N, BLOCK_N)
            if UPCAST_DOT:
                wq_lo = wq_lo.to(tl.float32)
                wq_hi = wq_hi.to(tl.float32)
            s += tl.where(lo, tl.gather(tl.dot(wq_lo, tl.trans(k), input_precision=DOT_PRECISION), t_lo, axis=0),
                          tl.gather(tl.dot(wq_hi, tl.trans(k), input_precision=DOT_PRECISION), t_hi, axis=0))
        s = s * qk_scale
        if HAS_ROW or HAS_COL:
            s += _bias_tile(b, h, offs_m[:, None], offs_n[None, :], mask_mn, seqlen,
                            ROW_T, ROW_I, stride_rtb, stride_rth, stride_rtm, stride_rtc,
                            COL_T, COL_I, stride_ctb, stride_cth, stride_ctn, stride_ctc,
                            HAS_ROW, HAS_COL) * 1.4426950408889634
        s = tl.where(key_ok[None, :], s, float("-inf"))
        if HAS_SEG:
            s = tl.where(tl.load(SEG + offs_m, mask=m_valid, other=-1)[:, None] == seg_n[None, :], s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = philox_keep(seed, bh, offs_m, pid * BLOCK_N, seqlen, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
            p_drop = tl.where(keep, p * drop_scale, 0.0)
        else:
            p_drop = p
        # dLoss / d(score), the score being sm_scale * (q.k + c2p + p2c) + table bias
        ds = p * (dp - delta[:, None])
        dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=DOT_PRECISION)
        if HAS_ROW:
            if ROW_DIST:
                # window column t of score (i, j) is i - j + BLOCK_N - 1 (distance d0 + t); chunk c
                # holds columns c BLOCK_M .. c BLOCK_M + BLOCK_M - 1, and row i's key at column t is
                # i - t + BLOCK_N - 1. dS is 0 at masked keys and rows (p = 0), so the sums are exact
                for c in tl.static_range((BLOCK_M + BLOCK_N - 2) // BLOCK_M + 1):
                    t = c * BLOCK_M + tl.arange(0, BLOCK_M)
                    key = tl.arange(0, BLOCK_M)[:, None] - t[None, :] + (BLOCK_N - 1)
                    on_tile = (key >= 0) & (key < BLOCK_N)
                    g = tl.where(on_tile, tl.gather(ds, tl.minimum(tl.maximum(key, 0), BLOCK_N - 1), axis=1), 0.0)
                    dist = start_m - pid * BLOCK_N - (BLOCK_N - 1) + t
                    ok = (t < BLOCK_M + BLOCK_N - 1) & (dist > -seqlen) & (dist < seqlen)
                    tl.atomic_add(DROW + b * stride_drb + h * stride_drh + (dist + seqlen - 1) * stride_drc,
                                  tl.sum(g, 0), mask=ok, sem="relaxed")
            else:
                ridx = tl.load(ROW_I + offs_m[:, None] - offs_n[None, :] + seqlen - 1, mask=mask_mn, other=0)
                tl.atomic_add(DROW + b * stride_drb + h * stride_drh + offs_m[:, None] * stride_drm
                              + ridx * stride_drc, ds, mask=mask_mn, sem="relaxed")
        if HAS_COL:
            cidx = tl.load(COL_I + offs_m[:, None] - offs_n[None, :] + seqlen - 1, mask=mask_mn, other=0)
            tl.atomic_add(DCOL + b * stride_dcb + h * stride_dch + offs_n[None, :] * stride_dcn
                          + cidx * stride_dcc, ds, mask=mask_mn, sem="relaxed")
        ds = ds * sm_scale  # the content and window terms are sm_scale times a dot product
        ds_lo = ds.to(q.dtype)
        dk += tl.dot(tl.trans(ds_lo), q, input_precision=DOT_PRECISION)
        if STORE_DS:  # (int32 offsets inside one (batch, head): L^2 < 2**31 up to L = 46,340)
            tl.store(ds_base + offs_m[:, None] * stride_sm + offs_n[None, :], ds_lo.to(DS.dtype.element_ty),
                     mask=mask_mn)
        else:
            dq = tl.dot(ds_lo, k, input_precision=DOT_PRECISION)
        if HAS_POSQ:
            # H[t, j] = dS[query of (t, j), j]: query t + j - (T - 1) (lower half), t + j + 1 (upper)
            h_query = tl.arange(0, BLOCK_N)[:, None] + tl.arange(0, BLOCK_N)[None, :] - (BLOCK_N - 1)
            h_lo = tl.where(h_query >= 0, tl.gather(ds, tl.maximum(h_query, 0), axis=0), 0.0)
            h_query = h_query + BLOCK_N
            h_hi = tl.where(h_query < BLOCK_M, tl.gather(ds, tl.minimum(h_query, BLOCK_M - 1), axis=0), 0.0)
            h_lo = h_lo.to(q.dtype)
            h_hi = h_hi.to(q.dtype)
            dk += tl.dot(tl.trans(h_lo), wq_lo.to(q.dtype), input_precision=DOT_PRECISION)
            dk += tl.dot(tl.trans(h_hi), wq_hi.to(q.dtype), input_precision=DOT_PRECISION)
        if not STORE_DS:
            tl.atomic_add(DQ_ACC + b * stride_dab + h * stride_dah + offs_m[:, None] * stride_dam
                          + offs_d[None, :], dq, mask=mask_md, sem="relaxed")

    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _biased_attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV,
    ROW_T, ROW_I, COL_T, COL_I, KMASK, SEED, DROW, DCOL,
    sm_scale, dropout_p, seqlen, num_heads,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_rtb, stride_rth, stride_rtm, stride_rtc,
    stride_ctb, stride_cth, stride_ctn, stride_ctc,
    stride_drb, stride_drh, stride_drm, stride_drc,
    stride_dcb, stride_dch, stride_dcn, stride_dcc,
    stride_kmb,
    POSK, C2P_I, POSQ, P2C_I, DQ_ACC, DS,
    stride_pkh, stride_pke, stride_pqh, stride_pqe,
    stride_dab, stride_dah, stride_dam, stride_sh, stride_sm,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_KMASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # one kernel, two passes: KV_PASS owns a key tile (dK, dV, column-table grad) and loops over
    # queries; otherwise it owns a query tile (dQ, row-table grad) and loops over keys
    KV_PASS: tl.constexpr,
    LOOP_BLOCK: tl.constexpr,  # BLOCK_M in the KV pass, BLOCK_N in the Q pass
    # FUSED_DQ: one pass only (a key tile per program, as KV_PASS), scores recomputed once; dQ
    # goes by fp32 atomics into DQ_ACC (DeBERTa: STORE_DS instead, see _fused_bwd_program)
    FUSED_DQ: tl.constexpr = False,
    HAS_POSK: tl.constexpr = False, HAS_POSQ: tl.constexpr = False, BLOCK_W: tl.constexpr = 16,
    # FUSED_DQ with a distance-only row table (T5): its gradient per distance (see _fused_bwd_program)
    ROW_DIST: tl.constexpr = False,
    # FUSED_DQ for DeBERTa: the score gradient stored to DS instead of dQ / window atomics
    STORE_DS: tl.constexpr = False,
    # FUSED_DQ on packed sequences (see the forward kernel)
    SEG=None, CU=None, HAS_SEG: tl.constexpr = False,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: b * stride_qb reaches B * H * L * D, past 2**31 for long batches (int32 would wrap)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    qk_scale = sm_scale * 1.4426950408889634
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        drop_scale = 1.0 / (1.0 - dropout_p)
    else:
        seed = 0
        drop_scale = 1.0

    if FUSED_DQ:
        _fused_bwd_program(
            Q, K, V, DO, LSE, DELTA, DK, DV, ROW_T, ROW_I, COL_T, COL_I, KMASK, DROW, DCOL,
            POSK, C2P_I, POSQ, P2C_I, DQ_ACC, DS, SEG, CU,
            pid, bh, b, h, seed, drop_scale, sm_scale, dropout_p, seqlen,
            stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
            stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
            stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
            stride_rtb, stride_rth, stride_rtm, stride_rtc, stride_ctb, stride_cth, stride_ctn, stride_ctc,
            stride_drb, stride_drh, stride_drm, stride_drc, stride_dcb, stride_dch, stride_dcn, stride_dcc,
            stride_kmb, stride_pkh, stride_pke, stride_pqh, stride_pqe,
            stride_dab, stride_dah, stride_dam, stride_sh, stride_sm,
            HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_W, HAS_ROW, HAS_COL, HAS_KMASK, HAS_DROPOUT,
            HAS_POSK, HAS_POSQ, UPCAST_DOT, DOT_PRECISION, ROW_DIST, STORE_DS, HAS_SEG)
    else:
        if KV_PASS:
            offs_n, n_valid, mask_nd, k, v, key_ok = _key_tile(
                K, V, KMASK, b, h, pid, seqlen, offs_d, d_valid, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_kmb, BLOCK_N, HAS_KMASK, UPCAST_DOT)
            dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        else:
            offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            m_valid = offs_m < seqlen
            mask_md = m_valid[:, None] & d_valid[None, :]
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                        mask=mask_md, other=0.0)
            do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                         + offs_d[None, :], mask=mask_md, other=0.0)
            if UPCAST_DOT:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + bh.to(tl.int64) * seqlen + offs_m, mask=m_valid, other=float("inf"))
            delta = tl.load(DELTA + bh.to(tl.int64) * seqlen + offs_m, mask=m_valid, other=0.0)
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        for start in range(0, seqlen, LOOP_BLOCK):
            if KV_PASS:
                # transposed tiles (keys x queries): sT = K Q^T, so that dV += P^T dO and
                # dK += dS^T Q need no transpose of a computed tile
                offs_m = start + tl.arange(0, BLOCK_M)
                m_valid = offs_m < seqlen
                mask_md = m_valid[:, None] & d_valid[None, :]
                q_t = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[None, :] * stride_qm
                              + offs_d[:, None], mask=d_valid[:, None] & m_valid[None, :], other=0.0)
                do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                             + offs_d[None, :], mask=mask_md, other=0.0)
                if UPCAST_DOT:
                    q_t = q_t.to(tl.float32)
                    do = do.to(tl.float32)
                lse = tl.load(LSE + bh.to(tl.int64) * seqlen + offs_m, mask=m_valid, other=float("inf"))
                delta = tl.load(DELTA + bh.to(tl.int64) * seqlen + offs_m, mask=m_valid, other=0.0)

                mask_nm = n_valid[:, None] & m_valid[None, :]
                s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
                s_t += _bias_tile(b, h, offs_m[None, :], offs_n[:, None], mask_nm, seqlen,
                                  ROW_T, ROW_I, stride_rtb, stride_rth, stride_rtm, stride_rtc,
                                  COL_T, COL_I, stride_ctb, stride_cth, stride_ctn, stride_ctc,
                                  HAS_ROW, HAS_COL) * 1.4426950408889634
                s_t = tl.where(key_ok[:, None], s_t, float("-inf"))
                p_t = tl.exp2(s_t - lse[None, :])
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
                if HAS_DROPOUT:
                    keep_t = tl.trans(philox_keep(seed, bh, offs_m, pid * BLOCK_N, seqlen, dropout_p, BLOCK_M, BLOCK_N))
                    dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
                    p_drop_t = tl.where(keep_t, p_t * drop_scale, 0.0)
                else:
                    p_drop_t = p_t
                # dS = dLoss / d(score), the score being sm_scale * q.k + bias
                ds_t = p_t * (dp_t - delta[None, :])
                dv += tl.dot(p_drop_t.to(do.dtype), do, input_precision=DOT_PRECISION)
                dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
                if HAS_COL:
                    cidx = tl.load(COL_I + offs_m[None, :] - offs_n[:, None] + seqlen - 1, mask=mask_nm, other=0)
                    tl.atomic_add(DCOL + b * stride_dcb + h * stride_dch + offs_n[:, None] * stride_dcn
                                  + cidx * stride_dcc, ds_t, mask=mask_nm, sem="relaxed")
            else:
                offs_n = start + tl.arange(0, BLOCK_N)
                n_valid = offs_n < seqlen
                mask_nd = n_valid[:, None] & d_valid[None, :]
                k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn
                            + offs_d[None, :], mask=mask_nd, other=0.0)
                v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn
                            + offs_d[None, :], mask=mask_nd, other=0.0)
                if UPCAST_DOT:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                key_ok = n_valid
                if HAS_KMASK:
                    key_ok = key_ok & (tl.load(KMASK + b * stride_kmb + offs_n, mask=n_valid, other=0) != 0)

                # recompute the probabilities of this tile from the stored log-sum-exp
                mask_mn = m_valid[:, None] & n_valid[None, :]
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
                s += _bias_tile(b, h, offs_m[:, None], offs_n[None, :], mask_mn, seqlen,
                                ROW_T, ROW_I, stride_rtb, stride_rth, stride_rtm, stride_rtc,
                                COL_T, COL_I, stride_ctb, stride_cth, stride_ctn, stride_ctc,
                                HAS_ROW, HAS_COL) * 1.4426950408889634
                s = tl.where(key_ok[None, :], s, float("-inf"))
                p = tl.exp2(s - lse[:, None])
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
                if HAS_DROPOUT:
                    keep = philox_keep(seed, bh, offs_m, start, seqlen, dropout_p, BLOCK_M, BLOCK_N)
                    dp = tl.where(keep, dp * drop_scale, 0.0)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
                if HAS_ROW:
                    ridx = tl.load(ROW_I + offs_m[:, None] - offs_n[None, :] + seqlen - 1, mask=mask_mn, other=0)
                    tl.atomic_add(DROW + b * stride_drb + h * stride_drh + offs_m[:, None] * stride_drm
                                  + ridx * stride_drc, ds, mask=mask_mn, sem="relaxed")

        if KV_PASS:
            tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
                     (dk * sm_scale).to(DK.dtype.element_ty), mask=mask_nd)
            tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
                     dv.to(DV.dtype.element_ty), mask=mask_nd)
        else:
            tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
                     (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask_md)


@triton.jit
def _disentangled_dq_kernel(
    DS, K, POSK, C2P_I, DQ, seqlen, num_heads,
    stride_sh, stride_sm, stride_kb, stride_kh, stride_kn, stride_pkh, stride_pke,
    stride_dqb, stride_dqh, stride_dqm,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_POSK: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """DeBERTa's dQ from the stored score gradient, one query tile per program (no atomics):
    dQ_i = sum_j dS[i, j] K_j (the content term) + sum_d dS[i, i - d] W_k[c2p(d)] (c2p's term,
    over the BLOCK_N-wide blocks of the distances d = i - j its rows reach: each (i, j) once)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < seqlen
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    rows = DS + bh.to(tl.int64) * stride_sh + offs_m[:, None].to(tl.int64) * stride_sm
    k_base = K + b * stride_kb + h * stride_kh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < seqlen
        ds = tl.load(rows + offs_n[None, :], mask=m_valid[:, None] & n_valid[None, :], other=0.0)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=n_valid[:, None] & d_valid[None, :],
                    other=0.0)
        if UPCAST_DOT:
            ds = ds.to(tl.float32)
            k = k.to(tl.float32)
        dq += tl.dot(ds, k.to(ds.dtype), input_precision=DOT_PRECISION)
    if HAS_POSK:
        for d0 in range(pid * BLOCK_M - seqlen + 1, pid * BLOCK_M + BLOCK_M, BLOCK_N):
            wk, dist, w_ok = _window_rows(POSK, C2P_I, h, stride_pkh, stride_pke, d0, seqlen, offs_d, d_valid,
                                          BLOCK_N, BLOCK_N)
            key = offs_m[:, None] - dist[None, :]
            ok = m_valid[:, None] & w_ok[None, :] & (key >= 0) & (key < seqlen)
            g = tl.load(rows + key, mask=ok, other=0.0)  # G[i, t] = dS[i, i - d0 - t]
            if UPCAST_DOT:
                g = g.to(tl.float32)
            dq += tl.dot(g, wk.to(g.dtype), input_precision=DOT_PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


@triton.jit
def _disentangled_window_grad_kernel(
    DS, Q, K, DPOSK, DPOSQ, seqlen, batch, num_heads,
    stride_sh, stride_sm, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_dph, stride_dpe,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_POSK: tl.constexpr, HAS_POSQ: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """DeBERTa's relative-embedding gradients per distance, one block of BLOCK distances
    d = i - j and one head per program, summed over the batch in registers and stored once (no
    atomics): DPOSK[h, d] = sum_{b, i} dS[i, i - d] Q_i (c2p), DPOSQ[h, d] = sum_{b, j}
    dS[j + d, j] K_j (p2c). c2p's dS[i, i - d0 - t] is read along rows (coalesced); p2c's
    dS[j + d0 + t, j] walks a diagonal, so its two BLOCK x BLOCK row tiles are read whole and
    the diagonal gathered in registers (as the fused backward's H)."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    d0 = pid * BLOCK - (seqlen - 1)
    offs_t = tl.arange(0, BLOCK)
    dist = d0 + offs_t
    t_ok = dist < seqlen
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    acc_k = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    # p2c's gather: row (j - j0) + t of the two stacked row tiles holds dS[j + d0 + t, j]
    stacked = offs_t[:, None] + offs_t[None, :]  # (t, j - j0)
    for b in range(batch):
        ds_base = DS + (b * num_heads + h) * stride_sh
        if HAS_POSK:
            # the queries i whose keys i - d fall inside [0, L) for some d of the block
            lo = (tl.maximum(d0, 0) // BLOCK) * BLOCK
            hi = tl.minimum(seqlen, d0 + BLOCK - 1 + seqlen)
            for start_m in range(lo, hi, BLOCK):
                offs_m = start_m + offs_t
                m_valid = offs_m < seqlen
                key = offs_m[:, None] - dist[None, :]
                ok = m_valid[:, None] & t_ok[None, :] & (key >= 0) & (key < seqlen)
                g = tl.load(ds_base + offs_m[:, None].to(tl.int64) * stride_sm + key, mask=ok, other=0.0)
                q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                            mask=m_valid[:, None] & d_valid[None, :], other=0.0)
                if UPCAST_DOT:
                    g = g.to(tl.float32)
                    q = q.to(tl.float32)
                acc_k += tl.dot(tl.trans(g), q.to(g.dtype), input_precision=DOT_PRECISION)
        if HAS_POSQ:
            # the keys j whose queries j + d fall inside [0, L)
            lo = (tl.maximum(-(d0 + BLOCK - 1), 0) // BLOCK) * BLOCK
            hi = tl.minimum(seqlen, seqlen - d0)
            for start_n in range(lo, hi, BLOCK):
                offs_n = start_n + offs_t
                n_valid = offs_n < seqlen
                r_lo = start_n + d0 + offs_t
                r_hi = r_lo + BLOCK
                tile_lo = tl.load(ds_base + r_lo[:, None].to(tl.int64) * stride_sm + offs_n[None, :],
                                  mask=((r_lo >= 0) & (r_lo < seqlen))[:, None] & n_valid[None, :], other=0.0)
                tile_hi = tl.load(ds_base + r_hi[:, None].to(tl.int64) * stride_sm + offs_n[None, :],
                                  mask=((r_hi >= 0) & (r_hi < seqlen))[:, None] & n_valid[None, :], other=0.0)
                ht = tl.where(stacked < BLOCK, tl.gather(tile_lo, tl.minimum(stacked, BLOCK - 1), axis=0),
                              tl.gather(tile_hi, tl.maximum(stacked - BLOCK, 0), axis=0))  # (t, j): dS[j + d, j]
                ht = tl.where(t_ok[:, None] & n_valid[None, :], ht, 0.0)
                k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                            mask=n_valid[:, None] & d_valid[None, :], other=0.0)
                if UPCAST_DOT:
                    ht = ht.to(tl.float32)
                    k = k.to(tl.float32)
                acc_q += tl.dot(ht, k.to(ht.dtype), input_precision=DOT_PRECISION)
    rows = h * stride_dph + (dist + seqlen - 1)[:, None].to(tl.int64) * stride_dpe + offs_d[None, :]
    ok = t_ok[:, None] & d_valid[None, :]
    if HAS_POSK:
        tl.store(DPOSK + rows, acc_k, mask=ok)
    if HAS_POSQ:
        tl.store(DPOSQ + rows, acc_q, mask=ok)


@triton.jit
def _dropout_mask_kernel(MASK, SEED, dropout_p, seqlen, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # writes the keep-mask the attention kernels draw (for the eager reference and tests)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = philox_keep(tl.load(SEED), bh, offs_m, pid_n * BLOCK_N, seqlen, dropout_p, BLOCK_M, BLOCK_N)
    mask = (offs_m < seqlen)[:, None] & (offs_n < seqlen)[None, :]
    tl.store(MASK + bh.to(tl.int64) * seqlen * seqlen + offs_m[:, None] * seqlen + offs_n[None, :],
             keep.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------


def _table_strides(table: torch.Tensor | None) -> tuple[int, int, int, int]:
    """Strides of a (batch, heads, rows, entries) table, 0 on broadcast (size-1) dims."""
    if table is None:
        return (0, 0, 0, 0)
    return tuple(0 if table.size(i) == 1 else table.stride(i) for i in range(4))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _kernel_mask(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    if key_padding_mask is None:
        return None
    mask = _last_dim_contiguous(key_padding_mask)
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


class _LaunchConfig:
    """Tile sizes and flags of one call.

    GPU tiles come from compiling for sm_90 without a GPU (see ``test_kernels_compile_for_sm90``)
    and keeping the largest tiles with no register spills at head_dim 64, with triton 3.6 (the
    GPU image's) and 3.9: fp16/bf16 forward 64 x 32 with 4 warps, two-pass backward 64 x 16 with
    8 warps; fp32 (IEEE dots, no tensor-core shortcut) 32 x 32 with 8 warps. 64 x 64 tiles spill: the bias gathers hold one 64-bit
    address per score per table. The fused backward of T5 / no table (``fused``, not ``window``)
    takes a wide key tile, BLOCK_M x BLOCK_N = 32 x 64 in bf16 / fp16 with 8 warps: its dQ
    atomics are BLOCK_M x head_dim per tile, L^2 head_dim / BLOCK_N per (batch, head) in all,
    so BLOCK_N is the wider side; 64 x 64 spills 456 bytes per thread, 64 x 128 1,920 (sm_90,
    triton 3.9). Not timed on a GPU yet: re-tune with ``bench/bench_biased_attention.py`` when one
    is available.
    Interpreted runs use 16 x 16 tiles (16 x 32 for the fused non-window backward, so the tests
    cover non-square tiles), so tiny test shapes still cover several ragged tiles.
    """

    def __init__(self, q: torch.Tensor, block_m: int | None, block_n: int | None, backward: bool = False,
                 num_warps: int | None = None, window: bool = False, fused: bool = False):
        head_dim = q.shape[-1]
        self.interpreted = interpreted()
        self.block_d = max(16, triton.next_power_of_2(head_dim))
        if self.interpreted:
            default_m, default_n, self.num_warps = 16, 32 if (fused and not window) else 16, 4
        elif window:
            # DeBERTa in the kernel: square tiles (the backward's window halves are one tile wide;
            # the window of BLOCK_M + BLOCK_N - 1 distances pads to 2 BLOCK_N, so the window
            # products cost 2x the content product per table). bf16 forward 32 x 32 with 4 warps.
            # bf16 backward (the score-gradient pass: no dQ, no window gradients, no atomics)
            # 32 x 32 with 8 warps, no spills with triton 3.9 (sm_90 register test; 4 warps
            # spill 32 bytes per thread, 16 x 16 with 4 warps 16). fp32 16 x 16 with 8 warps
            default_m = default_n = 16 if q.dtype == torch.float32 else 32
            self.num_warps = 8 if backward else 4
        elif fused:
            # T5 / no table, fp16 / bf16 (fp32 takes two passes on a GPU, see the launcher)
            default_m, default_n, self.num_warps = 32, 64, 8
        elif q.dtype == torch.float32:
            default_m, default_n, self.num_warps = 32, 32, 8
        elif backward:
            # the two-pass backward of the generic tables: 64 x 16 with 8 warps (64 x 32 spills 16
            # bytes per thread with triton 3.6, none with 3.9)
            default_m, default_n, self.num_warps = 64, 16, 8
        else:
            default_m, default_n, self.num_warps = 64, 32, 4
        if self.block_d > 64 and not self.interpreted:  # wider heads: halve the query tile
            default_m = max(16, default_m // 2)
            default_n = default_m if window else (max(32, default_n // 2) if fused else default_n)
            self.num_warps = 8
        self.block_m = block_m or default_m
        self.block_n = block_n or default_n
        # DeBERTa's dQ and window-gradient passes over the stored score gradient (tiles of their
        # own: no score recomputation, two accumulators at most)
        if self.interpreted:
            self.dq_block_m, self.dq_block_n, self.dist_block, self.pass_warps = 16, 16, 16, 4
        else:
            # (fp32: 16-distance blocks, the 32-wide ones spill 336 bytes per thread on sm_90)
            self.dq_block_m, self.dq_block_n, self.pass_warps = 64, 32, 4
            self.dist_block = 16 if q.dtype == torch.float32 else 32
        # the relative embeddings one tile's distances reach (i - j over the tile), padded
        self.block_w = triton.next_power_of_2(self.block_m + self.block_n - 1)
        self.num_warps = num_warps or self.num_warps
        self.num_stages = 2
        self.upcast_dot, self.dot_precision = dot_settings(q.dtype)


def _pos_arguments(q, pos_key, c2p_index, pos_query, p2c_index):
    """Kernel arguments of DeBERTa's relative embeddings (placeholders when absent): pointers
    (POSK, C2P_I, POSQ, P2C_I) and strides (heads, entries) of the (heads, entries, head_dim)
    tables (unit last stride)."""
    def one(pos, index):
        if pos is None:
            return (q, q), (0, 0)
        pos = _last_dim_contiguous(pos)  # strides of the tensor the kernel reads
        return (pos, index.to(torch.int32).contiguous()), (pos.stride(0), pos.stride(1))

    (pk, ci), pk_strides = one(pos_key, c2p_index)
    (pq, pi), pq_strides = one(pos_query, p2c_index)
    return (pk, ci, pq, pi), (*pk_strides, *pq_strides)


def biased_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    row_table: torch.Tensor | None, row_index: torch.Tensor | None,
    col_table: torch.Tensor | None, col_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, seed: torch.Tensor | None,
    sm_scale: float, dropout_p: float,
    *, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
    pos_key: torch.Tensor | None = None, c2p_index: torch.Tensor | None = None,
    pos_query: torch.Tensor | None = None, p2c_index: torch.Tensor | None = None,
    segments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher.

    ``block_m`` / ``block_n`` / ``num_warps`` override the tile heuristic (tests, tuning runs).

    Shapes: ``q, k, v``: (batch, heads, seq, head_dim), any strides with a unit last stride (HF's
    ``view(B, L, H, D).transpose(1, 2)`` needs no copy). ``row_table`` / ``col_table``:
    (1 or batch, heads, 1 or seq, entries); ``row_index`` / ``col_index``: int32 (2 seq - 1,),
    entry ``i - j + seq - 1`` giving the table column for distance ``i - j``.
    ``key_padding_mask``: (batch, seq), nonzero = attend. ``seed``: int64 (1,) tensor, read only
    when ``dropout_p > 0``. ``segments``: ``(segment_ids, cu_seqlens)`` (integer ids per token,
    int32 offsets) for packed sequences in one batch row (batch 1): token ``i`` attends to ``j``
    only within its sequence, and each tile visits the other side's tiles of its sequences only.

    Returns ``out`` (batch, heads, seq, head_dim) stored as (batch, seq, heads, head_dim) so that
    merging the heads afterwards is free, and ``lse`` (batch, heads, seq) fp32 in base 2; both are
    written into ``out`` / ``lse`` when given (any strides with a unit last stride; ``lse``
    contiguous).
    """
    batch, heads, seqlen, head_dim = q.shape
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    cfg = _LaunchConfig(q, block_m, block_n, num_warps=num_warps,
                        window=pos_key is not None or pos_query is not None)
    if out is None:
        out = torch.empty((batch, seqlen, heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    if lse is None:
        lse = torch.empty((batch, heads, seqlen), dtype=torch.float32, device=q.device)
    if seqlen == 0 or batch * heads == 0:
        return out, lse
    kmask = _kernel_mask(key_padding_mask)
    row_i = None if row_index is None else row_index.to(torch.int32).contiguous()
    col_i = None if col_index is None else col_index.to(torch.int32).contiguous()
    pos_args, pos_strides = _pos_arguments(q, pos_key, c2p_index, pos_query, p2c_index)
    grid = (triton.cdiv(seqlen, cfg.block_m), batch * heads)
    _biased_attn_fwd_kernel[grid](
        q, k, v, out, lse,
        q if row_table is None else row_table, q if row_i is None else row_i,
        q if col_table is None else col_table, q if col_i is None else col_i,
        q if kmask is None else kmask, q if seed is None else seed,
        *pos_args,
        float(sm_scale), float(dropout_p), seqlen, heads,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *_table_strides(row_table), *_table_strides(col_table),
        0 if kmask is None else kmask.stride(0),
        *pos_strides,
        HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        HAS_ROW=row_table is not None, HAS_COL=col_table is not None, HAS_KMASK=kmask is not None,
        HAS_DROPOUT=dropout_p > 0.0, UPCAST_DOT=cfg.upcast_dot, DOT_PRECISION=cfg.dot_precision,
        HAS_POSK=pos_key is not None, HAS_POSQ=pos_query is not None, BLOCK_W=cfg.block_w,
        **_segment_arguments(q, segments),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def _segment_arguments(q: torch.Tensor, segments) -> dict:
    """The kernels' packed-sequence arguments (placeholders without ``segments``)."""
    if segments is None:
        return dict(SEG=q, CU=q, HAS_SEG=False)
    if q.shape[0] != 1:
        raise ValueError("packed sequences (segments) take a batch of one row")
    seg, cu = (x.contiguous() for x in segments)
    return dict(SEG=seg, CU=cu, HAS_SEG=True)


def biased_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    row_table: torch.Tensor | None, row_index: torch.Tensor | None,
    col_table: torch.Tensor | None, col_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, seed: torch.Tensor | None,
    sm_scale: float, dropout_p: float,
    *, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    dq: torch.Tensor | None = None, dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
    raw_table_grads: bool = False, passes: tuple[str, ...] | None = None, fused: bool | None = None,
    pos_key: torch.Tensor | None = None, c2p_index: torch.Tensor | None = None,
    pos_query: torch.Tensor | None = None, p2c_index: torch.Tensor | None = None,
    segments: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Backward launcher: (dq, dk, dv, d_row_table, d_col_table), same shapes as the inputs;
    with ``pos_key`` / ``pos_query`` (DeBERTa in the kernel, always ``fused``) two more,
    (d_pos_key, d_pos_query), in their dtype (``None`` when absent).

    The table gradients are accumulated in fp32 with atomics into (batch, heads, rows, entries)
    buffers (a per-batch buffer even for a broadcast table, which spreads the atomics; it is
    summed afterwards) and cast to the table's dtype. ``None`` for an absent table. With
    ``raw_table_grads`` the fp32 buffers are returned as they are ((batch, heads, rows, entries),
    or (batch, heads, 1, 2 seq - 1) per distance on the fused T5 path).
    ``dq`` / ``dk`` / ``dv``: optional output buffers (unit last stride). DeBERTa's windows always
    take the three passes over a stored score gradient (see the module doc). ``fused``: one
    column-parallel pass for everything (scores and probabilities recomputed once; dQ by fp32
    atomics into a zeroed (batch, heads, seq, head_dim) buffer). ``None`` (the default) takes it
    wherever the model shows it cheaper: no table, or a row table
    broadcast over queries (T5's distance row, whose gradient is then summed per distance inside
    the tiles); the generic per-row / per-column tables keep two passes. ``passes`` (two-pass
    only) picks the column-parallel pass (``"kv"``: dk, dv, column-table grad) and / or the
    row-parallel one (``"q"``: dq, row-table grad); a skipped pass leaves its outputs unwritten
    and its table gradient ``None``.
    """
    batch, heads, seqlen, head_dim = q.shape
    window = pos_key is not None or pos_query is not None
    distance_row = row_table is not None and row_table.size(2) == 1 and col_table is None
    if fused is None:
        # fp32 on a GPU keeps two passes: its fused T5 kernel spills at every tile tried (16 x 32:
        # 32 bytes per thread, sm_90), the two passes do not; the interpreter runs fp32 fused, so
        # the CPU tests cover the fused path
        fused = passes is None and (window or (col_table is None and (row_table is None or distance_row)
                                               and (q.dtype != torch.float32 or interpreted())))
    if segments is not None and (window or row_table is not None or col_table is not None):
        raise ValueError("packed sequences (segments) take no bias table")
    fused = fused or window or segments is not None  # (the two-pass kernels know no segments)
    passes = ("kv", "q") if passes is None else passes
    row_dist = fused and distance_row and not window
    q, k, v, out, grad_out = (_last_dim_contiguous(x) for x in (q, k, v, out, grad_out))
    cfg = _LaunchConfig(q, block_m, block_n, backward=True, num_warps=num_warps, window=window, fused=fused)
    if window and cfg.block_m != cfg.block_n:
        raise ValueError("the DeBERTa backward needs square tiles (its window halves are one tile wide)")
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv

    def grad_buffer(table):
        if table is None:
            return None
        # per distance on the fused T5 path (the kernel sums each tile's diagonals)
        entries = max(1, 2 * seqlen - 1) if row_dist else table.size(3)
        return torch.zeros((batch, heads, table.size(2), entries), dtype=torch.float32, device=q.device)

    drow = grad_buffer(row_table) if ("q" in passes or fused) else None
    dcol = grad_buffer(col_table) if ("kv" in passes or fused) else None
    # DeBERTa's window gradients per distance i - j + L - 1, summed over the batch: (heads,
    # 2 L - 1, head_dim) fp32, 1 / (batch * L / (2 head_dim)) of a (batch, heads, L, entries) table
    # (written whole by _disentangled_window_grad_kernel: every distance block stores its rows)
    dist_grad = [None if pos is None else torch.empty((heads, max(1, 2 * seqlen - 1), head_dim),
                                                       dtype=torch.float32, device=q.device)
                 for pos in (pos_key, pos_query)]
    # DeBERTa: the score gradient, stored by the fused pass, read by the dQ and window passes
    # (batch * heads * L^2 in the inputs' dtype: 48 MiB at 8 x 12 x 512^2 in bf16, where the
    # atomics it replaces cost ~70 % of the fused pass on an H200 by the performance model)
    ds = torch.empty((batch * heads, seqlen, seqlen), dtype=q.dtype, device=q.device) if window else None
    dq_acc = torch.zeros((batch, heads, seqlen, head_dim), dtype=torch.float32, device=q.device) \
        if fused and not window else None
    if seqlen > 0 and batch * heads > 0:
        delta = torch.empty((batch, heads, seqlen), dtype=torch.float32, device=q.device)
        _biased_attn_bwd_delta_kernel[(triton.cdiv(seqlen, cfg.block_m), batch * heads)](
            out, grad_out, delta, seqlen, heads,
            out.stride(0), out.stride(1), out.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
        )
        kmask = _kernel_mask(key_padding_mask)
        row_i = None if row_index is None else row_index.to(torch.int32).contiguous()
        col_i = None if col_index is None else col_index.to(torch.int32).contiguous()
        pos_args, pos_strides = _pos_arguments(q, pos_key, c2p_index, pos_query, p2c_index)
        dpk, dpq = dist_grad
        dist_ref = dpk if dpk is not None else dpq
        common = dict(
            HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            HAS_ROW=row_table is not None, HAS_COL=col_table is not None,
            HAS_KMASK=kmask is not None, HAS_DROPOUT=dropout_p > 0.0,
            UPCAST_DOT=cfg.upcast_dot, DOT_PRECISION=cfg.dot_precision,
            HAS_POSK=pos_key is not None, HAS_POSQ=pos_query is not None, BLOCK_W=cfg.block_w,
            ROW_DIST=row_dist, **_segment_arguments(q, segments), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        args = (
            q, k, v, grad_out, lse, delta, dq, dk, dv,
            q if row_table is None else row_table, q if row_i is None else row_i,
            q if col_table is None else col_table, q if col_i is None else col_i,
            q if kmask is None else kmask, q if seed is None else seed,
            q if drow is None else drow, q if dcol is None else dcol,
            float(sm_scale), float(dropout_p), seqlen, heads,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            *_table_strides(row_table), *_table_strides(col_table),
            *_table_strides(drow), *_table_strides(dcol),
            0 if kmask is None else kmask.stride(0),
            *pos_args, q if dq_acc is None else dq_acc, q if ds is None else ds,
            *pos_strides,
            *((0, 0, 0) if dq_acc is None else dq_acc.stride()[:3]),
            *((0, 0) if ds is None else ds.stride()[:2]),
        )
        if window:
            _biased_attn_bwd_kernel[(triton.cdiv(seqlen, cfg.block_n), batch * heads)](
                *args, KV_PASS=True, LOOP_BLOCK=cfg.block_m, FUSED_DQ=True, STORE_DS=True, **common)
            pk, ci, _, _ = pos_args
            small = dict(DOT_PRECISION=cfg.dot_precision, UPCAST_DOT=cfg.upcast_dot, BLOCK_D=cfg.block_d,
                         HEAD_DIM=head_dim, num_warps=cfg.pass_warps, num_stages=cfg.num_stages)
            _disentangled_dq_kernel[(triton.cdiv(seqlen, cfg.dq_block_m), batch * heads)](
                ds, k, pk, ci, dq, seqlen, heads, ds.stride(0), ds.stride(1),
                k.stride(0), k.stride(1), k.stride(2), *pos_strides[:2], dq.stride(0), dq.stride(1), dq.stride(2),
                BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n, HAS_POSK=pos_key is not None, **small)
            _disentangled_window_grad_kernel[(triton.cdiv(2 * seqlen - 1, cfg.dist_block), heads)](
                ds, q, k, q if dpk is None else dpk, q if dpq is None else dpq, seqlen, batch, heads,
                ds.stride(0), ds.stride(1), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                k.stride(2), *dist_ref.stride()[:2], BLOCK=cfg.dist_block,
                HAS_POSK=pos_key is not None, HAS_POSQ=pos_query is not None, **small)
        elif fused:
            _biased_attn_bwd_kernel[(triton.cdiv(seqlen, cfg.block_n), batch * heads)](
                *args, KV_PASS=True, LOOP_BLOCK=cfg.block_m, FUSED_DQ=True, **common)
            dq.copy_(dq_acc)
        else:
            if "kv" in passes:
                _biased_attn_bwd_kernel[(triton.cdiv(seqlen, cfg.block_n), batch * heads)](
                    *args, KV_PASS=True, LOOP_BLOCK=cfg.block_m, **common)
            if "q" in passes:
                _biased_attn_bwd_kernel[(triton.cdiv(seqlen, cfg.block_m), batch * heads)](
                    *args, KV_PASS=False, LOOP_BLOCK=cfg.block_n, **common)
    else:
        dq.zero_(), dk.zero_(), dv.zero_()

    def finish(buffer, table):
        if buffer is None or raw_table_grads:
            return buffer
        if row_dist and table is row_table:
            # distances that share a table entry (T5's buckets) add up
            grad = torch.zeros((batch, heads, 1, table.size(3)), dtype=torch.float32, device=q.device)
            if seqlen > 0:
                grad.index_add_(3, row_index.long(), buffer)
            buffer = grad
        if table.size(0) == 1:
            buffer = buffer.sum(0, keepdim=True)
        return buffer.to(table.dtype)

    grads = (dq, dk, dv, finish(drow, row_table), finish(dcol, col_table))
    if not window:
        return grads

    def per_entry(buffer, pos, index):
        # distances that share a relative embedding (buckets, clamping) add up; a (heads,
        # entries, head_dim) scatter of 2 L - 1 rows per head, small next to the kernel
        if pos is None:
            return None
        grad = torch.zeros(pos.shape, dtype=torch.float32, device=q.device)
        if seqlen > 0:
            grad.index_add_(1, index.long(), buffer)
        return grad.to(pos.dtype)

    return (*grads, per_entry(dist_grad[0], pos_key, c2p_index), per_entry(dist_grad[1], pos_query, p2c_index))


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, seqlen: int,
                      dropout_p: float) -> torch.Tensor:
    """The (batch, heads, seq, seq) bool keep-mask the kernels draw for ``seed`` and ``dropout_p``.

    For the eager reference and tests only (it materialises what the kernels never store).
    """
    mask = torch.empty((batch, heads, seqlen, seqlen), dtype=torch.int8, device=seed.device)
    block = 16 if interpreted() else 64
    grid = (triton.cdiv(seqlen, block), triton.cdiv(seqlen, block), batch * heads)
    _dropout_mask_kernel[grid](mask, seed, float(dropout_p), seqlen, BLOCK_M=block, BLOCK_N=block)
    return mask.bool()


# --------------------------------------------------------------------------------------------
# torch.library registration and autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastcse::biased_attention_fwd", mutates_args=())
def _biased_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    row_table: torch.Tensor | None, row_index: torch.Tensor | None,
    col_table: torch.Tensor | None, col_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, seed: torch.Tensor | None,
    sm_scale: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return biased_attention_forward(q, k, v, row_table, row_index, col_table, col_index,
                                    key_padding_mask, seed, sm_scale, dropout_p)


@_biased_attention_fwd_op.register_fake
def _(q, k, v, row_table, row_index, col_table, col_index, key_padding_mask, seed, sm_scale,
      dropout_p):
    batch, heads, seqlen, head_dim = q.shape
    out = q.new_empty((batch, seqlen, heads, head_dim)).transpose(1, 2)
    return out, q.new_empty((batch, heads, seqlen), dtype=torch.float32)


@torch.library.custom_op("fastcse::biased_attention_bwd", mutates_args=())
def _biased_attention_bwd_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    row_table: torch.Tensor | None, row_index: torch.Tensor | None,
    col_table: torch.Tensor | None, col_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, seed: torch.Tensor | None,
    sm_scale: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, drow, dcol = biased_attention_backward(
        grad_out, q, k, v, out, lse, row_table, row_index, col_table, col_index,
        key_padding_mask, seed, sm_scale, dropout_p)
    # custom ops return tensors only (never aliased): an absent table's gradient is an empty one
    return (dq, dk, dv, q.new_empty((0,)) if drow is None else drow,
            q.new_empty((0,)) if dcol is None else dcol)


@_biased_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, row_table, row_index, col_table, col_index, key_padding_mask,
      seed, sm_scale, dropout_p):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty((0,)) if row_table is None else row_table.new_empty(row_table.shape),
            q.new_empty((0,)) if col_table is None else col_table.new_empty(col_table.shape))


def _setup_context(ctx, inputs, output):
    (q, k, v, row_table, row_index, col_table, col_index, key_padding_mask, seed, sm_scale,
     dropout_p) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, row_table, row_index, col_table, col_index,
                          key_padding_mask, seed)
    ctx.sm_scale = sm_scale
    ctx.dropout_p = dropout_p
    ctx.set_materialize_grads(False)  # lse is returned for saving only: no zero-filled gradient for it


def _backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * 11
    (q, k, v, out, lse, row_table, row_index, col_table, col_index, key_padding_mask,
     seed) = ctx.saved_tensors
    dq, dk, dv, drow, dcol = _biased_attention_bwd_op(
        grad_out, q, k, v, out, lse, row_table, row_index, col_table, col_index,
        key_padding_mask, seed, ctx.sm_scale, ctx.dropout_p)
    return (dq, dk, dv, None if row_table is None else drow, None,
            None if col_table is None else dcol, None, None, None, None, None)


_biased_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# DeBERTa's disentangled attention: the position terms computed inside the tiles, no tables
# --------------------------------------------------------------------------------------------

# HF's c2p / p2c tables, (batch, heads, seq, entries) each, as large as the score matrix at
# DeBERTa-v3-base's L = 512 and 2 x 256 buckets, are never built: each tile multiplies its
# queries / keys with the BLOCK_M + BLOCK_N - 1 relative embeddings its distances reach (window
# products on the tensor cores) and gathers the score's diagonal. HF's ``/ scale`` of the tables
# and of the content scores is the kernel's one ``sm_scale`` multiply; the backward is one fused
# pass (scores and delta computed once) and the embeddings' gradients are kept per distance
# ((heads, 2 L - 1, head_dim) fp32), not per table entry.


@torch.library.custom_op("fastcse::disentangled_attention_fwd", mutates_args=())
def _disentangled_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    pos_key: torch.Tensor | None, c2p_index: torch.Tensor | None,
    pos_query: torch.Tensor | None, p2c_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, seed: torch.Tensor | None,
    scale: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return biased_attention_forward(q, k, v, None, None, None, None, key_padding_mask, seed, 1.0 / scale,
                                    dropout_p, pos_key=pos_key, c2p_index=c2p_index, pos_query=pos_query,
                                    p2c_index=p2c_index)


@_disentangled_fwd_op.register_fake
def _(q, k, v, pos_key, c2p_index, pos_query, p2c_index, key_padding_mask, seed, scale, dropout_p):
    batch, heads, seqlen, head_dim = q.shape
    out = q.new_empty((batch, seqlen, heads, head_dim)).transpose(1, 2)
    return out, q.new_empty((batch, heads, seqlen), dtype=torch.float32)


@torch.library.custom_op("fastcse::disentangled_attention_bwd", mutates_args=())
def _disentangled_bwd_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    pos_key: torch.Tensor | None, c2p_index: torch.Tensor | None,
    pos_query: torch.Tensor | None, p2c_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, seed: torch.Tensor | None,
    scale: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, _, _, dpos_key, dpos_query = biased_attention_backward(
        grad_out, q, k, v, out, lse, None, None, None, None, key_padding_mask, seed, 1.0 / scale, dropout_p,
        pos_key=pos_key, c2p_index=c2p_index, pos_query=pos_query, p2c_index=p2c_index)
    return (dq, dk, dv, q.new_empty((0,)) if dpos_key is None else dpos_key,
            q.new_empty((0,)) if dpos_query is None else dpos_query)


@_disentangled_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, pos_key, c2p_index, pos_query, p2c_index, key_padding_mask, seed,
      scale, dropout_p):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty((0,)) if pos_key is None else pos_key.new_empty(pos_key.shape),
            q.new_empty((0,)) if pos_query is None else pos_query.new_empty(pos_query.shape))


def _disentangled_setup_context(ctx, inputs, output):
    (q, k, v, pos_key, c2p_index, pos_query, p2c_index, key_padding_mask, seed, scale, dropout_p) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, pos_key, c2p_index, pos_query, p2c_index,
                          key_padding_mask, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.set_materialize_grads(False)  # lse is returned for saving only: no zero-filled gradient for it


def _disentangled_backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * 11
    (q, k, v, out, lse, pos_key, c2p_index, pos_query, p2c_index, key_padding_mask,
     seed) = ctx.saved_tensors
    dq, dk, dv, dpos_key, dpos_query = _disentangled_bwd_op(
        grad_out, q, k, v, out, lse, pos_key, c2p_index, pos_query, p2c_index, key_padding_mask,
        seed, ctx.scale, ctx.dropout_p)
    return (dq, dk, dv, None if pos_key is None else dpos_key, None,
            None if pos_query is None else dpos_query, None, None, None, None, None)


_disentangled_fwd_op.register_autograd(_disentangled_backward, setup_context=_disentangled_setup_context)


# --------------------------------------------------------------------------------------------
# packed sequences: the varlen path's attention without padding, in tiles that span sequences
# --------------------------------------------------------------------------------------------

# FlashAttention's varlen kernels give each sequence its own 128-row tiles, so a 20-token
# SimCSE sentence pays a 128 x 128 tile per head. Here the packed (tokens, heads, head_dim) rows
# are one sequence of the kernel, tiles run across sequence boundaries, a score is kept only
# within a sequence, and each tile visits only the other side's tiles its sequences reach.


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(tokens, heads, head_dim) as the kernels' (1, heads, tokens, head_dim), no copy."""
    return x.permute(1, 0, 2).unsqueeze(0)


@torch.library.custom_op("fastcse::packed_attention_fwd", mutates_args=())
def _packed_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                   cu_seqlens: torch.Tensor, seed: torch.Tensor | None, scale: float,
                   dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = biased_attention_forward(_as_rows(q), _as_rows(k), _as_rows(v), None, None, None, None, None, seed,
                                        scale, dropout_p, segments=(segment_ids, cu_seqlens))
    return out[0].transpose(0, 1), lse  # out is stored (1, tokens, heads, head_dim): packed rows


@_packed_fwd_op.register_fake
def _(q, k, v, segment_ids, cu_seqlens, seed, scale, dropout_p):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty((1, q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastcse::packed_attention_bwd", mutates_args=())
def _packed_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, segment_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                   seed: torch.Tensor | None, scale: float,
                   dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, _, _ = biased_attention_backward(
        _as_rows(grad_out), _as_rows(q), _as_rows(k), _as_rows(v), _as_rows(out), lse, None, None, None, None, None,
        seed, scale, dropout_p, segments=(segment_ids, cu_seqlens))
    return tuple(g[0].transpose(0, 1).contiguous() for g in (dq, dk, dv))


@_packed_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, segment_ids, cu_seqlens, seed, scale, dropout_p):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _packed_setup_context(ctx, inputs, output):
    q, k, v, segment_ids, cu_seqlens, seed, scale, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, segment_ids, cu_seqlens, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.set_materialize_grads(False)  # lse is returned for saving only: no zero-filled gradient for it


def _packed_backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * 8
    q, k, v, out, lse, segment_ids, cu_seqlens, seed = ctx.saved_tensors
    dq, dk, dv = _packed_bwd_op(grad_out, q, k, v, out, lse, segment_ids, cu_seqlens, seed, ctx.scale,
                                ctx.dropout_p)
    return dq, dk, dv, None, None, None, None, None


_packed_fwd_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)


# --------------------------------------------------------------------------------------------
# Entry points of the triton tier (inputs checked by fastcse.biased_attention, the dispatch)
# --------------------------------------------------------------------------------------------


def _draw_seed(q: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor | None:
    """The Philox seed of one call: the caller's, a fresh one from torch's generator, or None
    without dropout (so the ops' schemas see no tensor they would have to save)."""
    if dropout_p == 0.0:
        return None
    if seed is None:
        seed = draw_philox_seed(q.device)
    return seed


def biased_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    row_table: torch.Tensor | None = None, row_index: torch.Tensor | None = None,
    col_table: torch.Tensor | None = None, col_index: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sm_scale: float = 1.0, dropout_p: float = 0.0, seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable fused biased attention (shapes as in :func:`biased_attention_forward`).

    ``seed``: int64 (1,) Philox seed of the dropout mask, drawn from torch's generator when None
    and ``dropout_p > 0``. Returns (batch, heads, seq, head_dim) stored as (batch, seq, heads,
    head_dim). The arguments are not checked here: :func:`fastcse.biased_attention.biased_attention`
    checks them before it calls this.
    """
    out, _ = _biased_attention_fwd_op(q, k, v, row_table, row_index, col_table, col_index,
                                      key_padding_mask, _draw_seed(q, dropout_p, seed),
                                      float(sm_scale), float(dropout_p))
    return out


def disentangled_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    pos_key: torch.Tensor | None = None, c2p_index: torch.Tensor | None = None,
    pos_query: torch.Tensor | None = None, p2c_index: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None, scale: float = 1.0,
    dropout_p: float = 0.0, seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable fused DeBERTa attention: ``pos_key`` / ``pos_query`` (heads, entries,
    head_dim) with int (2 seq - 1,) indices; the position terms are computed inside the tiles (no
    c2p / p2c table exists).
    Unchecked, as :func:`biased_attention_triton`
    (:func:`fastcse.biased_attention.disentangled_attention` checks).
    """
    out, _ = _disentangled_fwd_op(q, k, v, pos_key, c2p_index, pos_query, p2c_index, key_padding_mask,
                                  _draw_seed(q, dropout_p, seed), float(scale), float(dropout_p))
    return out


def packed_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                            cu_seqlens: torch.Tensor, *, scale: float, dropout_p: float = 0.0,
                            seed: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable attention over packed sequences: ``q, k, v`` (tokens, heads, head_dim) with
    a unit last stride, ``segment_ids`` (tokens,) the sequence of each token (int64, as
    :class:`~fastcse.models.unpad.PackedBatch` holds it), ``cu_seqlens`` (sequences + 1,) their
    offsets (int32). Dropout as :func:`biased_attention_triton` (Philox in
    packed coordinates, regenerated in the backward). Returns (tokens, heads, head_dim).
    Unchecked (:func:`fastcse.models.attention.varlen_attention` calls it)."""
    out, _ = _packed_fwd_op(q, k, v, segment_ids, cu_seqlens, _draw_seed(q, dropout_p, seed), float(scale),
                            float(dropout_p))
    return out
