"""Fused rotary position embeddings: one Triton kernel rotates q and k in a single launch.

Rotary embedding rotates each pair of features ``(x1, x2)`` of a head by the angle
``theta = position * inv_freq[pair]``::

    out1 = x1 * cos(theta) - x2 * sin(theta)
    out2 = x2 * cos(theta) + x1 * sin(theta)

Two pairings exist: ``half`` (pair ``i`` is ``(x[i], x[i + rotary_dim / 2])``: GPT-NeoX, Llama,
ModernBERT) and ``interleaved`` (pair ``i`` is ``(x[2i], x[2i + 1])``: RoFormer, GPT-J). The
rotation is orthogonal, so its backward pass is the rotation by ``-theta``: the same kernel with
``CONJUGATE=True`` (flash-attention's trick), applied to the output gradients.

Contents: the ``@triton.jit`` kernel, the host launcher :func:`rotary_launch`, two
``torch.library`` custom ops (``fastcse::rotary`` out-of-place, ``fastcse::rotary_`` in-place) so
``torch.compile`` graphs keep the kernel without graph breaks, and :class:`RotaryFunction`, the
autograd wrapper. Input checks and the eager reference live in :mod:`fastcse.rotary`, the user API.
"""

# No `from __future__ import annotations`: torch.library infers the custom ops' schemas from
# their annotations, and real types keep that independent of how a torch version parses strings.
from typing import Optional

import torch
import triton
import triton.language as tl

# Elements (pairs) one program rotates per head tile. 4096 pairs = 16 KiB of bf16 loaded per
# operand, enough in flight per SM to saturate HBM with 4 warps and still give thousands of
# programs at the benchmark shape (8 x 4096 tokens x 64 heads of q and k). A size heuristic rather
# than autotuning: the kernel is a pure streaming op and its best tile barely depends on shape.
_PAIRS_PER_PROGRAM = 4096
_MAX_BLOCK_HEADS = 16


@triton.jit
def _rotate_heads(
    X, OUT, COS, SIN,
    batch_index, tokens, token_mask, positions,
    head_block, n_heads, head_dim, rotary_half,
    stride_x_batch, stride_x_token, stride_x_head, stride_x_dim,
    stride_out_batch, stride_out_token, stride_out_head, stride_out_dim,
    stride_cos_position, stride_cos_dim, stride_sin_position, stride_sin_dim,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, COPY_TAIL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    """Rotate one (tokens x heads x pairs) tile of X into OUT (OUT may be X: in place)."""
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_HALF)

    # cos/sin are gathered once per token and broadcast over the tile's heads.
    cs_mask = token_mask[:, None] & (pairs[None, :] < rotary_half)
    cos = tl.load(COS + positions[:, None] * stride_cos_position + pairs[None, :] * stride_cos_dim,
                  mask=cs_mask, other=1.0).to(tl.float32)
    sin = tl.load(SIN + positions[:, None] * stride_sin_position + pairs[None, :] * stride_sin_dim,
                  mask=cs_mask, other=0.0).to(tl.float32)
    if CONJUGATE:
        sin = -sin
    cos = tl.expand_dims(cos, 1)
    sin = tl.expand_dims(sin, 1)

    t3 = tl.expand_dims(tl.expand_dims(tokens, 1), 2)
    h3 = tl.expand_dims(tl.expand_dims(heads, 0), 2)
    p3 = tl.expand_dims(tl.expand_dims(pairs, 0), 1)
    row_mask = tl.expand_dims(tl.expand_dims(token_mask, 1), 2) & (h3 < n_heads)
    mask = row_mask & (p3 < rotary_half)

    x_row = X + batch_index * stride_x_batch + t3 * stride_x_token + h3 * stride_x_head
    out_row = OUT + batch_index * stride_out_batch + t3 * stride_out_token + h3 * stride_out_head
    # fp32 arithmetic whatever the storage dtype: one rounding per output element.
    if INTERLEAVED:
        # Pairs (x[2i], x[2i+1]) are adjacent: load them as one contiguous (..., pairs, 2) tile and
        # split it, so each thread issues wide loads instead of two stride-2 gathers.
        dims = tl.expand_dims(tl.expand_dims(tl.arange(0, 2 * BLOCK_HALF), 0), 1)
        full_mask = row_mask & (dims < 2 * rotary_half)
        x = tl.load(x_row + dims * stride_x_dim, mask=full_mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_T, BLOCK_H, BLOCK_HALF, 2]))
        out1 = x1 * cos - x2 * sin
        out2 = x2 * cos + x1 * sin
        out = tl.reshape(tl.join(out1, out2), [BLOCK_T, BLOCK_H, 2 * BLOCK_HALF])
        tl.store(out_row + dims * stride_out_dim, out.to(OUT.dtype.element_ty), mask=full_mask)
    else:
        x1 = tl.load(x_row + p3 * stride_x_dim, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + (p3 + rotary_half) * stride_x_dim, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * cos - x2 * sin
        out2 = x2 * cos + x1 * sin
        tl.store(out_row + p3 * stride_out_dim, out1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(out_row + (p3 + rotary_half) * stride_out_dim, out2.to(OUT.dtype.element_ty), mask=mask)

    if COPY_TAIL:
        # Partial rotary, out of place: features past rotary_dim pass through unchanged.
        tail = 2 * rotary_half + tl.expand_dims(tl.expand_dims(tl.arange(0, BLOCK_TAIL), 0), 1)
        tail_mask = row_mask & (tail < head_dim)
        x_tail = tl.load(x_row + tail * stride_x_dim, mask=tail_mask, other=0.0)
        tl.store(out_row + tail * stride_out_dim, x_tail, mask=tail_mask)


@triton.jit
def _rotary_kernel(
    Q, K, OUT_Q, OUT_K, COS, SIN, CU_SEQLENS, POSITION_IDS, SEQLEN_OFFSETS,
    n_tokens, n_seqs, n_search_steps, offset_scalar,
    n_heads_q, n_heads_k, n_q_head_blocks, head_dim, rotary_half,
    stride_q_batch, stride_q_token, stride_q_head, stride_q_dim,
    stride_k_batch, stride_k_token, stride_k_head, stride_k_dim,
    stride_out_q_batch, stride_out_q_token, stride_out_q_head, stride_out_q_dim,
    stride_out_k_batch, stride_out_k_token, stride_out_k_head, stride_out_k_dim,
    stride_cos_position, stride_cos_dim, stride_sin_position, stride_sin_dim,
    stride_position_batch, stride_position_token,
    # The constexpr flags select code paths at compile time, so the common case (dense batch,
    # positions 0..seqlen-1, full rotary) carries no position gathers, search or tail copy.
    IS_VARLEN: tl.constexpr, HAS_POSITION_IDS: tl.constexpr, HAS_OFFSET_TENSOR: tl.constexpr,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, COPY_TAIL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
):
    """Grid: (token blocks, batch (1 when varlen), head blocks of q followed by those of k)."""
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_h = tl.program_id(2)
    # int64 token and batch indices: offsets of large packed batches overflow int32.
    batch_index = pid_b.to(tl.int64)
    tokens = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < n_tokens

    if IS_VARLEN:
        if HAS_POSITION_IDS:
            positions = tl.load(POSITION_IDS + tokens * stride_position_token, mask=token_mask,
                                other=0)
        else:
            # Sequence of each packed token: the largest s with cu_seqlens[s] <= token, by a
            # vectorised binary search (ceil(log2(n_seqs)) steps, cu_seqlens stays in L1).
            lo = tl.zeros([BLOCK_T], dtype=tl.int32)
            hi = lo + (n_seqs - 1)
            for _ in range(n_search_steps):
                mid = (lo + hi + 1) // 2
                start = tl.load(CU_SEQLENS + mid)
                found = start <= tokens
                lo = tl.where(found, mid, lo)
                hi = tl.where(found, hi, mid - 1)
            positions = tokens - tl.load(CU_SEQLENS + lo)
            if HAS_OFFSET_TENSOR:
                positions += tl.load(SEQLEN_OFFSETS + lo)
            else:
                positions += offset_scalar
    else:
        if HAS_POSITION_IDS:
            positions = tl.load(
                POSITION_IDS + batch_index * stride_position_batch + tokens * stride_position_token,
                mask=token_mask, other=0)
        elif HAS_OFFSET_TENSOR:
            positions = tokens + tl.load(SEQLEN_OFFSETS + batch_index)
        else:
            positions = tokens + offset_scalar
    positions = tl.where(token_mask, positions, 0)

    if pid_h < n_q_head_blocks:
        _rotate_heads(
            Q, OUT_Q, COS, SIN, batch_index, tokens, token_mask, positions,
            pid_h, n_heads_q, head_dim, rotary_half,
            stride_q_batch, stride_q_token, stride_q_head, stride_q_dim,
            stride_out_q_batch, stride_out_q_token, stride_out_q_head, stride_out_q_dim,
            stride_cos_position, stride_cos_dim, stride_sin_position, stride_sin_dim,
            INTERLEAVED, CONJUGATE, COPY_TAIL, BLOCK_T, BLOCK_H, BLOCK_HALF, BLOCK_TAIL,
        )
    else:
        _rotate_heads(
            K, OUT_K, COS, SIN, batch_index, tokens, token_mask, positions,
            pid_h - n_q_head_blocks, n_heads_k, head_dim, rotary_half,
            stride_k_batch, stride_k_token, stride_k_head, stride_k_dim,
            stride_out_k_batch, stride_out_k_token, stride_out_k_head, stride_out_k_dim,
            stride_cos_position, stride_cos_dim, stride_sin_position, stride_sin_dim,
            INTERLEAVED, CONJUGATE, COPY_TAIL, BLOCK_T, BLOCK_H, BLOCK_HALF, BLOCK_TAIL,
        )


def _strides4(x: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, token, head, dim) strides; a packed varlen tensor has a single batch of stride 0."""
    if varlen:
        return (0, x.stride(0), x.stride(1), x.stride(2))
    return (x.stride(0), x.stride(1), x.stride(2), x.stride(3))


def rotary_launch(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    q_out: torch.Tensor,
    k_out: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    interleaved: bool,
    conjugate: bool,
    cu_seqlens: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    seqlen_offsets: Optional[torch.Tensor] = None,
    offset: int = 0,
) -> None:
    """Rotate ``q`` (and ``k``) into ``q_out`` (and ``k_out``) with one kernel launch.

    Shapes (inputs are assumed checked by :func:`fastcse.rotary.apply_rotary`):
        q: (batch, seqlen, nheads_q, headdim), or (total_tokens, nheads_q, headdim) with cu_seqlens
        k: same leading dims as q with nheads_k heads (may differ from nheads_q), or None
        q_out, k_out: same shapes as q, k; may be q, k themselves (in place); any strides
        cos, sin: (seqlen_ro, rotary_dim // 2), rotary_dim <= headdim; row p is position p
        cu_seqlens: (batch + 1,) int32/int64 sequence starts in the packed token dimension
        position_ids: (batch, seqlen) (batch stride may be 0) or (total_tokens,) when varlen
        seqlen_offsets: (batch,) integer start position of each sequence, or None to use ``offset``
    ``conjugate`` rotates by minus theta (the backward pass).
    """
    varlen = cu_seqlens is not None
    if varlen:
        n_batch_programs, n_tokens = 1, q.shape[0]
    else:
        n_batch_programs, n_tokens = q.shape[0], q.shape[1]
    n_heads_q, head_dim = q.shape[-2], q.shape[-1]
    n_heads_k = k.shape[-2] if k is not None else 0
    rotary_half = cos.shape[-1]
    if n_tokens == 0 or n_batch_programs == 0:
        return
    inplace = q_out.data_ptr() == q.data_ptr()
    copy_tail = (not inplace) and 2 * rotary_half < head_dim

    block_half = triton.next_power_of_2(rotary_half)
    block_h = min(triton.next_power_of_2(max(n_heads_q, n_heads_k)), _MAX_BLOCK_HEADS)
    block_t = max(1, min(triton.next_power_of_2(n_tokens), _PAIRS_PER_PROGRAM // (block_h * block_half)))
    block_tail = triton.next_power_of_2(max(head_dim - 2 * rotary_half, 1))
    n_q_head_blocks = triton.cdiv(n_heads_q, block_h)
    n_k_head_blocks = triton.cdiv(n_heads_k, block_h)

    if k is None:
        k, k_out = q, q_out  # never read: there are no k head blocks in the grid
    dummy = cos  # stands in for absent optional pointers; the constexpr flags keep it unread
    n_seqs = cu_seqlens.shape[0] - 1 if varlen else q.shape[0]
    if position_ids is not None:
        pos_strides = (0, position_ids.stride(0)) if varlen else (position_ids.stride(0), position_ids.stride(1))
    else:
        pos_strides = (0, 0)

    grid = (triton.cdiv(n_tokens, block_t), n_batch_programs, n_q_head_blocks + n_k_head_blocks)
    _rotary_kernel[grid](
        q, k, q_out, k_out, cos, sin,
        cu_seqlens if varlen else dummy,
        position_ids if position_ids is not None else dummy,
        seqlen_offsets if seqlen_offsets is not None else dummy,
        n_tokens, max(n_seqs, 1), max(n_seqs - 1, 0).bit_length(), offset,
        n_heads_q, n_heads_k, n_q_head_blocks, head_dim, rotary_half,
        *_strides4(q, varlen), *_strides4(k, varlen),
        *_strides4(q_out, varlen), *_strides4(k_out, varlen),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        *pos_strides,
        IS_VARLEN=varlen,
        HAS_POSITION_IDS=position_ids is not None,
        HAS_OFFSET_TENSOR=seqlen_offsets is not None,
        INTERLEAVED=interleaved,
        CONJUGATE=conjugate,
        COPY_TAIL=copy_tail,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        BLOCK_TAIL=block_tail,
        num_warps=4,
    )


# --- torch.library registration ---------------------------------------------------------------
# custom_op (not triton_op): the launcher derives block sizes and the search depth from concrete
# sizes, which must stay Python ints even when torch.compile traces with symbolic shapes.


@torch.library.custom_op("fastcse::rotary", mutates_args=())
def _rotary_op(
    q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
    seqlen_offsets: Optional[torch.Tensor], offset: int, interleaved: bool, conjugate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    q_out = torch.empty_like(q)
    k_out = torch.empty_like(k) if k is not None else q.new_empty(0)
    rotary_launch(q, k, q_out, k_out if k is not None else None, cos, sin, interleaved=interleaved,
                  conjugate=conjugate, cu_seqlens=cu_seqlens, position_ids=position_ids,
                  seqlen_offsets=seqlen_offsets, offset=offset)
    return q_out, k_out


@_rotary_op.register_fake
def _(q, k, cos, sin, cu_seqlens, position_ids, seqlen_offsets, offset, interleaved, conjugate):
    return torch.empty_like(q), (torch.empty_like(k) if k is not None else q.new_empty(0))


@torch.library.custom_op("fastcse::rotary_", mutates_args=("q", "k"))
def _rotary_inplace_op(
    q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
    seqlen_offsets: Optional[torch.Tensor], offset: int, interleaved: bool, conjugate: bool,
) -> None:
    rotary_launch(q, k, q, k, cos, sin, interleaved=interleaved, conjugate=conjugate,
                  cu_seqlens=cu_seqlens, position_ids=position_ids,
                  seqlen_offsets=seqlen_offsets, offset=offset)


@_rotary_inplace_op.register_fake
def _(q, k, cos, sin, cu_seqlens, position_ids, seqlen_offsets, offset, interleaved, conjugate):
    return None


class RotaryFunction(torch.autograd.Function):
    """Autograd for the fused rotary: backward rotates the output gradients by minus theta.

    cos and sin are constants here (no gradient flows into them), as in every RoPE model.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, cu_seqlens, position_ids, seqlen_offsets, offset,
                interleaved, inplace):
        args = (cos, sin, cu_seqlens, position_ids, seqlen_offsets, offset, interleaved)
        if inplace:
            torch.ops.fastcse.rotary_(q, k, *args, False)
            if k is not None:
                ctx.mark_dirty(q, k)
            else:
                ctx.mark_dirty(q)
            q_out, k_out = q, k
        else:
            q_out, k_out = torch.ops.fastcse.rotary(q, k, *args, False)
            if k is None:
                k_out = None
        ctx.save_for_backward(cos, sin, cu_seqlens, position_ids, seqlen_offsets)
        ctx.offset = offset
        ctx.interleaved = interleaved
        ctx.has_k = k is not None
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin, cu_seqlens, position_ids, seqlen_offsets = ctx.saved_tensors
        grad_q_in, grad_k_in = torch.ops.fastcse.rotary(
            grad_q, grad_k if ctx.has_k else None, cos, sin, cu_seqlens, position_ids,
            seqlen_offsets, ctx.offset, ctx.interleaved, True)
        return (grad_q_in, grad_k_in if ctx.has_k else None) + (None,) * 8


def rotary_triton(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    interleaved: bool,
    cu_seqlens: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    seqlen_offsets: Optional[torch.Tensor] = None,
    offset: int = 0,
    inplace: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Differentiable fused rotary of q and k (shapes as in :func:`rotary_launch`)."""
    return RotaryFunction.apply(q, k, cos, sin, cu_seqlens, position_ids, seqlen_offsets, offset,
                                interleaved, inplace)
