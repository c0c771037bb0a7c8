"""Fused InfoNCE kernels: row-wise log-sum-exp of scaled cosine logits and its gradients.

For L2-normalised anchors ``a`` (N, D) and candidates ``c`` (M, D)::

    s_ij  = scale * <a_i, c_j> + w * [j == hn_offset + i]
    lse_i = log sum_j exp(s_ij)

The rest of the loss (target logit, reduction, normalisation, gathering) is cheap O((N + M) D)
PyTorch around it in ``fastcse/infonce.py``; the row-chunk loop of the training path is shared
with the chunked tier and lives, Triton-free, in :mod:`fastcse.kernels.infonce_chunks`. Two
paths, chosen by what the caller needs:

* ``_lse_fwd_kernel`` (no gradient wanted, or per-row upstream gradients): tiles of a against
  tiles of c with an online log-sum-exp, one float stored per row, never the N x M matrix
  (2NMD FLOPs). Its backward recomputes row chunks.
* gradients with a uniform upstream (a mean or sum reduction, i.e. training): row chunks of
  ``chunk_rows`` x M dot products from one cuBLAS matmul, ``_rows_softmax_kernel`` turning them
  into probabilities in one fused pass (scale, hard-negative weight, log-sum-exp, exp, cast to the
  matmul dtype), and two cuBLAS matmuls accumulating ``p c`` and ``p^T a``: the gradients are
  formed in the forward pass, 6NMD FLOPs in all like eager, at cuBLAS speed, with O(chunk x M)
  memory instead of O(N x M). (Fully fused tile backward kernels were tried first: for D > 128
  their register-bound accumulators forced the logits to be recomputed once per D slice, several
  times the FLOPs of this path.)

All accumulation is fp32. Inputs may be fp16 / bf16 / fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastcse.kernels._triton_utils import interpreted
from fastcse.kernels.infonce_chunks import (
    chunked_backward,
    chunked_forward_with_grads,
    claim_precomputed_grads,
    fused_matmul_dtype,
)


@triton.jit
def _logits_tile(
    a_ptr, c_ptr, rows, cols, row_mask, col_mask, dim, stride_anchor_row, stride_cand_row,
    scale, hn_weight, hn_offset,
    HAS_HARD_NEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) fp32 logits; columns past the end are -inf."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        # int64 row offsets: N * D passes 2**31 at about 2.8M rows of 768
        a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * stride_anchor_row + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        c = tl.load(c_ptr + cols.to(tl.int64)[:, None] * stride_cand_row + offs_d[None, :],
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(a, tl.trans(c), acc, input_precision=INPUT_PRECISION)
    s = acc * scale
    if HAS_HARD_NEG:
        s += tl.where(cols[None, :] == rows[:, None] + hn_offset, hn_weight, 0.0)
    return tl.where(col_mask[None, :], s, float("-inf"))


@triton.jit
def _lse_fwd_kernel(
    a_ptr, c_ptr, scale_ptr, lse_ptr,
    n_rows, n_cols, dim, stride_anchor_row, stride_cand_row, hn_weight, hn_offset,
    HAS_HARD_NEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    scale = tl.load(scale_ptr).to(tl.float32)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col0 in range(0, n_cols, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        s = _logits_tile(a_ptr, c_ptr, rows, cols, row_mask, cols < n_cols, dim,
                         stride_anchor_row, stride_cand_row, scale, hn_weight, hn_offset,
                         HAS_HARD_NEG, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST_DOT, INPUT_PRECISION)
        new_max = tl.maximum(running_max, tl.max(s, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), axis=1)
        running_max = new_max
    tl.store(lse_ptr + rows, running_max + tl.log(running_sum), mask=row_mask)


@triton.jit
def _row_logits(dots_row, cols, n_cols, scale, hn_col, hn_weight, HAS_HARD_NEG: tl.constexpr):
    """A block of one row's fp32 logits from raw dot products; -inf past the end."""
    mask = cols < n_cols
    s = tl.load(dots_row + cols, mask=mask, other=0.0).to(tl.float32) * scale
    if HAS_HARD_NEG:
        s += tl.where(cols == hn_col, hn_weight, 0.0)
    return tl.where(mask, s, float("-inf"))


@triton.jit
def _rows_softmax_kernel(
    dots_ptr, out_ptr, lse_ptr, grad_lse_ptr, scale_ptr,
    n_cols, stride_dots_row, stride_out_row, row0, hn_weight, hn_offset,
    COMPUTE_LSE: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_HARD_NEG: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per row of a chunk of raw dot products (fp32):
    ``out_ij = g_i * exp(scale * dots_ij + w [j == hn_offset + row0 + i] - lse_i)``.

    COMPUTE_LSE (forward): two passes over the row, an online max / sum then the write, and
    lse_i is stored; otherwise lse_i is read (backward) and one pass suffices. HAS_GRAD scales by
    the per-row upstream gradient g_i (else g_i = 1). These are constexpr so each variant compiles
    without dead branches.
    """
    row = tl.program_id(0)
    dots_row = dots_ptr + row.to(tl.int64) * stride_dots_row
    out_row = out_ptr + row.to(tl.int64) * stride_out_row
    scale = tl.load(scale_ptr).to(tl.float32)
    hn_col = row0 + row + hn_offset
    if COMPUTE_LSE:
        running_max = float("-inf")
        running_sum = 0.0
        for col0 in range(0, n_cols, BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N)
            s = _row_logits(dots_row, cols, n_cols, scale, hn_col, hn_weight, HAS_HARD_NEG)
            new_max = tl.maximum(running_max, tl.max(s, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(s - new_max), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        tl.store(lse_ptr + row0 + row, lse)
    else:
        lse = tl.load(lse_ptr + row0 + row)
    if HAS_GRAD:
        g = tl.load(grad_lse_ptr + row0 + row)
    else:
        g = 1.0
    for col0 in range(0, n_cols, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        weights = tl.exp(_row_logits(dots_row, cols, n_cols, scale, hn_col, hn_weight, HAS_HARD_NEG) - lse) * g
        tl.store(out_row + cols, weights.to(out_ptr.dtype.element_ty), mask=cols < n_cols)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------

# Rows of dot products materialised per chunk on the fused training path. Two pulls:
# * memory: a chunk holds chunk_rows x M fp32 dot products plus their probabilities in the matmul
#   dtype (6 bytes per element in bf16). 2**25 elements is 192 MiB: at N = 32768, M = 65536 that
#   is 512 rows, next to the ~17 GiB eager's bf16 logits, log-softmax and their gradients take.
# * speed: every chunk re-reads and re-writes the fp32 gradient accumulator of the candidates
#   (8 M D bytes) while its three matmuls do 6 chunk_rows M D FLOPs: 0.75 chunk_rows FLOPs per
#   byte. An H100 needs ~300 (990 TFLOP/s over 3.35 TB/s), hence the floor of 512 rows, which wins over
#   the memory budget when M is very large (N = 262144: 512 x 524288 x 6 B = 1.5 GiB).
# Predictions, not yet measured on a GPU: bench/gpu_check.sh records both.
FUSED_CHUNK_ELEMENTS = 1 << 25
FUSED_MIN_CHUNK_ROWS = 512


def _tile_config(a: torch.Tensor) -> dict:
    """Tile sizes for the fused forward kernel, chosen per device and dtype.

    A size heuristic rather than autotuning: the kernel streams (BLOCK_M x D) and (BLOCK_N x D)
    tiles through one matmul shape, so a handful of configs would all be timed on the same
    pattern. Re-tune when the GPU benchmark's TFLOP/s fraction drops (bench/bench_infonce.py).
    """
    dim_pow2 = triton.next_power_of_2(a.shape[1])
    if a.is_cuda:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=64 if a.element_size() <= 2 else 32,
                   num_warps=8, num_stages=3)
        upcast = False
    else:
        # Triton's CPU interpreter: few large blocks run fastest (it executes each op with numpy
        # over whole blocks), and it gets bf16 tl.dot wrong (triton-lang/triton#11584), so tiles
        # are upcast to fp32 before every dot when, and only when, running interpreted.
        cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=min(max(dim_pow2, 16), 64), num_warps=4, num_stages=1)
        upcast = interpreted()
    # fp32 follows PyTorch's own matmul setting: tf32 only where the user allowed it.
    precision = "ieee" if a.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    cfg.update(UPCAST_DOT=upcast, INPUT_PRECISION=precision)
    return cfg


def rows_softmax_(dots: torch.Tensor, row0: int, scale: torch.Tensor, hn_weight: float, hn_offset: int,
                  lse: torch.Tensor, grad_rows: Optional[torch.Tensor], compute_lse: bool,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton twin of :func:`fastcse.kernels.infonce_chunks.torch_rows_softmax_` (same contract).

    dots: (rows, M) fp32 raw dot products of anchors row0.. against all candidates, unit stride
    along M. The weights are written into ``out`` (default: ``dots`` itself), whose dtype may be
    the matmul dtype (bf16 / fp16), so the cast costs no extra pass.
    """
    out = dots if out is None else out
    if dots.shape[0] == 0:
        return out
    block_n = 1024 if dots.is_cuda else 128
    _rows_softmax_kernel[(dots.shape[0],)](
        dots, out, lse, grad_rows if grad_rows is not None else lse, scale,
        dots.shape[1], dots.stride(0), out.stride(0), row0, hn_weight, hn_offset,
        COMPUTE_LSE=compute_lse, HAS_GRAD=grad_rows is not None, HAS_HARD_NEG=hn_weight != 0.0,
        BLOCK_N=block_n, num_warps=8 if dots.is_cuda else 4,
    )
    return out


def _softmax_into_matmul_dtype(matmul_dtype):
    """rows_softmax_ writing straight into a buffer of the matmul dtype (one pass, no cast)."""

    def softmax_(dots, row0, scale, hn_weight, hn_offset, lse, grad_rows, compute_lse):
        out = dots if dots.dtype == matmul_dtype else torch.empty(dots.shape, dtype=matmul_dtype, device=dots.device)
        return rows_softmax_(dots, row0, scale, hn_weight, hn_offset, lse, grad_rows, compute_lse, out=out)

    return softmax_


# --------------------------------------------------------------------------------------------
# torch.library ops: opaque custom ops with fake (meta) implementations, so a torch.compile'd
# training step keeps them in one graph with symbolic batch sizes (no graph break, no recompile
# per batch size). custom_op rather than triton_op: triton_op traces the launcher with fake
# tensors, which fails when the kernels run in Triton's CPU interpreter (CI), and the chunk loop
# inside these ops must stay opaque to the compiler anyway.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastcse::infonce_lse", mutates_args=())
def infonce_lse(anchors: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor, hn_weight: float,
                hn_offset: int, n_grad_cols: int, chunk_rows: int, precompute_grads: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise log-sum-exp of scaled cosine logits, and optionally its unit-weight gradients.

    Args:
        anchors: (N, D) normalised rows, unit stride along D.
        candidates: (M, D) normalised rows, unit stride along D, same dtype as anchors.
        scale: (1,) fp32, 1 / temperature.
        hn_weight, hn_offset: ``hn_weight`` is added to logit (i, hn_offset + i); 0 disables it.
        n_grad_cols: gradients only for the first ``n_grad_cols`` candidates (the rest is the
            ESimCSE / MoCo queue).
        chunk_rows: rows of dot products materialised at once when gradients are formed.
        precompute_grads: form the gradients of ``sum_i lse_i`` during this pass (chunked, 6NMD
            in all with the backward) instead of the fused tile kernel (2NMD, no N x M storage,
            recomputation in backward).
    Returns:
        lse (N,) fp32; grad_a (N, D), grad_c (n_grad_cols, D) fp32 and grad_scale () fp32 when
        precompute_grads, else empty tensors.
    """
    if precompute_grads:
        mm_dtype = fused_matmul_dtype(anchors)
        return chunked_forward_with_grads(
            anchors, candidates, scale, hn_weight, hn_offset, n_grad_cols, chunk_rows,
            matmul_dtype=mm_dtype, softmax_=_softmax_into_matmul_dtype(mm_dtype))
    n_rows, dim = anchors.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=anchors.device)
    cfg = _tile_config(anchors)
    _lse_fwd_kernel[(triton.cdiv(n_rows, cfg["BLOCK_M"]),)](
        anchors, candidates, scale, lse,
        n_rows, candidates.shape[0], dim, anchors.stride(0), candidates.stride(0),
        hn_weight, hn_offset, HAS_HARD_NEG=hn_weight != 0.0, **cfg,
    )
    empty = anchors.new_empty(0, dtype=torch.float32)
    return lse, empty, empty.clone(), empty.clone()


@infonce_lse.register_fake
def _(anchors, candidates, scale, hn_weight, hn_offset, n_grad_cols, chunk_rows, precompute_grads):
    f32 = dict(dtype=torch.float32)
    lse = anchors.new_empty(anchors.shape[0], **f32)
    if precompute_grads:
        return (lse, anchors.new_empty(anchors.shape, **f32),
                anchors.new_empty((n_grad_cols, anchors.shape[1]), **f32), anchors.new_empty((), **f32))
    return lse, anchors.new_empty(0, **f32), anchors.new_empty(0, **f32), anchors.new_empty(0, **f32)


@torch.library.custom_op("fastcse::infonce_lse_backward", mutates_args=())
def infonce_lse_backward(anchors: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor,
                         lse: torch.Tensor, grad_lse: torch.Tensor, hn_weight: float, hn_offset: int,
                         n_grad_cols: int, chunk_rows: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_i grad_lse_i * lse_i``: (N, D), (n_grad_cols, D), () fp32, recomputing
    chunk by chunk (cuBLAS matmuls around the fused row-softmax kernel)."""
    mm_dtype = fused_matmul_dtype(anchors)
    return chunked_backward(anchors, candidates, scale, lse, grad_lse, hn_weight, hn_offset, n_grad_cols,
                            chunk_rows, matmul_dtype=mm_dtype, softmax_=_softmax_into_matmul_dtype(mm_dtype))


@infonce_lse_backward.register_fake
def _(anchors, candidates, scale, lse, grad_lse, hn_weight, hn_offset, n_grad_cols, chunk_rows):
    f32 = dict(dtype=torch.float32)
    return (anchors.new_empty(anchors.shape, **f32),
            anchors.new_empty((n_grad_cols, anchors.shape[1]), **f32), anchors.new_empty((), **f32))


def _setup_context(ctx, inputs, output):
    anchors, candidates, scale, hn_weight, hn_offset, n_grad_cols, chunk_rows, precompute = inputs
    lse, grad_a, grad_c, grad_scale = output
    ctx.mark_non_differentiable(grad_a, grad_c, grad_scale)
    if precompute:
        ctx.save_for_backward(grad_a, grad_c, grad_scale)
    else:
        ctx.save_for_backward(anchors, candidates, scale, lse)
    ctx.config = (hn_weight, hn_offset, n_grad_cols, chunk_rows, precompute, candidates.shape[0])
    ctx.dtypes = (anchors.dtype, candidates.dtype, scale.dtype)


def _backward(ctx, grad_lse, *_unused):
    hn_weight, hn_offset, n_grad_cols, chunk_rows, precompute, n_cols = ctx.config
    if precompute:
        claim_precomputed_grads(ctx)
        grad_a, grad_c, grad_scale = ctx.saved_tensors
        g = grad_lse[0]  # uniform upstream: the caller reduced lse with a mean or a sum
        grad_a, grad_c, grad_scale = grad_a.mul_(g), grad_c.mul_(g), grad_scale * g  # once, in place
    else:
        anchors, candidates, scale, lse = ctx.saved_tensors
        grad_a, grad_c, grad_scale = infonce_lse_backward(
            anchors, candidates, scale, lse, grad_lse.float().contiguous(), hn_weight, hn_offset,
            n_grad_cols, chunk_rows)
    if n_grad_cols < n_cols:  # queue rows carry no gradient
        grad_c = torch.cat([grad_c, grad_c.new_zeros(n_cols - n_grad_cols, grad_c.shape[1])])
    a_dtype, c_dtype, s_dtype = ctx.dtypes
    return (grad_a.to(a_dtype), grad_c.to(c_dtype), grad_scale.reshape(1).to(s_dtype),
            None, None, None, None, None)


infonce_lse.register_autograd(_backward, setup_context=_setup_context)


def triton_lse(a: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, hn_weight: float, hn_offset: int,
               *, n_grad_cols: Optional[int] = None, uniform_upstream: bool = False,
               chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Differentiable fused log-sum-exp (the ``triton`` backend); see :func:`infonce_lse`.

    Without gradients, and for per-row upstream gradients (``reduction="none"``), the forward is
    the fused tile kernel: no N x M storage at all. With gradients and a uniform upstream (the
    caller reduces with a mean or a sum), the gradients are formed in the same pass.
    """
    n_grad_cols = c.shape[0] if n_grad_cols is None else n_grad_cols
    chunk_rows = chunk_rows or max(FUSED_MIN_CHUNK_ROWS, FUSED_CHUNK_ELEMENTS // max(1, c.shape[0]))
    wants_grad = torch.is_grad_enabled() and (a.requires_grad or c.requires_grad or scale.requires_grad)
    lse, _, _, _ = infonce_lse(a.contiguous(), c.contiguous(), scale.to(torch.float32).reshape(1),
                               float(hn_weight), int(hn_offset), int(n_grad_cols), int(chunk_rows),
                               bool(uniform_upstream and wants_grad))
    return lse
