"""``LayerNorm(residual + dropout(x + x_bias))``: the user API, the eager twin and the dispatch.

The tail of every post-LN sublayer (BERT's ``BertSelfOutput`` / ``BertOutput``, RoBERTa's, XLM-R's)
after its dense GEMM. :func:`dropout_add_layer_norm` checks its inputs and runs either the fused
Triton kernel (:mod:`fastcse.kernels.dropout_add_norm`: one kernel forward, two backward, no stored
dropout mask) or :func:`dropout_add_layer_norm_eager`, the same formula in PyTorch ops (the CPU
path and the ``eager`` twin of the benchmarks).

Dtypes follow eager PyTorch: the bias is rounded to x's dtype and added, dropout keeps x's dtype,
the add promotes x and the residual, and the norm's output is fp32 under autocast (LayerNorm is
an autocast fp32 op) and the add's dtype otherwise. The kernel computes the norm in fp32.

Under autocast the output is fp32 (the residual stream) and the next GEMM casts it to the autocast
dtype, a kernel of its own forward and backward and an add of the two gradients. ``low_dtype``
makes the one kernel write that cast copy too and the backward kernel add its gradient to the
output's, as autograd would (the pair ``(out, out.to(low_dtype))`` is returned).

Dropout masks: the eager twin draws from torch's generator like ``nn.Dropout``; the kernel draws
Philox noise of an int64 ``seed`` tensor and a ``stream`` number (one seed per model forward,
a stream per call site, so a checkpointed layer recomputes the same masks from the same seed).
:func:`fastcse.kernels.dropout_add_norm.dropout_keep_rows` returns the kernel's mask.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from fastcse.kernels._triton_utils import draw_philox_seed, require_triton, triton_available

Backend = Literal["auto", "triton", "eager"]
BACKENDS = ("auto", "triton", "eager")

# The kernels' limits, checked here before any launch: a row normalised in one program's registers
# (a 1.5B model's hidden size is 1,536 - 2,048) and 32-bit Philox counters (kernel_fits)
_MAX_DIM = 16384
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, residual, weight, bias, x_bias, dropout_p, eps) -> None:
    """Shapes, dtypes, devices and ranges (free: no device synchronisation)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be a (..., dim) tensor with dim > 0, got shape {tuple(getattr(x, 'shape', ()))}")
    dim = x.shape[-1]
    if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(getattr(residual, 'shape', ()))}")
    named = {"x": x, "residual": residual, "weight": weight, "bias": bias}
    if x_bias is not None:
        named["x_bias"] = x_bias
    for name, t in named.items():
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be fp32, fp16 or bf16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x on {x.device}")
    for name in ("weight", "bias", "x_bias"):
        if name in named and named[name].shape != (dim,):
            raise ValueError(f"{name} must be ({dim},) (x's last dim), got {tuple(named[name].shape)}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not float(eps) > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")


def _check_seed(seed, stream, device) -> None:
    if seed is not None and (not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64
                             or seed.shape != (1,) or seed.device != device):
        raise ValueError(f"seed must be an int64 (1,) tensor on {device}, got "
                         f"{getattr(seed, 'dtype', type(seed).__name__)} {tuple(getattr(seed, 'shape', ()))} "
                         f"on {getattr(seed, 'device', None)}")
    if not isinstance(stream, int) or not 0 <= stream < 2**31:
        raise ValueError(f"stream must be an int in [0, 2**31), got {stream!r}")


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast lowers to on ``device``'s type, or None where it is off (or knows no
    such device type). bench/perf_model.py answers it for the meta tensors it plays autocast on."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def output_dtype(x: torch.Tensor, residual: torch.Tensor) -> torch.dtype:
    """The norm's output dtype as eager gives it: fp32 under autocast on x's device, else the add's."""
    if autocast_dtype(x.device) is not None:
        return torch.float32
    return torch.promote_types(x.dtype, residual.dtype)


def kernel_fits(x: torch.Tensor) -> bool:
    """Whether the fused kernel takes x's sizes (rows at most 2**31 / ceil(dim / 8), dim <= 16384)."""
    dim = x.shape[-1]
    rows = x.numel() // max(dim, 1)
    return 0 < dim <= _MAX_DIM and rows * ((dim + 7) // 8) < 2**31


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """``auto`` -> the kernel on CUDA (when Triton imports and the sizes fit), the eager twin
    elsewhere: on the CPU eager is exact and fast, and the interpreter only serves the tests,
    which ask for ``triton`` by name. A forced ``triton`` is checked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() and kernel_fits(x) else "eager"
    if backend == "triton":
        require_triton(x)
        if not kernel_fits(x):
            raise ValueError(f"the fused kernel takes dim <= {_MAX_DIM} and fewer than 2**31 / ceil(dim / 8) "
                             f"rows, got {tuple(x.shape)}")
    return backend


def dropout_add_layer_norm_eager(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor, *, x_bias: Optional[torch.Tensor] = None,
                                 dropout_p: float = 0.0, eps: float = 1e-5, training: bool = True,
                                 low_dtype: Optional[torch.dtype] = None):
    """The formula in PyTorch ops, with ``nn.Dropout``'s mask (no input checks); with
    ``low_dtype`` the pair (output, output cast to it)."""
    if x_bias is not None:
        x = x + x_bias.to(x.dtype)
    z = F.dropout(x, dropout_p, training) + residual
    out = F.layer_norm(z, (z.shape[-1],), weight, bias, eps)
    return out if low_dtype is None else (out, out.to(low_dtype))


def dropout_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                           x_bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0, eps: float = 1e-5,
                           training: bool = True, seed: Optional[torch.Tensor] = None, stream: int = 0,
                           low_dtype: Optional[torch.dtype] = None, backend: Backend = "auto"):
    """``LayerNorm(residual + dropout(x + x_bias))`` over the last dim, fused on CUDA.

    Args:
        x: ``(..., dim)``, typically a dense layer's output computed without its bias.
        residual: x's shape (the sublayer's input).
        weight, bias: the LayerNorm's ``(dim,)`` affine parameters.
        x_bias: the dense layer's ``(dim,)`` bias, added inside the kernel (its gradient is summed
            there too), or None.
        dropout_p: dropout probability on ``x + x_bias``, in [0, 1); no dropout when
            ``training`` is False.
        eps: LayerNorm's epsilon.
        seed: the kernel's int64 ``(1,)`` Philox seed; None draws one from torch's generator. The
            eager backend draws from torch's generator and ignores it.
        stream: which of the seed's independent masks to use (a small int, one per call site).
        low_dtype: also return the output cast to this floating dtype (the next GEMM's input under
            autocast), written by the same kernel; its gradient is added to the output's in the
            backward kernel. None: the output only.
        backend: "triton" (the fused kernel), "eager" (PyTorch ops), "auto" (triton on CUDA).

    Returns the normalised ``(..., dim)``, dtype as :func:`output_dtype`; with ``low_dtype`` the
    pair ``(out, out.to(low_dtype))``.

    Example:
        >>> x, res = torch.randn(5, 16), torch.randn(5, 16)
        >>> out = dropout_add_layer_norm(x, res, torch.ones(16), torch.zeros(16), dropout_p=0.1)
    """
    _check(x, residual, weight, bias, x_bias, dropout_p, eps)
    _check_seed(seed, stream, x.device)
    if low_dtype is not None and low_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"low_dtype must be None, fp32, fp16 or bf16, got {low_dtype}")
    p = float(dropout_p) if training else 0.0
    if resolve_backend(backend, x) == "eager":
        return dropout_add_layer_norm_eager(x, residual, weight, bias, x_bias=x_bias, dropout_p=p, eps=eps,
                                            low_dtype=low_dtype)
    if bias.dtype != weight.dtype or (x_bias is not None and x_bias.dtype != weight.dtype):
        raise ValueError("the fused kernel takes weight, bias and x_bias of one dtype (its parameter "
                         f"gradients share a buffer), got {weight.dtype}, {bias.dtype}, "
                         f"{None if x_bias is None else x_bias.dtype}; use backend='eager'")
    from fastcse.kernels.dropout_add_norm import dropout_add_norm_triton

    if p > 0.0 and seed is None:
        seed = draw_philox_seed(x.device)
    return dropout_add_norm_triton(x, residual, weight.contiguous(), bias.contiguous(),
                                   x_bias=None if x_bias is None else x_bias.contiguous(),
                                   dropout_p=p, eps=float(eps), seed=seed, stream=stream,
                                   out_dtype=output_dtype(x, residual), low_dtype=low_dtype)
