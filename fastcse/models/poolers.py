"""Poolers: token states -> one vector per sentence.

Every pooler takes either padded states ``(batch, seqlen, hidden)`` with the ``(batch, seqlen)``
attention mask (:meth:`Pooler.forward`) or packed states ``(total_tokens, hidden)`` with their
:class:`~fastcse.models.unpad.PackedBatch` (:meth:`Pooler.forward_packed`); both return
``(batch, hidden)``. Padded batches must be right-padded for ``cls`` / ``first`` (position 0 is the
first token), which is what every tokenizer here produces.
"""

from __future__ import annotations

import torch
from torch import nn

from .unpad import PackedBatch

POOLINGS = ("cls", "cls_mlp", "mean", "first")


class Pooler(nn.Module):
    """Base class: subclasses implement both the padded and the packed form."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_packed(self, hidden: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
        raise NotImplementedError


class FirstTokenPooler(Pooler):
    """The first token's state: BERT's ``[CLS]`` (``cls``) or T5's first token (``first``)."""

    def forward(self, hidden, attention_mask):
        return hidden[:, 0]

    def forward_packed(self, hidden, packed):
        return hidden[packed.cu_seqlens[:-1].long()]


class CLSMLPPooler(FirstTokenPooler):
    """SimCSE's ``cls`` pooler: ``tanh(W h_cls + b)``, W ``(hidden, hidden)``.

    Args:
        hidden_size: width of the backbone.
        mlp_only_train: SimCSE unsupervised (``--mlp_only_train``): the MLP runs in training mode
            only and evaluation uses the raw CLS state (the paper's ``cls_before_pooler``).
            ``False`` (SimCSE supervised) keeps the MLP at evaluation too.
        initializer_range: std of the normal initialisation of ``W`` (the backbone's
            ``config.initializer_range``, as SimCSE's ``init_weights``); the bias starts at zero.
    """

    def __init__(self, hidden_size: int, *, mlp_only_train: bool = True, initializer_range: float = 0.02):
        super().__init__()
        self.mlp_only_train = mlp_only_train
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()
        nn.init.normal_(self.dense.weight, std=initializer_range)
        nn.init.zeros_(self.dense.bias)

    def _mlp(self, cls: torch.Tensor) -> torch.Tensor:
        if self.training or not self.mlp_only_train:
            return self.activation(self.dense(cls))
        return cls

    def forward(self, hidden, attention_mask):
        return self._mlp(super().forward(hidden, attention_mask))

    def forward_packed(self, hidden, packed):
        return self._mlp(super().forward_packed(hidden, packed))


class MeanPooler(Pooler):
    """Masked mean of the real tokens' states (sentence-transformers' ``mean`` pooling).

    Sums in float32 whatever the states' dtype, so bf16 batches of long sentences do not lose
    precision in the running sum; the result has the states' dtype.
    """

    def forward(self, hidden, attention_mask):
        mask = attention_mask.to(torch.float32).unsqueeze(-1)
        summed = (hidden.float() * mask).sum(dim=1)
        # clamp: a row without tokens gives zeros rather than NaN (sentence-transformers does the same)
        counts = mask.sum(dim=1).clamp_min(1e-9)
        return (summed / counts).to(hidden.dtype)

    def forward_packed(self, hidden, packed):
        summed = hidden.new_zeros(packed.batch, hidden.shape[-1], dtype=torch.float32)
        summed = summed.index_add(0, packed.seq_ids, hidden.float())
        counts = packed.lengths.to(torch.float32).clamp_min(1e-9).unsqueeze(-1)
        return (summed / counts).to(hidden.dtype)


def build_pooler(pooling: str, hidden_size: int, *, mlp_only_train: bool = True,
                 initializer_range: float = 0.02) -> Pooler:
    """Make the pooler called ``pooling`` (one of :data:`POOLINGS`)."""
    if pooling in ("cls", "first"):
        return FirstTokenPooler()
    if pooling == "cls_mlp":
        return CLSMLPPooler(hidden_size, mlp_only_train=mlp_only_train, initializer_range=initializer_range)
    if pooling == "mean":
        return MeanPooler()
    raise ValueError(f"unknown pooling {pooling!r}; valid poolings: {', '.join(POOLINGS)}")
