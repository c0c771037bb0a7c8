"""Fused bias + dropout + residual add + LayerNorm: the tail of every post-LN transformer sublayer.

BERT, RoBERTa and XLM-R end each attention block and each MLP with::

    a   = dense(x)                       (the GEMM with its bias)
    z   = dropout(a) + residual
    out = LayerNorm(z)

which eager PyTorch runs as four kernels forward (the GEMM's epilogue adds the bias, then dropout,
add, layer_norm) and four backward (layer_norm_backward, the add's cast, dropout_backward and the
bias gradient's column sum) around the GEMMs. Here the GEMM runs without its bias and one kernel
does the rest: it adds the bias, draws the dropout mask (Philox, :mod:`fastcse.kernels.philox_dropout`:
no mask is stored, the backward redraws it), adds the residual, normalises in fp32 and stores the
output and ``z`` (LayerNorm's backward needs it) with the per-row mean and 1/std. The backward is
one kernel per row block (LayerNorm's input gradient, the residual's gradient, dropout's and the
bias's through the same mask, and column partial sums of the three parameter gradients) and a
small one that adds the partials and writes the gradients in the parameters' dtypes. Under
autocast the output is the fp32 residual stream and the next GEMM wants it in bf16: the forward can
store that copy too (``fastcse::dropout_add_norm_low_fwd``) and the backward then takes both
outputs' gradients and adds them in fp32, where eager runs a cast kernel each way and an add.

Rounding is PyTorch's at every point where eager rounds, so a bf16 model gives what its modules
would up to summation order: ``a`` is rounded to x's dtype after the bias (the bias rounded to x's
dtype first, as autocast casts addmm's bias), dropout's output again, ``z`` to the promoted dtype
of x and the residual; the norm runs in fp32 from the rounded ``z``. (The one difference: eager
rounds ``GEMM + bias`` once, here the GEMM's output is rounded before the bias is added.)

Contents: the ``@triton.jit`` kernels, their launchers, the ``torch.library`` custom ops with their
autograd, and :func:`dropout_keep_rows` (the mask as a tensor, for tests and references). Input
checks, the eager twin and the dispatch live in :mod:`fastcse.dropout_add_norm`.
"""

# No `from __future__ import annotations`: torch.library infers the custom ops' schemas from
# their annotations.
from typing import Optional

import torch
import triton
import triton.language as tl

from fastcse.kernels._triton_utils import interpreted, resident_programs
from fastcse.kernels.philox_dropout import philox_keep

# Elements one program holds per tensor: 4 rows of BERT-base's 768 features (padded to 1024). A
# streaming kernel; the tile barely matters once thousands of rows keep every SM busy.
_ELEMENTS_PER_PROGRAM = 4096
# Columns and partial rows the partial-sum kernel adds per program
_SUM_BLOCK_COLS = 32
_SUM_BLOCK_PARTIALS = 64


@triton.jit
def _round(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 ``x`` in ``dtype``, rounded to nearest even as the GPU's conversion does. Triton's
    interpreter truncates fp32 -> bf16 (its cast keeps the high half), so there the bits are
    rounded first: + 0x7FFF and the lowest kept bit, then the low half cleared."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dropout_add_norm_fwd_kernel(
    X, X_BIAS, RES, W, B, OUT, LOW, Z, STATS, SEED,
    n_rows, dim, stream, dropout_p, drop_scale, eps,
    HAS_X_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_Z: tl.constexpr, STORE_LOW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """One program normalises BLOCK_R rows (Z's dtype is the add's). With STORE_Z, z and the
    statistics are stored: STATS is (2, n_rows) fp32, the rows' means then their 1/std. With
    STORE_LOW the output is stored a second time, rounded to LOW's dtype (the cast autocast would
    make for the next GEMM)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < dim
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * dim + cols[None, :]  # int64: rows * dim passes 2**31

    a = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_X_BIAS:
        x_bias = _round(tl.load(X_BIAS + cols, mask=col_ok, other=0.0).to(tl.float32), X.dtype.element_ty,
                        INTERPRETED)
        a = _round(a.to(tl.float32) + x_bias.to(tl.float32)[None, :], X.dtype.element_ty, INTERPRETED)
    if HAS_DROPOUT:
        keep = philox_keep(tl.load(SEED), stream, rows, 0, dim, dropout_p, BLOCK_R, BLOCK_D)
        a = _round(tl.where(keep, a.to(tl.float32) * drop_scale, 0.0), X.dtype.element_ty, INTERPRETED)
    residual = tl.load(RES + offs, mask=mask, other=0.0)
    z = _round(a.to(tl.float32) + residual.to(tl.float32), Z.dtype.element_ty, INTERPRETED)

    zf = z.to(tl.float32)
    mean = tl.sum(zf, axis=1) / dim
    centred = tl.where(mask, zf - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / dim + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = centred * rstd[:, None] * w[None, :] + b[None, :]
    out = _round(out, OUT.dtype.element_ty, INTERPRETED)
    tl.store(OUT + offs, out, mask=mask)
    if STORE_LOW:
        tl.store(LOW + offs, _round(out.to(tl.float32), LOW.dtype.element_ty, INTERPRETED), mask=mask)
    if STORE_Z:
        tl.store(Z + offs, z, mask=mask)
        tl.store(STATS + rows, mean, mask=row_ok)
        tl.store(STATS + n_rows + rows, rstd, mask=row_ok)


@triton.jit
def _dropout_add_norm_bwd_kernel(
    G, G_LOW, Z, STATS, W, SEED, DX, DRES, PARTIAL,
    n_rows, dim, stream, dropout_p, drop_scale, n_programs,
    HAS_X_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_G_LOW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Program ``pid`` takes row blocks pid, pid + n_programs, ...; its column sums of the weight,
    bias and x-bias gradients go to PARTIAL[0 / 1 / 2, pid]. With HAS_G_LOW the output's gradient
    is G plus G_LOW (the low-precision copy's), added in fp32 as autograd adds the cast's gradient."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_x_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    for block in range(pid, tl.cdiv(n_rows, BLOCK_R), n_programs):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * dim + cols[None, :]
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_G_LOW:
            g += tl.load(G_LOW + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(STATS + rows, mask=row_ok, other=0.0)
        rstd = tl.load(STATS + n_rows + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        wg = g * w[None, :]
        # LayerNorm's input gradient, as PyTorch writes it: rstd (w g - mean(w g) - xhat mean(w g xhat))
        c_xhat = tl.sum(wg * xhat, axis=1) / dim
        c_mean = tl.sum(wg, axis=1) / dim
        dz = _round((wg - xhat * c_xhat[:, None] - c_mean[:, None]) * rstd[:, None], Z.dtype.element_ty,
                    INTERPRETED).to(tl.float32)
        tl.store(DRES + offs, _round(dz, DRES.dtype.element_ty, INTERPRETED), mask=mask)
        # the add hands dropout's output the gradient in x's dtype; dropout scales it through the mask
        da = _round(dz, DX.dtype.element_ty, INTERPRETED)
        if HAS_DROPOUT:
            keep = philox_keep(tl.load(SEED), stream, rows, 0, dim, dropout_p, BLOCK_R, BLOCK_D)
            da = _round(tl.where(keep, da.to(tl.float32) * drop_scale, 0.0), DX.dtype.element_ty, INTERPRETED)
        tl.store(DX + offs, da, mask=mask)
        acc_w += tl.sum(g * xhat, axis=0)
        acc_b += tl.sum(g, axis=0)
        if HAS_X_BIAS:
            acc_x_bias += tl.sum(tl.where(mask, da.to(tl.float32), 0.0), axis=0)
    stride = n_programs * dim
    tl.store(PARTIAL + pid * dim + cols, acc_w, mask=col_ok)
    tl.store(PARTIAL + stride + pid * dim + cols, acc_b, mask=col_ok)
    if HAS_X_BIAS:
        tl.store(PARTIAL + 2 * stride + pid * dim + cols, acc_x_bias, mask=col_ok)


@triton.jit
def _sum_partials_kernel(
    PARTIAL, DPARAMS, n_partials, dim,
    N_SUMS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Adds each of PARTIAL's N_SUMS (n_partials, dim) planes into its row of DPARAMS (N_SUMS, dim),
    in DPARAMS's dtype (the parameters')."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < dim
    for which in tl.static_range(N_SUMS):
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, n_partials, BLOCK_P):
            parts = start + tl.arange(0, BLOCK_P)
            mask = (parts < n_partials)[:, None] & col_ok[None, :]
            offs = (which * n_partials + parts)[:, None] * dim + cols[None, :]
            acc += tl.sum(tl.load(PARTIAL + offs, mask=mask, other=0.0), axis=0)
        tl.store(DPARAMS + which * dim + cols, _round(acc, DPARAMS.dtype.element_ty, INTERPRETED), mask=col_ok)


@triton.jit
def _keep_rows_kernel(MASK, SEED, n_rows, dim, stream, dropout_p, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # writes the keep-mask the kernels above draw (for references and tests)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    keep = philox_keep(tl.load(SEED), stream, rows, 0, dim, dropout_p, BLOCK_R, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < dim)[None, :]
    tl.store(MASK + rows.to(tl.int64)[:, None] * dim + cols[None, :], keep.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------


def _blocks(n_rows: int, dim: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) of a (n_rows, dim) call; the sizes are the caller's to check
    (:func:`fastcse.dropout_add_norm.kernel_fits`: dim <= 16384, 32-bit Philox counters). Warps from the elements a thread holds per tile: 16 forward,
    8 backward (which keeps about twice the live tiles). Compiled for sm_90 at BERT-base's 768 that
    is 104 / 117 registers, 16 resident warps per SM either way; the backward spills at 4 warps
    (255 registers, 40 stack bytes) and 4 warps forward hold 162 (tests/test_dropout_add_norm.py)."""
    block_d = max(16, triton.next_power_of_2(dim))  # philox_keep takes columns in eights
    block_r = max(1, min(16, _ELEMENTS_PER_PROGRAM // block_d, triton.next_power_of_2(max(n_rows, 1))))
    per_thread = block_r * block_d // (4 * 32)  # elements per thread per tile at 4 warps
    warps = 4 * max(1, min(8, per_thread // (8 if backward else 16)))
    return block_r, block_d, warps


def dropout_add_norm_forward(x, x_bias, residual, weight, bias, seed, stream, dropout_p, eps,
                             out_dtype, save, low_dtype=None):
    """Launch the forward on 2-D contiguous (n_rows, dim) x / residual; returns (out, low, z, stats)
    with z and stats ((2, n_rows): means, 1/stds) empty unless ``save``, and ``low`` (the output in
    ``low_dtype``) None when ``low_dtype`` is None."""
    n_rows, dim = x.shape
    z_dtype = torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty((n_rows, dim), dtype=out_dtype, device=x.device)
    low = None if low_dtype is None else torch.empty((n_rows, dim), dtype=low_dtype, device=x.device)
    # without save the empty z stands in as the kernel's Z (only its dtype is read)
    z = torch.empty((n_rows, dim) if save else (0,), dtype=z_dtype, device=x.device)
    stats = torch.empty((2, n_rows if save else 0), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return out, low, z, stats
    has_dropout = seed is not None and dropout_p > 0.0
    block_r, block_d, warps = _blocks(n_rows, dim)
    _dropout_add_norm_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        x, x if x_bias is None else x_bias, residual, weight, bias, out, out if low is None else low, z, stats,
        seed if has_dropout else x,
        n_rows, dim, stream, float(dropout_p), 1.0 / (1.0 - dropout_p), float(eps),
        HAS_X_BIAS=x_bias is not None, HAS_DROPOUT=has_dropout, STORE_Z=save, STORE_LOW=low_dtype is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, INTERPRETED=interpreted(), num_warps=warps,
    )
    return out, low, z, stats


def dropout_add_norm_backward(grad_out, grad_low, z, stats, weight, has_x_bias, seed, stream, dropout_p,
                              x_dtype, residual_dtype):
    """Launch the backward; returns (dx, dresidual, dparams): dparams (2 or 3, dim) holds the
    weight's, the bias's (and x_bias's) gradients in the weight's dtype. ``grad_low``: the low
    copy's gradient (contiguous like ``grad_out``), added to ``grad_out``'s, or None."""
    n_rows, dim = z.shape
    device = z.device
    dx = torch.empty((n_rows, dim), dtype=x_dtype, device=device)
    dres = torch.empty((n_rows, dim), dtype=residual_dtype, device=device)
    n_sums = 3 if has_x_bias else 2
    dparams = torch.empty((n_sums, dim), dtype=weight.dtype, device=device)
    if n_rows == 0:
        return dx, dres, dparams.zero_()
    has_dropout = seed is not None and dropout_p > 0.0
    block_r, block_d, warps = _blocks(n_rows, dim, backward=True)
    # each program loops over row blocks and keeps one partial row; three interpreted programs
    # make the tests cross the loop
    programs = min(resident_programs(z, interpreted_programs=3), triton.cdiv(n_rows, block_r))
    partial = torch.empty((n_sums, programs, dim), dtype=torch.float32, device=device)
    _dropout_add_norm_bwd_kernel[(programs,)](
        grad_out, grad_out if grad_low is None else grad_low, z, stats, weight, seed if has_dropout else z,
        dx, dres, partial, n_rows, dim, stream, float(dropout_p), 1.0 / (1.0 - dropout_p), programs,
        HAS_X_BIAS=has_x_bias, HAS_DROPOUT=has_dropout, HAS_G_LOW=grad_low is not None,
        BLOCK_R=block_r, BLOCK_D=block_d,
        INTERPRETED=interpreted(), num_warps=warps,
    )
    _sum_partials_kernel[(triton.cdiv(dim, _SUM_BLOCK_COLS),)](
        partial, dparams, programs, dim,
        N_SUMS=n_sums, BLOCK_P=_SUM_BLOCK_PARTIALS, BLOCK_C=_SUM_BLOCK_COLS, INTERPRETED=interpreted(),
        num_warps=4,
    )
    return dx, dres, dparams


def dropout_keep_rows(seed: torch.Tensor, stream: int, n_rows: int, dim: int, dropout_p: float) -> torch.Tensor:
    """The (n_rows, dim) bool keep-mask the kernels draw for ``seed``, ``stream`` and ``dropout_p``.

    For references and tests only (it materialises what the kernels never store).
    """
    mask = torch.empty((n_rows, dim), dtype=torch.int8, device=seed.device)
    if n_rows:
        block_r, block_d, _ = _blocks(n_rows, dim)
        _keep_rows_kernel[(triton.cdiv(n_rows, block_r),)](mask, seed, n_rows, dim, stream, float(dropout_p),
                                                           BLOCK_R=block_r, BLOCK_D=block_d)
    return mask.bool()


# --------------------------------------------------------------------------------------------
# torch.library registration and autograd
# --------------------------------------------------------------------------------------------
# custom_op (not triton_op): the launchers pick blocks from concrete sizes, which stay Python ints
# under torch.compile's symbolic shapes this way.


# Two forward ops, one without the low-precision copy (no placeholder output to allocate on every
# sublayer of a bf16 model) and one with it; one backward op and one autograd formula for both.
@torch.library.custom_op("fastcse::dropout_add_norm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, x_bias: Optional[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor, seed: Optional[torch.Tensor], stream: int, dropout_p: float, eps: float,
            out_dtype: torch.dtype, save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, _, z, stats = dropout_add_norm_forward(x, x_bias, residual, weight, bias, seed, stream, dropout_p, eps,
                                                out_dtype, save)
    return out, z, stats


@torch.library.custom_op("fastcse::dropout_add_norm_low_fwd", mutates_args=())
def _fwd_low_op(x: torch.Tensor, x_bias: Optional[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor, seed: Optional[torch.Tensor], stream: int, dropout_p: float, eps: float,
                out_dtype: torch.dtype, save: bool, low_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dropout_add_norm_forward(x, x_bias, residual, weight, bias, seed, stream, dropout_p, eps,
                                    out_dtype, save, low_dtype)


def _fake_outputs(x, residual, out_dtype, save, low_dtype=None):
    n_rows, dim = x.shape
    z_dtype = torch.promote_types(x.dtype, residual.dtype)
    low = () if low_dtype is None else (x.new_empty((n_rows, dim), dtype=low_dtype),)
    return (x.new_empty((n_rows, dim), dtype=out_dtype), *low,
            x.new_empty((n_rows, dim) if save else (0,), dtype=z_dtype),
            x.new_empty((2, n_rows if save else 0), dtype=torch.float32))


@_fwd_op.register_fake
def _(x, x_bias, residual, weight, bias, seed, stream, dropout_p, eps, out_dtype, save):
    return _fake_outputs(x, residual, out_dtype, save)


@_fwd_low_op.register_fake
def _(x, x_bias, residual, weight, bias, seed, stream, dropout_p, eps, out_dtype, save, low_dtype):
    return _fake_outputs(x, residual, out_dtype, save, low_dtype)


@torch.library.custom_op("fastcse::dropout_add_norm_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, grad_low: Optional[torch.Tensor], z: torch.Tensor, stats: torch.Tensor,
            weight: torch.Tensor, has_x_bias: bool, seed: Optional[torch.Tensor], stream: int, dropout_p: float,
            x_dtype: torch.dtype, residual_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dropout_add_norm_backward(grad_out.contiguous(), None if grad_low is None else grad_low.contiguous(),
                                     z, stats, weight, has_x_bias, seed, stream, dropout_p, x_dtype,
                                     residual_dtype)


@_bwd_op.register_fake
def _(grad_out, grad_low, z, stats, weight, has_x_bias, seed, stream, dropout_p, x_dtype, residual_dtype):
    n_rows, dim = z.shape
    return (z.new_empty((n_rows, dim), dtype=x_dtype), z.new_empty((n_rows, dim), dtype=residual_dtype),
            z.new_empty((3 if has_x_bias else 2, dim), dtype=weight.dtype))


def _setup_context(ctx, inputs, output):
    x, x_bias, residual, weight, bias, seed, stream, dropout_p, eps, out_dtype, save = inputs[:11]
    z, stats = output[-2:]
    ctx.unsaved = not save  # backward raises: the caller asked for no saved activations
    ctx.save_for_backward(z, stats, weight, seed)
    ctx.params = (stream, dropout_p, x.dtype, residual.dtype, x_bias is not None)
    ctx.n_inputs = len(inputs)
    # z and the statistics are returned for saving only, and either of the two outputs of the
    # low op may go unused: no zero-filled gradients for them
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, *rest):
    grad_low = rest[0] if len(rest) == 3 else None  # (the low op's second output; then z's, stats')
    if grad_out is None:  # only the low copy (or nothing) was used
        grad_out, grad_low = grad_low, None
    if grad_out is None:
        return (None,) * ctx.n_inputs
    if ctx.unsaved:
        raise RuntimeError("dropout_add_norm ran with save=False (no activations kept) but a gradient "
                           "reached it: call it with gradients enabled")
    z, stats, weight, seed = ctx.saved_tensors
    stream, dropout_p, x_dtype, residual_dtype, has_x_bias = ctx.params
    dx, dres, dparams = _bwd_op(grad_out, grad_low, z, stats, weight, has_x_bias, seed, stream, dropout_p,
                                x_dtype, residual_dtype)
    # one (2 or 3, dim) buffer for the parameters' gradients: rows, not three allocations
    grads = dparams.unbind(0)
    return (dx, grads[2] if has_x_bias else None, dres, grads[0], grads[1]) + (None,) * (ctx.n_inputs - 5)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_fwd_low_op.register_autograd(_backward, setup_context=_setup_context)


def dropout_add_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                            x_bias: Optional[torch.Tensor], dropout_p: float, eps: float,
                            seed: Optional[torch.Tensor], stream: int, out_dtype: torch.dtype,
                            low_dtype: Optional[torch.dtype] = None):
    """Differentiable fused op on (..., dim) x / residual (checked by :mod:`fastcse.dropout_add_norm`;
    weight, bias and x_bias share a dtype, all contiguous).

    ``seed``: int64 (1,) Philox seed (read only when ``dropout_p > 0``); ``stream`` picks one of
    its independent masks (a model passes one seed per forward and a stream per sublayer).
    Returns the output; with ``low_dtype`` the pair (output, output in ``low_dtype``), both written
    by the one kernel, their gradients summed by the one backward kernel.
    """
    shape = x.shape
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, x_bias, residual, weight, bias))
    flat = x.dim() != 2  # (2-D inputs skip the reshapes: host ops on every sublayer of a step)
    if flat:
        x, residual = x.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1])
    args = (x.contiguous(), x_bias, residual.contiguous(), weight, bias, seed if dropout_p > 0.0 else None,
            int(stream), float(dropout_p), float(eps), out_dtype, save)
    if low_dtype is None:
        out = _fwd_op(*args)[0]
        return out.view(shape) if flat else out
    out, low = _fwd_low_op(*args, low_dtype)[:2]
    return (out.view(shape), low.view(shape)) if flat else (out, low)
