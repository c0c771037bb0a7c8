"""The InfoNCE loss's row-chunk loop: pure PyTorch, shared by the chunked and the Triton tiers.

Both tiers form the gradients of ``sum_i g_i lse_i`` the same way (notation of
:mod:`fastcse.infonce`): per chunk of anchor rows, one matmul for the raw dot products, a row
softmax turning them into weights ``g_i p_ij`` in place, and two matmuls accumulating
``w c`` (anchor gradients) and ``w^T a`` (candidate gradients). Only the row softmax differs:
:func:`torch_rows_softmax_` here, or the fused Triton kernel of :mod:`fastcse.kernels.infonce`
(``rows_softmax_``, which also casts to the matmul dtype in the same pass).

The loop lives in the kernel layer so that the Triton fast path runs it without calling back
into the engine, and in its own module, with no Triton import, so that the chunked tier of
:mod:`fastcse.infonce` loads and runs where Triton is not installed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16 / bf16 / fp32 inputs, fp64 for fp64: lse, logits and gradients use it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def torch_rows_softmax_(dots: Tensor, row0: int, scale: Tensor, hn_weight: float, hn_offset: int,
                        lse: Tensor, grad_rows: Optional[Tensor], compute_lse: bool) -> Tensor:
    """In place on a chunk of raw dot products ``dots`` (rows row0.., all M columns):
    ``dots <- g_i * exp(scale * dots + bias - lse_i)``. With ``compute_lse`` it first writes
    ``lse[row0:row0 + rows]``; otherwise it reads it. ``grad_rows`` None means g_i = 1.
    Returns the weights (the same buffer). The Triton twin is ``fastcse.kernels.infonce.rows_softmax_``.
    """
    rows = dots.shape[0]
    logits = dots.mul_(scale.to(dots.dtype))
    if hn_weight != 0.0:
        idx = torch.arange(rows, device=dots.device)
        logits[idx, idx + row0 + hn_offset] += hn_weight
    chunk_lse = lse[row0:row0 + rows]
    if compute_lse:
        chunk_lse.copy_(torch.logsumexp(logits, dim=1))
    weights = logits.sub_(chunk_lse[:, None].to(logits.dtype)).exp_()
    if grad_rows is not None:
        weights.mul_(grad_rows[row0:row0 + rows, None].to(weights.dtype))
    return weights


def chunk_gradient_pass(a: Tensor, c: Tensor, scale: Tensor, hn_weight: float, hn_offset: int,
                         n_grad_cols: int, chunk_rows: int, lse: Tensor, grad_rows: Optional[Tensor],
                         compute_lse: bool, matmul_dtype: torch.dtype, softmax_):
    """The loop both gradient paths share: per row chunk, one matmul for the dot products,
    ``softmax_`` turning them into weights g_i p_ij in place (writing ``lse`` first when
    ``compute_lse``), and two matmuls accumulating ``w c`` and ``w^T a``. Returns
    ``(grad_a, grad_c, grad_scale)`` of ``sum_i g_i lse_i`` in the accumulation dtype."""
    acc = lse.dtype
    am, cm = a.to(matmul_dtype), c.to(matmul_dtype)
    grad_a = torch.empty(a.shape, dtype=acc, device=a.device)
    grad_c = torch.zeros((n_grad_cols, c.shape[1]), dtype=acc, device=a.device)
    for r0 in range(0, a.shape[0], chunk_rows):
        r1 = min(a.shape[0], r0 + chunk_rows)
        dots = mm_acc(am[r0:r1], cm.T, acc)
        weights = softmax_(dots, r0, scale, hn_weight, hn_offset, lse, grad_rows, compute_lse).to(matmul_dtype)
        grad_a[r0:r1] = mm_acc(weights, cm, acc)
        addmm_acc_(grad_c, weights[:, :n_grad_cols].T, am[r0:r1])
    # d scale = sum_ij w_ij <a_i, c_j> = sum_i <a_i, (w c)_i>, taken before scaling grad_a
    grad_scale = torch.vdot(a.to(acc).flatten(), grad_a.flatten())
    s = scale.to(acc)
    return grad_a.mul_(s), grad_c.mul_(s), grad_scale


def chunked_forward_with_grads(a: Tensor, c: Tensor, scale: Tensor, hn_weight: float, hn_offset: int,
                               n_grad_cols: int, chunk_rows: int, *, matmul_dtype: torch.dtype,
                               softmax_=torch_rows_softmax_):
    """One pass over row chunks computing lse and the gradients of ``sum_i lse_i`` (6NMD FLOPs).

    Returns ``(lse, grad_a, grad_c, grad_scale)``: fp32 (fp64 for fp64 inputs); grad_c covers
    the first ``n_grad_cols`` candidates (``matmul_dtype``: the operands of the chunk matmuls).
    """
    lse = torch.empty(a.shape[0], dtype=accumulation_dtype(a.dtype), device=a.device)
    grads = chunk_gradient_pass(a, c, scale, hn_weight, hn_offset, n_grad_cols, chunk_rows, lse, None,
                                 True, matmul_dtype, softmax_)
    return (lse, *grads)


def chunked_backward(a: Tensor, c: Tensor, scale: Tensor, lse: Tensor, grad_lse: Tensor, hn_weight: float,
                     hn_offset: int, n_grad_cols: int, chunk_rows: int, *, matmul_dtype: torch.dtype,
                     softmax_=torch_rows_softmax_):
    """Gradients of ``sum_i grad_lse_i * lse_i``, recomputing each chunk (4NMD FLOPs on top of the
    forward's 2NMD). Returns ``(grad_a, grad_c, grad_scale)`` in the accumulation dtype."""
    return chunk_gradient_pass(a, c, scale, hn_weight, hn_offset, n_grad_cols, chunk_rows, lse,
                                grad_lse.to(lse.dtype), False, matmul_dtype, softmax_)


def mm_acc(x: Tensor, y: Tensor, acc: torch.dtype) -> Tensor:
    """``x @ y`` returned in the accumulation dtype.

    Half-precision operands on CUDA write fp32 straight from the matmul (``mm.dtype``) where this
    PyTorch has it, so logits and gradients keep fp32 precision at no extra pass; elsewhere the
    result is cast (CPU callers pass fp32 operands, see ``fused_matmul_dtype``).
    """
    if x.dtype != acc and x.is_cuda and _HAS_MM_OUT_DTYPE:
        return torch.mm(x, y, out_dtype=acc)
    return (x @ y).to(acc)


def fused_matmul_dtype(x: Tensor) -> torch.dtype:
    """Operand dtype of the chunk matmuls: the input's on CUDA (tensor cores), fp32 elsewhere (CPU
    half-precision matmuls are slow and round their outputs)."""
    return x.dtype if x.is_cuda else accumulation_dtype(x.dtype)


_HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def addmm_acc_(acc_out: Tensor, x: Tensor, y: Tensor) -> None:
    """``acc_out += x @ y`` (acc_out in the accumulation dtype). Same-dtype operands accumulate
    in place in the BLAS call (no (M, D) temporary per chunk: measured 1.4x slower at D = 1024 on
    CPU with one); half-precision operands go through an fp32-output matmul and an add."""
    if x.dtype == acc_out.dtype:
        acc_out.addmm_(x, y)
    else:
        acc_out += mm_acc(x, y, acc_out.dtype)


def claim_precomputed_grads(ctx) -> None:
    """Precomputed gradients are handed out (scaled in place) once: refuse a second backward
    through the same graph (``retain_graph=True``) rather than return wrong gradients."""
    if getattr(ctx, "grads_claimed", False):
        raise RuntimeError(
            "backward ran twice through a fused InfoNCE loss whose gradients were formed in the "
            "forward pass (reduction='mean'/'sum'); with retain_graph=True use reduction='none' "
            "(then .mean()) or backend='eager'"
        )
    ctx.grads_claimed = True
