"""Varlen flash attention with attention dropout on packed tokens: PyTorch's own FlashAttention-2.

``torch.nn.attention.varlen.varlen_attn`` has no dropout argument and SDPA on jagged nested tensors
pays Python dispatch per op; the ATen ops under both, ``aten._flash_attention_forward`` /
``aten._flash_attention_backward``, take ``cu_seqlens``, ``dropout_p``, a scale and a window. This
file wraps the pair as one ``torch.library`` custom op with an autograd formula, so that
``torch.compile`` sees one opaque node (no graph break, no recompile per batch of new lengths when
``max_seqlen`` is marked dynamic) and the backward replays the forward's dropout mask from the RNG
state the forward returns (Philox seed and offset; ``rng_state`` / ``unused`` in torch 2.13's
schema, ``philox_seed`` / ``philox_offset`` in older ones: both are passed on positionally, untouched).

CUDA only: the flash kernels take fp16 / bf16 on sm80+ (head_dim <= 256, a multiple of 8). On the
meta device the ops' meta kernels give the shapes (the performance model traces through them).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["flash_varlen_attention", "flash_varlen_supported", "flash_varlen_unsupported_reason",
           "flash_varlen_has_window"]

aten = torch.ops.aten


@functools.lru_cache(maxsize=None)
def _keyword_args() -> tuple[frozenset, frozenset]:
    """Keyword-only argument names of the forward and backward ATen ops in this torch.

    Inspected, not assumed: the schema moved between torch releases (torch 2.13 names the RNG
    outputs rng_state / unused and adds seqused_k, alibi_slopes, block_table, num_splits).
    """
    def names(op):
        return frozenset(a.name for a in op.default._schema.arguments if a.kwarg_only)

    return names(aten._flash_attention_forward), names(aten._flash_attention_backward)


def _window_kwargs(kw: frozenset, window_left: int, window_right: int) -> dict:
    if window_left < 0 and window_right < 0:
        return {}
    if not {"window_size_left", "window_size_right"} <= kw:
        raise RuntimeError("this torch's aten._flash_attention_forward takes no window_size_left/right; "
                           "use the padded SDPA varlen kernel for sliding-window attention")
    return {"window_size_left": window_left, "window_size_right": window_right}


@torch.library.custom_op("fastcse::flash_varlen_fwd", mutates_args=())
def _flash_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, dropout_p: float, scale: float, window_left: int,
                      window_right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fwd_kw, _ = _keyword_args()
    out, lse, rng_a, rng_b, _debug = aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, False, False,
        scale=scale, **_window_kwargs(fwd_kw, window_left, window_right))
    return out, lse, rng_a, rng_b


@_flash_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, window_left, window_right):
    # the ATen op's own meta kernel: shapes and dtypes exactly as CUDA returns them
    fwd_kw, _ = _keyword_args()
    out, lse, rng_a, rng_b, _debug = aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, False, False,
        scale=scale, **_window_kwargs(fwd_kw, window_left, window_right))
    return out, lse, rng_a, rng_b


@torch.library.custom_op("fastcse::flash_varlen_bwd", mutates_args=())
def _flash_varlen_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                      dropout_p: float, scale: float, rng_a: torch.Tensor, rng_b: torch.Tensor,
                      window_left: int, window_right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, bwd_kw = _keyword_args()
    dq, dk, dv = aten._flash_attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
        False, rng_a, rng_b, scale=scale, **_window_kwargs(bwd_kw, window_left, window_right))
    return dq, dk, dv


@_flash_varlen_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, scale, rng_a, rng_b, window_left,
      window_right):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, window_left, window_right = inputs
    out, lse, rng_a, rng_b = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_a, rng_b)
    ctx.params = (max_seqlen, dropout_p, scale, window_left, window_right)
    # lse and the RNG state never carry a gradient: without this autograd would launch a zero-fill for
    # each of them in every layer's backward (three kernels a layer) only for _backward to ignore them
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_lse, _grad_rng_a, _grad_rng_b):
    q, k, v, out, lse, cu_seqlens, rng_a, rng_b = ctx.saved_tensors
    if grad_out is None:  # (the attention output itself fed nothing that needs a gradient)
        return None, None, None, None, None, None, None, None, None
    max_seqlen, dropout_p, scale, window_left, window_right = ctx.params
    # the saved RNG state replays the forward's dropout mask inside the backward kernel
    dq, dk, dv = _flash_varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, scale,
                                   rng_a, rng_b, window_left, window_right)
    return dq, dk, dv, None, None, None, None, None, None


_flash_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_varlen_unsupported_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when the flash kernels can run tensors of this device / dtype / head size, else why not."""
    device = torch.device(device)
    if device.type not in ("cuda", "meta"):
        return f"needs CUDA tensors (got {device.type})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16 or bf16 (got {dtype})"
    if head_dim > 256 or head_dim % 8:
        return f"needs head_dim <= 256 and a multiple of 8 (got {head_dim})"
    # (a meta tensor posing as CUDA, as the performance model traces, has no capability to ask)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] < 8:
        return "needs an sm80+ GPU"
    return None


def flash_varlen_has_window() -> bool:
    """Whether this torch's flash ops take a sliding window (window_size_left / right)."""
    fwd_kw, bwd_kw = _keyword_args()
    return all({"window_size_left", "window_size_right"} <= kw for kw in (fwd_kw, bwd_kw))


def flash_varlen_supported(q: torch.Tensor) -> bool:
    return flash_varlen_unsupported_reason(q.device, q.dtype, q.shape[-1]) is None


def flash_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int, *, dropout_p: float = 0.0, scale: float | None = None,
                           window: int | None = None) -> torch.Tensor:
    """Bidirectional attention over packed sequences, attention dropout inside the kernel.

    Args:
        q, k, v: ``(total_tokens, nheads, head_dim)``, fp16 / bf16 CUDA; sequence ``b`` owns rows
            ``cu_seqlens[b]:cu_seqlens[b + 1]``.
        cu_seqlens: ``(batch + 1,)`` int32 cumulative lengths.
        max_seqlen: longest sequence (a launch size: a Python int).
        dropout_p: dropout on the attention probabilities; the backward replays the same mask.
            Pass 0 in evaluation mode (the op is then deterministic).
        scale: softmax scale, default ``head_dim ** -0.5``.
        window: token ``i`` attends to ``j`` only when ``|i - j| <= window`` (None: everywhere).

    Returns ``(total_tokens, nheads, head_dim)`` in q's dtype.
    """
    reason = flash_varlen_unsupported_reason(q.device, q.dtype, q.shape[-1])
    if reason is not None:
        raise RuntimeError(f"flash varlen attention {reason}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    left = right = -1 if window is None else int(window)
    out, _lse, _a, _b = _flash_varlen_fwd(q, k, v, cu_seqlens, int(max_seqlen), float(dropout_p), float(scale),
                                          left, right)
    return out
