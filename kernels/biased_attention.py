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
- DeBERTa-v2/v3: ``row_table = c2p = Q_c K_r^T / scale`` of shape ``(B, H, L, 2 * span)`` with
  ``row_index = clamp(bucket(i - j) + span)``, and ``col_table = p2c = K_c Q_r^T / scale`` with the
  index of HF's p2c gather (:func:`disentangled_attention_triton` builds both tables a batch chunk
  at a time from ``K_r`` / ``Q_r`` and rebuilds them in the backward instead of saving them).

Forward: online softmax over key tiles; one log-sum-exp per query row is stored, never the
L x L matrix. Backward: the tiles are recomputed twice, once column-parallel (dK, dV and the
column-table gradient) and once row-parallel (dQ and the row-table gradient), so dQ needs no
atomics. The bias-table gradients are scattered with fp32 atomics into per-batch buffers (several
``(i, j)`` pairs share one table entry when distances share a bucket).

Dropout (on the probabilities, as Hugging Face does) draws a Philox number per ``(b, h, i, j)``
from a per-call seed tensor; the backward regenerates the same mask instead of storing it.

Contents: the ``@triton.jit`` kernels, their host launchers, the ``torch.library`` custom ops
with their autograd, and the triton tier's entry points. Input checks, the eager references, the
chunked PyTorch twin and the dispatch live in :mod:`fastcse.biased_attention`, which imports this
module only when the triton tier runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcse.kernels._triton_utils import interpreted


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _dropout_keep(seed, bh, qi, kj, seqlen, dropout_p):
    # One Philox stream per (batch, head): the key is seed + bh, the counter the flat (i, j)
    # position, so forward, both backward kernels and the test helper draw the same numbers.
    # qi / kj: query / key positions as broadcastable 2-D tiles ((M, 1) and (1, N), or
    # transposed in the column-parallel backward).
    rand = tl.rand(seed + bh, qi * seqlen + kj)
    return rand >= dropout_p


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
    sm_scale, dropout_p, seqlen, num_heads,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_rtb, stride_rth, stride_rtm, stride_rtc,
    stride_ctb, stride_cth, stride_ctn, stride_ctc,
    stride_kmb,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    # constexpr flags compile away the bias terms, the mask and dropout when a call has none
    HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_KMASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    # the interpreter multiplies bf16 bit patterns in tl.dot: upcast tiles there (never on GPU)
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
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

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        drop_scale = 1.0 / (1.0 - dropout_p)

    qk_scale = sm_scale * 1.4426950408889634  # scores are kept in base 2 (exp2)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, seqlen, BLOCK_N):
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
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s += _bias_tile(b, h, offs_m[:, None], offs_n[None, :], mask_mn, seqlen,
                        ROW_T, ROW_I, stride_rtb, stride_rth, stride_rtm, stride_rtc,
                        COL_T, COL_I, stride_ctb, stride_cth, stride_ctn, stride_ctc,
                        HAS_ROW, HAS_COL) * 1.4426950408889634
        key_ok = n_valid
        if HAS_KMASK:
            key_ok = key_ok & (tl.load(KMASK + b * stride_kmb + offs_n, mask=n_valid, other=0) != 0)
        s = tl.where(key_ok[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row whose keys are all masked so far has m_new = -inf: subtract 0 instead (p = 0)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], seqlen, dropout_p)
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
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_KMASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # one kernel, two passes: KV_PASS owns a key tile (dK, dV, column-table grad) and loops over
    # queries; otherwise it owns a query tile (dQ, row-table grad) and loops over keys
    KV_PASS: tl.constexpr,
    LOOP_BLOCK: tl.constexpr,  # BLOCK_M in the KV pass, BLOCK_N in the Q pass
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

    if KV_PASS:
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
                keep_t = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], seqlen, dropout_p)
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
                keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], seqlen, dropout_p)
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
def _dropout_mask_kernel(MASK, SEED, dropout_p, seqlen, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # writes the keep-mask the attention kernels draw (for the eager reference and tests)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(SEED), bh, offs_m[:, None], offs_n[None, :], seqlen, dropout_p)
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
    and keeping the largest tiles with no register spills at head_dim 64: fp16/bf16 forward
    64 x 32 with 4 warps, backward 64 x 32 with 8 warps; fp32 (IEEE dots, no tensor-core
    shortcut) 32 x 32 with 8 warps. 64 x 64 tiles spill: the bias gathers hold one 64-bit
    address per score per table. Not timed on a GPU yet: re-tune with
    ``bench/bench_biased_attention.py`` when one is available.
    Interpreted runs use 16 x 16 tiles, so tiny test shapes still cover several ragged tiles.
    """

    def __init__(self, q: torch.Tensor, block_m: int | None, block_n: int | None, backward: bool = False,
                 num_warps: int | None = None):
        head_dim = q.shape[-1]
        self.interpreted = interpreted()
        self.block_d = max(16, triton.next_power_of_2(head_dim))
        if self.interpreted:
            default_m, default_n, self.num_warps = 16, 16, 4
        elif q.dtype == torch.float32:
            default_m, default_n, self.num_warps = 32, 32, 8
        else:
            default_m, default_n, self.num_warps = 64, 32, 8 if backward else 4
        if self.block_d > 64 and not self.interpreted:  # wider heads: halve the query tile
            default_m = max(16, default_m // 2)
            self.num_warps = 8
        self.block_m = block_m or default_m
        self.block_n = block_n or default_n
        self.num_warps = num_warps or self.num_warps
        self.num_stages = 2
        # bf16 tl.dot is wrong in the interpreter only (triton-lang/triton#11584)
        self.upcast_dot = self.interpreted and q.dtype == torch.bfloat16
        fp32_exact = self.interpreted or not torch.backends.cuda.matmul.allow_tf32
        self.dot_precision = "ieee" if q.dtype == torch.float32 and fp32_exact else "tf32"


def biased_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    row_table: torch.Tensor | None, row_index: torch.Tensor | None,
    col_table: torch.Tensor | None, col_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, seed: torch.Tensor | None,
    sm_scale: float, dropout_p: float,
    *, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher.

    ``block_m`` / ``block_n`` / ``num_warps`` override the tile heuristic (tests, tuning runs).

    Shapes: ``q, k, v``: (batch, heads, seq, head_dim), any strides with a unit last stride (HF's
    ``view(B, L, H, D).transpose(1, 2)`` needs no copy). ``row_table`` / ``col_table``:
    (1 or batch, heads, 1 or seq, entries); ``row_index`` / ``col_index``: int32 (2 seq - 1,),
    entry ``i - j + seq - 1`` giving the table column for distance ``i - j``.
    ``key_padding_mask``: (batch, seq), nonzero = attend. ``seed``: int64 (1,) tensor, read only
    when ``dropout_p > 0``.

    Returns ``out`` (batch, heads, seq, head_dim) stored as (batch, seq, heads, head_dim) so that
    merging the heads afterwards is free, and ``lse`` (batch, heads, seq) fp32 in base 2; both are
    written into ``out`` / ``lse`` when given (any strides with a unit last stride; ``lse``
    contiguous).
    """
    batch, heads, seqlen, head_dim = q.shape
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    cfg = _LaunchConfig(q, block_m, block_n, num_warps=num_warps)
    if out is None:
        out = torch.empty((batch, seqlen, heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    if lse is None:
        lse = torch.empty((batch, heads, seqlen), dtype=torch.float32, device=q.device)
    if seqlen == 0 or batch * heads == 0:
        return out, lse
    kmask = _kernel_mask(key_padding_mask)
    row_i = None if row_index is None else row_index.to(torch.int32).contiguous()
    col_i = None if col_index is None else col_index.to(torch.int32).contiguous()
    grid = (triton.cdiv(seqlen, cfg.block_m), batch * heads)
    _biased_attn_fwd_kernel[grid](
        q, k, v, out, lse,
        q if row_table is None else row_table, q if row_i is None else row_i,
        q if col_table is None else col_table, q if col_i is None else col_i,
        q if kmask is None else kmask, q if seed is None else seed,
        float(sm_scale), float(dropout_p), seqlen, heads,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *_table_strides(row_table), *_table_strides(col_table),
        0 if kmask is None else kmask.stride(0),
        HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        HAS_ROW=row_table is not None, HAS_COL=col_table is not None, HAS_KMASK=kmask is not None,
        HAS_DROPOUT=dropout_p > 0.0, UPCAST_DOT=cfg.upcast_dot, DOT_PRECISION=cfg.dot_precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def biased_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    row_table: torch.Tensor | None, row_index: torch.Tensor | None,
    col_table: torch.Tensor | None, col_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, seed: torch.Tensor | None,
    sm_scale: float, dropout_p: float,
    *, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    dq: torch.Tensor | None = None, dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
    raw_table_grads: bool = False, passes: tuple[str, ...] = ("kv", "q"),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward launcher: (dq, dk, dv, d_row_table, d_col_table), same shapes as the inputs.

    The table gradients are accumulated in fp32 with atomics into (batch, heads, rows, entries)
    buffers (a per-batch buffer even for a broadcast table, which spreads the atomics; it is
    summed afterwards) and cast to the table's dtype. ``None`` for an absent table. With
    ``raw_table_grads`` the fp32 (batch, heads, rows, entries) buffers are returned as they are.
    ``dq`` / ``dk`` / ``dv``: optional output buffers (unit last stride). ``passes`` picks the
    column-parallel pass (``"kv"``: dk, dv, column-table grad) and / or the row-parallel one
    (``"q"``: dq, row-table grad); a skipped pass leaves its outputs unwritten and its table
    gradient ``None``.
    """
    batch, heads, seqlen, head_dim = q.shape
    q, k, v, out, grad_out = (_last_dim_contiguous(x) for x in (q, k, v, out, grad_out))
    cfg = _LaunchConfig(q, block_m, block_n, backward=True, num_warps=num_warps)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv

    def grad_buffer(table):
        if table is None:
            return None
        return torch.zeros((batch, heads, table.size(2), table.size(3)), dtype=torch.float32,
                           device=q.device)

    drow = grad_buffer(row_table) if "q" in passes else None
    dcol = grad_buffer(col_table) if "kv" in passes else None
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
        common = dict(
            HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            HAS_ROW=row_table is not None, HAS_COL=col_table is not None,
            HAS_KMASK=kmask is not None, HAS_DROPOUT=dropout_p > 0.0,
            UPCAST_DOT=cfg.upcast_dot, DOT_PRECISION=cfg.dot_precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
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
        )
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
        if table.size(0) == 1:
            buffer = buffer.sum(0, keepdim=True)
        return buffer.to(table.dtype)

    return dq, dk, dv, finish(drow, row_table), finish(dcol, col_table)


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


def _backward(ctx, grad_out, grad_lse):
    (q, k, v, out, lse, row_table, row_index, col_table, col_index, key_padding_mask,
     seed) = ctx.saved_tensors
    dq, dk, dv, drow, dcol = _biased_attention_bwd_op(
        grad_out, q, k, v, out, lse, row_table, row_index, col_table, col_index,
        key_padding_mask, seed, ctx.sm_scale, ctx.dropout_p)
    return (dq, dk, dv, None if row_table is None else drow, None,
            None if col_table is None else dcol, None, None, None, None, None)


_biased_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# DeBERTa's disentangled attention: tables rebuilt per batch chunk, never saved
# --------------------------------------------------------------------------------------------

# Elements of one (chunk, heads, seq, entries) table per batch chunk. The two tables (input dtype)
# and one fp32 gradient buffer exist for one chunk at a time: DeBERTa-v3-base at seq 512 has 3.1 M
# elements per sequence and head set, so chunks of <= 5 sequences, ~31 MiB each in bf16. Larger
# chunks fill the GPU better (12 heads x 8 query tiles = 96 programs per sequence), smaller ones
# save memory; re-measure with bench/bench_biased_attention.py before changing it.
_TABLE_CHUNK_ELEMENTS = 1 << 24


def _chunks(batch: int, heads: int, seqlen: int, entries: int, chunk_rows: int):
    """Batch slices of (nearly) equal size, each within the table budget."""
    rows = chunk_rows or max(1, _TABLE_CHUNK_ELEMENTS // max(1, heads * seqlen * entries))
    count = -(-batch // rows)
    rows = -(-batch // count)
    return [slice(b0, min(batch, b0 + rows)) for b0 in range(0, batch, rows)]


def _disentangled_tables(q, k, pos_key, pos_query, scale, rows):
    # HF: c2p = bmm(Q_c, K_r^T) / scale and p2c = bmm(K_c, Q_r^T) / scale, in the input dtype
    row_table = None if pos_key is None else torch.matmul(q[rows], pos_key.transpose(-1, -2)) / scale
    col_table = None if pos_query is None else torch.matmul(k[rows], pos_query.transpose(-1, -2)) / scale
    return row_table, col_table


def _chunk_seed(seed, rows, heads):
    # the Philox key is seed + (batch * heads + head): keep the global batch index per chunk
    return seed if seed is None or rows.start == 0 else seed + rows.start * heads


def _entries(pos_key, pos_query):
    return max(0 if pos_key is None else pos_key.size(1), 0 if pos_query is None else pos_query.size(1))


@torch.library.custom_op("fastcse::disentangled_attention_fwd", mutates_args=())
def _disentangled_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    pos_key: torch.Tensor | None, c2p_index: torch.Tensor | None,
    pos_query: torch.Tensor | None, p2c_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, seed: torch.Tensor | None,
    scale: float, dropout_p: float, chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, seqlen, head_dim = q.shape
    out = torch.empty((batch, seqlen, heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((batch, heads, seqlen), dtype=torch.float32, device=q.device)
    for rows in _chunks(batch, heads, seqlen, _entries(pos_key, pos_query), chunk_rows):
        row_table, col_table = _disentangled_tables(q, k, pos_key, pos_query, scale, rows)
        biased_attention_forward(
            q[rows], k[rows], v[rows], row_table, c2p_index, col_table, p2c_index,
            None if key_padding_mask is None else key_padding_mask[rows],
            _chunk_seed(seed, rows, heads), 1.0 / scale, dropout_p,
            out=out[rows], lse=lse[rows])
    return out, lse


@_disentangled_fwd_op.register_fake
def _(q, k, v, pos_key, c2p_index, pos_query, p2c_index, key_padding_mask, seed, scale, dropout_p,
      chunk_rows):
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
    scale: float, dropout_p: float, chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, seqlen, _ = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dpos_key = None if pos_key is None else torch.zeros(pos_key.shape, dtype=torch.float32, device=q.device)
    dpos_query = None if pos_query is None else torch.zeros(pos_query.shape, dtype=torch.float32,
                                                            device=q.device)
    for rows in _chunks(batch, heads, seqlen, _entries(pos_key, pos_query), chunk_rows):
        row_table, col_table = _disentangled_tables(q, k, pos_key, pos_query, scale, rows)
        # one pass at a time, so that a single fp32 table gradient is alive; each goes back
        # through its table (c2p = Q_c K_r^T / scale, p2c = K_c Q_r^T / scale) right away
        for bwd_pass in ("kv", "q"):
            _, _, _, drow, dcol = biased_attention_backward(
                grad_out[rows], q[rows], k[rows], v[rows], out[rows], lse[rows],
                row_table, c2p_index, col_table, p2c_index,
                None if key_padding_mask is None else key_padding_mask[rows],
                _chunk_seed(seed, rows, heads), 1.0 / scale, dropout_p,
                dq=dq[rows], dk=dk[rows], dv=dv[rows], raw_table_grads=True, passes=(bwd_pass,))
            if dcol is not None:
                g = dcol.div_(scale).to(k.dtype)
                del dcol
                dk[rows] += torch.matmul(g, pos_query)
                dpos_query += torch.matmul(g.transpose(-1, -2), k[rows]).sum(0, dtype=torch.float32)
            if drow is not None:
                g = drow.div_(scale).to(q.dtype)
                del drow
                dq[rows] += torch.matmul(g, pos_key)
                dpos_key += torch.matmul(g.transpose(-1, -2), q[rows]).sum(0, dtype=torch.float32)
        del row_table, col_table
    return (dq, dk, dv, q.new_empty((0,)) if dpos_key is None else dpos_key.to(pos_key.dtype),
            q.new_empty((0,)) if dpos_query is None else dpos_query.to(pos_query.dtype))


@_disentangled_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, pos_key, c2p_index, pos_query, p2c_index, key_padding_mask, seed,
      scale, dropout_p, chunk_rows):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty((0,)) if pos_key is None else pos_key.new_empty(pos_key.shape),
            q.new_empty((0,)) if pos_query is None else pos_query.new_empty(pos_query.shape))


def _disentangled_setup_context(ctx, inputs, output):
    (q, k, v, pos_key, c2p_index, pos_query, p2c_index, key_padding_mask, seed, scale, dropout_p,
     chunk_rows) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, pos_key, c2p_index, pos_query, p2c_index,
                          key_padding_mask, seed)
    ctx.scale, ctx.dropout_p, ctx.chunk_rows = scale, dropout_p, chunk_rows


def _disentangled_backward(ctx, grad_out, grad_lse):
    (q, k, v, out, lse, pos_key, c2p_index, pos_query, p2c_index, key_padding_mask,
     seed) = ctx.saved_tensors
    dq, dk, dv, dpos_key, dpos_query = _disentangled_bwd_op(
        grad_out, q, k, v, out, lse, pos_key, c2p_index, pos_query, p2c_index, key_padding_mask,
        seed, ctx.scale, ctx.dropout_p, ctx.chunk_rows)
    return (dq, dk, dv, None if pos_key is None else dpos_key, None,
            None if pos_query is None else dpos_query, None, None, None, None, None, None)


_disentangled_fwd_op.register_autograd(_disentangled_backward, setup_context=_disentangled_setup_context)


# --------------------------------------------------------------------------------------------
# Entry points of the triton tier (inputs checked by fastcse.biased_attention, the dispatch)
# --------------------------------------------------------------------------------------------


def _draw_seed(q: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor | None:
    """The Philox seed of one call: the caller's, a fresh one from torch's generator, or None
    without dropout (so the ops' schemas see no tensor they would have to save)."""
    if dropout_p == 0.0:
        return None
    if seed is None:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
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
    dropout_p: float = 0.0, seed: torch.Tensor | None = None, chunk_rows: int = 0,
) -> torch.Tensor:
    """Differentiable fused DeBERTa attention: ``pos_key`` / ``pos_query`` (heads, entries,
    head_dim) with int (2 seq - 1,) indices; the c2p / p2c tables are built ``chunk_rows``
    sequences at a time (0: sized by ``_TABLE_CHUNK_ELEMENTS``) and rebuilt in the backward.
    Unchecked, as :func:`biased_attention_triton`
    (:func:`fastcse.biased_attention.disentangled_attention` checks).
    """
    out, _ = _disentangled_fwd_op(q, k, v, pos_key, c2p_index, pos_query, p2c_index, key_padding_mask,
                                  _draw_seed(q, dropout_p, seed), float(scale), float(dropout_p),
                                  int(chunk_rows))
    return out
