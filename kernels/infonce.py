"""Fused row-wise log-sum-exp of scaled cosine logits: the InfoNCE kernel.

Computes, for L2-normalised anchors ``a`` (N, D) and candidates ``c`` (M, D)::

    s_ij  = scale * <a_i, c_j> + w * [j == hn_offset + i]
    lse_i = log sum_j exp(s_ij)

tile by tile with an online log-sum-exp, storing one float per row and never the N x M matrix.
The rest of the loss (target logit, reduction, normalisation, gathering) is cheap O((N + M) D)
PyTorch around it in ``fastcse/infonce.py``.

Kernels:
* ``_lse_fwd_kernel``   row-parallel: lse (2NMD FLOPs).
* ``_lse_bwd_rows_kernel``  row-parallel: d a_i = g_i * scale * sum_j p_ij c_j (4NMD: recompute + PC).
* ``_lse_bwd_cols_kernel``  column-parallel: d c_j = scale * sum_i g_i p_ij a_i (4NMD).
Both backward kernels own their output rows, so no atomics are needed; each grid also splits the
output's D dimension into ``BLOCK_DOUT`` slices (the logits are recomputed per slice) to bound the
fp32 accumulator held in registers when D is large.

All accumulation is fp32. Inputs may be fp16 / bf16 / fp32; the probabilities are cast to the
input dtype before the second matmul of the backward, as flash attention does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcse._triton_utils import interpreted


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
        a = tl.load(a_ptr + rows[:, None] * stride_anchor_row + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        c = tl.load(c_ptr + cols[:, None] * stride_cand_row + offs_d[None, :],
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
def _lse_bwd_rows_kernel(
    a_ptr, c_ptr, scale_ptr, lse_ptr, grad_lse_ptr, grad_a_ptr,
    n_rows, n_cols, dim, stride_anchor_row, stride_cand_row, stride_grad_row, hn_weight, hn_offset,
    HAS_HARD_NEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    offs_out = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    out_mask = offs_out < dim
    scale = tl.load(scale_ptr).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_lse_ptr + rows, mask=row_mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DOUT), dtype=tl.float32)
    for col0 in range(0, n_cols, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        s = _logits_tile(a_ptr, c_ptr, rows, cols, row_mask, col_mask, dim,
                         stride_anchor_row, stride_cand_row, scale, hn_weight, hn_offset,
                         HAS_HARD_NEG, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST_DOT, INPUT_PRECISION)
        weights = tl.exp(s - lse[:, None]) * g[:, None]
        c_out = tl.load(c_ptr + cols[:, None] * stride_cand_row + offs_out[None, :],
                        mask=col_mask[:, None] & out_mask[None, :], other=0.0)
        if UPCAST_DOT:
            acc = tl.dot(weights, c_out.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(weights.to(c_out.dtype), c_out, acc, input_precision=INPUT_PRECISION)
    tl.store(grad_a_ptr + rows[:, None] * stride_grad_row + offs_out[None, :], acc * scale,
             mask=row_mask[:, None] & out_mask[None, :])


@triton.jit
def _lse_bwd_cols_kernel(
    a_ptr, c_ptr, scale_ptr, lse_ptr, grad_lse_ptr, grad_c_ptr,
    n_rows, n_cols, n_grad_cols, dim, stride_anchor_row, stride_cand_row, stride_grad_row,
    hn_weight, hn_offset,
    HAS_HARD_NEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_grad_cols
    offs_out = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    out_mask = offs_out < dim
    scale = tl.load(scale_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_DOUT), dtype=tl.float32)
    for row0 in range(0, n_rows, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        g = tl.load(grad_lse_ptr + rows, mask=row_mask, other=0.0)  # 0 kills padded rows
        s = _logits_tile(a_ptr, c_ptr, rows, cols, row_mask, col_mask, dim,
                         stride_anchor_row, stride_cand_row, scale, hn_weight, hn_offset,
                         HAS_HARD_NEG, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST_DOT, INPUT_PRECISION)
        weights = tl.exp(s - lse[:, None]) * g[:, None]
        a_out = tl.load(a_ptr + rows[:, None] * stride_anchor_row + offs_out[None, :],
                        mask=row_mask[:, None] & out_mask[None, :], other=0.0)
        if UPCAST_DOT:
            acc = tl.dot(tl.trans(weights), a_out.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(tl.trans(weights.to(a_out.dtype)), a_out, acc, input_precision=INPUT_PRECISION)
    tl.store(grad_c_ptr + cols[:, None] * stride_grad_row + offs_out[None, :], acc * scale,
             mask=col_mask[:, None] & out_mask[None, :])


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------


def _launch_config(a: torch.Tensor) -> dict:
    """Tile sizes and flags, chosen per device and dtype.

    A size heuristic rather than autotuning: the kernel streams (BLOCK_M x D) and (BLOCK_N x D)
    tiles through one matmul shape, so a handful of configs would all be timed on the same
    pattern. Re-tune BLOCK_* / num_warps when the GPU benchmark's TFLOP/s fraction drops
    (bench/bench_infonce.py reports it).
    """
    dim = a.shape[1]
    dim_pow2 = triton.next_power_of_2(dim)
    if a.is_cuda:
        wide = a.element_size() <= 2
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64 if wide else 32,
                   BLOCK_DOUT=min(dim_pow2, 128), num_warps=4, num_stages=3)
        upcast = False
    else:
        # Triton's CPU interpreter: few large blocks run fastest (it executes each op with numpy
        # over whole blocks), and it gets bf16 tl.dot wrong (triton-lang/triton#11584), so tiles
        # are upcast to fp32 before every dot when, and only when, running interpreted.
        cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=min(max(dim_pow2, 16), 64),
                   BLOCK_DOUT=min(max(dim_pow2, 16), 64), num_warps=4, num_stages=1)
        upcast = interpreted()
    # fp32 follows PyTorch's own matmul setting: tf32 only where the user allowed it.
    if a.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        precision = "ieee"
    else:
        precision = "tf32"
    cfg.update(UPCAST_DOT=upcast, INPUT_PRECISION=precision)
    return cfg


def _split(cfg: dict) -> tuple[dict, dict]:
    """Separate the backward-only constexpr from the forward's."""
    fwd = {k: v for k, v in cfg.items() if k != "BLOCK_DOUT"}
    return fwd, cfg


# --------------------------------------------------------------------------------------------
# torch.library ops: opaque custom ops with fake (meta) implementations, so a torch.compile'd
# training step keeps them in one graph with symbolic batch sizes (no graph break, no recompile
# per batch size). custom_op rather than triton_op: triton_op traces the launcher with fake
# tensors, which fails when the kernels run in Triton's CPU interpreter (CI).
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastcse::infonce_lse_fwd", mutates_args=())
def infonce_lse_fwd(anchors: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor,
                    hn_weight: float, hn_offset: int, n_grad_cols: int) -> torch.Tensor:
    """Row-wise log-sum-exp of scaled logits.

    Args:
        anchors: (N, D) normalised rows, unit stride along D.
        candidates: (M, D) normalised rows, unit stride along D, same dtype as anchors.
        scale: 0-d or 1-element fp32 tensor, 1 / temperature.
        hn_weight, hn_offset: ``hn_weight`` is added to logit (i, hn_offset + i); 0 disables it.
        n_grad_cols: only the first ``n_grad_cols`` candidates get a gradient in backward (the
            rest is the ESimCSE / MoCo queue); unused by the forward itself.
    Returns:
        (N,) fp32 log-sum-exp per row.
    """
    n_rows, dim = anchors.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=anchors.device)
    fwd_cfg, _ = _split(_launch_config(anchors))
    grid = (triton.cdiv(n_rows, fwd_cfg["BLOCK_M"]),)
    _lse_fwd_kernel[grid](
        anchors, candidates, scale, lse,
        n_rows, candidates.shape[0], dim, anchors.stride(0), candidates.stride(0),
        hn_weight, hn_offset, HAS_HARD_NEG=hn_weight != 0.0, **fwd_cfg,
    )
    return lse


@torch.library.custom_op("fastcse::infonce_lse_bwd", mutates_args=())
def infonce_lse_bwd(anchors: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor,
                    lse: torch.Tensor, grad_lse: torch.Tensor, hn_weight: float, hn_offset: int,
                    n_grad_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_i grad_lse_i * lse_i`` for anchors (N, D) and candidates' first
    ``n_grad_cols`` rows (n_grad_cols, D), both fp32, *before* the 1/temperature-gradient
    contraction (done by the caller as ``sum_i <a_i, grad_a_i> / scale``)."""
    n_rows, dim = anchors.shape
    n_cols = candidates.shape[0]
    cfg = _launch_config(anchors)
    grad_a = torch.empty((n_rows, dim), dtype=torch.float32, device=anchors.device)
    grad_c = torch.empty((n_grad_cols, dim), dtype=torch.float32, device=anchors.device)
    d_slices = triton.cdiv(dim, cfg["BLOCK_DOUT"])
    common = dict(HAS_HARD_NEG=hn_weight != 0.0, **cfg)
    _lse_bwd_rows_kernel[(triton.cdiv(n_rows, cfg["BLOCK_M"]), d_slices)](
        anchors, candidates, scale, lse, grad_lse, grad_a,
        n_rows, n_cols, dim, anchors.stride(0), candidates.stride(0), grad_a.stride(0),
        hn_weight, hn_offset, **common,
    )
    if n_grad_cols > 0:
        _lse_bwd_cols_kernel[(triton.cdiv(n_grad_cols, cfg["BLOCK_N"]), d_slices)](
            anchors, candidates, scale, lse, grad_lse, grad_c,
            n_rows, n_cols, n_grad_cols, dim, anchors.stride(0), candidates.stride(0), grad_c.stride(0),
            hn_weight, hn_offset, **common,
        )
    return grad_a, grad_c


@infonce_lse_fwd.register_fake
def _(anchors, candidates, scale, hn_weight, hn_offset, n_grad_cols):
    return anchors.new_empty(anchors.shape[0], dtype=torch.float32)


@infonce_lse_bwd.register_fake
def _(anchors, candidates, scale, lse, grad_lse, hn_weight, hn_offset, n_grad_cols):
    return (anchors.new_empty(anchors.shape, dtype=torch.float32),
            anchors.new_empty((n_grad_cols, anchors.shape[1]), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    anchors, candidates, scale, hn_weight, hn_offset, n_grad_cols = inputs
    ctx.save_for_backward(anchors, candidates, scale, output)
    ctx.hn_weight, ctx.hn_offset, ctx.n_grad_cols = hn_weight, hn_offset, n_grad_cols


def _backward(ctx, grad_lse):
    anchors, candidates, scale, lse = ctx.saved_tensors
    n_grad_cols = ctx.n_grad_cols
    grad_a, grad_c = infonce_lse_bwd(anchors, candidates, scale, lse, grad_lse.float().contiguous(),
                                     ctx.hn_weight, ctx.hn_offset, n_grad_cols)
    if n_grad_cols < candidates.shape[0]:  # queue rows carry no gradient
        grad_c = torch.cat([grad_c, grad_c.new_zeros(candidates.shape[0] - n_grad_cols, grad_c.shape[1])])
    # d scale = sum_ij g_i p_ij <a_i, c_j> = sum_i <a_i, grad_a_i> / scale
    grad_scale = (anchors.float() * grad_a).sum() / scale.reshape(())
    return (grad_a.to(anchors.dtype), grad_c.to(candidates.dtype), grad_scale.reshape(scale.shape),
            None, None, None)


infonce_lse_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_lse(a: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, hn_weight: float,
               hn_offset: int, n_grad_cols: int | None = None) -> torch.Tensor:
    """Differentiable fused log-sum-exp; see :func:`infonce_lse_fwd` for the contract.

    Candidate rows past ``n_grad_cols`` (the ESimCSE queue) get no gradient; that saves the
    column-parallel backward kernel their share of work.
    """
    n_grad_cols = c.shape[0] if n_grad_cols is None else n_grad_cols
    scale32 = scale.to(torch.float32).reshape(1)
    return infonce_lse_fwd(a.contiguous(), c.contiguous(), scale32, float(hn_weight), int(hn_offset),
                           int(n_grad_cols))
