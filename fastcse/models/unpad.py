"""Unpadding: padded ``(batch, seqlen, ...)`` tensors <-> packed ``(total_tokens, ...)`` tokens.

A SimCSE batch of 64 Wikipedia sentences padded to 32 tokens is about half padding; every op that
runs on packed tokens (embeddings, layer norms, MLPs, attention with ``cu_seqlens``) skips that
half. ``cu_seqlens`` follows the FlashAttention convention: int32, ``(batch + 1,)``, sequence ``b``
owns packed rows ``cu_seqlens[b]:cu_seqlens[b + 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedBatch:
    """Where the real tokens of a padded batch live once packed.

    Attributes:
        indices: ``(total_tokens,)`` int64, flat positions ``b * seqlen + t`` of the real tokens in
            the padded batch, in row-major order (so each sequence's tokens stay contiguous).
        cu_seqlens: ``(batch + 1,)`` int32 cumulative sequence lengths.
        seq_ids: ``(total_tokens,)`` int64, the sequence each packed token belongs to.
        positions: ``(total_tokens,)`` int64, each token's index inside its own sequence.
        max_seqlen: longest sequence (a Python int: the flash kernels take it as a launch size).
        min_seqlen: shortest sequence (0 flags a row without tokens).
        batch: number of sequences.
        seqlen: padded length.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_ids: torch.Tensor
    positions: torch.Tensor
    max_seqlen: int
    min_seqlen: int
    batch: int
    seqlen: int

    @property
    def total_tokens(self) -> int:
        return int(self.indices.numel())

    @property
    def lengths(self) -> torch.Tensor:
        """``(batch,)`` int32 number of real tokens per sequence."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]


def unpad_input(attention_mask: torch.Tensor) -> PackedBatch:
    """Describe the packing of a padded batch from its ``(batch, seqlen)`` 0/1 attention mask.

    Any pattern of real tokens works (right or left padding): the tokens of each row keep their
    order. Costs one device-to-host copy (``max_seqlen`` and ``min_seqlen`` together) besides the
    one ``nonzero`` makes.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seqlen), got shape {tuple(attention_mask.shape)}")
    batch, seqlen = attention_mask.shape
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    seq_ids = torch.div(indices, seqlen, rounding_mode="floor")
    positions = torch.arange(indices.numel(), device=indices.device) - cu_seqlens.long()[seq_ids]
    max_seqlen, min_seqlen = torch.stack([lengths.max(), lengths.min()]).tolist() if batch else (0, 0)
    return PackedBatch(indices, cu_seqlens, seq_ids, positions, int(max_seqlen), int(min_seqlen), batch, seqlen)


def pack(x: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """``(batch, seqlen, *rest)`` -> ``(total_tokens, *rest)``: keep the real tokens only."""
    return x.reshape(packed.batch * packed.seqlen, *x.shape[2:]).index_select(0, packed.indices)


def unpack(x: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """``(total_tokens, *rest)`` -> ``(batch, seqlen, *rest)`` with zeros at padded positions.

    Differentiable (a scatter into zeros): gradients of padded positions are dropped.
    """
    out = x.new_zeros(packed.batch * packed.seqlen, *x.shape[1:])
    out = out.index_copy(0, packed.indices, x)
    return out.view(packed.batch, packed.seqlen, *x.shape[1:])
