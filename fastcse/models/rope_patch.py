"""Swap fastcse's fused rotary kernel into Hugging Face RoPE encoders (RoFormer, ModernBERT).

The patch is per module instance (no class or module global is modified, so other models in the
process keep their own code) and numerically neutral: the fused op computes the same formula in
fp32 and rounds once. When the backend resolves to ``eager`` (``backend="auto"`` on CPU) a patched
module calls the model's own rotary code, so CPU runs stay bit-identical to the unpatched model.

- RoFormer: ``RoFormerSelfAttention.apply_rotary_position_embeddings`` is a staticmethod looked up
  through ``self``; an instance attribute of the same name shadows it. RoFormer pairs features
  interleaved, and its ``sinusoidal_pos`` (1, 1, seqlen, head_dim) holds sin in the first half and
  cos in the second.
- ModernBERT: ``ModernBertAttention.forward`` calls the module-level ``apply_rotary_pos_emb``; the
  patched instance gets a copy of ``forward`` (same code object, so the rest of HF's forward is
  untouched) whose globals, a shadow of HF's module, map that name to the fused function. cos/sin come in as
  (batch or 1, seqlen, head_dim) with the two halves equal (``cat((freqs, freqs))``), half layout.
"""

from __future__ import annotations

import sys
import types
from typing import Callable

import torch
from torch import nn

from fastcse.rotary import Backend, apply_rotary, resolve_backend

_PATCHED_FLAG = "_fastcse_fused_rotary"


# --- RoFormer ----------------------------------------------------------------------------------


def _roformer_rotary(original: Callable, backend: str) -> Callable:
    def apply_rotary_position_embeddings(sinusoidal_pos, query_layer, key_layer, value_layer=None):
        # query/key/value: (batch, heads, seqlen, head_dim), views of (batch, seqlen, heads, dim).
        seqlen, head_dim = query_layer.shape[-2], query_layer.shape[-1]
        supported = (
            sinusoidal_pos.dim() == 4 and sinusoidal_pos.shape[:2] == (1, 1)
            and sinusoidal_pos.shape[-2] == seqlen and key_layer.shape[-2] == seqlen
            and head_dim % 2 == 0 and sinusoidal_pos.shape[-1] == head_dim
        )
        if not supported or resolve_backend(backend, query_layer) == "eager":
            return original(sinusoidal_pos, query_layer, key_layer, value_layer)
        table = sinusoidal_pos[0, 0]
        sin, cos = table[:, : head_dim // 2], table[:, head_dim // 2:]
        # Positions are 0..seqlen-1 of a table built for exactly this seqlen: nothing to validate.
        q, k = apply_rotary(query_layer.transpose(1, 2), key_layer.transpose(1, 2), cos, sin,
                            layout="interleaved", backend=backend, validate=False)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if value_layer is None:
            return q, k
        v, _ = apply_rotary(value_layer.transpose(1, 2), None, cos, sin, layout="interleaved",
                            backend=backend, validate=False)
        return q, k, v.transpose(1, 2)

    return apply_rotary_position_embeddings


def _patch_roformer(module: nn.Module, backend: str) -> None:
    original = type(module).apply_rotary_position_embeddings
    module.apply_rotary_position_embeddings = _roformer_rotary(original, backend)


def _unpatch_roformer(module: nn.Module) -> None:
    del module.apply_rotary_position_embeddings


# --- ModernBERT --------------------------------------------------------------------------------


def _modernbert_rotary(original: Callable, backend: str) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        # q, k: (batch, heads, seqlen, head_dim); cos, sin: (batch or 1, seqlen, head_dim).
        batch, _, seqlen, head_dim = q.shape
        supported = (
            unsqueeze_dim == 1 and cos.dim() == 3 and cos.shape[-2:] == (seqlen, head_dim)
            and cos.shape[0] in (1, batch) and sin.shape == cos.shape and k.shape[-2] == seqlen
            and head_dim % 2 == 0
        )
        if not supported or resolve_backend(backend, q) == "eager":
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        cos_half, sin_half = cos[..., : head_dim // 2], sin[..., : head_dim // 2]
        position_ids = None
        if cos.shape[0] == 1:
            cos_table, sin_table = cos_half[0], sin_half[0]  # positions are 0..seqlen-1
        else:
            # Per-row cos/sin (custom position_ids): row b * seqlen + t of the flattened tables.
            cos_table = cos_half.reshape(batch * seqlen, -1)
            sin_table = sin_half.reshape(batch * seqlen, -1)
            position_ids = torch.arange(batch * seqlen, device=q.device).view(batch, seqlen)
        q_out, k_out = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos_table, sin_table,
                                    layout="half", position_ids=position_ids, backend=backend,
                                    validate=False)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)

    return apply_rotary_pos_emb


_FORWARD_COPIES: dict[tuple[int, str], Callable] = {}


def _forward_with_fused_rotary(forward: Callable, backend: str) -> Callable:
    """A copy of HF's ``forward`` (same code object) whose global ``apply_rotary_pos_emb`` is ours.

    The copy's globals are the ``__dict__`` of a module registered in ``sys.modules`` under its
    own name: torch.compile finds a function's globals by importing ``__globals__["__name__"]``,
    and with HF's module name it would guard on HF's original function (and fail).
    """
    key = (id(forward), backend)
    if key not in _FORWARD_COPIES:
        hf_globals = forward.__globals__
        name = f"fastcse._rope_patched.{hf_globals['__name__']}.{backend}"
        shadow = types.ModuleType(name)
        shadow.__dict__.update(hf_globals)
        shadow.__name__ = name
        shadow.apply_rotary_pos_emb = _modernbert_rotary(hf_globals["apply_rotary_pos_emb"], backend)
        sys.modules[name] = shadow
        patched = types.FunctionType(forward.__code__, shadow.__dict__, forward.__name__,
                                     forward.__defaults__, forward.__closure__)
        patched.__kwdefaults__ = forward.__kwdefaults__
        patched.__qualname__ = forward.__qualname__
        _FORWARD_COPIES[key] = patched
    return _FORWARD_COPIES[key]


def _patch_modernbert(module: nn.Module, backend: str) -> bool:
    forward = type(module).forward
    if "apply_rotary_pos_emb" not in forward.__code__.co_names or hasattr(forward, "__wrapped__"):
        return False  # a transformers version that reaches its rotary some other way
    module.forward = types.MethodType(_forward_with_fused_rotary(forward, backend), module)
    return True


def _unpatch_modernbert(module: nn.Module) -> None:
    del module.forward


# --- public ------------------------------------------------------------------------------------

# class name -> (patch, unpatch); matched by name so transformers is never imported here.
_PATCHERS = {
    "RoFormerSelfAttention": (_patch_roformer, _unpatch_roformer),
    "ModernBertAttention": (_patch_modernbert, _unpatch_modernbert),
}


def patch_rotary(model: nn.Module, *, backend: Backend = "auto") -> int:
    """Make every RoFormer / ModernBERT attention module of ``model`` use the fused rotary kernel.

    Idempotent (a second call re-targets ``backend``). Outputs and gradients equal the unpatched
    model's up to fp32 rounding order; on CPU with ``backend="auto"`` they are bit-identical.

    Returns:
        The number of attention modules that now run the fused rotary (0: nothing to patch).
    """
    if backend not in ("auto", "triton", "eager"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'eager', got {backend!r}")
    count = 0
    for module in model.modules():
        patchers = _PATCHERS.get(type(module).__name__)
        if patchers is None:
            continue
        patch, unpatch = patchers
        if getattr(module, _PATCHED_FLAG, False):
            unpatch(module)
        if patch(module, backend) is False:
            continue
        setattr(module, _PATCHED_FLAG, True)
        count += 1
    return count


def unpatch_rotary(model: nn.Module) -> int:
    """Restore the models' own rotary code; returns how many modules were restored."""
    count = 0
    for module in model.modules():
        if getattr(module, _PATCHED_FLAG, False):
            _PATCHERS[type(module).__name__][1](module)
            delattr(module, _PATCHED_FLAG)
            count += 1
    return count
