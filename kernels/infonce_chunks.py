"""The InfoNCE loss's row-chunk loop: pure PyTorch, shared by the chunked and the Triton tiers.

One direction of the loss, in the notation of :mod:`fastcse.infonce`, on the *raw* rows (the
L2 normalisation is folded in, so no normalised copy of any input is ever made)::

    r_i = 1 / max(|x_i|, eps)    q_j = 1 / max(|y_j|, eps)      x: (N, D) anchors, y: (M, D) candidates
    s_ij = scale r_i q_j <x_i, y_j> + w [j == hn_offset + i]
    loss_i = lse_i - s_i,t(i)        t(i) = target_offset + i  (a row of the first candidate part)

The candidates come as a list of parts (positives, hard negatives, queue: the columns, in that
order); they are never concatenated: each part's dot products are written into its own column
slice of the chunk buffer, and each part's matmuls read its own slice.

Gradients of ``sum_i g_i loss_i``: with ``p_ij = exp(s_ij - lse_i)`` and the weights that the
chunk's row softmax writes in place of the dot products, ``W_ij = p_ij c_j`` (``c_j = q_j``, times a
constant headroom factor for fp16, see :data:`FP16_WEIGHT_HEADROOM`)::

    u_i   = sum_j (p_ij - [j = t(i)]) q_j y_j  = (W y)_i / kappa - q_t(i) y_t(i)
    dx_i  = g_i scale r_i (u_i - r_i^2 <x_i, u_i> x_i)
    Vc_j  = q_j sum_i g_i (p_ij - [j = t(i)]) r_i x_i = (W^T x~)_j / kappa - [j = t(i)] q_j g_i r_i x_i
    dy_j  = scale (Vc_j - q_j^2 <y_j, Vc_j> y_j)          x~_i = g_i r_i x_i
    dscale = sum_i g_i r_i <x_i, u_i>

Per chunk of R anchor rows: one matmul per part for the dot products, the row softmax (in place,
writing the loss pieces, ``W`` and ``x~``), ``W y`` (R x D, finished into dx rows at once) and
``V += W^T x~`` accumulated in fp32 inside the GEMM (cuBLAS ``beta = 1``): the only (M, D) buffer.
The row softmax is :func:`torch_rows_softmax_` here or the fused Triton kernel of
:mod:`fastcse.kernels.infonce` (``rows_softmax_``), with the same contract.

The loop lives in the kernel layer so that the Triton fast path runs it without calling back
into the engine, and in its own module, with no Triton import, so that the chunked tier of
:mod:`fastcse.infonce` loads and runs where Triton is not installed.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

NORM_EPS = 1e-12  # as F.normalize: x / max(|x|, eps)

# fp16 weights are stored as p_ij * q_j * 2**15 / max_j q_j: never above 2**15 (< 65504), while
# probabilities down to ~1e-12 of a row stay representable. bf16 and fp32 have fp32's exponent
# range and store p_ij * q_j as is.
FP16_WEIGHT_HEADROOM = 2.0 ** 15

# Rows per chunk on CUDA. The candidate-gradient GEMM of a chunk, V += W^T x~, moves 2 R M (W) +
# 8 M D (the fp32 accumulator, read and written by the GEMM epilogue) bytes for 2 R M D FLOPs: it
# stays matmul-bound while R >= 8 D / (2 D B / F - 2), B / F the card's bytes per FLOP (H200:
# 4.3 TB/s / 788 TFLOP/s): R >= 963 at D = 768, 892 at D = 1024. The chunk buffer is then R x M in
# bf16 (128 MiB at M = 65536), under the fp32 accumulator it feeds (4 M D bytes) for every D >= 256.
GPU_CHUNK_ROWS = 1024

# Elements per chunk on CPU (fp32): 2**23 (32 MiB of dot products, 512 rows at M = 16384). Measured
# with bench_infonce's step at N = 8192, M = 16384, D = 768 on this 2-thread CPU (process time,
# interleaved with eager, shared machine): 2**22 -> 1.24x eager's time and 1/12 of its memory,
# 2**23 -> 0.97x and 1/10.7, 2**24 -> 0.89x and 1/8.7: larger chunks make fewer, larger GEMMs
# and fewer passes over the candidate accumulator. At least 256 rows, so that the accumulator
# (M x D fp32, read and written by every chunk's GEMM) stays a small part of a chunk's work at any M.
CPU_CHUNK_ELEMENTS = 1 << 23
CPU_MIN_CHUNK_ROWS = 256


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16 / bf16 / fp32 inputs, fp64 for fp64: lse, logits and gradients use it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused_matmul_dtype(x: Tensor) -> torch.dtype:
    """Operand dtype of the chunk matmuls: the input's on CUDA (tensor cores), the accumulation
    dtype elsewhere (CPU half-precision matmuls are slow and round their outputs)."""
    return x.dtype if x.is_cuda else accumulation_dtype(x.dtype)


def default_chunk_rows(n_rows: int, n_cols: int, on_gpu: bool) -> int:
    """Anchor rows per chunk: :data:`GPU_CHUNK_ROWS` on CUDA, a :data:`CPU_CHUNK_ELEMENTS`
    budget of dot products (at least :data:`CPU_MIN_CHUNK_ROWS` rows) on CPU; never more than
    the rows there are."""
    rows = GPU_CHUNK_ROWS if on_gpu else max(CPU_MIN_CHUNK_ROWS, CPU_CHUNK_ELEMENTS // max(1, n_cols))
    return max(1, min(n_rows, rows))


def inverse_norms(x: Tensor, acc: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
    """``1 / max(|x_i|, eps)`` per row, in ``acc`` (an inf or NaN row gives 0 or NaN)."""
    norms = torch.linalg.vector_norm(x, dim=1, dtype=acc, out=out)
    return norms.clamp_min_(NORM_EPS).reciprocal_()


class Problem:
    """One direction of the loss, everything its chunks share.

    Args:
        x: (N, D) raw anchor rows.
        parts: raw candidate blocks (M_k, D), same D and dtype as ``x``; their rows are the
            columns of the logits, in order.
        scale: 0-d tensor, 1 / temperature.
        hn_weight, hn_offset: ``hn_weight`` is added to logit (i, hn_offset + i); 0 disables it.
        target_offset: anchor i's target is column ``target_offset + i``, inside ``parts[0]``.
        n_grad_parts: gradients are formed for ``parts[:n_grad_parts]`` only (the queue is last).
        mm_dtype: operand dtype of the chunk matmuls (:func:`fused_matmul_dtype`).
    """

    def __init__(self, x: Tensor, parts: Sequence[Tensor], scale: Tensor, hn_weight: float, hn_offset: int,
                 target_offset: int, n_grad_parts: int, mm_dtype: torch.dtype):
        self.x, self.parts = x, list(parts)
        self.acc = accumulation_dtype(x.dtype)
        self.scale = scale.to(self.acc).reshape(())
        self.hn_weight, self.hn_offset, self.target_offset = float(hn_weight), int(hn_offset), int(target_offset)
        self.n_grad_parts = int(n_grad_parts)
        self.mm_dtype = mm_dtype
        # raw dot products of unnormalised fp16 rows can pass 65504: fp16 keeps them in fp32
        self.dots_dtype = self.acc if mm_dtype == torch.float16 else mm_dtype
        self.offsets = [0]
        for p in self.parts:
            self.offsets.append(self.offsets[-1] + p.shape[0])
        self.n_cols = self.offsets[-1]
        self.rx = inverse_norms(x, self.acc)
        q = torch.empty(self.n_cols, dtype=self.acc, device=x.device)
        for p, o in zip(self.parts, self.offsets):
            torch.linalg.vector_norm(p, dim=1, dtype=self.acc, out=q[o:o + p.shape[0]])
        self.q = q.clamp_min_(NORM_EPS).reciprocal_()
        # kappa: weights are p q_j kappa; a 0-d tensor (fp16), or None for 1
        self.col_scale = (q.amax().reciprocal_().mul_(FP16_WEIGHT_HEADROOM)
                          if mm_dtype == torch.float16 else None)
        self.xm = x.to(mm_dtype)
        self.parts_m = [p.to(mm_dtype) for p in self.parts]

    def columns(self, k: int) -> slice:
        return slice(self.offsets[k], self.offsets[k + 1])


# --------------------------------------------------------------------------------------------
# matmuls into given buffers (fp32 out of half-precision operands on CUDA, no temporaries)
# --------------------------------------------------------------------------------------------

_HAS_MM_DTYPE_OUT = hasattr(torch.ops.aten.mm, "dtype_out")
# Whether torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc) accumulates fp32 out of half
# operands in one GEMM on this PyTorch (it does since pytorch/pytorch#167931; older builds require
# `acc` to have the operands' dtype). None: not tried yet; False: add_ a product instead.
_ADDMM_FP32_INTO_SELF: Optional[bool] = None


def mm_into(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``out = a @ b``; ``out`` may be a column slice (unit stride along a row) and may be fp32
    for half-precision operands (written by the GEMM itself on CUDA)."""
    if out.dtype == a.dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda and _HAS_MM_DTYPE_OUT:
        return torch.mm(a, b, out_dtype=out.dtype, out=out)
    if a.is_cuda:  # a PyTorch without out_dtype matmuls: half-precision product, then a copy
        return out.copy_(a @ b)
    # elsewhere (CPU tests of the CUDA dtypes): the same fp32 accumulation and output, by upcasting
    return torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def mm_new(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ b`` in ``dtype`` (fp32 straight from the GEMM for half operands on CUDA)."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=dtype, device=a.device)
    return mm_into(out, a, b)


def addmm_into_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` inside the GEMM (beta = 1): no (rows, cols) temporary, one read and one
    write of ``acc``. Half-precision operands accumulate into an fp32 ``acc`` through addmm's
    ``out_dtype`` with ``out`` aliasing ``acc`` where this PyTorch allows it; elsewhere through a
    product and an add."""
    global _ADDMM_FP32_INTO_SELF
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _ADDMM_FP32_INTO_SELF is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _ADDMM_FP32_INTO_SELF = True
            return
        except RuntimeError:  # refused by the dtype checks, before the GEMM ran: acc is intact
            if _ADDMM_FP32_INTO_SELF:
                raise
            _ADDMM_FP32_INTO_SELF = False
    acc.add_(mm_new(a, b, acc.dtype))


# --------------------------------------------------------------------------------------------
# the row softmax of a chunk (PyTorch twin of the Triton kernel)
# --------------------------------------------------------------------------------------------


def same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors are the same elements of the same storage (meta tensors included)."""
    return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset()
            and a.untyped_storage()._cdata == b.untyped_storage()._cdata)

def torch_rows_softmax_(prob: Problem, dots: Tensor, weights: Optional[Tensor], row0: int, lse: Tensor,
                        tgt: Optional[Tensor], grad_rows: Optional[Tensor], x_tilde: Optional[Tensor],
                        compute_lse: bool, radial: Optional[Tensor] = None) -> bool:
    """The row softmax of a chunk of raw dot products, in place.

    ``dots``: (R, M) ``<x_i, y_j>`` of anchors ``row0 .. row0 + R`` against every candidate.
    With ``compute_lse`` it writes ``lse[row0:row0 + R]`` and the target logits ``tgt[...]``;
    otherwise it reads ``lse``. With ``weights`` ((R, M), the matmul dtype, possibly ``dots``
    itself) it writes ``W_ij = p_ij q_j kappa`` there and ``x~_i = g_i r_i x_i`` into ``x_tilde``
    ((R, D); ``g`` is ``grad_rows``, or 1). ``dots`` is overwritten. The Triton twin is
    ``fastcse.kernels.infonce.rows_softmax_``; it also writes ``radial`` ((R,), the anchor
    gradient's radial dot ``<x_i, u_i> = sum_j p_ij q_j <x_i, y_j> - q_t <x_i, y_t>``) from the dots
    it reads and returns True, where this twin leaves it to the caller and returns False.
    """
    n = dots.shape[0]
    rows = slice(row0, row0 + n)
    s = dots if dots.dtype == prob.acc else dots.to(prob.acc)
    s.mul_((prob.rx[rows] * prob.scale)[:, None]).mul_(prob.q[None, :])
    idx = torch.arange(n, device=dots.device) if (compute_lse or prob.hn_weight != 0.0) else None
    if prob.hn_weight != 0.0:
        s[idx, idx + row0 + prob.hn_offset] += prob.hn_weight
    if compute_lse:
        tgt[rows] = s[idx, idx + row0 + prob.target_offset]
        m = s.amax(dim=1, keepdim=True)
        e = s.sub_(m).exp_()
        total = e.sum(dim=1, keepdim=True)
        lse[rows] = (m + total.log()).squeeze(1)
        if weights is not None:
            e.div_(total)
    else:
        e = s.sub_(lse[rows, None]).exp_()
    if weights is None:
        return False
    e.mul_(prob.q[None, :])
    if prob.col_scale is not None:
        e.mul_(prob.col_scale)
    if not same_memory(e, weights):
        weights.copy_(e)
    factor = prob.rx[rows] if grad_rows is None else prob.rx[rows] * grad_rows[rows]
    torch.mul(prob.x[rows], factor[:, None], out=x_tilde)
    return False


def torch_finish_rows_(u: Tensor, w: Tensor, out: Tensor, a: Tensor, c: Tensor, radial: Tensor,
                       radial_known: bool, col_scale: Optional[Tensor], z: Optional[Tensor] = None,
                       b: Optional[Tensor] = None, z_lo: int = 0) -> None:
    """Rows of a gradient through the normalisation, from accumulated rows ``u`` (fp32, in place)::

        u'_i  = u_i / kappa - b_(i - z_lo) z_(i - z_lo)      (rows z_lo .. z_lo + len(z); the target term)
        rho_i = radial_i if radial_known, else <w_i, u'_i> (written to radial)
        out_i = a_i (u'_i - c_i rho_i w_i)

    ``w``: the rows' own raw inputs; ``a``: (rows,) or a 0-d tensor; ``out`` may be ``u``. The
    Triton twin is ``fastcse.kernels.infonce.finish_rows_``.
    """
    if col_scale is not None:
        u.div_(col_scale)
    if z is not None:
        u[z_lo:z_lo + z.shape[0]].addcmul_(z, b[:, None], value=-1.0)
    if not radial_known:
        block = 4096
        for j0 in range(0, u.shape[0], block):
            j1 = min(u.shape[0], j0 + block)
            torch.bmm(w[j0:j1].to(u.dtype).unsqueeze(1), u[j0:j1].unsqueeze(2), out=radial[j0:j1].view(-1, 1, 1))
    u.addcmul_(w, (c * radial)[:, None], value=-1.0)
    torch.mul(u, a[:, None] if a.dim() else a, out=out)


class ChunkOps(NamedTuple):
    """The device pieces of the loop: the row softmax, the row finish, and whether the
    candidates' gradients may be views of one accumulator (not for custom-op outputs, which may
    not alias each other)."""

    softmax_: Callable[..., bool]
    finish_rows_: Callable[..., None]
    views_ok: bool


TORCH_OPS = ChunkOps(torch_rows_softmax_, torch_finish_rows_, True)


# --------------------------------------------------------------------------------------------
# the loops
# --------------------------------------------------------------------------------------------


def _chunk_dots(prob: Problem, dots: Tensor, r0: int, r1: int) -> None:
    xr = prob.xm[r0:r1]
    for k, part in enumerate(prob.parts_m):
        mm_into(dots[:, prob.columns(k)], xr, part.T)


def loss_rows(prob: Problem, chunk_rows: int, ops: ChunkOps = TORCH_OPS) -> tuple[Tensor, Tensor]:
    """``(lse, tgt)``, (N,) each in the accumulation dtype, chunk by chunk (2NMD FLOPs, one
    R x M buffer): ``loss_i = lse_i - tgt_i``."""
    n = prob.x.shape[0]
    lse = torch.empty(n, dtype=prob.acc, device=prob.x.device)
    tgt = torch.empty_like(lse)
    rows = max(1, min(n, chunk_rows))
    dots = torch.empty((rows, prob.n_cols), dtype=prob.dots_dtype, device=prob.x.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        chunk = dots[:r1 - r0]
        _chunk_dots(prob, chunk, r0, r1)
        ops.softmax_(prob, chunk, None, r0, lse, tgt, None, None, True)
    return lse, tgt


def gradient_pass(prob: Problem, chunk_rows: int, ops: ChunkOps, *, lse: Tensor, tgt: Optional[Tensor],
                  grad_rows: Optional[Tensor], row_weight: float, compute_lse: bool
                  ) -> tuple[Tensor, List[Tensor], Tensor]:
    """Gradients of ``sum_i g_i loss_i`` (``g = grad_rows``, or the constant ``row_weight``):
    ``(dx, [dy_k for the grad parts], dscale)``, dx and dy in their inputs' dtypes, dscale 0-d in
    the accumulation dtype. With ``compute_lse`` it also writes ``lse`` and ``tgt`` (the forward
    pass of a mean / sum reduction: 6NMD FLOPs in all); otherwise it reads ``lse`` (a backward
    that recomputes: 4NMD).

    Memory: dx, one fp32 accumulator for all grad parts' gradients (their columns are contiguous:
    one GEMM per chunk) and one set of chunk buffers (R x M dot products, overwritten by the
    weights; R x D for x~ and W y), reused by every chunk and freed before the candidates'
    gradients are finished.
    """
    x, acc, dev = prob.x, prob.acc, prob.x.device
    n, dim = x.shape
    rows = max(1, min(n, chunk_rows))
    dots_buf = torch.empty((rows, prob.n_cols), dtype=prob.dots_dtype, device=dev)
    weights_buf = dots_buf if prob.dots_dtype == prob.mm_dtype else torch.empty(
        (rows, prob.n_cols), dtype=prob.mm_dtype, device=dev)
    x_tilde_buf = torch.empty((rows, dim), dtype=prob.mm_dtype, device=dev)
    u_buf = torch.empty((rows, dim), dtype=acc, device=dev)
    dx = torch.empty_like(x)
    radial = torch.empty(n, dtype=acc, device=dev)  # <x_i, u_i>
    g_r = prob.rx if grad_rows is None else prob.rx * grad_rows  # g_i r_i
    # dx_i = a_i (u_i - r_i^2 <x_i, u_i> x_i), a_i = g_i scale r_i (times a mean's 1 / N)
    row_factor = g_r * (prob.scale * row_weight)
    rx_sq = prob.rx * prob.rx
    accum: Optional[Tensor] = None  # sum over chunks of W_g^T x~, (M_g, D): the grad parts' rows
    grad_cols = slice(0, prob.offsets[prob.n_grad_parts])
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        dots, weights = dots_buf[:r1 - r0], weights_buf[:r1 - r0]
        x_tilde, u = x_tilde_buf[:r1 - r0], u_buf[:r1 - r0]
        _chunk_dots(prob, dots, r0, r1)
        rad = radial[r0:r1]
        known = ops.softmax_(prob, dots, weights, r0, lse, tgt, grad_rows, x_tilde, compute_lse, radial=rad)
        for k, part in enumerate(prob.parts_m):
            if k == 0:
                mm_into(u, weights[:, prob.columns(k)], part)
            else:
                addmm_into_(u, weights[:, prob.columns(k)], part)
        if prob.n_grad_parts:
            if accum is None:  # the first chunk writes the accumulator: no zero fill
                accum = mm_new(weights[:, grad_cols].T, x_tilde, acc)
            else:
                addmm_into_(accum, weights[:, grad_cols].T, x_tilde)
        t0 = prob.target_offset + r0
        ops.finish_rows_(u, prob.x[r0:r1], dx[r0:r1], row_factor[r0:r1], rx_sq[r0:r1], rad, known, prob.col_scale,
                         z=prob.parts[0][t0:t0 + r1 - r0], b=prob.q[t0:t0 + r1 - r0])
    del dots_buf, weights_buf, x_tilde_buf, u_buf, dots, weights, x_tilde, u  # chunk buffers die here
    dscale = torch.dot(g_r, radial).mul_(row_weight)
    grads = _finish_candidates(prob, ops, accum, g_r, row_weight) if prob.n_grad_parts else []
    return dx, grads, dscale


def _finish_candidates(prob: Problem, ops: ChunkOps, accum: Tensor, g_r: Tensor, row_weight: float) -> List[Tensor]:
    """The accumulated ``W_g^T x~`` into each grad part's gradient, in the part's dtype (views of
    the accumulator itself where ``ops.views_ok`` and the dtypes match)."""
    t0, n = prob.target_offset, prob.x.shape[0]
    q_sq = prob.q[:accum.shape[0]] * prob.q[:accum.shape[0]]
    factor = prob.scale * row_weight
    radial = torch.empty(accum.shape[0], dtype=prob.acc, device=accum.device)
    grads = []
    for k in range(prob.n_grad_parts):
        y, cols = prob.parts[k], prob.columns(k)
        v = accum[cols]
        out = v if (ops.views_ok and v.dtype == y.dtype) else torch.empty_like(y)
        # part 0 holds the targets: column t(i) = target_offset + i loses q_t g_i r_i x_i
        target = dict(z=prob.x, b=prob.q[t0:t0 + n] * g_r, z_lo=t0) if k == 0 else {}
        ops.finish_rows_(v, y, out, factor, q_sq[cols], radial[cols], False, prob.col_scale, **target)
        grads.append(out)
    return grads


def forward_with_grads(prob: Problem, chunk_rows: int, ops: ChunkOps = TORCH_OPS, *, row_weight: float = 1.0):
    """One pass: ``(lse, tgt, dx, [dy_k], dscale)``, the gradients of ``row_weight * sum_i loss_i``
    (6NMD FLOPs with the backward, which only scales them)."""
    n = prob.x.shape[0]
    lse = torch.empty(n, dtype=prob.acc, device=prob.x.device)
    tgt = torch.empty_like(lse)
    dx, grads, dscale = gradient_pass(prob, chunk_rows, ops, lse=lse, tgt=tgt, grad_rows=None,
                                      row_weight=row_weight, compute_lse=True)
    return lse, tgt, dx, grads, dscale


def backward_recompute(prob: Problem, lse: Tensor, grad_rows: Tensor, chunk_rows: int, ops: ChunkOps = TORCH_OPS):
    """Gradients of ``sum_i grad_rows_i * loss_i`` from the saved ``lse``, recomputing each chunk
    (4NMD FLOPs on top of the forward's 2NMD): ``(dx, [dy_k], dscale)``."""
    return gradient_pass(prob, chunk_rows, ops, lse=lse, tgt=None, grad_rows=grad_rows.to(prob.acc),
                         row_weight=1.0, compute_lse=False)


def reduce_rows(per_row: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def anticipated_row_weight(reduction: str, n_rows: int) -> float:
    """The upstream gradient each row's loss gets from a mean (1 / N) or a sum (1)."""
    return 1.0 / n_rows if reduction == "mean" else 1.0


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
