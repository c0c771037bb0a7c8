"""User-facing contrastive losses: ``info_nce``, ``InfoNCELoss`` and a sentence-transformers drop-in.

The maths and the three backends live in :mod:`fastcse.infonce` (and the Triton kernel in
``fastcse.kernels.infonce``); this module only wraps them for users.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fastcse.infonce import Backend, Reduction, info_nce

__all__ = ["info_nce", "InfoNCELoss", "FusedMultipleNegativesRankingLoss"]


class InfoNCELoss(nn.Module):
    """InfoNCE / SimCSE contrastive loss as a module (same arguments as :func:`fastcse.info_nce`).

    Formula, with candidates ``C = [positives; hard_negatives; queue]`` (M rows)::

        logits_ij = cos(anchor_i, C_j) / temperature  (+ hard_negative_weight if j == N + i)
        loss      = mean_i [ logsumexp_j(logits_ij) - logits_ii ]

    Args:
        temperature: initial temperature (0.05 as in SimCSE). sentence-transformers' ``scale`` is
            ``1 / temperature``.
        learnable_temperature: make the temperature an ``nn.Parameter`` (stored as its log, so it
            stays positive while training, as CLIP does).
        hard_negative_weight, symmetric, gather_across_ranks, reduction, backend: as in
            :func:`fastcse.info_nce`.

    Inputs:
        anchors ``(N, D)``, positives ``(N, D)``, optional hard_negatives ``(N, D)`` (or a list of
        such columns), optional queue ``(K, D)`` (no gradient).

    Example:
        >>> import torch, fastcse
        >>> loss_fn = fastcse.InfoNCELoss(temperature=0.05)
        >>> anchors = torch.randn(16, 64, requires_grad=True)
        >>> loss = loss_fn(anchors, torch.randn(16, 64), torch.randn(16, 64))
        >>> loss.backward()

    References:
        Gao, Yao, Chen. SimCSE: Simple Contrastive Learning of Sentence Embeddings (EMNLP 2021).
        van den Oord et al. Representation Learning with Contrastive Predictive Coding (2018).
    """

    def __init__(
        self,
        temperature: float = 0.05,
        *,
        learnable_temperature: bool = False,
        hard_negative_weight: float = 0.0,
        symmetric: bool = False,
        gather_across_ranks: bool = False,
        reduction: Reduction = "mean",
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.learnable_temperature = learnable_temperature
        if learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(float(temperature)).log())
        else:
            self.fixed_temperature = float(temperature)
        self.hard_negative_weight = hard_negative_weight
        self.symmetric = symmetric
        self.gather_across_ranks = gather_across_ranks
        self.reduction = reduction
        self.backend = backend

    @property
    def temperature(self) -> Union[float, Tensor]:
        return self.log_temperature.exp() if self.learnable_temperature else self.fixed_temperature

    def forward(
        self,
        anchors: Tensor,
        positives: Tensor,
        hard_negatives: Union[Tensor, Sequence[Tensor], None] = None,
        queue: Optional[Tensor] = None,
    ) -> Tensor:
        return info_nce(
            anchors, positives, hard_negatives, temperature=self.temperature,
            hard_negative_weight=self.hard_negative_weight, queue=queue, symmetric=self.symmetric,
            gather_across_ranks=self.gather_across_ranks, reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        t = "learnable" if self.learnable_temperature else self.fixed_temperature
        return (f"temperature={t}, hard_negative_weight={self.hard_negative_weight}, "
                f"symmetric={self.symmetric}, gather_across_ranks={self.gather_across_ranks}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class FusedMultipleNegativesRankingLoss(nn.Module):
    """Drop-in for sentence-transformers' ``MultipleNegativesRankingLoss`` on the fused loss.

    Takes the same input columns: ``(anchor, positive)`` pairs, ``(anchor, positive, negative)``
    triplets or ``(anchor, positive, negative_1, ..., negative_k)``; every positive and negative
    of the batch is a candidate for every anchor, with cosine similarity times ``scale``. It gives
    the same loss values as ``MultipleNegativesRankingLoss(model, scale=scale)`` (and, with
    ``symmetric=True``, as its ``directions=("query_to_doc", "doc_to_query"),
    partition_mode="per_direction")`` variant) without building the N x M score matrix.

    Args:
        model: the ``SentenceTransformer`` being trained (any module returning
            ``{"sentence_embedding": Tensor}`` for a features dict works).
        scale: inverse temperature, sentence-transformers' convention (20.0 == temperature 0.05).
            Give either ``scale`` or ``temperature``.
        temperature: SimCSE's convention, ``1 / scale``.
        symmetric: add the positive-to-anchor direction and average.
        hard_negative_weight: SimCSE's weight on each anchor's own (single) hard negative.
        gather_across_devices: share candidates across ranks, with gradient.
        backend: fused-loss backend (``"auto"``, ``"triton"``, ``"chunked"``, ``"eager"``).

    Example:
        >>> from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
        >>> from fastcse.losses import FusedMultipleNegativesRankingLoss
        >>> model = SentenceTransformer("path/to/model")            # doctest: +SKIP
        >>> loss = FusedMultipleNegativesRankingLoss(model, scale=20.0)  # doctest: +SKIP
        >>> SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss).train()  # doctest: +SKIP

    References:
        Henderson et al. Efficient Natural Language Response Suggestion for Smart Reply (2017);
        Gao, Yao, Chen. SimCSE (2021).
    """

    def __init__(
        self,
        model: nn.Module,
        scale: Optional[float] = None,
        *,
        temperature: Optional[float] = None,
        symmetric: bool = False,
        hard_negative_weight: float = 0.0,
        gather_across_devices: bool = False,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if scale is not None and temperature is not None:
            raise ValueError("give either scale or temperature (scale = 1 / temperature), not both")
        if scale is None and temperature is None:
            scale = 20.0
        if temperature is None:
            if not scale > 0:
                raise ValueError(f"scale must be > 0, got {scale}")
            temperature = 1.0 / scale
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model = model
        self.scale = 1.0 / temperature
        self.temperature = temperature
        self.symmetric = symmetric
        self.hard_negative_weight = hard_negative_weight
        self.gather_across_devices = gather_across_devices
        self.backend = backend

    def compute_loss_from_embeddings(self, embeddings: Sequence[Tensor]) -> Tensor:
        if len(embeddings) < 2:
            raise ValueError(
                f"{type(self).__name__} needs (anchor, positive[, negative...]) columns, "
                f"got {len(embeddings)} column(s)"
            )
        anchors, positives, *negatives = embeddings
        return info_nce(
            anchors, positives, negatives or None, temperature=self.temperature,
            hard_negative_weight=self.hard_negative_weight, symmetric=self.symmetric,
            gather_across_ranks=self.gather_across_devices, backend=self.backend,
        )

    def forward(self, sentence_features: Iterable[dict], labels: Optional[Tensor] = None) -> Tensor:
        embeddings = [self.model(features)["sentence_embedding"] for features in sentence_features]
        return self.compute_loss_from_embeddings(embeddings)

    def get_config_dict(self) -> dict:
        return {"scale": self.scale, "symmetric": self.symmetric,
                "hard_negative_weight": self.hard_negative_weight,
                "gather_across_devices": self.gather_across_devices, "backend": self.backend}

    @property
    def citation(self) -> str:
        return (
            "@inproceedings{gao2021simcse,\n  title={{SimCSE}: Simple Contrastive Learning of "
            "Sentence Embeddings},\n  author={Gao, Tianyu and Yao, Xingcheng and Chen, Danqi},\n"
            "  booktitle={EMNLP},\n  year={2021}\n}"
        )
