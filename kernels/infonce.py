"""Fused InfoNCE kernels: the loss of scaled cosine logits and its gradients, on raw rows.

For anchors ``x`` (N, D) and candidate parts ``y`` (M rows in all), with the L2 normalisation
folded in (``r_i = 1 / |x_i|``, ``q_j = 1 / |y_j|``; no normalised copy is made)::

    s_ij   = scale r_i q_j <x_i, y_j> + w [j == hn_offset + i]
    loss_i = log sum_j exp(s_ij) - s_i,target_offset+i

The row-chunk loop of the training path is shared with the chunked tier and lives, Triton-free,
in :mod:`fastcse.kernels.infonce_chunks` (its docstring has the gradient formulas). Two paths,
chosen by what the caller needs:

* ``_lse_fwd_kernel`` (no gradient wanted, or per-row upstream gradients): tiles of x against
  tiles of one candidate part with an online log-sum-exp, split across candidate columns so that
  even N = 1024 fills the card; each program stores one partial log-sum-exp per row, combined by a
  log-sum-exp over the splits (a (splits, N) array): never the N x M matrix (2NMD FLOPs). Its
  backward recomputes row chunks.
* gradients with a uniform upstream (a mean or sum reduction, i.e. training): chunks of R rows,
  one cuBLAS matmul per candidate part writing bf16 dot products into the chunk's column slices,
  ``_rows_softmax_kernel`` turning them into weights in place (two passes: online max / sum per
  lane, then the write), and two cuBLAS matmuls per part, the candidate gradient accumulated in fp32
  inside the GEMM: the gradients are formed in the forward pass, 6NMD FLOPs in all like eager, at
  cuBLAS speed, with one R x M buffer instead of the N x M matrix. (Fully fused tile backward kernels
  were tried first: for D > 128 their register-bound accumulators forced the logits to be recomputed
  once per D slice, several times the FLOPs of this path.)

Inputs may be fp16 / bf16 / fp32; lse, logits and accumulators are fp32; gradients come back in
the inputs' dtype.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from fastcse.kernels._triton_utils import interpreted, resident_programs
from fastcse.kernels.infonce_chunks import (
    ChunkOps,
    Problem,
    anticipated_row_weight,
    backward_recompute,
    claim_precomputed_grads,
    default_chunk_rows,
    forward_with_grads,
    fused_matmul_dtype,
    reduce_rows,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _lse_fwd_kernel(
    a_ptr, c_ptr, rx_ptr, q_ptr, scale_ptr, lse_ptr, tgt_ptr,
    n_rows, n_cols, dim, stride_anchor_row, stride_cand_row, stride_lse_split,
    cols_per_split, col_offset, hn_weight, hn_offset, target_offset,
    HAS_HARD_NEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Program (row block, column split) of one candidate part (``n_cols`` rows at global column
    ``col_offset``): the log-sum-exp of its logits over columns ``[s * cols_per_split, ...)``, one
    per row, into row ``s`` of the (splits, N) ``lse_ptr``; the program whose columns hold a row's
    target column also stores the target logit. UPCAST_DOT: tiles to fp32 before tl.dot (only
    under the interpreter, which gets bf16 dots wrong); constexpr so the GPU path carries no branch.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    scale = tl.load(scale_ptr).to(tl.float32)
    # base-2 logits: s2 = acc * (scale r_i log2 e) * q_j, so the exponentials are exp2
    row_scale = scale * tl.load(rx_ptr + rows, mask=row_mask, other=0.0).to(tl.float32) * 1.4426950408889634
    col_lo = pid_s * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, n_cols)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_col = rows + target_offset - col_offset  # in this part's columns
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_anchor_row  # int64: N * D can pass 2**31
    for col0 in range(col_lo, col_hi, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        col_mask = cols < col_hi
        c_rows = c_ptr + cols.to(tl.int64)[:, None] * stride_cand_row
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < dim
            a = tl.load(a_rows + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            c = tl.load(c_rows + offs_d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                c = c.to(tl.float32)
            acc = tl.dot(a, tl.trans(c), acc, input_precision=INPUT_PRECISION)
        q = tl.load(q_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        s2 = acc * row_scale[:, None] * q[None, :]
        target += tl.sum(tl.where(cols[None, :] == target_col[:, None], s2, 0.0), axis=1)
        if HAS_HARD_NEG:
            s2 += tl.where(cols[None, :] + col_offset == rows[:, None] + hn_offset, hn_weight * 1.4426950408889634, 0.0)
        s2 = tl.where(col_mask[None, :], s2, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(s2, axis=1))
        running_sum = running_sum * tl.exp2(running_max - new_max) + tl.sum(tl.exp2(s2 - new_max[:, None]), axis=1)
        running_max = new_max
    lse = (running_max + tl.log2(running_sum)) * 0.6931471805599453
    tl.store(lse_ptr + pid_s * stride_lse_split + rows, lse, mask=row_mask)
    owns_target = row_mask & (target_col >= col_lo) & (target_col < col_hi)
    tl.store(tgt_ptr + rows, target * 0.6931471805599453, mask=owns_target)


@triton.jit
def _chunk_logits2(dots_rows, cols, n_cols, row_mask, row_scale, q_ptr, hn_col, hn_weight2,
                   HAS_HARD_NEG: tl.constexpr):
    """(BLOCK_R, BLOCK_N) base-2 logits of a block of a chunk's raw dot products (-inf past the
    last column), the block's q_j and the dot products (fp32, 0 past the last column)."""
    col_mask = cols < n_cols
    q = tl.load(q_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    d = tl.load(dots_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    s2 = d * row_scale[:, None] * q[None, :]
    if HAS_HARD_NEG:
        s2 += tl.where(cols[None, :] == hn_col[:, None], hn_weight2, 0.0)
    return tl.where(col_mask[None, :], s2, float("-inf")), q, d


@triton.jit
def _rows_softmax_kernel(
    dots_ptr, out_ptr, x_ptr, xt_ptr, rx_ptr, q_ptr, col_scale_ptr, scale_ptr, lse_ptr, tgt_ptr, grad_ptr,
    radial_ptr,
    n_rows, n_cols, dim, stride_dots_row, stride_out_row, stride_x_row, stride_xt_row,
    row0, hn_weight, hn_offset, target_offset,
    COMPUTE_LSE: tl.constexpr, WRITE_WEIGHTS: tl.constexpr, HAS_GRAD: tl.constexpr,
    HAS_HARD_NEG: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """BLOCK_R rows of a chunk of raw dot products ``<x_i, y_j>`` (anchors row0 + ..., all M
    candidate columns) per program: the contract of ``infonce_chunks.torch_rows_softmax_``.

    COMPUTE_LSE (forward): pass 1 keeps an online max and sum per lane (BLOCK_R x BLOCK_N, one
    reduction per row at the end, no block-wide reduction per step) and stores lse_i and the
    target logit (one element loaded per row); otherwise lse_i is read (backward, no pass 1).
    WRITE_WEIGHTS: pass 2 writes ``p_ij q_j kappa`` into ``out`` (the dots themselves when the
    dtypes match: each element is read before it is overwritten, by the same program) and
    ``x~_i = g_i r_i x_i``. Bytes per element: dots read once per pass, weights written once.
    BLOCK_R rows share each block of q (fp32), which would otherwise cost more L2 traffic than the
    dots. The flags are constexpr so each variant compiles without dead branches.
    """
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = local < n_rows
    grow = row0 + local
    scale = tl.load(scale_ptr).to(tl.float32)
    rx = tl.load(rx_ptr + grow, mask=row_mask, other=0.0).to(tl.float32)
    row_scale = scale * rx * 1.4426950408889634
    dots_rows = dots_ptr + local.to(tl.int64)[:, None] * stride_dots_row
    hn_col = grow + hn_offset
    hn_weight2 = hn_weight * 1.4426950408889634
    if COMPUTE_LSE:
        # lanes start at a finite floor, so that masked lanes (-inf) never give -inf - -inf
        lane_max = tl.full((BLOCK_R, BLOCK_N), -1.0e30, dtype=tl.float32)
        lane_sum = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for col0 in range(0, n_cols, BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N)
            s2, _, _ = _chunk_logits2(dots_rows, cols, n_cols, row_mask, row_scale, q_ptr, hn_col, hn_weight2,
                                      HAS_HARD_NEG)
            new_max = tl.maximum(lane_max, s2)
            lane_sum = lane_sum * tl.exp2(lane_max - new_max) + tl.exp2(s2 - new_max)
            lane_max = new_max
        row_max = tl.max(lane_max, axis=1)
        row_sum = tl.sum(lane_sum * tl.exp2(lane_max - row_max[:, None]), axis=1)
        lse2 = row_max + tl.log2(row_sum)
        tl.store(lse_ptr + grow, lse2 * 0.6931471805599453, mask=row_mask)
        target_col = grow + target_offset
        d_t = tl.load(dots_ptr + local.to(tl.int64) * stride_dots_row + target_col, mask=row_mask,
                      other=0.0).to(tl.float32)
        q_t = tl.load(q_ptr + target_col, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(tgt_ptr + grow, d_t * scale * rx * q_t, mask=row_mask)
    else:
        lse2 = tl.load(lse_ptr + grow, mask=row_mask, other=0.0).to(tl.float32) * 1.4426950408889634
    if WRITE_WEIGHTS:
        if HAS_COL_SCALE:
            col_scale = tl.load(col_scale_ptr).to(tl.float32)
        else:
            col_scale = 1.0
        # the target's dot product, read before this program overwrites its rows
        target_col = grow + target_offset
        d_t = tl.load(dots_ptr + local.to(tl.int64) * stride_dots_row + target_col, mask=row_mask,
                      other=0.0).to(tl.float32)
        q_t = tl.load(q_ptr + target_col, mask=row_mask, other=0.0).to(tl.float32)
        out_rows = out_ptr + local.to(tl.int64)[:, None] * stride_out_row
        lane_radial = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)  # sum_j p_ij q_j <x_i, y_j>
        for col0 in range(0, n_cols, BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N)
            s2, q, d = _chunk_logits2(dots_rows, cols, n_cols, row_mask, row_scale, q_ptr, hn_col, hn_weight2,
                                      HAS_HARD_NEG)
            pq = tl.exp2(s2 - lse2[:, None]) * q[None, :]
            lane_radial += pq * d
            tl.store(out_rows + cols[None, :], (pq * col_scale).to(out_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & (cols < n_cols)[None, :])
        tl.store(radial_ptr + local, tl.sum(lane_radial, axis=1) - q_t * d_t, mask=row_mask)
        if HAS_GRAD:
            g = tl.load(grad_ptr + grow, mask=row_mask, other=0.0).to(tl.float32)
        else:
            g = 1.0
        factor = g * rx
        x_rows = x_ptr + grow.to(tl.int64)[:, None] * stride_x_row
        xt_rows = xt_ptr + local.to(tl.int64)[:, None] * stride_xt_row
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (offs_d < dim)[None, :]
            xv = tl.load(x_rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(xt_rows + offs_d[None, :], (xv * factor[:, None]).to(xt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish_rows_kernel(
    u_ptr, w_ptr, z_ptr, out_ptr, radial_ptr, a_ptr, b_ptr, c_ptr, col_scale_ptr,
    n_rows, dim, stride_u_row, stride_w_row, stride_z_row, stride_out_row, stride_a, z_lo, z_rows,
    HAS_COL_SCALE: tl.constexpr, HAS_Z: tl.constexpr, RADIAL_KNOWN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """BLOCK_R whole rows (BLOCK_D >= dim) per program: the contract of
    ``infonce_chunks.torch_finish_rows_``, ``out_i = a_i (u'_i - c_i rho_i w_i)`` with
    ``u'_i = u_i / kappa - b z`` (the target term) and ``rho_i`` given or ``<w_i, u'_i>``: one read
    of u, w (and z), one write of out; ``out`` may be ``u`` (each program reads its rows whole
    before it writes them)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    offs = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (offs < dim)[None, :]
    rows64 = rows.to(tl.int64)
    u = tl.load(u_ptr + rows64[:, None] * stride_u_row + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        u = u / tl.load(col_scale_ptr).to(tl.float32)
    if HAS_Z:
        z_row = rows - z_lo
        z_mask = row_mask & (z_row >= 0) & (z_row < z_rows)
        z_row = tl.where(z_mask, z_row, 0)
        b = tl.load(b_ptr + z_row, mask=z_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + z_row.to(tl.int64)[:, None] * stride_z_row + offs[None, :],
                    mask=z_mask[:, None] & (offs < dim)[None, :], other=0.0).to(tl.float32)
        u -= b[:, None] * z
    w = tl.load(w_ptr + rows64[:, None] * stride_w_row + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    if RADIAL_KNOWN:
        rho = tl.load(radial_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    else:
        rho = tl.sum(u * w, axis=1)
        tl.store(radial_ptr + rows, rho, mask=row_mask)
    c = tl.load(c_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + rows * stride_a, mask=row_mask, other=0.0).to(tl.float32)
    out = a[:, None] * (u - (c * rho)[:, None] * w)
    tl.store(out_ptr + rows64[:, None] * stride_out_row + offs[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------


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


def _column_splits(n_cols: int, row_blocks: int, total_cols: int, programs: int, block_n: int) -> int:
    """Columns per split of one part: enough splits that all parts together launch about
    ``programs`` programs, each split a whole number of column tiles and none empty."""
    tiles = triton.cdiv(n_cols, block_n)
    want = triton.cdiv(programs * n_cols, max(1, total_cols) * row_blocks)
    splits = max(1, min(tiles, want))
    return triton.cdiv(tiles, splits) * block_n


def tile_lse(prob: Problem, *, cols_per_split: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, tgt)`` (N,) fp32 through the fused tile kernel, one launch per candidate part, each
    split across its columns; the partial log-sum-exps are combined by one log-sum-exp.
    ``cols_per_split`` (a multiple of the tile width) overrides the split (tests)."""
    x = prob.x
    n_rows, dim = x.shape
    cfg = _tile_config(x)
    row_blocks = triton.cdiv(n_rows, cfg["BLOCK_M"])
    programs = resident_programs(x, interpreted_programs=4)
    splits = []
    for k, part in enumerate(prob.parts):
        m_k = part.shape[0]
        per = cols_per_split or _column_splits(m_k, row_blocks, prob.n_cols, programs, cfg["BLOCK_N"])
        splits.append((per, triton.cdiv(m_k, per)))
    partial = torch.empty((sum(s for _, s in splits), n_rows), dtype=torch.float32, device=x.device)
    tgt = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    base = 0
    for k, (part, (per, n_splits)) in enumerate(zip(prob.parts, splits)):
        o = prob.offsets[k]
        _lse_fwd_kernel[(row_blocks, n_splits)](
            x, part, prob.rx, prob.q[o:], prob.scale, partial[base:], tgt,
            n_rows, part.shape[0], dim, x.stride(0), part.stride(0), partial.stride(0),
            per, o, prob.hn_weight, prob.hn_offset, prob.target_offset,
            HAS_HARD_NEG=prob.hn_weight != 0.0, **cfg,
        )
        base += n_splits
    lse = partial[0] if partial.shape[0] == 1 else torch.logsumexp(partial, dim=0)
    return lse, tgt


def rows_softmax_(prob: Problem, dots: torch.Tensor, weights: Optional[torch.Tensor], row0: int,
                  lse: torch.Tensor, tgt: Optional[torch.Tensor], grad_rows: Optional[torch.Tensor],
                  x_tilde: Optional[torch.Tensor], compute_lse: bool,
                  radial: Optional[torch.Tensor] = None) -> bool:
    """Triton twin of :func:`fastcse.kernels.infonce_chunks.torch_rows_softmax_` (same contract);
    with weights it also writes ``radial`` ((R,), acc dtype) and returns True.

    dots: (R, M), unit stride along M, the matmul dtype (fp32 for fp16 inputs); weights: (R, M) in
    the matmul dtype (may be ``dots``); x_tilde: (R, D) in the matmul dtype.
    """
    n = dots.shape[0]
    write = weights is not None
    if n == 0:
        return write
    cuda = dots.is_cuda
    block_r = 4
    _rows_softmax_kernel[(triton.cdiv(n, block_r),)](
        dots, weights if write else dots, prob.x, x_tilde if write else dots, prob.rx, prob.q,
        prob.col_scale if prob.col_scale is not None else prob.scale, prob.scale, lse,
        tgt if tgt is not None else lse, grad_rows if grad_rows is not None else lse,
        radial if write else lse, n, dots.shape[1], prob.x.shape[1], dots.stride(0), (weights if write else dots).stride(0),
        prob.x.stride(0), (x_tilde if write else dots).stride(0),
        row0, prob.hn_weight, prob.hn_offset, prob.target_offset,
        COMPUTE_LSE=compute_lse, WRITE_WEIGHTS=write, HAS_GRAD=grad_rows is not None,
        HAS_HARD_NEG=prob.hn_weight != 0.0, HAS_COL_SCALE=prob.col_scale is not None,
        BLOCK_R=block_r, BLOCK_N=512 if cuda else 128, BLOCK_D=128 if cuda else 64,
        num_warps=8 if cuda else 4,
    )
    return write


def finish_rows_(u: torch.Tensor, w: torch.Tensor, out: torch.Tensor, a: torch.Tensor, c: torch.Tensor,
                 radial: torch.Tensor, radial_known: bool, col_scale: Optional[torch.Tensor],
                 z: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None, z_lo: int = 0) -> None:
    """Triton twin of :func:`fastcse.kernels.infonce_chunks.torch_finish_rows_` (same contract):
    one launch instead of five elementwise passes over (rows, D)."""
    n, dim = u.shape
    if n == 0:
        return
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, 2048 // block_d) if u.is_cuda else 4
    _finish_rows_kernel[(triton.cdiv(n, block_r),)](
        u, w, z if z is not None else w, out, radial, a, b if b is not None else c, c,
        col_scale if col_scale is not None else c,
        n, dim, u.stride(0), w.stride(0), (z if z is not None else w).stride(0), out.stride(0),
        a.stride(0) if a.dim() else 0, z_lo, z.shape[0] if z is not None else 0,
        HAS_COL_SCALE=col_scale is not None, HAS_Z=z is not None, RADIAL_KNOWN=radial_known,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )


TRITON_OPS = ChunkOps(rows_softmax_, finish_rows_, False)


# --------------------------------------------------------------------------------------------
# torch.library ops: opaque custom ops with fake (meta) implementations, so a torch.compile'd
# training step keeps them in one graph with symbolic batch sizes (no graph break, no recompile
# per batch size). custom_op rather than triton_op: triton_op traces the launcher with fake
# tensors, which fails when the kernels run in Triton's CPU interpreter (CI), and the chunk loop
# inside these ops must stay opaque to the compiler anyway.
# --------------------------------------------------------------------------------------------


def _problem(anchors, parts, scale, hn_weight, hn_offset, target_offset, n_grad_parts) -> Problem:
    return Problem(anchors, parts, scale, hn_weight, hn_offset, target_offset, n_grad_parts,
                   fused_matmul_dtype(anchors))


def _rows(chunk_rows: int, prob: Problem) -> int:
    return chunk_rows or default_chunk_rows(prob.x.shape[0], prob.n_cols, prob.x.is_cuda)


@torch.library.custom_op("fastcse::infonce_loss", mutates_args=())
def infonce_loss(anchors: torch.Tensor, parts: List[torch.Tensor], scale: torch.Tensor, hn_weight: float,
                 hn_offset: int, target_offset: int, n_grad_parts: int, reduction: str, chunk_rows: int,
                 precompute_grads: bool) -> List[torch.Tensor]:
    """The InfoNCE loss of one direction, and optionally its gradients.

    Args:
        anchors: (N, D) raw rows (normalised inside), unit stride along D.
        parts: candidate blocks (M_k, D), unit stride along D, anchors' dtype; their rows are the
            logits' columns, in order.
        scale: () fp32, 1 / temperature.
        hn_weight, hn_offset: ``hn_weight`` is added to logit (i, hn_offset + i); 0 disables it.
        target_offset: anchor i's target is column ``target_offset + i`` (inside ``parts[0]``).
        n_grad_parts: gradients only for ``parts[:n_grad_parts]`` (the rest is the queue).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        chunk_rows: anchor rows per chunk when gradients are formed (0: the default).
        precompute_grads: form the gradients of the reduced loss during this pass (6NMD in all
            with the backward) instead of the fused tile kernel (2NMD, no N x M storage,
            recomputation in backward); needs a mean / sum reduction.
    Returns:
        ``[loss, lse]`` (loss: () or (N,) fp32, lse (N,) fp32), then with ``precompute_grads``
        ``dscale`` () fp32, ``grad_anchors`` and one gradient per grad part, in their inputs' dtype.
    """
    prob = _problem(anchors, parts, scale, hn_weight, hn_offset, target_offset, n_grad_parts)
    if precompute_grads:
        lse, tgt, dx, grads, dscale = forward_with_grads(
            prob, _rows(chunk_rows, prob), TRITON_OPS,
            row_weight=anticipated_row_weight(reduction, anchors.shape[0]))
        return [reduce_rows(lse - tgt, reduction), lse, dscale, dx, *grads]
    lse, tgt = tile_lse(prob)
    return [reduce_rows(lse - tgt, reduction), lse]


@infonce_loss.register_fake
def _(anchors, parts, scale, hn_weight, hn_offset, target_offset, n_grad_parts, reduction, chunk_rows,
      precompute_grads):
    f32 = dict(dtype=torch.float32)
    n = anchors.shape[0]
    loss = anchors.new_empty(() if reduction != "none" else (n,), **f32)
    out = [loss, anchors.new_empty(n, **f32)]
    if precompute_grads:
        out += [anchors.new_empty((), **f32), torch.empty_like(anchors)]
        out += [torch.empty_like(p) for p in parts[:n_grad_parts]]
    return out


@torch.library.custom_op("fastcse::infonce_loss_backward", mutates_args=())
def infonce_loss_backward(anchors: torch.Tensor, parts: List[torch.Tensor], scale: torch.Tensor,
                          lse: torch.Tensor, grad_rows: torch.Tensor, hn_weight: float, hn_offset: int,
                          target_offset: int, n_grad_parts: int, chunk_rows: int) -> List[torch.Tensor]:
    """Gradients of ``sum_i grad_rows_i * loss_i``, recomputing chunk by chunk (cuBLAS matmuls
    around the fused row-softmax kernel): ``[dscale () fp32, grad_anchors, grads of the grad
    parts]``, gradients in their inputs' dtype."""
    prob = _problem(anchors, parts, scale, hn_weight, hn_offset, target_offset, n_grad_parts)
    dx, grads, dscale = backward_recompute(prob, lse, grad_rows, _rows(chunk_rows, prob), TRITON_OPS)
    return [dscale, dx, *grads]


@infonce_loss_backward.register_fake
def _(anchors, parts, scale, lse, grad_rows, hn_weight, hn_offset, target_offset, n_grad_parts, chunk_rows):
    return ([anchors.new_empty((), dtype=torch.float32), torch.empty_like(anchors)]
            + [torch.empty_like(p) for p in parts[:n_grad_parts]])


def _setup_context(ctx, inputs, output):
    anchors, parts, scale, hn_weight, hn_offset, target_offset, n_grad_parts, reduction, chunk_rows, precompute = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # else autograd fills a zero gradient for every extra output
    if precompute:
        ctx.save_for_backward(*output[2:])
    else:
        ctx.save_for_backward(anchors, scale, output[1], *parts)
    ctx.config = (hn_weight, hn_offset, target_offset, n_grad_parts, reduction, chunk_rows, precompute, len(parts))
    ctx.scale_dtype = scale.dtype


def _backward(ctx, grads):
    hn_weight, hn_offset, target_offset, n_grad_parts, reduction, chunk_rows, precompute, n_parts = ctx.config
    grad_loss = grads[0]
    if grad_loss is None:
        return None, [None] * n_parts, None, None, None, None, None, None, None, None
    if precompute:
        claim_precomputed_grads(ctx)
        dscale, dx, *dparts = ctx.saved_tensors
        # the saved gradients are those of the reduced loss with a unit upstream: scale them in
        # place (exact for the usual upstream of 1) and hand them out once
        g = grad_loss.reshape(())
        dscale, dx = dscale * g, dx.mul_(g)
        dparts = [d.mul_(g) for d in dparts]
    else:
        anchors, scale, lse, *parts = ctx.saved_tensors
        grad_rows = grad_loss.float().expand(anchors.shape[0]) if reduction != "none" else grad_loss.float()
        if reduction == "mean":
            grad_rows = grad_rows / anchors.shape[0]
        dscale, dx, *dparts = infonce_loss_backward(
            anchors, parts, scale, lse, grad_rows.contiguous(), hn_weight, hn_offset, target_offset,
            n_grad_parts, chunk_rows)
    needs = ctx.needs_input_grad
    part_grads = [d if need else None for d, need in zip(dparts, needs[1][:n_grad_parts])]
    part_grads += [None] * (n_parts - n_grad_parts)
    return (dx if needs[0] else None, part_grads,
            dscale.reshape(()).to(ctx.scale_dtype) if needs[2] else None,
            None, None, None, None, None, None, None)


infonce_loss.register_autograd(_backward, setup_context=_setup_context)


def triton_loss(x: torch.Tensor, parts: Sequence[torch.Tensor], scale: torch.Tensor, hn_weight: float,
                hn_offset: int, target_offset: int, *, n_grad_parts: int, reduction: str,
                chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Differentiable fused InfoNCE loss of one direction (the ``triton`` backend); see
    :func:`infonce_loss`.

    Without gradients, and for per-row upstream gradients (``reduction="none"``), the forward is
    the fused tile kernel: no N x M storage at all. With gradients and a mean / sum reduction, the
    gradients are formed in the same pass.
    """
    wants_grad = torch.is_grad_enabled() and (
        x.requires_grad or scale.requires_grad or any(p.requires_grad for p in parts[:n_grad_parts]))
    out = infonce_loss(x.contiguous(), [p.contiguous() for p in parts], scale.to(torch.float32).reshape(()),
                       float(hn_weight), int(hn_offset), int(target_offset), int(n_grad_parts), reduction,
                       int(chunk_rows or 0), bool(reduction != "none" and wants_grad))
    return out[0]
