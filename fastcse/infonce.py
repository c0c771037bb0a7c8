"""The contrastive (InfoNCE) loss: input checks, the eager reference, the chunked twin, dispatch.

Notation used throughout (see ``info_nce`` for the user-facing contract)::

    r_i = 1 / ||anchors_i||,  q_j = 1 / ||candidates_j||     i < N (rows), j < M (columns)
    s_ij = scale r_i q_j <anchors_i, candidates_j> + w * [j == hn_offset + i]   scale = 1 / temperature
    loss_i = log sum_j exp(s_ij) - s_{i, target_offset + i}

The fused backends compute ``loss_i`` and its gradients in one op on the raw rows: the L2
normalisation, the target logit and the hard-negative weight are folded into it, so no normalised
copy of any input and no concatenation of the candidates is ever made. The three tiers:

* ``eager``: materialises the N x M logits; the reference of the tests and the benchmarks.
* ``chunked``: pure PyTorch, row chunks of at most ``chunk_rows`` x M dot products at a time;
  with a mean / sum reduction the gradients are formed during the forward pass.
* ``triton``: ``fastcse.kernels.infonce``: without gradients (or for per-row upstream gradients)
  a tile kernel split across candidate columns with an online log-sum-exp (never the N x M
  matrix); for training, the row-chunk loop with a fused Triton row softmax between cuBLAS matmuls.

The row-chunk loop both fused tiers share (``forward_with_grads`` / ``backward_recompute``, the
gradient formulas in its docstring) is pure PyTorch and lives in the kernel layer,
:mod:`fastcse.kernels.infonce_chunks`, which imports without Triton: the Triton tier runs it
without calling back into this module, and the chunked tier here still loads where Triton is not
installed.

Input values (NaN / inf, a temperature tensor <= 0) are checked without stopping the GPU: on CPU
tensors before the loss is computed (a host read costs nothing there); on CUDA from the loss itself,
read back asynchronously and raised as a ``ValueError`` by the next ``info_nce`` call or by
:func:`raise_deferred_input_errors` (see :func:`check_values`).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcse.kernels._triton_utils import interpreted, triton_available
from fastcse.kernels.infonce_chunks import (
    Problem,
    accumulation_dtype,
    anticipated_row_weight,
    backward_recompute,
    claim_precomputed_grads,
    default_chunk_rows,
    forward_with_grads,
    fused_matmul_dtype,
    loss_rows,
    reduce_rows,
)

Backend = Literal["auto", "triton", "chunked", "eager"]
Reduction = Literal["mean", "sum", "none"]
BACKENDS = ("auto", "triton", "chunked", "eager")
REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    """Raise a ``TypeError`` / ``ValueError`` naming the problem; never let a kernel see bad input.

    Shapes, dtypes, devices and arguments are checked on the host. Values (NaN / inf in the
    inputs, a temperature tensor <= 0) are checked by :func:`check_values` when ``check_finite``:
    here for CPU tensors; for CUDA tensors :func:`info_nce` checks them from its result instead,
    without a host synchronisation.
    """
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
    elif isinstance(temperature, (int, float)):
        if not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    else:
        raise TypeError(f"temperature must be a float or a 0-d tensor, got {type(temperature).__name__}")
    if check_finite and anchors.device.type == "cpu" and not _is_compiling():
        check_values(named, temperature)


def check_values(named: Sequence[tuple[str, Tensor]], temperature) -> None:
    """The value checks, now: NaN / inf in any input (named, with the count of bad rows), and a
    temperature tensor that is not > 0. Each is a host read of a device value: free on CPU, a
    synchronisation on CUDA (where :func:`info_nce` uses :func:`defer_value_check` instead)."""
    if isinstance(temperature, torch.Tensor) and not float(temperature.detach()) > 0:
        raise ValueError(f"temperature must be > 0, got {float(temperature.detach())}")
    for name, x in named:
        if x.numel() and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(dim=1).sum())
            raise ValueError(
                f"{name} contains non-finite values (NaN or inf) in {bad} row(s); "
                "the encoder probably diverged upstream of the loss"
            )


# CUDA value checks in flight: (pinned host flag, CUDA event after its copy, description)
_DEFERRED: list = []

_DEFERRED_MESSAGE = (
    "an earlier info_nce call on {device} returned a non-finite loss: its inputs contained "
    "non-finite values (NaN or inf; the encoder probably diverged upstream of the loss), or its "
    "temperature was not > 0. On CUDA the inputs are checked from the loss without stopping the "
    "GPU, so the error is raised at the next info_nce call (or by "
    "fastcse.infonce.raise_deferred_input_errors())."
)


def _value_flag(loss: Tensor, temperature) -> Tensor:
    """A device bool: the loss is not finite (``loss - loss`` is NaN exactly for NaN and +-inf),
    or a temperature tensor on the loss's device is not > 0. Three small kernels, no host read."""
    bad = (loss - loss).ne_(0)
    if bad.dim():
        bad = bad.any()
    if isinstance(temperature, torch.Tensor) and temperature.device == loss.device:
        bad = bad.logical_or_(temperature.detach().reshape(()) <= 0)
    return bad


def defer_value_check(loss: Tensor, temperature) -> None:
    """Check a CUDA call's values from its result, without a host synchronisation.

    Any NaN / inf in an input reaches the loss (it enters a norm, hence every logit of its row or
    column, hence the log-sum-exp; tests/test_infonce.py checks it for every input), so
    :func:`_value_flag` is one device flag. It is copied to pinned host memory behind a CUDA event
    and read once the event has passed: by the next :func:`info_nce` call, which raises the
    ``ValueError``, or by :func:`raise_deferred_input_errors`. Skipped under ``torch.compile`` and
    CUDA-graph capture; on meta tensors (the performance model) the device ops run and nothing is
    read. A temperature tensor on the CPU is checked on the host at once (no device involved).
    """
    if _is_compiling():
        return
    if isinstance(temperature, torch.Tensor) and temperature.device.type == "cpu":
        check_values([], temperature)
    bad = _value_flag(loss, temperature)
    if loss.is_meta or not loss.is_cuda or torch.cuda.is_current_stream_capturing():
        return
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(bad, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _DEFERRED.append((host, event, str(loss.device)))


def raise_deferred_input_errors(wait: bool = True) -> None:
    """Raise the ``ValueError`` of any CUDA ``info_nce`` call whose inputs were bad.

    ``wait``: block until every pending check has finished (one synchronisation); otherwise only
    look at those already done (no synchronisation: what every ``info_nce`` call does first).
    """
    still = []
    error = None
    for host, event, device in _DEFERRED:
        if wait:
            event.synchronize()
        elif not event.query():
            still.append((host, event, device))
            continue
        if error is None and bool(host):
            error = ValueError(_DEFERRED_MESSAGE.format(device=device))
    _DEFERRED[:] = still
    if error is not None:
        raise error


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
# the loss of one direction, three ways
# --------------------------------------------------------------------------------------------


class _ChunkedLoss(torch.autograd.Function):
    """Pure-PyTorch row-chunked InfoNCE loss of one direction (chunk x M dot products at a time),
    the CPU default; the same loop as the Triton tier with the row softmax in PyTorch.

    Matmuls run in fp32 off CUDA (:func:`fused_matmul_dtype`), so this path is at least as
    accurate as eager in every dtype; gradients come back in the inputs' dtype.

    With a mean / sum reduction and gradients wanted, they are formed during the forward pass
    (6NMD FLOPs in all, the same as eager, instead of 8NMD with recomputation) and backward only
    scales them by the upstream gradient: the trick of Liger-Kernel's fused linear cross-entropy.
    With ``reduction="none"`` backward recomputes.
    """

    @staticmethod
    def forward(ctx, x, scale, config, *parts):
        hn_weight, hn_offset, target_offset, n_grad_parts, reduction, chunk_rows, grad_enabled = config
        needs = ctx.needs_input_grad  # requires_grad of the inputs, whatever the grad mode was
        wants_grad = grad_enabled and (needs[0] or needs[1] or any(needs[3:3 + n_grad_parts]))
        prob = Problem(x, parts, scale, hn_weight, hn_offset, target_offset, n_grad_parts, fused_matmul_dtype(x))
        rows = chunk_rows or default_chunk_rows(x.shape[0], prob.n_cols, x.is_cuda)
        ctx.config = config
        ctx.scale_dtype = scale.dtype
        ctx.precompute = bool(wants_grad and reduction != "none")
        if ctx.precompute:
            lse, tgt, dx, grads, dscale = forward_with_grads(
                prob, rows, row_weight=anticipated_row_weight(reduction, x.shape[0]))
            ctx.save_for_backward(dscale, dx, *grads)
        else:
            lse, tgt = loss_rows(prob, rows)
            if wants_grad:
                ctx.save_for_backward(x, scale, lse, *parts)
        return reduce_rows(lse - tgt, reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        hn_weight, hn_offset, target_offset, n_grad_parts, reduction, chunk_rows, _ = ctx.config
        if ctx.precompute:
            claim_precomputed_grads(ctx)
            dscale, dx, *dparts = ctx.saved_tensors
            # scaled in place: the saved gradients become the returned ones (no second copy at
            # the memory peak), which is why a second backward is refused above
            g = grad_loss.reshape(())
            dscale, dx = dscale * g, dx.mul_(g)
            dparts = [d.mul_(g) for d in dparts]
        else:
            x, scale, lse, *parts = ctx.saved_tensors
            prob = Problem(x, parts, scale, hn_weight, hn_offset, target_offset, n_grad_parts,
                           fused_matmul_dtype(x))
            rows = chunk_rows or default_chunk_rows(x.shape[0], prob.n_cols, x.is_cuda)
            grad_rows = grad_loss.to(lse.dtype).expand(x.shape[0])
            if reduction == "mean":
                grad_rows = grad_rows / x.shape[0]
            dx, dparts, dscale = backward_recompute(prob, lse, grad_rows, rows)
        needs = ctx.needs_input_grad
        n_parts = len(needs) - 3
        part_grads = [d if need else None for d, need in zip(dparts, needs[3:])]
        part_grads += [None] * (n_parts - len(part_grads))
        return (dx if needs[0] else None, dscale.to(ctx.scale_dtype) if needs[1] else None, None, *part_grads)


def _fused_loss(backend: str, rows: Tensor, parts: Sequence[Tensor], scale: Tensor, *, hn_weight: float,
                hn_offset: int, target_offset: int, n_grad_parts: int, reduction: str,
                chunk_rows: Optional[int]) -> Tensor:
    """One direction on the fused backends: raw ``rows`` (N, D) against the raw ``parts`` (their
    rows are the columns; gradients for ``parts[:n_grad_parts]``), the target of row i at column
    ``target_offset + i`` (inside ``parts[0]``)."""
    if backend == "chunked":
        config = (hn_weight, hn_offset, target_offset, n_grad_parts, reduction, chunk_rows, torch.is_grad_enabled())
        return _ChunkedLoss.apply(rows, scale, config, *parts)
    from fastcse.kernels.infonce import triton_loss

    return triton_loss(rows, parts, scale, hn_weight, hn_offset, target_offset, n_grad_parts=n_grad_parts,
                       reduction=reduction, chunk_rows=chunk_rows)


def _eager_loss(rows, candidate_parts, scale, *, hn_weight, hn_offset, target_offset, reduction):
    """The materialised formula: normalise, N x M logits, cross-entropy."""
    n = rows.shape[0]
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


def _direction_loss(backend, rows, candidate_parts, scale, *, hn_weight, hn_offset, target_offset, n_grad_parts,
                    reduction, chunk_rows):
    if backend == "eager":
        return _eager_loss(rows, candidate_parts, scale, hn_weight=hn_weight, hn_offset=hn_offset,
                           target_offset=target_offset, reduction=reduction)
    return _fused_loss(backend, rows, candidate_parts, scale, hn_weight=hn_weight, hn_offset=hn_offset,
                       target_offset=target_offset, n_grad_parts=n_grad_parts, reduction=reduction,
                       chunk_rows=chunk_rows)


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
        chunk_rows: anchor rows per chunk of the fused backends' training path (default: 1024
            on CUDA, about 4M dot products on CPU).

    Returns:
        A scalar (``mean`` / ``sum``) or ``(N,)`` per-anchor losses (``none``), in fp32 (fp64 for
        fp64 inputs). Input gradients come back in the inputs' dtype.

    Raises:
        TypeError / ValueError naming the problem for bad shapes, dtypes or arguments, at the call.
        NaN / inf inputs and a temperature tensor <= 0: at the call for CPU tensors; for CUDA
        tensors at the next call (checked from the loss without a host synchronisation), or by
        :func:`raise_deferred_input_errors`.

    Example:
        >>> import torch, fastcse
        >>> a, p = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32)
        >>> loss = fastcse.info_nce(a, p, temperature=0.05)
        >>> loss.backward()
    """
    if _DEFERRED:
        raise_deferred_input_errors(wait=False)
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
        # a fill kernel, not torch.tensor(...): a host-to-device copy from pageable memory would
        # synchronise the stream
        scale = torch.full((), 1.0 / temperature, dtype=acc_dtype, device=anchors.device)

    parts = [positives_all] + hard_all
    n_grad_parts = len(parts)
    if queue is not None and queue.shape[0] > 0:
        parts.append(queue.detach())
    loss = _direction_loss(
        resolved, anchors, parts, scale, hn_weight=float(hard_negative_weight),
        hn_offset=(world + rank) * n, target_offset=rank * n, n_grad_parts=n_grad_parts,
        reduction=reduction, chunk_rows=chunk_rows,
    )
    if symmetric:
        anchors_all = all_gather_with_grad(anchors) if world > 1 else anchors
        reverse = _direction_loss(
            resolved, positives, [anchors_all], scale, hn_weight=0.0, hn_offset=0,
            target_offset=rank * n, n_grad_parts=1, reduction=reduction, chunk_rows=chunk_rows,
        )
        loss = (loss + reverse) / 2
    if anchors.device.type != "cpu":
        defer_value_check(loss, temperature)
    return loss
