"""``attn_backend="biased"``: Hugging Face T5 / DeBERTa-v2 attention on the fused relative-bias kernel.

:func:`patch_biased_attention` swaps, in place, the ``forward`` of

- T5 / MT5 / UMT5 **encoder self-attention** (``T5Attention``, ``MT5Attention``,
  ``UMT5Attention`` with ``is_decoder=False``): the bucketed relative position bias
  ``table[head, bucket(j - i)]`` is looked up per distance. The module's own ``compute_bias`` is
  evaluated once on the ``2 L - 1`` distances (a ``(1, heads, 1, 2 L - 1)`` table, so the
  gradient reaches ``relative_attention_bias.weight`` by autograd); T5 shares it between layers
  through the ``position_bias`` value HF passes from layer to layer. No ``1 / sqrt(d)`` scaling.
- DeBERTa-v2 / v3 ``DisentangledSelfAttention``: the relative embeddings go through the key /
  query projection (HF's ``pos_key_layer`` / ``pos_query_layer``, ``(heads, entries, head_dim)``,
  only the ``2 L - 1`` entries around the centre a length-L batch can reach when the bucketing
  allows) and, with the per-distance index of HF's (bucketed, clamped) ``relative_pos``, are handed
  to :func:`~fastcse.biased_attention.disentangled_attention`. On the kernel the c2p / p2c terms
  are computed inside the tiles from those embeddings: HF's ``seq x 2 span`` c2p / p2c tables are
  never built, and the embeddings' gradients are summed per distance by the kernel's backward
  (a distance-parallel pass over the stored score gradient, no atomics). HF's ``/ scale``
  (``sqrt(head_dim * scale_factor)``, rounded to the activation dtype as HF's
  ``scale.to(dtype)``) is one multiply of the whole score inside the kernel.

T5 / MT5 / UMT5 models also get their RMS norms (``T5LayerNorm`` and its copies) as one
``F.rms_norm`` call (:func:`_t5_norm_forward`): torch's fused kernel on CUDA.

The score matrix is never materialised. Key padding comes from the mask HF hands the module.
Dropout: attention-probability dropout runs inside the kernel (Philox, a fresh seed from torch's
generator per call, the same mask regenerated in the backward) with the module's rate in
training mode and none in eval mode; HF's hidden dropouts and DeBERTa's ``pos_dropout`` on the
relative embeddings are the model's own ``nn.Dropout`` modules, untouched.

The patched modules call the dispatch of :mod:`fastcse.biased_attention` with ``backend="auto"``:
the kernel wherever Triton can run (CUDA, or CPU under ``TRITON_INTERPRET=1``), and otherwise
:func:`~fastcse.biased_attention.chunked_attention`, the pure PyTorch twin with the same memory
shape (query chunks recomputed in the backward; its dropout is torch's own). The Triton module is
imported only when the kernel runs, so this module loads where Triton is not installed.

Falls back to the HF forward for what the kernel does not cover: cross-attention, decoder
caches, DeBERTa's ``query_states`` (enhanced mask decoder) and ``output_attentions=True`` (which
needs the probability matrix). Padded *query* rows attend to the valid keys (HF DeBERTa gives
them uniform attention over all keys): their outputs differ from HF's but never reach a real
token, since padded keys are masked.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from fastcse.biased_attention import biased_attention, disentangled_attention

_T5_NORM_CLASSES = ("T5LayerNorm", "MT5LayerNorm", "UMT5LayerNorm")
_T5_CLASSES = ("T5Attention", "MT5Attention")
_UMT5_CLASSES = ("UMT5Attention",)
_DEBERTA_CLASSES = ("DisentangledSelfAttention",)


def _kind(module: nn.Module) -> str | None:
    cls = type(module)
    name, where = cls.__name__, cls.__module__
    if name in _T5_CLASSES and where.split(".")[-1] in ("modeling_t5", "modeling_mt5"):
        return "t5"
    if name in _UMT5_CLASSES and where.endswith("modeling_umt5"):
        return "umt5"
    if name in _DEBERTA_CLASSES and where.endswith("deberta_v2.modeling_deberta_v2"):
        return "deberta"
    if name in _T5_NORM_CLASSES and where.split(".")[-1] in ("modeling_t5", "modeling_mt5", "modeling_umt5"):
        return "t5_norm"
    return None


def patch_biased_attention(model: nn.Module) -> int:
    """Patch every supported attention module of ``model`` in place; returns how many.

    Supported: T5 / MT5 / UMT5 encoder self-attention and DeBERTa-v2/v3 disentangled attention
    (decoder and cross-attention modules of T5 stay HF's). Patching twice is harmless (already
    patched modules are counted, not wrapped again). Build the model with
    ``attn_implementation="eager"`` so HF hands the modules an eager padding mask.

    Raises:
        ValueError: ``model`` has no module this backend supports (e.g. BERT, DeBERTa v1).
    """
    count = 0
    norms = []
    for module in model.modules():
        kind = _kind(module)
        if kind == "t5_norm":
            norms.append(module)
            continue
        if kind is None or (kind in ("t5", "umt5") and module.is_decoder):
            continue
        if kind == "deberta":
            _prepare_deberta(module)
        if not getattr(module, "_fastcse_biased", False):
            module.forward = types.MethodType(_FORWARDS[kind], module)
            module._fastcse_biased = True
        count += 1
    if count == 0:
        raise ValueError(
            f"attn_backend='biased' supports T5 / MT5 / UMT5 encoders and DeBERTa-v2/v3; "
            f"{type(model).__name__} has no T5 encoder self-attention or DeBERTa-v2 "
            f"DisentangledSelfAttention module to patch")
    for module in norms:
        module.forward = types.MethodType(_t5_norm_forward, module)
        module._fastcse_rms_norm = True
    return count


def unpatch_biased_attention(model: nn.Module) -> int:
    """Restore HF's forward on every module :func:`patch_biased_attention` patched; returns how many."""
    count = 0
    for module in model.modules():
        if getattr(module, "_fastcse_biased", False):
            del module.forward
            del module._fastcse_biased
            count += 1
        elif getattr(module, "_fastcse_rms_norm", False):
            del module.forward
            del module._fastcse_rms_norm
    return count


def _t5_norm_forward(self, hidden_states):
    """HF's T5LayerNorm (``weight * x / sqrt(mean(x^2) + eps)``, statistics in fp32) as one
    ``F.rms_norm``: on CUDA one fused kernel forward and one backward (torch >= 2.9's
    ``_fused_rms_norm``) where HF's runs about six ops forward and ten back, all memory-bound
    (3.2 of the 11.3 ms of a T5-base encoder's forward + backward at 8 x 512 tokens in bf16, as
    bench/perf_model.py predicts it on an H200). The
    output keeps the input's dtype, as HF's does when input and weight share one; HF's rounding
    of the normalised input to a half weight's dtype before the multiply is not repeated (one
    rounding instead of two). Mixed dtypes take HF's own forward (ATen would decompose anyway)."""
    weight = self.weight
    if hidden_states.dtype != weight.dtype:
        return type(self).forward(self, hidden_states)
    return F.rms_norm(hidden_states, weight.shape, weight, self.variance_epsilon)


# --------------------------------------------------------------------------------------------
# masks and relative positions
# --------------------------------------------------------------------------------------------


def _t5_key_padding_mask(mask: torch.Tensor | None, batch: int, seqlen: int) -> torch.Tensor | None:
    """(batch, seq) bool from the mask HF gives T5 attention (padding masks only).

    4-D eager masks are additive (0 = attend), 4-D sdpa masks bool (True = attend), 2-D masks
    1 / 0; a padding mask is the same for every query row, so row 0 is read.
    """
    if mask is None:
        return None
    if mask.dim() == 4:
        row = mask[:, 0, 0, :]
        keep = row if row.dtype == torch.bool else row == 0
    elif mask.dim() == 2:
        keep = mask.bool()
    else:
        raise ValueError(f"biased attention: unsupported T5 attention mask of shape {tuple(mask.shape)}")
    return keep.expand(batch, seqlen)


def _t5_distance_bias(module: nn.Module, seqlen: int, device: torch.device) -> torch.Tensor:
    # compute_bias(1, 2L - 1, past_seen_tokens=L - 1): column m is relative position
    # j - i = m - (L - 1), i.e. the distances -(L - 1) .. L - 1 in one (1, heads, 1, 2L - 1) row
    return module.compute_bias(1, 2 * seqlen - 1, device=device, past_seen_tokens=seqlen - 1)


def _t5_row_index(seqlen: int, device: torch.device) -> torch.Tensor:
    # the kernel indexes by i - j + L - 1; the table column of distance i - j is (L - 1) - (i - j)
    return torch.arange(2 * seqlen - 2, -1, -1, dtype=torch.int32, device=device)


def _is_distance_bias(position_bias: torch.Tensor, seqlen: int) -> bool:
    return position_bias.dim() == 4 and position_bias.size(0) == 1 and position_bias.size(2) == 1 \
        and position_bias.size(3) == 2 * seqlen - 1


def _per_distance(relative_pos: torch.Tensor, seqlen: int) -> torch.Tensor:
    """HF's (.., L, L) relative-position matrix (a function of i - j) as a (2L - 1,) vector."""
    rel = relative_pos.reshape(-1, seqlen, seqlen)[0]
    return torch.cat([rel[0, 1:].flip(0), rel[:, 0]])  # entry i - j + L - 1


def _deberta_key_padding_mask(mask: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """(batch, seq) bool from DeBERTa's mask: (B, L), or HF's (B, 1, L, L) product mask
    ``m_i * m_j``, whose diagonal is the key mask."""
    if mask.dim() == 2:
        return mask.bool().expand(batch, seqlen)
    if mask.dim() in (3, 4):
        square = mask.reshape(mask.size(0), seqlen, seqlen) if mask.dim() == 3 else mask[:, 0]
        return torch.diagonal(square, dim1=-2, dim2=-1).bool().expand(batch, seqlen)
    raise ValueError(f"biased attention: unsupported DeBERTa attention mask of shape {tuple(mask.shape)}")


# --------------------------------------------------------------------------------------------
# patched forwards
# --------------------------------------------------------------------------------------------


def _t5_forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, **kwargs):
    batch, seqlen = hidden_states.shape[:2]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if key_value_states is not None or cache is not None or (
            position_bias is not None and not _is_distance_bias(position_bias, seqlen)):
        return type(self).forward(self, hidden_states, mask=mask, key_value_states=key_value_states,
                                  position_bias=position_bias, **kwargs)
    heads, head_dim = self.n_heads, self.key_value_proj_dim
    q = self.q(hidden_states).view(batch, seqlen, heads, head_dim).transpose(1, 2)
    k = self.k(hidden_states).view(batch, seqlen, heads, head_dim).transpose(1, 2)
    v = self.v(hidden_states).view(batch, seqlen, heads, head_dim).transpose(1, 2)
    if position_bias is None and self.has_relative_attention_bias:
        position_bias = _t5_distance_bias(self, seqlen, q.device)
    bias = {} if position_bias is None else dict(
        row_table=position_bias, row_index=_t5_row_index(seqlen, q.device))
    out = biased_attention(q, k, v, **bias, key_padding_mask=_t5_key_padding_mask(mask, batch, seqlen),
                           sm_scale=1.0, dropout_p=self.dropout if self.training else 0.0)
    out = self.o(out.transpose(1, 2).reshape(batch, seqlen, heads * head_dim))
    # position_bias travels to the next layers as HF's does (a layer without a table gets None,
    # where HF passes zeros)
    return out, position_bias, None


def _umt5_forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
    # the cache arrives as ``cache`` (transformers >= 5.2x) or ``past_key_values`` (5.17)
    if encoder_hidden_states is not None or kwargs.get("cache") is not None \
            or kwargs.get("past_key_values") is not None:
        return type(self).forward(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                  attention_mask=attention_mask, **kwargs)
    batch, seqlen = hidden_states.shape[:2]
    heads, head_dim = self.n_heads, self.key_value_proj_dim
    q = self.q(hidden_states).view(batch, seqlen, heads, head_dim).transpose(1, 2)
    k = self.k(hidden_states).view(batch, seqlen, heads, head_dim).transpose(1, 2)
    v = self.v(hidden_states).view(batch, seqlen, heads, head_dim).transpose(1, 2)
    bias = {}
    if self.has_relative_attention_bias:  # UMT5: every layer has its own table
        bias = dict(row_table=_t5_distance_bias(self, seqlen, q.device),
                    row_index=_t5_row_index(seqlen, q.device))
    out = biased_attention(q, k, v, **bias,
                           key_padding_mask=_t5_key_padding_mask(attention_mask, batch, seqlen),
                           sm_scale=1.0, dropout_p=self.dropout if self.training else 0.0)
    return self.o(out.transpose(1, 2).reshape(batch, seqlen, heads * head_dim)), None


def _prepare_deberta(module: nn.Module) -> None:
    """Constants computed once here, not in the traced forward.

    HF's scale sqrt(head_dim * scale_factor), in fp32 and rounded to each activation dtype (HF
    divides by ``scale.to(dtype)``). Whether this config's bucketing never moves a distance away
    from 0 (``|bucket(d)| <= |d|``, true for DeBERTa-v2/v3's configs, false for some
    ``max_relative_positions ~ position_buckets`` ones): then a sequence of length L only reaches
    the 2L - 1 relative embeddings around the centre, and the tables are built for those only
    (at L = 32 and 2 x 256 buckets, 63 entries instead of 512).
    """
    scale_factor = 1 + ("c2p" in module.pos_att_type) + ("p2c" in module.pos_att_type)
    scale = torch.sqrt(torch.tensor(module.attention_head_size, dtype=torch.float) * scale_factor)
    module._fastcse_scale = {dtype: float(scale.to(dtype))
                             for dtype in (torch.float32, torch.float16, torch.bfloat16)}
    window_ok = True
    if module.relative_attention and module.position_buckets > 0:
        from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

        dist = torch.arange(-(1 << 15), (1 << 15) + 1)
        bucket = make_log_bucket_position(dist, module.position_buckets, module.max_relative_positions)
        window_ok = bool((bucket.abs() <= dist.abs()).all())
    module._fastcse_window_ok = window_ok


def _deberta_forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                     relative_pos=None, rel_embeddings=None):
    if output_attentions or query_states is not None:
        return type(self).forward(self, hidden_states, attention_mask, output_attentions,
                                  query_states=query_states, relative_pos=relative_pos,
                                  rel_embeddings=rel_embeddings)
    batch, seqlen = hidden_states.shape[:2]
    heads = self.num_attention_heads

    def split_heads(x):  # (B, L, H * D) -> (B, H, L, D), a view
        return x.view(batch, seqlen, heads, -1).transpose(1, 2)

    q = split_heads(self.query_proj(hidden_states))
    k = split_heads(self.key_proj(hidden_states))
    v = split_heads(self.value_proj(hidden_states))
    scale = self._fastcse_scale[q.dtype]

    rel = {}
    if self.relative_attention:
        from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

        if relative_pos is None:
            relative_pos = build_relative_position(hidden_states, hidden_states,
                                                   bucket_size=self.position_buckets,
                                                   max_position=self.max_relative_positions)
        span = self.pos_ebd_size
        distance = _per_distance(relative_pos.to(q.device), seqlen)
        # the relative embeddings this length can reach (all 2 span when the window is not safe)
        lo, hi = (max(0, span - seqlen + 1), min(2 * span, span + seqlen)) if self._fastcse_window_ok \
            else (0, 2 * span)
        rel_embeddings = self.pos_dropout(rel_embeddings[lo:hi])

        def window(index):  # HF's clamped index, shifted into the window (and kept inside it)
            return torch.clamp(torch.clamp(index, 0, 2 * span - 1) - lo, 0, hi - lo - 1)

        def pos_heads(x):  # (2 span, H * D) -> (H, 2 span, D)
            return x.view(x.size(0), heads, -1).transpose(0, 1)

        if "c2p" in self.pos_att_type:
            proj = self.key_proj if self.share_att_key else self.pos_key_proj
            rel["pos_key"] = pos_heads(proj(rel_embeddings))
            rel["c2p_index"] = window(distance + span)
        if "p2c" in self.pos_att_type:
            proj = self.query_proj if self.share_att_key else self.pos_query_proj
            rel["pos_query"] = pos_heads(proj(rel_embeddings))
            rel["p2c_index"] = window(-distance.flip(0) + span)

    out = disentangled_attention(q, k, v, **rel,
                                 key_padding_mask=_deberta_key_padding_mask(attention_mask, batch, seqlen),
                                 scale=scale, dropout_p=self.dropout.p if self.training else 0.0)
    return out.transpose(1, 2).reshape(batch, seqlen, -1), None


_FORWARDS = {"t5": _t5_forward, "umt5": _umt5_forward, "deberta": _deberta_forward}

__all__ = ["patch_biased_attention", "unpatch_biased_attention"]
