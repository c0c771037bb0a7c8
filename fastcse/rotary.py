"""Rotary position embeddings: the user API, the eager reference and the cos/sin cache module.

:func:`apply_rotary` checks its inputs and dispatches to the fused Triton kernel
(:mod:`fastcse.kernels.rope`) or to :func:`apply_rotary_eager`, the plain PyTorch formula that is
the reference of the tests, the ``eager`` provider of ``bench/bench_rope.py`` and the CPU fallback.

Conventions (shared by both backends):
    q: (batch, seqlen, nheads_q, headdim), or packed (total_tokens, nheads_q, headdim) with
       ``cu_seqlens`` (batch + 1,) holding each sequence's start (the unpadded batches of the
       encoders)
    k: the same leading dims with nheads_k heads (may differ from nheads_q), or None
    cos, sin: (seqlen_ro, rotary_dim // 2), row p holds cos/sin(p * inv_freq); the first
       rotary_dim features of each head are rotated, the rest pass through unchanged
    layout: "half" pairs (x[i], x[i + rotary_dim/2]) (rotate_half: GPT-NeoX, Llama, ModernBERT);
       "interleaved" pairs (x[2i], x[2i+1]) (RoFormer, GPT-J)
    position of a token: position_ids if given, else its index in its sequence plus
       seqlen_offsets (an int, or a (batch,) tensor of per-sequence offsets)
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from torch import nn

from fastcse.kernels._triton_utils import require_triton, triton_available

Layout = Literal["half", "interleaved"]
Backend = Literal["auto", "triton", "eager"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- input checks ------------------------------------------------------------------------------


def _check_static(q, k, cos, sin, layout, cu_seqlens, position_ids, seqlen_offsets) -> None:
    """Shape, dtype and device checks: free (no device synchronisation), valid under compile."""
    if layout not in ("half", "interleaved"):
        raise ValueError(f"layout must be 'half' or 'interleaved', got {layout!r}")
    varlen = cu_seqlens is not None
    want_dim = 3 if varlen else 4
    names = "(total_tokens, nheads, headdim) with cu_seqlens" if varlen else "(batch, seqlen, nheads, headdim)"
    if not isinstance(q, torch.Tensor) or q.dim() != want_dim:
        raise ValueError(f"q must be {names}, got shape {tuple(getattr(q, 'shape', ()))}")
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating-point tensor, got {q.dtype}")
    head_dim = q.shape[-1]
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even to form rotation pairs, got {head_dim}")
    if k is not None:
        if k.dim() != want_dim or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != head_dim:
            raise ValueError(
                f"k must match q's leading dims and head_dim (heads may differ): q {tuple(q.shape)}, "
                f"k {tuple(k.shape)}")
        if k.dtype != q.dtype:
            raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
        if k.device != q.device:
            raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")
    if cos.dim() != 2 or sin.shape != cos.shape:
        raise ValueError(
            f"cos and sin must both be (seqlen_ro, rotary_dim // 2), got {tuple(cos.shape)} and "
            f"{tuple(sin.shape)}")
    if cos.dtype != sin.dtype or not cos.is_floating_point():
        raise ValueError(f"cos and sin must share a floating dtype, got {cos.dtype} and {sin.dtype}")
    if cos.device != q.device or sin.device != q.device:
        raise ValueError(f"cos/sin on {cos.device}/{sin.device} but q on {q.device}")
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim == 0 or rotary_dim > head_dim:
        raise ValueError(
            f"rotary_dim (2 * cos.shape[1] = {rotary_dim}) must be in [2, head_dim = {head_dim}]")
    if varlen:
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must be (batch + 1,), got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens on {cu_seqlens.device} but q on {q.device}")
    n_seqs = cu_seqlens.shape[0] - 1 if varlen else q.shape[0]
    if position_ids is not None:
        if position_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"position_ids must be int32 or int64, got {position_ids.dtype}")
        if position_ids.device != q.device:
            raise ValueError(f"position_ids on {position_ids.device} but q on {q.device}")
        if varlen:
            ok = position_ids.shape == (q.shape[0],)
        else:
            ok = position_ids.dim() in (1, 2) and position_ids.shape[-1] == q.shape[1] and (
                position_ids.dim() == 1 or position_ids.shape[0] in (1, q.shape[0]))
        if not ok:
            want = "(total_tokens,)" if varlen else "(batch, seqlen) or (seqlen,)"
            raise ValueError(f"position_ids must be {want}, got {tuple(position_ids.shape)}")
        if isinstance(seqlen_offsets, torch.Tensor) or seqlen_offsets != 0:
            raise ValueError("give position_ids or seqlen_offsets, not both")
    if isinstance(seqlen_offsets, torch.Tensor):
        if seqlen_offsets.shape != (n_seqs,) or seqlen_offsets.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"seqlen_offsets must be an int or an int32/int64 tensor of shape ({n_seqs},), got "
                f"{seqlen_offsets.dtype} {tuple(seqlen_offsets.shape)}")
        if seqlen_offsets.device != q.device:
            raise ValueError(f"seqlen_offsets on {seqlen_offsets.device} but q on {q.device}")
    else:
        if int(seqlen_offsets) < 0:
            raise ValueError(f"seqlen_offsets must be >= 0, got {seqlen_offsets}")
        if not varlen and position_ids is None and q.shape[1] + seqlen_offsets > cos.shape[0]:
            raise ValueError(
                f"cos/sin cover {cos.shape[0]} positions but positions up to "
                f"{q.shape[1] + seqlen_offsets - 1} are used (seqlen {q.shape[1]} + offset "
                f"{seqlen_offsets})")


def _check_data(q, cos, cu_seqlens, position_ids, seqlen_offsets) -> None:
    """Checks on tensor values; each reads device memory (one synchronisation on CUDA)."""
    seqlen_ro = cos.shape[0]
    if cu_seqlens is not None:
        cu = cu_seqlens.detach().cpu().long()
        lengths = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
        if int(cu[-1]) != q.shape[0]:
            raise ValueError(
                f"cu_seqlens[-1] = {int(cu[-1])} does not match total_tokens = {q.shape[0]}")
    if position_ids is not None:
        if position_ids.numel():
            lo, hi = int(position_ids.min()), int(position_ids.max())
            if lo < 0 or hi >= seqlen_ro:
                raise ValueError(
                    f"position_ids span [{lo}, {hi}] but cos/sin cover positions [0, {seqlen_ro - 1}]")
        return
    if isinstance(seqlen_offsets, torch.Tensor):
        offsets = seqlen_offsets.detach().cpu().long()
        if bool((offsets < 0).any()):
            raise ValueError(f"seqlen_offsets must be >= 0, got {offsets.tolist()}")
        lengths = (cu[1:] - cu[:-1]) if cu_seqlens is not None else torch.full_like(offsets, q.shape[1])
        ends = lengths + offsets
        if ends.numel() and int(ends.max()) > seqlen_ro:
            raise ValueError(
                f"cos/sin cover {seqlen_ro} positions but a sequence reaches position "
                f"{int(ends.max()) - 1} (length + offset)")
    elif cu_seqlens is not None:
        longest = int(lengths.max()) if lengths.numel() else 0
        if longest + int(seqlen_offsets) > seqlen_ro:
            raise ValueError(
                f"cos/sin cover {seqlen_ro} positions but the longest sequence ({longest}) plus "
                f"offset {int(seqlen_offsets)} needs {longest + int(seqlen_offsets)}")


# --- eager reference ---------------------------------------------------------------------------


def token_positions(q: torch.Tensor, *, cu_seqlens=None, position_ids=None, seqlen_offsets=0) -> torch.Tensor:
    """Position of every token: (batch, seqlen), or (total_tokens,) when ``cu_seqlens`` is given."""
    device = q.device
    if cu_seqlens is not None:
        if position_ids is not None:
            return position_ids.long()
        total = q.shape[0]
        starts = cu_seqlens[:-1].long()
        lengths = cu_seqlens[1:].long() - starts
        seq_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths,
                                               output_size=total)
        positions = torch.arange(total, device=device) - starts[seq_of_token]
        if isinstance(seqlen_offsets, torch.Tensor):
            return positions + seqlen_offsets.long()[seq_of_token]
        return positions + int(seqlen_offsets)
    batch, seqlen = q.shape[0], q.shape[1]
    if position_ids is not None:
        return position_ids.long().reshape(-1, seqlen).expand(batch, seqlen)
    positions = torch.arange(seqlen, device=device).expand(batch, seqlen)
    if isinstance(seqlen_offsets, torch.Tensor):
        return positions + seqlen_offsets.long()[:, None]
    return positions + int(seqlen_offsets)


def _rotate_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str,
                  inplace: bool) -> torch.Tensor:
    """x: (..., tokens, heads, headdim); cos, sin: (..., tokens, 1, rotary_dim // 2) in x.dtype."""
    rotary_dim = 2 * cos.shape[-1]
    x_rot = x[..., :rotary_dim]
    if layout == "half":
        cos_full, sin_full = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        x1, x2 = x_rot[..., : rotary_dim // 2], x_rot[..., rotary_dim // 2:]
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        cos_full, sin_full = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., 0::2]), dim=-1).flatten(-2)
    out = x_rot * cos_full + rotated * sin_full
    if inplace:
        x[..., :rotary_dim].copy_(out)
        return x
    if rotary_dim < x.shape[-1]:
        out = torch.cat((out, x[..., rotary_dim:]), dim=-1)
    return out


def apply_rotary_eager(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    layout: Layout = "half",
    cu_seqlens: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
    inplace: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The plain formula ``x * cos + rotate(x) * sin`` in x's dtype, as Hugging Face writes it.

    Same contract as :func:`apply_rotary` (no input checks); cos/sin are gathered per token and
    cast to q's dtype, so in fp16/bf16 this carries PyTorch's own low-precision error.
    """
    positions = token_positions(q, cu_seqlens=cu_seqlens, position_ids=position_ids,
                                seqlen_offsets=seqlen_offsets)
    cos_t = cos[positions].to(q.dtype).unsqueeze(-2)
    sin_t = sin[positions].to(q.dtype).unsqueeze(-2)
    q_out = _rotate_eager(q, cos_t, sin_t, layout, inplace)
    k_out = _rotate_eager(k, cos_t, sin_t, layout, inplace) if k is not None else None
    return q_out, k_out


# --- public API --------------------------------------------------------------------------------


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """``auto`` -> triton on CUDA when Triton imports, eager otherwise; checks forced backends."""
    if backend == "auto":
        return "triton" if q.is_cuda and triton_available() else "eager"
    if backend == "eager":
        return "eager"
    if backend == "triton":
        require_triton(q)
        return "triton"
    raise ValueError(f"backend must be 'auto', 'triton' or 'eager', got {backend!r}")


def apply_rotary(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    layout: Layout = "half",
    cu_seqlens: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
    inplace: bool = False,
    backend: Backend = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotate queries and keys by their positions (rotary position embedding).

    Args:
        q: (batch, seqlen, nheads_q, headdim), or (total_tokens, nheads_q, headdim) with cu_seqlens.
        k: same leading dims and headdim as q, nheads_k heads; or None to rotate q alone.
        cos, sin: (seqlen_ro, rotary_dim // 2); rotary_dim <= headdim, features past it pass
            through. Any float dtype; the kernel computes in fp32 and treats them as constants
            (no gradient; the eager backend lets autograd reach them).
        layout: "half" (rotate_half) or "interleaved" (pairs (x0, x1), (x2, x3), ...).
        cu_seqlens: (batch + 1,) int32/int64 starts of the packed sequences.
        position_ids: (batch, seqlen) / (seqlen,), or (total_tokens,) when packed.
        seqlen_offsets: int, or (batch,) tensor: position of each sequence's first token.
        inplace: rotate q and k in their own storage (and return them).
        backend: "triton" (fused kernel, one launch for q and k), "eager" (reference), "auto"
            (triton on CUDA, eager on CPU).
        validate: also check tensor values (cu_seqlens monotonic and summing to total_tokens,
            positions inside cos/sin); costs one device synchronisation on CUDA, skipped inside
            torch.compile. Callers that build positions themselves may turn it off.

    Returns:
        (q_rotated, k_rotated) of q's and k's shapes and dtypes (k_rotated is None without k).

    Example:
        >>> rope = RotaryEmbedding(64)
        >>> q, k = torch.randn(2, 10, 4, 64), torch.randn(2, 10, 1, 64)
        >>> cos, sin = rope.cos_sin(10, q.device)
        >>> q_rot, k_rot = apply_rotary(q, k, cos, sin)
    """
    _check_static(q, k, cos, sin, layout, cu_seqlens, position_ids, seqlen_offsets)
    if validate and not torch.compiler.is_compiling():
        _check_data(q, cos, cu_seqlens, position_ids, seqlen_offsets)
    if resolve_backend(backend, q) == "eager":
        return apply_rotary_eager(q, k, cos, sin, layout=layout, cu_seqlens=cu_seqlens,
                                  position_ids=position_ids, seqlen_offsets=seqlen_offsets,
                                  inplace=inplace)
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"the triton backend takes fp32/fp16/bf16, got {q.dtype}")
    from fastcse.kernels.rope import rotary_triton

    if position_ids is not None and cu_seqlens is None and position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids is not None and cu_seqlens is None:
        position_ids = position_ids.expand(q.shape[0], q.shape[1])
    offsets_tensor = seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None
    offset = 0 if offsets_tensor is not None else int(seqlen_offsets)
    return rotary_triton(q, k, cos, sin, interleaved=layout == "interleaved", cu_seqlens=cu_seqlens,
                         position_ids=position_ids, seqlen_offsets=offsets_tensor, offset=offset,
                         inplace=inplace)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with a cos/sin cache.

    The cache is built once per (length, dim, base, dtype, device) and grown (to the next power of
    two) when a longer batch comes; it is plain state, not a buffer, so state dicts stay clean.

    Args:
        dim: rotary_dim, the number of rotated features per head (even, <= head_dim).
        base: the frequency base: inv_freq[i] = base ** (-2i / dim).
        layout: "half" or "interleaved" (see :func:`apply_rotary`).
        backend: "auto", "triton" or "eager".
        cache_dtype: dtype of the cos/sin tables (fp32 by default: the kernel computes in fp32, and
            the tables are tiny next to q and k).

    Inputs of forward: q, k as in :func:`apply_rotary`; cu_seqlens, position_ids, seqlen_offsets,
    inplace; ``max_position`` (optional) bounds the positions used, saving a device read when
    positions come from tensors.
    """

    def __init__(self, dim: int, base: float = 10000.0, *, layout: Layout = "half",
                 backend: Backend = "auto", cache_dtype: torch.dtype = torch.float32):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"rotary dim must be positive and even, got {dim}")
        self.dim, self.base, self.layout, self.backend = dim, float(base), layout, backend
        self.cache_dtype = cache_dtype
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, layout={self.layout!r}, backend={self.backend!r}"

    def cos_sin(self, length: int, device: torch.device | str,
                dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (>= length, dim // 2) for positions 0, 1, ..., computed in float64."""
        device, dtype = torch.device(device), dtype or self.cache_dtype
        key = (device, dtype)
        cached = self._cache.get(key)
        if cached is None or cached[0].shape[0] < length:
            size = 1 << max(int(length) - 1, 0).bit_length()
            inv_freq = rotary_inv_freq(self.dim, self.base)
            angles = torch.outer(torch.arange(size, dtype=torch.float64), inv_freq)
            cached = (angles.cos().to(device, dtype), angles.sin().to(device, dtype))
            self._cache[key] = cached
        return cached

    def forward(self, q: torch.Tensor, k: Optional[torch.Tensor] = None, *,
                cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                seqlen_offsets: Union[int, torch.Tensor] = 0, inplace: bool = False,
                max_position: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # Table length = largest position used + 1; only tensor-valued positions need a device read.
        if max_position is not None:
            length = int(max_position) + 1
        elif position_ids is not None:
            length = int(position_ids.max()) + 1 if position_ids.numel() else 1
        elif cu_seqlens is None and not isinstance(seqlen_offsets, torch.Tensor):
            length = q.shape[1] + int(seqlen_offsets)
        else:
            if cu_seqlens is not None:
                lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            else:
                lengths = torch.full((q.shape[0],), q.shape[1], device=q.device)
            ends = lengths + seqlen_offsets
            length = int(ends.max()) if ends.numel() else 1
        cos, sin = self.cos_sin(max(length, 1), q.device)
        return apply_rotary(q, k, cos, sin, layout=self.layout, cu_seqlens=cu_seqlens,
                            position_ids=position_ids, seqlen_offsets=seqlen_offsets,
                            inplace=inplace, backend=self.backend)


def rotary_inv_freq(dim: int, base: float = 10000.0) -> torch.Tensor:
    """inv_freq[i] = base ** (-2i / dim), float64 (handy for building references)."""
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


__all__ = ["apply_rotary", "apply_rotary_eager", "RotaryEmbedding", "token_positions",
           "rotary_inv_freq", "resolve_backend"]
