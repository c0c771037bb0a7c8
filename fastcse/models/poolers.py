"""Poolers: token states -> one vector per sentence.

Every pooler takes either padded states ``(batch, seqlen, hidden)`` with the ``(batch, seqlen)``
attention mask (:meth:`Pooler.forward`) or packed states ``(total_tokens, hidden)`` with their
:class:`~fastcse.models.unpad.PackedBatch` (:meth:`Pooler.forward_packed`); both return
``(batch, hidden)``. Padded batches must be right-padded for ``cls`` / ``first`` (position 0 is the
first token), which is what every tokenizer here produces.

:class:`Dense` is the layer that may follow a pooler (sentence-transformers' ``Dense`` module):
``(batch, in_features)`` to ``(batch, out_features)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .unpad import PackedBatch

POOLINGS = ("cls", "cls_mlp", "mean", "first")
# activations a Dense layer may carry: torch.nn classes that take no arguments, by their full path
# (sentence-transformers records ``fullname(activation)``; it also only trusts ``torch.`` paths)
DENSE_ACTIVATION_PREFIX = "torch."


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


class Dense(nn.Module):
    """``activation(W x + b)`` (+ ``x`` or ``R x`` with ``use_residual``): sentence-transformers'
    ``Dense`` module on the pooled embedding, trainable like the rest of the encoder.

    Args:
        in_features / out_features / bias: the linear layer (weights ``linear.weight`` /
            ``linear.bias``, the names sentence-transformers saves).
        activation_function: the full path of a ``torch.nn`` module class without arguments
            (``"torch.nn.modules.activation.Tanh"``, ``"torch.nn.modules.linear.Identity"``).
        use_residual: add the input (projected by ``residual``, a bias-free linear layer, when the
            widths differ), as sentence-transformers >= 5.7.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 activation_function: str = "torch.nn.modules.activation.Tanh", use_residual: bool = False):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bias = bool(bias)
        self.activation_function = activation_function
        self.use_residual = bool(use_residual)
        self.linear = nn.Linear(self.in_features, self.out_features, bias=self.bias)
        self.activation = _activation(activation_function)
        if self.use_residual and self.in_features != self.out_features:
            self.residual = nn.Linear(self.in_features, self.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (x if self.in_features == self.out_features else self.residual(x))
        return out

    def config(self) -> dict:
        """The constructor's arguments (what sentence-transformers writes to ``config.json``)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias,
                "activation_function": self.activation_function, "use_residual": self.use_residual}

    def extra_repr(self) -> str:
        return f"activation_function={self.activation_function!r}, use_residual={self.use_residual}"


def _activation(path: str) -> nn.Module:
    import importlib

    module_name, _, class_name = str(path).rpartition(".")
    if not str(path).startswith(DENSE_ACTIVATION_PREFIX) or not module_name:
        raise ValueError(f"Dense activation {path!r} is not a torch.nn module path (e.g. "
                         f"'torch.nn.modules.activation.Tanh'); other activations are not loaded")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise ValueError(f"Dense activation {path!r} does not exist in this torch") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"Dense activation {path!r} is not a torch.nn.Module class")
    return cls()
