"""Attention over packed short sequences in tiles that each hold whole sequences.

A SimCSE batch is many short sentences (~20 tokens). FlashAttention gives each sequence its own
128-row tile; fastcse's packed kernel (:mod:`fastcse.kernels.biased_attention`, ``segments``)
runs tiles across sequence boundaries, so a sequence cut by a tile edge is seen by two tiles,
which makes its backward an online-softmax flash backward: a delta kernel, fp32 atomics into a
zeroed dQ buffer, and a cast of dQ afterwards. Here every tile owns whole sequences, so a
tile's softmax rows are complete and nothing is shared between tiles:

- program ``(t, h)`` owns the sequences that *start* in the packed rows
  ``[t * CHUNK, (t + 1) * CHUNK)``; they span rows ``[start, end)``, at most
  ``CHUNK - 1 + max_seqlen <= BLOCK`` of them, with ``CHUNK = BLOCK - max_seqlen + 1``; a chunk
  where no sequence starts has nothing to do;
- forward: the ``BLOCK x BLOCK`` scores of those rows, kept within a sequence, an exact softmax
  (no running maximum, no log-sum-exp stored), dropout, ``P V``;
- backward: the same tile recomputed, and dQ, dK, dV of its rows written once each (no atomics,
  no zero fill, no delta kernel: the rows' ``sum(dP * P)`` is in the tile).

Q, K and V are read from the fused projection's output ``qkv`` (tokens, 3 * heads * head_dim)
and the gradient is written into one buffer of that shape, so autograd splits and concatenates
nothing. The output is (tokens, heads * head_dim), heads merged.

Dropout (on the probabilities, as Hugging Face does) is :func:`~fastcse.kernels.philox_dropout.philox_keep`
of (seed + stream + head, packed row, column inside the owning tile): the backward, which has the
same tiles, regenerates the forward's mask; :func:`short_attention_keep_mask` draws it for tests.

Contents: the kernels, their launchers and the ``torch.library`` ops with autograd. The dispatch
(which varlen kernel runs, input checks) is :func:`fastcse.models.attention.varlen_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcse.kernels._triton_utils import dot_settings, interpreted
from fastcse.kernels.philox_dropout import philox_keep

# longest sequence the kernels take: a 64-row tile then owns the sequences starting in 17 rows,
# 4096 / 17 = 241 scores per query row, still below FlashAttention's tile per sequence (128^2 / 48
# = 341); 128-row tiles would go further but spill registers on sm_90 (120-216 bytes a thread at
# 8 warps, more at 16: tests/test_short_attention.py's compile check)
SHORT_MAX_SEQLEN = 48


def short_attention_tiles(max_seqlen: int) -> tuple[int, int, int]:
    """``(BLOCK, CHUNK, num_warps)`` for sequences of at most ``max_seqlen`` tokens: 64-row tiles
    with 4 warps on a GPU (sm_90, bf16, dropout on: no spills, 2 blocks per SM; 197-213 registers
    with triton 3.9, 255 with 3.6; 8 warps hold 165-205 registers, 1 block, the same 8 warps per
    SM); interpreted runs take 16 or 32
    rows where the sequences fit, so the tests' small batches cross many tiles."""
    if not 1 <= max_seqlen <= SHORT_MAX_SEQLEN:
        raise ValueError(f"short-sequence attention takes sequences of 1..{SHORT_MAX_SEQLEN} tokens, "
                         f"got max_seqlen={max_seqlen}")
    block = (16 if max_seqlen <= 8 else 32 if max_seqlen <= 24 else 64) if interpreted() else 64
    return block, block - max_seqlen + 1, 4


@triton.jit
def _tile_rows(SEG, CU, t, chunk, total, BLOCK: tl.constexpr):
    """Packed rows ``start + arange(BLOCK)`` of tile ``t``, which of them it owns (the sequences
    starting in ``[t * CHUNK, (t + 1) * CHUNK)``, ending by ``end``) and their sequence ids."""
    c0 = t * chunk
    s0 = tl.load(SEG + c0)
    start = tl.load(CU + s0)
    start = tl.where(start == c0, c0, tl.load(CU + s0 + 1))
    c1 = tl.minimum(c0 + chunk, total)
    s1 = tl.load(SEG + tl.minimum(c1, total - 1))
    end = tl.load(CU + s1)
    end = tl.where((c1 == total) | (end == c1), c1, tl.load(CU + s1 + 1))
    rows = start + tl.arange(0, BLOCK)
    owned = rows < end  # (end <= start: no sequence starts in this chunk, nothing owned)
    seg = tl.load(SEG + rows, mask=owned, other=-1)
    return rows.to(tl.int64), owned, seg


@triton.jit
def _tile(QKV, SEG, CU, SEED, chunk, total, stride_qkv, sm_scale, dropout_p, stream,
          HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
          HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """This program's tile (``t``, head ``h`` from the grid): its rows, the (rows, head_dim) mask
    of what it owns, q, k, v of those rows (zero elsewhere), the softmax probabilities P within
    each sequence (fp32, zero off the sequences' blocks) and the dropout keep-mask (the block
    pattern without dropout)."""
    h = tl.program_id(1)
    rows, owned, seg = _tile_rows(SEG, CU, tl.program_id(0), chunk, total, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = owned[:, None] & (offs_d < HEAD_DIM)[None, :]
    offs = QKV + rows[:, None] * stride_qkv + h * HEAD_DIM + offs_d[None, :]
    q = tl.load(offs, mask=tile_mask, other=0.0)
    k = tl.load(offs + HEADS * HEAD_DIM, mask=tile_mask, other=0.0)
    v = tl.load(offs + 2 * HEADS * HEAD_DIM, mask=tile_mask, other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * (sm_scale * 1.4426950408889634)
    same = (seg[:, None] == seg[None, :]) & owned[None, :]
    s = tl.where(same, s, float("-inf"))
    # an owned row has its own diagonal, so its maximum is finite; a row not owned is all -inf
    row_max = tl.where(owned, tl.max(s, axis=1), 0.0)
    p = tl.exp2(s - row_max[:, None])
    p = p / tl.where(owned, tl.sum(p, axis=1), 1.0)[:, None]
    if HAS_DROPOUT:
        keep = philox_keep(tl.load(SEED), stream + h, rows.to(tl.int32), 0, BLOCK, dropout_p, BLOCK, BLOCK)
    else:
        keep = same
    return rows, tile_mask, h * HEAD_DIM + offs_d[None, :], q, k, v, p, keep


@triton.jit
def _short_attn_fwd_kernel(
    QKV, OUT, SEG, CU, SEED, sm_scale, dropout_p, stream, chunk, total, stride_qkv, stride_out,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows, tile_mask, head, q, k, v, p, keep = _tile(
        QKV, SEG, CU, SEED, chunk, total, stride_qkv, sm_scale, dropout_p, stream,
        HEADS, HEAD_DIM, BLOCK, BLOCK_D, HAS_DROPOUT, UPCAST_DOT, DOT_PRECISION)
    if HAS_DROPOUT:
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    o = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    tl.store(OUT + rows[:, None] * stride_out + head, o.to(OUT.dtype.element_ty), mask=tile_mask)


@triton.jit
def _short_attn_bwd_kernel(
    GRAD, QKV, DQKV, SEG, CU, SEED, sm_scale, dropout_p, stream, chunk, total, stride_qkv, stride_grad,
    stride_dqkv,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows, tile_mask, head, q, k, v, p, keep = _tile(
        QKV, SEG, CU, SEED, chunk, total, stride_qkv, sm_scale, dropout_p, stream,
        HEADS, HEAD_DIM, BLOCK, BLOCK_D, HAS_DROPOUT, UPCAST_DOT, DOT_PRECISION)
    hd = HEADS * HEAD_DIM
    do = tl.load(GRAD + rows[:, None] * stride_grad + head, mask=tile_mask, other=0.0)
    if UPCAST_DOT:
        do = do.to(tl.float32)
    # O = Pd V with Pd = P * keep / (1 - p): dV = Pd^T dO, dPd = dO V^T, dP = dPd * keep / (1 - p),
    # dS = P * (dP - rowsum(dP * P)) (the rows are whole: the rowsum is the tile's)
    if HAS_DROPOUT:
        drop_scale = 1.0 / (1.0 - dropout_p)
        pd = tl.where(keep, p * drop_scale, 0.0)
    else:
        pd = p
    dv = tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=DOT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - tl.sum(dp * p, axis=1)[:, None])
    ds = (ds * sm_scale).to(q.dtype)
    dq = tl.dot(ds, k, input_precision=DOT_PRECISION)
    dk = tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
    out = DQKV + rows[:, None] * stride_dqkv + head
    tl.store(out, dq.to(DQKV.dtype.element_ty), mask=tile_mask)
    tl.store(out + hd, dk.to(DQKV.dtype.element_ty), mask=tile_mask)
    tl.store(out + 2 * hd, dv.to(DQKV.dtype.element_ty), mask=tile_mask)


@triton.jit
def _short_keep_mask_kernel(MASK, SEG, CU, SEED, dropout_p, stream, chunk, total,
                            BLOCK: tl.constexpr):
    """The (heads, tokens, tokens) keep-mask of the forward's tiles (kept pairs within a sequence:
    1; dropped: 0; across sequences: left as it was)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    rows, owned, seg = _tile_rows(SEG, CU, t, chunk, total, BLOCK)
    keep = philox_keep(tl.load(SEED), stream + h, rows.to(tl.int32), 0, BLOCK, dropout_p, BLOCK, BLOCK)
    same = (seg[:, None] == seg[None, :]) & owned[:, None] & owned[None, :]
    tl.store(MASK + h.to(tl.int64) * total * total + rows[:, None] * total + rows[None, :], keep.to(tl.int8), mask=same)


def _launch_config(qkv: torch.Tensor, heads: int, max_seqlen: int):
    head_dim = qkv.shape[1] // (3 * heads)
    block, chunk, num_warps = short_attention_tiles(max_seqlen)
    if qkv.shape[0] * (block // 8) >= 2**31:  # the dropout counter, row * BLOCK / 8 + column / 8, is 32-bit
        raise ValueError(f"short-sequence attention takes fewer than {2**31 // (block // 8)} tokens a call, "
                         f"got {qkv.shape[0]}")
    return (head_dim, block, chunk, num_warps, *dot_settings(qkv.dtype))


def short_attention_forward(qkv: torch.Tensor, seq_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                            seed: torch.Tensor | None, heads: int, max_seqlen: int, scale: float,
                            dropout_p: float, stream: int) -> torch.Tensor:
    """Forward launcher: ``qkv`` (tokens, 3 * heads * head_dim) with a unit last stride, q then k
    then v; ``seq_ids`` (tokens,) the sequence of each row (contiguous), ``cu_seqlens``
    (sequences + 1,) int32; ``seed`` int64 (1,) with dropout. Returns (tokens, heads * head_dim)."""
    total = qkv.shape[0]
    head_dim, block, chunk, num_warps, upcast, precision = _launch_config(qkv, heads, max_seqlen)
    out = qkv.new_empty((total, heads * head_dim))
    if total == 0:
        return out
    grid = (triton.cdiv(total, chunk), heads)
    _short_attn_fwd_kernel[grid](
        qkv, out, seq_ids, cu_seqlens, qkv if seed is None else seed, float(scale), float(dropout_p), int(stream),
        chunk, total, qkv.stride(0), out.stride(0),
        HEADS=heads, HEAD_DIM=head_dim, BLOCK=block, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_DROPOUT=dropout_p > 0.0, UPCAST_DOT=upcast, DOT_PRECISION=precision, num_warps=num_warps,
    )
    return out


def short_attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, seq_ids: torch.Tensor,
                             cu_seqlens: torch.Tensor, seed: torch.Tensor | None, heads: int, max_seqlen: int,
                             scale: float, dropout_p: float, stream: int) -> torch.Tensor:
    """Backward launcher: the gradient of ``qkv`` (its shape, contiguous) from the output's."""
    total = qkv.shape[0]
    head_dim, block, chunk, num_warps, upcast, precision = _launch_config(qkv, heads, max_seqlen)
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    if total == 0:
        return grad_qkv
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grid = (triton.cdiv(total, chunk), heads)
    _short_attn_bwd_kernel[grid](
        grad_out, qkv, grad_qkv, seq_ids, cu_seqlens, qkv if seed is None else seed, float(scale),
        float(dropout_p), int(stream), chunk, total, qkv.stride(0), grad_out.stride(0), grad_qkv.stride(0),
        HEADS=heads, HEAD_DIM=head_dim, BLOCK=block, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_DROPOUT=dropout_p > 0.0, UPCAST_DOT=upcast, DOT_PRECISION=precision, num_warps=num_warps,
    )
    return grad_qkv


def short_attention_keep_mask(seed: torch.Tensor, seq_ids: torch.Tensor, cu_seqlens: torch.Tensor, heads: int,
                              max_seqlen: int, dropout_p: float, stream: int) -> torch.Tensor:
    """The (heads, tokens, tokens) bool keep-mask the kernels draw (False across sequences).
    For the tests and the eager reference only: it materialises what the kernels never store."""
    total = seq_ids.numel()
    block, chunk, _ = short_attention_tiles(max_seqlen)
    mask = torch.zeros((heads, total, total), dtype=torch.int8, device=seq_ids.device)
    if total:
        _short_keep_mask_kernel[(triton.cdiv(total, chunk), heads)](
            mask, seq_ids, cu_seqlens, seed, float(dropout_p), int(stream), chunk, total, BLOCK=block)
    return mask.bool()


# --------------------------------------------------------------------------------------------
# torch.library ops and autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastcse::short_attention_fwd", mutates_args=())
def _short_fwd_op(qkv: torch.Tensor, seq_ids: torch.Tensor, cu_seqlens: torch.Tensor, seed: torch.Tensor | None,
                  heads: int, max_seqlen: int, scale: float, dropout_p: float, stream: int) -> torch.Tensor:
    return short_attention_forward(qkv, seq_ids, cu_seqlens, seed, heads, max_seqlen, scale, dropout_p, stream)


@_short_fwd_op.register_fake
def _(qkv, seq_ids, cu_seqlens, seed, heads, max_seqlen, scale, dropout_p, stream):
    return qkv.new_empty((qkv.shape[0], qkv.shape[1] // 3))


@torch.library.custom_op("fastcse::short_attention_bwd", mutates_args=())
def _short_bwd_op(grad_out: torch.Tensor, qkv: torch.Tensor, seq_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                  seed: torch.Tensor | None, heads: int, max_seqlen: int, scale: float, dropout_p: float,
                  stream: int) -> torch.Tensor:
    return short_attention_backward(grad_out, qkv, seq_ids, cu_seqlens, seed, heads, max_seqlen, scale, dropout_p,
                                    stream)


@_short_bwd_op.register_fake
def _(grad_out, qkv, seq_ids, cu_seqlens, seed, heads, max_seqlen, scale, dropout_p, stream):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _setup_context(ctx, inputs, output):
    qkv, seq_ids, cu_seqlens, seed, heads, max_seqlen, scale, dropout_p, stream = inputs
    ctx.save_for_backward(qkv, seq_ids, cu_seqlens, seed)  # (the output is not needed)
    ctx.args = (heads, max_seqlen, scale, dropout_p, stream)


def _backward(ctx, grad_out):
    qkv, seq_ids, cu_seqlens, seed = ctx.saved_tensors
    return _short_bwd_op(grad_out, qkv, seq_ids, cu_seqlens, seed, *ctx.args), None, None, None, None, None, None, \
        None, None


_short_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def short_attention_qkv(qkv: torch.Tensor, seq_ids: torch.Tensor, cu_seqlens: torch.Tensor, *, heads: int,
                        max_seqlen: int, scale: float, dropout_p: float = 0.0, seed: torch.Tensor | None = None,
                        stream: int = 0) -> torch.Tensor:
    """Differentiable attention of packed short sequences from their fused projection ``qkv``
    (tokens, 3 * heads * head_dim; unit last stride): returns (tokens, heads * head_dim).
    ``seed``: int64 (1,) Philox seed (required with dropout: the caller draws one a forward and
    gives each layer its own ``stream``, a multiple of ``heads`` apart). Unchecked
    (:func:`fastcse.models.attention.varlen_attention_qkv` checks)."""
    if dropout_p == 0.0:
        seed = None
    elif seed is None:
        raise ValueError("short_attention_qkv with dropout needs a seed")
    return _short_fwd_op(qkv, seq_ids, cu_seqlens, seed, int(heads), int(max_seqlen), float(scale),
                         float(dropout_p), int(stream))
