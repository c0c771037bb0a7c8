"""User-facing contrastive losses: ``info_nce``, ``InfoNCELoss`` and sentence-transformers drop-ins.

The maths and the three backends live in :mod:`fastcse.infonce` (and the Triton kernel in
``fastcse.kernels.infonce``); this module only wraps them for users.

``FusedCachedMultipleNegativesRankingLoss`` (the gradient-cached drop-in) subclasses
sentence-transformers' ``CachedLossMixin``, so the class is built the first time the name is
looked up (``from fastcse.losses import FusedCachedMultipleNegativesRankingLoss``), which imports
sentence-transformers then: the package stays optional for everything else here.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fastcse.infonce import Backend, Reduction, info_nce

__all__ = ["info_nce", "InfoNCELoss", "FusedMultipleNegativesRankingLoss"]
# built on first use, as it subclasses sentence-transformers (see the module docstring); not in
# __all__, so that ``from fastcse.losses import *`` works without sentence-transformers
_LAZY = ("FusedCachedMultipleNegativesRankingLoss",)


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


def _resolve_temperature(scale: Optional[float], temperature: Optional[float]) -> float:
    if scale is not None and temperature is not None:
        raise ValueError("give either scale or temperature (scale = 1 / temperature), not both")
    if temperature is None:
        scale = 20.0 if scale is None else scale
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        temperature = 1.0 / scale
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def _cached_loss_mixin():
    """sentence-transformers' GradCache base class (``sentence_transformers.base.losses``, in
    6.0 and 6.2 alike), or an ImportError that says which version is needed."""
    try:
        from sentence_transformers.base.losses import CachedLossMixin
    except ImportError as exc:
        try:
            import sentence_transformers
        except ImportError:
            raise ImportError("FusedCachedMultipleNegativesRankingLoss needs sentence-transformers "
                              "(pip install 'sentence-transformers>=6.0')") from exc
        raise ImportError(
            "FusedCachedMultipleNegativesRankingLoss builds on sentence-transformers' CachedLossMixin "
            f"(sentence_transformers.base.losses, 6.0 and later); version {sentence_transformers.__version__} "
            "has none. Upgrade, or use FusedMultipleNegativesRankingLoss (no caching), or "
            "fastcse.grad_cache.grad_cache with your own encoder call") from exc
    if not (hasattr(CachedLossMixin, "forward_cached") and hasattr(CachedLossMixin, "calculate_loss")):
        raise ImportError("sentence-transformers' CachedLossMixin lacks forward_cached / calculate_loss; "
                          "this version's GradCache interface is not the one fastcse was written for")
    return CachedLossMixin


def _build_fused_cached_mnrl():
    CachedLossMixin = _cached_loss_mixin()

    class FusedCachedMultipleNegativesRankingLoss(CachedLossMixin, nn.Module):
        """Drop-in for sentence-transformers' ``CachedMultipleNegativesRankingLoss`` on the fused loss.

        GradCache (Gao et al. 2021): the columns are embedded in mini-batches of
        ``mini_batch_size`` without a graph, the loss and its gradient with respect to the
        embeddings are taken over the whole batch with :func:`fastcse.info_nce` (no N x M score
        matrix), then every mini-batch is embedded again with a graph under the RNG state of its
        first pass and the cached gradient is backpropagated through it. The caching machinery
        (mini-batching, RNG replay, the backward hook, DDP handling) is sentence-transformers' own
        ``CachedLossMixin``; this class supplies the loss. So it takes the same inputs and gives
        the same loss values and gradients as ``CachedMultipleNegativesRankingLoss(model,
        scale=scale, mini_batch_size=...)`` (and, memory aside, as ``MultipleNegativesRankingLoss``),
        and it works inside ``MatryoshkaLoss``, which decorates ``calculate_loss``.

        Formula (anchor a_i, candidates C = every positive and negative column of the batch)::

            loss = mean_i [ logsumexp_j(scale * cos(a_i, C_j)) - scale * cos(a_i, p_i) ]

        Args:
            model: the ``SentenceTransformer`` being trained.
            scale: inverse temperature, sentence-transformers' convention (20.0 == temperature 0.05,
                the default). Give either ``scale`` or ``temperature``.
            mini_batch_size: sentences per embedding mini-batch: what bounds the activation memory.
            temperature: SimCSE's convention, ``1 / scale``.
            symmetric: add the positive-to-anchor direction and average (sentence-transformers'
                ``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"``).
            hard_negative_weight: SimCSE's weight on each anchor's own (single) hard negative.
            gather_across_devices: share candidates across ranks, with gradient.
            backend: fused-loss backend (``"auto"``, ``"triton"``, ``"chunked"``, ``"eager"``).
            mini_batch_num_tokens: pack mini-batches by non-padding tokens instead (as in
                sentence-transformers).
            show_progress_bar: sentence-transformers' mini-batch progress bar.

        Inputs:
            ``(anchor, positive)`` pairs, ``(anchor, positive, negative)`` triplets or
            ``(anchor, positive, negative_1, ..., negative_k)``; no labels.

        Example:
            >>> from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
            >>> from fastcse.losses import FusedCachedMultipleNegativesRankingLoss
            >>> model = SentenceTransformer("path/to/model")                      # doctest: +SKIP
            >>> loss = FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=64)  # doctest: +SKIP
            >>> SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss).train()  # doctest: +SKIP

        References:
            Gao, Zhang, Han, Callan. Scaling Deep Contrastive Learning Batch Size under Memory
            Limited Setup (2021); Henderson et al. Efficient Natural Language Response Suggestion
            for Smart Reply (2017).
        """

        def __init__(self, model: nn.Module, scale: Optional[float] = None, mini_batch_size: int = 32, *,
                     temperature: Optional[float] = None, symmetric: bool = False,
                     hard_negative_weight: float = 0.0, gather_across_devices: bool = False,
                     backend: Backend = "auto", mini_batch_num_tokens: Optional[int] = None,
                     show_progress_bar: bool = False) -> None:
            super().__init__()
            self.temperature = _resolve_temperature(scale, temperature)
            self.scale = 1.0 / self.temperature
            if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
                raise ValueError(f"mini_batch_size must be a positive int, got {mini_batch_size!r}")
            if mini_batch_num_tokens is not None and not mini_batch_num_tokens > 0:
                raise ValueError(f"mini_batch_num_tokens must be a positive int or None, got {mini_batch_num_tokens!r}")
            self.model = model
            self.mini_batch_size = mini_batch_size
            self.mini_batch_num_tokens = mini_batch_num_tokens
            self.show_progress_bar = show_progress_bar
            self.symmetric = symmetric
            self.hard_negative_weight = hard_negative_weight
            self.gather_across_devices = gather_across_devices
            self.backend = backend

        def calculate_loss(self, reps, labels: Optional[Tensor] = None, *, with_backward: bool = False) -> Tensor:
            """The loss over the whole batch from the per-mini-batch embeddings ``reps[column][mb]``;
            with ``with_backward`` it is backpropagated to them (the mixin's cache) and returned
            detached. The fused loss never builds the score matrix, so it runs in one piece."""
            columns = [torch.cat(list(mbs)) for mbs in reps]
            if len(columns) < 2:
                raise ValueError(f"{type(self).__name__} needs (anchor, positive[, negative...]) columns, "
                                 f"got {len(columns)} column(s)")
            anchors, positives, *negatives = columns
            loss = info_nce(anchors, positives, negatives or None, temperature=self.temperature,
                            hard_negative_weight=self.hard_negative_weight, symmetric=self.symmetric,
                            gather_across_ranks=self.gather_across_devices, backend=self.backend)
            if with_backward:
                loss.backward()
                loss = loss.detach()
            return loss

        def forward(self, sentence_features: Iterable[dict], labels: Optional[Tensor] = None) -> Tensor:
            sentence_features = list(sentence_features)
            if len(sentence_features) < 2:
                raise ValueError(f"{type(self).__name__} needs (anchor, positive[, negative...]) columns, "
                                 f"got {len(sentence_features)} column(s)")
            return self.forward_cached(sentence_features, labels)

        def get_config_dict(self) -> dict:
            return {"scale": self.scale, "mini_batch_size": self.mini_batch_size,
                    "mini_batch_num_tokens": self.mini_batch_num_tokens, "symmetric": self.symmetric,
                    "hard_negative_weight": self.hard_negative_weight,
                    "gather_across_devices": self.gather_across_devices, "backend": self.backend}

        @property
        def citation(self) -> str:
            return (
                "@misc{gao2021scaling,\n  title={Scaling Deep Contrastive Learning Batch Size under Memory "
                "Limited Setup},\n  author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},\n"
                "  year={2021},\n  eprint={2101.06983},\n  archivePrefix={arXiv}\n}"
            )

    FusedCachedMultipleNegativesRankingLoss.__module__ = __name__
    return FusedCachedMultipleNegativesRankingLoss


def __getattr__(name: str):
    if name == "FusedCachedMultipleNegativesRankingLoss":
        cls = _build_fused_cached_mnrl()
        globals()[name] = cls  # built once: isinstance checks and pickling see one class
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
