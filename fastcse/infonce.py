"""The contrastive (InfoNCE) loss: input checks, the eager reference, the chunked twin, dispatch.

Notation used throughout (see ``info_nce`` for the user-facing contract)::

    a_i = anchors_i / ||anchors_i||                      i < N           (rows)
    c_j = candidates_j / ||candidates_j||                j < M           (columns)
    s_ij = scale * <a_i, c_j> + w * [j == hn_offset + i]  scale = 1 / temperature
    lse_i = log sum_j exp(s_ij)
    loss_i = lse_i - s_{i, target_offset + i}

Only ``lse`` needs a fused kernel: the target logit is one dot product per row and gets its
gradient from autograd. So every backend implements one op, ``lse = rowwise_lse(a, c, scale, w,
hn_offset)``, with the gradients

    d a_i   = g_i * scale * sum_j p_ij c_j            p_ij = exp(s_ij - lse_i)
    d c_j   = scale * sum_i g_i p_ij a_i
    d scale = sum_i g_i sum_j p_ij <a_i, c_j> = sum_i <a_i, d a_i> / scale

where g_i is the upstream gradient of lse_i. The three tiers:

* ``eager``: materialises the N x M logits; the reference of the tests and the benchmarks.
* ``chunked``: pure PyTorch, row chunks of at most ``chunk_rows`` x M logits at a time; with a
  mean / sum reduction the gradients are formed during the forward pass.
* ``triton``: ``fastcse.kernels.infonce``: without gradients (or for per-row upstream gradients)
  a tile kernel with an online log-sum-exp (never the N x M matrix); for training, the row-chunk
  loop with a fused Triton row-softmax between cuBLAS matmuls.

The row-chunk loop both fused tiers share (``chunked_forward_with_grads`` / ``chunked_backward``)
is pure PyTorch and lives in the kernel layer, :mod:`fastcse.kernels.infonce_chunks`, which
imports without Triton: the Triton tier runs it without calling back into this module, and the
chunked tier here still loads where Triton is not installed.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcse.kernels._triton_utils import interpreted, triton_available
from fastcse.kernels.infonce_chunks import (
    accumulation_dtype,
    chunked_backward,
    chunked_forward_with_grads,
    claim_precomputed_grads,
    mm_acc,
)

Backend = Literal["auto", "triton", "chunked", "eager"]
Reduction = Literal["mean", "sum", "none"]
BACKENDS = ("auto", "triton", "chunked", "eager")
REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Rows of logits materialised at once by the chunked backend: chunk_size x M floats. 8 MiB of fp32
# logits per chunk at M = 16384 keeps the working set near the L2/L3 caches on CPU while leaving
# the matmuls large enough to run at full speed (measured in bench/bench_infonce.py).
DEFAULT_CHUNK_ELEMENTS = 1 << 21


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _check_matrix(name: str, x, *, dim: Optional[int], allow_empty: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: the loss needs at least one row")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has embedding dimension 0")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{name} has embedding dimension {x.shape[1]}, but anchors have {dim}"
        )


def hard_negative_columns(hard_negatives) -> list:
    """``None`` -> [], a tensor -> [tensor], a list / tuple of tensors -> that list."""
    if hard_negatives is None:
        return []
    if isinstance(hard_negatives, (list, tuple)):
        return list(hard_negatives)
    return [hard_negatives]


def check_inputs(
    anchors, positives, hard_negatives, queue, temperature, hard_negative_weight, reduction, backend,
    *, check_finite: bool = True,
) -> None:
    """Raise a ``TypeError`` / ``ValueError`` naming the problem; never let a kernel see bad input."""
    _check_matrix("anchors", anchors, dim=None)
    n, d = anchors.shape
    _check_matrix("positives", positives, dim=d)
    if positives.shape[0] != n:
        raise ValueError(
            f"positives must have one row per anchor: anchors have {n} rows, positives "
            f"{positives.shape[0]}"
        )
    named = [("anchors", anchors), ("positives", positives)]
    columns = hard_negative_columns(hard_negatives)
    for k, column in enumerate(columns):
        name = "hard_negatives" if len(columns) == 1 else f"hard_negatives[{k}]"
        _check_matrix(name, column, dim=d)
        if column.shape[0] != n:
            raise ValueError(
                f"{name} must have one row per anchor (row i is anchor i's hard negative): "
                f"anchors have {n} rows, {name} {column.shape[0]}"
            )
        named.append((name, column))
    if hard_negative_weight != 0.0 and not columns:
        raise ValueError("hard_negative_weight is set but no hard_negatives were given")
    if hard_negative_weight != 0.0 and len(columns) != 1:
        raise ValueError(
            "hard_negative_weight needs exactly one hard-negative column, got "
            f"{len(columns)}"
        )
    if queue is not None:
        _check_matrix("queue", queue, dim=d, allow_empty=True)
        named.append(("queue", queue))
    for name, x in named[1:]:
        if x.dtype != anchors.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but anchors have {anchors.dtype}")
        if x.device != anchors.device:
            raise ValueError(f"{name} is on {x.device} but anchors are on {anchors.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(hard_negative_weight, (int, float)) or not math.isfinite(hard_negative_weight):
        raise TypeError(f"hard_negative_weight must be a finite float, got {hard_negative_weight!r}")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a floating tensor, got {temperature.dtype}")
        if temperature.device != anchors.device and temperature.device.type != "cpu":
            raise ValueError(
                f"temperature is on {temperature.device} but anchors are on {anchors.device}"
            )
        if not _is_compiling() and not float(temperature.detach()) > 0:
            raise ValueError(f"temperature must be > 0, got {float(temperature.detach())}")
    elif isinstance(temperature, (int, float)):
        if not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    else:
        raise TypeError(f"temperature must be a float or a 0-d tensor, got {type(temperature).__name__}")
    if check_finite and not _is_compiling():
        for name, x in named:
            if x.numel() and not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).any(dim=1).sum())
                raise ValueError(
                    f"{name} contains non-finite values (NaN or inf) in {bad} row(s); "
                    "the encoder probably diverged upstream of the loss"
                )


def resolve_backend(backend: Backend, device: torch.device, dtype: torch.dtype) -> str:
    """``auto``: Triton on CUDA when it imports, chunked otherwise. Forced names are checked."""
    if backend == "auto":
        if device.type == "cuda" and triton_available() and dtype != torch.float64:
            return "triton"
        return "chunked"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which does not import")
        if dtype == torch.float64:
            raise TypeError("backend='triton' supports fp16/bf16/fp32 inputs; use 'chunked' or 'eager' for fp64")
        if device.type != "cuda" and not (device.type == "cpu" and interpreted()):
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on CPU it runs only "
                "under Triton's interpreter (TRITON_INTERPRET=1 set before importing fastcse)"
            )
    return backend


# --------------------------------------------------------------------------------------------
# the row-wise log-sum-exp, three ways
# --------------------------------------------------------------------------------------------


def default_chunk_rows(n_cols: int, elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    return max(1, elements // max(1, n_cols))


def _pad_queue_rows(grad_c: Tensor, n_cols: int) -> Tensor:
    """Candidates past ``n_grad_cols`` (the queue) get a zero gradient."""
    if grad_c.shape[0] == n_cols:
        return grad_c
    return torch.cat([grad_c, grad_c.new_zeros(n_cols - grad_c.shape[0], grad_c.shape[1])])


class _ChunkedLSE(torch.autograd.Function):
    """Pure-PyTorch row-chunked log-sum-exp (chunk x M logits at a time), the CPU default.

    Low-precision inputs are upcast once to fp32 (O((N + M) D) memory, like the inputs), so this
    path is at least as accurate as eager in every dtype.

    ``uniform_upstream=True`` is a contract with the caller: the upstream gradient of ``lse`` will
    be the same for every row (the caller reduces ``lse`` with a mean or a sum right away and never
    hands it out). Then the gradients are formed during the forward pass with unit weights (6NMD
    FLOPs in all, the same as eager, instead of 8NMD with recomputation) and backward only scales
    them: the trick of Liger-Kernel's fused linear cross-entropy. Otherwise backward recomputes.
    """

    @staticmethod
    def forward(ctx, a, c, scale, hn_weight, hn_offset, n_grad_cols, chunk_rows, uniform_upstream):
        acc = accumulation_dtype(a.dtype)
        precompute = bool(uniform_upstream and any(ctx.needs_input_grad[:3]))
        ctx.config = (hn_weight, hn_offset, n_grad_cols, chunk_rows, precompute, c.shape[0])
        ctx.dtypes = (a.dtype, c.dtype, scale.dtype)
        if precompute:
            lse, da, dc, dscale = chunked_forward_with_grads(
                a, c, scale, hn_weight, hn_offset, n_grad_cols, chunk_rows, matmul_dtype=acc)
            ctx.save_for_backward(da, dc, dscale)
            return lse
        lse = torch.empty(a.shape[0], dtype=acc, device=a.device)
        am, cm = a.to(acc), c.to(acc)
        for r0 in range(0, a.shape[0], chunk_rows):
            dots = mm_acc(am[r0:r0 + chunk_rows], cm.T, acc)
            dots.mul_(scale.to(acc))
            if hn_weight != 0.0:
                idx = torch.arange(dots.shape[0], device=dots.device)
                dots[idx, idx + r0 + hn_offset] += hn_weight
            lse[r0:r0 + chunk_rows] = torch.logsumexp(dots, dim=1)
        ctx.save_for_backward(a, c, scale, lse)
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        hn_weight, hn_offset, n_grad_cols, chunk_rows, precompute, n_cols = ctx.config
        if precompute:
            claim_precomputed_grads(ctx)
            da, dc, dscale = ctx.saved_tensors
            g = grad_lse[0].to(da.dtype)  # uniform upstream (see the class docstring)
            # scaled in place: the saved gradients become the returned ones (no second N x D and
            # M x D copy at the memory peak), which is why a second backward is refused above
            ga, gc, gs = da.mul_(g), dc.mul_(g), dscale * g
        else:
            a, c, scale, lse = ctx.saved_tensors
            ga, gc, gs = chunked_backward(a, c, scale, lse, grad_lse, hn_weight, hn_offset, n_grad_cols,
                                          chunk_rows, matmul_dtype=lse.dtype)
        gc = _pad_queue_rows(gc, n_cols)
        needs, (a_dtype, c_dtype, s_dtype) = ctx.needs_input_grad, ctx.dtypes
        return (ga.to(a_dtype) if needs[0] else None, gc.to(c_dtype) if needs[1] else None,
                gs.to(s_dtype) if needs[2] else None, None, None, None, None, None)


def chunked_lse(a, c, scale, hn_weight, hn_offset, *, n_grad_cols=None, chunk_rows=None, uniform_upstream=False):
    n_grad_cols = c.shape[0] if n_grad_cols is None else n_grad_cols
    chunk_rows = chunk_rows or default_chunk_rows(c.shape[0])
    return _ChunkedLSE.apply(a, c, scale, hn_weight, hn_offset, n_grad_cols, chunk_rows, uniform_upstream)


def rowwise_lse(backend: str, a, c, scale, hn_weight, hn_offset, *, n_grad_cols, uniform_upstream, chunk_rows=None):
    """``lse_i = log sum_j exp(scale <a_i, c_j> + w [j == hn_offset + i])`` on the fused backends."""
    if backend == "chunked":
        return chunked_lse(a, c, scale, hn_weight, hn_offset, n_grad_cols=n_grad_cols,
                           chunk_rows=chunk_rows, uniform_upstream=uniform_upstream)
    from fastcse.kernels.infonce import triton_lse

    return triton_lse(a, c, scale, hn_weight, hn_offset, n_grad_cols=n_grad_cols,
                      uniform_upstream=uniform_upstream, chunk_rows=chunk_rows)


class _NormalizeRows(torch.autograd.Function):
    """``x / max(||x||, 1e-12)`` per row, as ``F.normalize``, but saving only ``x`` (the caller's
    tensor, no new memory) and the inverse norms: F.normalize keeps its normalised output alive
    for backward, an extra (N + M) x D that the fused backends exist to avoid."""

    @staticmethod
    def forward(ctx, x):
        acc = accumulation_dtype(x.dtype)
        inv_norm = torch.linalg.vector_norm(x, dim=1, dtype=acc).clamp_min(1e-12).reciprocal()
        ctx.save_for_backward(x, inv_norm)
        return (x * inv_norm[:, None].to(x.dtype)) if x.dtype == acc else (x.to(acc) * inv_norm[:, None]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        # d(x r)/dx applied to g: r (g - x_hat <x_hat, g>) = r g - x (r^3 <x, g>). Written with a
        # batched dot and one addcmul so the only (rows, D) allocation is the result: this runs
        # at the loss's memory peak, where each temporary would cost a full copy of the input.
        x, inv_norm = ctx.saved_tensors
        acc = inv_norm.dtype
        x, grad = x.to(acc), grad.to(acc)
        radial = torch.bmm(x.unsqueeze(1), grad.unsqueeze(2)).squeeze_(2)  # (rows, 1) <x, g>
        coef = radial.mul_(inv_norm[:, None] ** 3)
        out = torch.addcmul(grad * inv_norm[:, None], x, coef, value=-1.0)
        return out.to(ctx.saved_tensors[0].dtype)


def _lean_normalize(parts: Sequence[Tensor]) -> Tensor:
    """Normalise each block and concatenate, keeping no normalised copy for backward."""
    normed = [_NormalizeRows.apply(p) if p.requires_grad else F.normalize(p, dim=-1) for p in parts]
    return torch.cat(normed) if len(normed) > 1 else normed[0]


def _cosine_rows(x: Tensor, y: Tensor, acc: torch.dtype) -> Tensor:
    """cos(x_i, y_i) per row from the raw rows (no normalised copies saved for backward)."""
    dots = (x * y).sum(dim=1, dtype=acc)
    norms = torch.linalg.vector_norm(x, dim=1, dtype=acc) * torch.linalg.vector_norm(y, dim=1, dtype=acc)
    return dots / norms.clamp_min(1e-24)


def _direction_loss(backend, rows, candidate_parts, targets, scale, *, hn_weight, hn_offset, target_offset,
                    n_grad_cols, reduction, chunk_rows):
    """Cross-entropy of one direction: raw ``rows`` (N, D) against the concatenated raw
    ``candidate_parts`` (M rows in all; the queue, if any, last and detached). ``targets`` are
    the raw candidate rows ``target_offset .. target_offset + N`` (this rank's own block), from
    which the target logit is computed directly."""
    n = rows.shape[0]
    if backend == "eager":
        a_hat = F.normalize(rows, dim=-1)
        c_hat = F.normalize(torch.cat(candidate_parts) if len(candidate_parts) > 1 else candidate_parts[0], dim=-1)
        logits = scale * (a_hat @ c_hat.T)
        if hn_weight != 0.0:
            idx = torch.arange(n, device=rows.device)
            bias = torch.zeros_like(logits)
            bias[idx, idx + hn_offset] = hn_weight
            logits = logits + bias
        target_ids = torch.arange(n, device=rows.device) + target_offset
        return F.cross_entropy(logits, target_ids, reduction=reduction)
    lse = rowwise_lse(backend, _lean_normalize([rows]), _lean_normalize(candidate_parts), scale, hn_weight,
                      hn_offset, n_grad_cols=n_grad_cols, uniform_upstream=reduction != "none",
                      chunk_rows=chunk_rows)
    per_row = lse - scale * _cosine_rows(rows, targets, lse.dtype)
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def info_nce(
    anchors: Tensor,
    positives: Tensor,
    hard_negatives: Union[Tensor, Sequence[Tensor], None] = None,
    *,
    temperature: Union[float, Tensor] = 0.05,
    hard_negative_weight: float = 0.0,
    queue: Optional[Tensor] = None,
    symmetric: bool = False,
    gather_across_ranks: bool = False,
    reduction: Reduction = "mean",
    backend: Backend = "auto",
    chunk_rows: Optional[int] = None,
) -> Tensor:
    """InfoNCE / SimCSE contrastive loss without the N x M similarity matrix in memory.

    Candidates are ``C = [positives; hard_negatives; queue]`` (M rows); anchors and candidates are
    L2-normalised inside the op, and anchor i's target is candidate i::

        logits_ij = cos(anchor_i, C_j) / temperature  (+ hard_negative_weight if j == N + i)
        loss_i    = logsumexp_j(logits_ij) - logits_ii

    Args:
        anchors: ``(N, D)`` embeddings (fp16 / bf16 / fp32; fp64 on the chunked and eager backends).
        positives: ``(N, D)``; row i is anchor i's positive.
        hard_negatives: optional ``(N, D)``; row i is anchor i's hard negative (SimCSE supervised).
            A list of ``(N, D)`` tensors gives several hard-negative columns (sentence-transformers'
            ``(anchor, positive, negative_1, ..., negative_k)`` inputs); they join the candidates
            in that order.
        temperature: float or 0-d tensor (a learnable temperature gets its gradient). This is
            sentence-transformers' ``1 / scale`` (scale 20 == temperature 0.05).
        hard_negative_weight: added to logit ``(i, N + i)``, as SimCSE's ``--hard_negative_weight``
            (needs exactly one hard-negative column).
        queue: optional ``(K, D)`` extra negatives without gradient (ESimCSE / MoCo queue).
        symmetric: also score positives against anchors (CLIP style) and average both directions.
        gather_across_ranks: all-gather positives and hard negatives (and anchors, if symmetric)
            from every rank of the default process group **with gradient**; anchor i of rank r
            targets column ``r * N + i``. Every rank must pass the same N. No-op in one process.
        reduction: ``"mean"`` | ``"sum"`` over this rank's anchors, or ``"none"`` for ``(N,)``.
        backend: ``"auto"`` (Triton on CUDA, chunked otherwise), ``"triton"``, ``"chunked"``,
            ``"eager"`` (materialised reference).
        chunk_rows: rows of logits per chunk for the chunked backend (default: ~2M logits).

    Returns:
        A scalar (``mean`` / ``sum``) or ``(N,)`` per-anchor losses (``none``), in fp32 (fp64 for
        fp64 inputs).

    Example:
        >>> import torch, fastcse
        >>> a, p = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32)
        >>> loss = fastcse.info_nce(a, p, temperature=0.05)
        >>> loss.backward()
    """
    check_inputs(anchors, positives, hard_negatives, queue, temperature, hard_negative_weight,
                 reduction, backend)
    resolved = resolve_backend(backend, anchors.device, anchors.dtype)
    n = anchors.shape[0]

    rank, world = 0, 1
    if gather_across_ranks:
        from fastcse.distributed import all_gather_with_grad, world_info

        rank, world = world_info()
    hard_columns = hard_negative_columns(hard_negatives)
    if world > 1:
        positives_all = all_gather_with_grad(positives)
        hard_all = [all_gather_with_grad(h) for h in hard_columns]
    else:
        positives_all, hard_all = positives, hard_columns

    acc_dtype = accumulation_dtype(anchors.dtype)
    if isinstance(temperature, torch.Tensor):
        scale = temperature.to(device=anchors.device, dtype=acc_dtype).reshape(()).reciprocal()
    else:
        scale = torch.tensor(1.0 / temperature, dtype=acc_dtype, device=anchors.device)

    parts = [positives_all] + hard_all
    n_grad_cols = sum(p.shape[0] for p in parts)
    if queue is not None and queue.shape[0] > 0:
        parts.append(queue.detach())
    loss = _direction_loss(
        resolved, anchors, parts, positives, scale, hn_weight=float(hard_negative_weight),
        hn_offset=(world + rank) * n, target_offset=rank * n,
        n_grad_cols=n_grad_cols, reduction=reduction, chunk_rows=chunk_rows,
    )
    if symmetric:
        anchors_all = all_gather_with_grad(anchors) if world > 1 else anchors
        reverse = _direction_loss(
            resolved, positives, [anchors_all], anchors, scale, hn_weight=0.0, hn_offset=0,
            target_offset=rank * n, n_grad_cols=anchors_all.shape[0], reduction=reduction,
            chunk_rows=chunk_rows,
        )
        loss = (loss + reverse) / 2
    return loss
