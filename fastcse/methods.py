"""Training methods: a batch of examples in, the inputs of :func:`fastcse.info_nce` out.

A method does three things per micro-step: ``collate`` (examples -> token tensors, on CPU; every
random choice comes from the micro-step's own stream, so a resumed run repeats it),
``loss_inputs`` (forward through the model -> anchors / positives / hard negatives / queue), and
after the step ``after_micro_step`` / ``after_optimizer_step`` (ESimCSE's queue and momentum
encoder). ``state_dict`` holds whatever must survive a resume.

- ``simcse-unsup``: the batch twice in one forward of 2N sequences (independent dropout masks);
  positive = the other copy.
- ``simcse-sup``: ``[sent0; sent1; hard_neg]`` in one forward of 3N; positive = sent1, hard negative
  = hard_neg (weighted by ``hard_negative_weight`` inside the loss). Pairs (``Triplet(sent0, sent1,
  None)``, data without a negative column): ``[sent0; sent1]`` in one forward of 2N, no hard negatives.
- ``esimcse``: anchor = the sentence, positive = its word-repetition view (both through the model in
  one forward); a momentum encoder (EMA of the model) embeds the positive view, and those embeddings
  enter a FIFO queue after the step: extra negatives, without gradient, for the next steps.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastcse.config import MethodConfig
from fastcse.data import concat_features, step_rng, word_repetition
from fastcse.distributed import is_distributed, world_info


class LossInputs(NamedTuple):
    """What :func:`fastcse.info_nce` takes: ``(N, D)`` anchors and positives, optional ``(N, D)`` hard
    negatives and an optional ``(K, D)`` queue of extra negatives without gradient."""

    anchors: Tensor
    positives: Tensor
    hard_negatives: Tensor | None = None
    queue: Tensor | None = None


def _split(embeddings: Tensor, parts: int) -> list[Tensor]:
    return list(embeddings.chunk(parts, dim=0))


def _to(batch: dict[str, Tensor], device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Method:
    """A training method: examples -> token tensors -> the inputs of :func:`fastcse.info_nce`.

    The trainer calls, per optimizer step of ``grad_accum`` micro-batches::

        batch = method.collate(examples, micro_step=m, rank=r)    # CPU tensors, deterministic in m
        inputs = method.loss_inputs(model, batch)                 # the forward pass
        loss = info_nce(inputs.anchors, inputs.positives, inputs.hard_negatives, queue=inputs.queue)
        method.after_micro_step()            # finite loss: e.g. ESimCSE's queue takes the batch
        method.discard_pending()             # non-finite loss instead: forget what it computed
        method.after_optimizer_step(encoder, gathered)           # after an applied step: EMA

    Subclasses set ``name`` (the ``--method`` value) and ``uses_triplets`` (reads
    ``(sent0, sent1, hard_neg)`` rows instead of sentences) and override ``collate`` and
    ``loss_inputs``; the other hooks default to doing nothing. Build one with :func:`build_method`.

    Args:
        cfg: the method's config section (temperature, hard-negative weight, ESimCSE's knobs).
        tokenizer_fn: ``sentences -> padded features`` (the encoder's ``tokenize``).
        pad_id: the tokenizer's padding id (used when views of different lengths are joined).
        special_ids: token ids never repeated or dropped by augmentations ([CLS], [SEP], ...).
        max_seq_length: tokens per sentence after truncation (augmented views keep to it too).
        seed: the run's seed; every random choice of ``collate`` derives from it and the micro-step,
            so a resumed run repeats it.

    Example:
        >>> from transformers import BertConfig
        >>> from fastcse.config import MethodConfig
        >>> from fastcse.data import train_fallback_tokenizer
        >>> from fastcse.models import SentenceEncoder
        >>> tok = train_fallback_tokenizer(vocab_size=500)
        >>> enc = SentenceEncoder.from_config(BertConfig(vocab_size=len(tok), hidden_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64), tokenizer=tok)
        >>> method = build_method(MethodConfig(name="simcse-unsup"), enc, seed=0)
        >>> batch = method.collate(["a cat sat", "dogs run"], micro_step=0, rank=0)
        >>> inputs = method.loss_inputs(enc.train(), batch)
        >>> inputs.anchors.shape == inputs.positives.shape == (2, 32)
        True
    """

    name = "base"
    uses_triplets = False

    def __init__(self, cfg: MethodConfig, *, tokenizer_fn: Callable[[list[str]], dict[str, Tensor]],
                 pad_id: int, special_ids: set[int], max_seq_length: int, seed: int):
        self.cfg = cfg
        self._tokenizer_fn = tokenizer_fn
        self.pad_id = pad_id
        self.special_ids = special_ids
        self.max_seq_length = max_seq_length
        self.seed = seed

    def tokenize(self, sentences: list[str]) -> dict[str, Tensor]:
        # cutting sentences to max_seq_length is what training asks for (SimCSE: 32): no warning
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*were longer than.*truncated")
            return self._tokenizer_fn(sentences)

    def setup(self, encoder: nn.Module, device) -> None:
        """Called once with the plain encoder, before any distributed wrapping."""

    def collate(self, examples: Sequence, *, micro_step: int, rank: int) -> dict[str, Tensor]:
        """This rank's examples of micro-step ``micro_step`` -> one padded batch of CPU tensors."""
        raise NotImplementedError

    def loss_inputs(self, model: nn.Module, batch: dict[str, Tensor]) -> LossInputs:
        """The forward pass of ``model`` (the encoder, or its DeepSpeed engine) over ``batch``."""
        raise NotImplementedError

    def after_micro_step(self) -> None:
        """After a micro-step whose loss was finite (before the optimizer step)."""

    def after_optimizer_step(self, encoder: nn.Module, gathered: Callable = contextlib.nullcontext) -> None:
        """After an applied optimizer step; ``gathered(params)`` makes sharded params whole (ZeRO-3)."""

    def discard_pending(self) -> None:
        """Forget what a skipped micro-step computed."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SimCSEUnsup(Method):
    name = "simcse-unsup"

    def collate(self, examples, *, micro_step, rank):
        return self.tokenize(list(examples))

    def loss_inputs(self, model, batch):
        # one forward of [x; x]: each copy gets its own dropout mask (SimCSE's only augmentation)
        doubled = {k: torch.cat([v, v]) for k, v in batch.items()}
        anchors, positives = _split(model(**doubled), 2)
        return LossInputs(anchors, positives)


# the key of a pair batch's part count: an int, not a feature (the model never sees it)
PARTS_KEY = "num_parts"


class SimCSESup(Method):
    """Triplets: one forward of ``[sent0; sent1; hard_neg]``. Pairs (every ``hard_neg`` None): one
    forward of ``[sent0; sent1]``, no hard negatives; the batch then says so under :data:`PARTS_KEY`
    (a batch without it has three parts)."""

    name = "simcse-sup"
    uses_triplets = True

    def collate(self, examples, *, micro_step, rank):
        sent0 = [t[0] for t in examples]
        sent1 = [t[1] for t in examples]
        hard = [t[2] for t in examples]
        if all(h is None for h in hard):
            return {**self.tokenize(sent0 + sent1), PARTS_KEY: 2}  # one forward of 2N
        if any(h is None for h in hard):
            raise ValueError(f"simcse-sup: a batch mixes pairs and triplets ({sum(h is None for h in hard)} of "
                             f"{len(hard)} examples have no hard negative); each batch must be one or the other")
        return self.tokenize(sent0 + sent1 + hard)  # one padded batch: one forward of 3N

    def loss_inputs(self, model, batch):
        features = {k: v for k, v in batch.items() if k != PARTS_KEY}
        parts = batch.get(PARTS_KEY, 3)
        if parts == 2:
            anchors, positives = _split(model(**features), 2)
            return LossInputs(anchors, positives, None)
        anchors, positives, hard_negatives = _split(model(**features), 3)
        return LossInputs(anchors, positives, hard_negatives)


class ESimCSE(Method):
    name = "esimcse"

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.momentum_encoder: nn.Module | None = None
        self.queue: Tensor | None = None  # (rows, dim) fp32, oldest first
        self._pending: Tensor | None = None

    def setup(self, encoder, device):
        # a full fp32 copy outside any DeepSpeed engine: under ZeRO-3 the model's own parameters are
        # sharded, the momentum encoder's are not (it is updated from gathered parameters)
        self.momentum_encoder = copy.deepcopy(encoder).float().to(device)
        for p in self.momentum_encoder.parameters():
            p.requires_grad_(False)
        self.queue = torch.zeros(0, encoder.embedding_dim, device=device)

    def collate(self, examples, *, micro_step, rank):
        x = self.tokenize(list(examples))
        n = len(examples)
        # one stream per row of the global batch (rank r holds rows r*n ... r*n + n - 1)
        rngs = [step_rng(self.seed, micro_step, rank * n + i, "word_repetition") for i in range(n)]
        x_rep = word_repetition(x, dup_rate=self.cfg.dup_rate, rngs=rngs, special_ids=self.special_ids,
                                max_length=self.max_seq_length, pad_id=self.pad_id)
        return concat_features(x, x_rep, pad_id=self.pad_id)  # [x; repeated x], one forward

    def loss_inputs(self, model, batch):
        anchors, positives = _split(model(**batch), 2)
        n = anchors.shape[0]
        # the momentum encoder follows the model's mode (dropout in training, as MoCo's key encoder)
        self.momentum_encoder.train(model.training)
        with torch.no_grad():
            positive_view = {k: v[n:] for k, v in batch.items()}
            self._pending = self.momentum_encoder(**positive_view).float()
        queue = self.queue if self.queue is not None and self.queue.shape[0] else None
        if queue is not None:
            queue = queue.to(anchors.dtype)
        return LossInputs(anchors, positives, queue=queue)

    def after_micro_step(self):
        new = self._pending
        self._pending = None
        if new is None or self.cfg.queue_size == 0:
            return
        if is_distributed():
            # every rank keeps the same queue: the global batch's rows in rank order
            parts = [torch.empty_like(new) for _ in range(world_info()[1])]
            dist.all_gather(parts, new.contiguous())
            new = torch.cat(parts)
        self.queue = torch.cat([self.queue, new])[-self.cfg.queue_size:]

    def discard_pending(self):
        self._pending = None

    @torch.no_grad()
    def after_optimizer_step(self, encoder, gathered=contextlib.nullcontext):
        lam = self.cfg.momentum
        params = list(encoder.parameters())
        with gathered(params):
            for pm, p in zip(self.momentum_encoder.parameters(), params):
                # theta_m <- lambda * theta_m + (1 - lambda) * theta
                pm.mul_(lam).add_(p.detach().to(pm.device, torch.float32), alpha=1.0 - lam)

    def state_dict(self):
        return {"momentum_encoder": {k: v.detach().cpu() for k, v in self.momentum_encoder.state_dict().items()},
                "queue": self.queue.detach().cpu()}

    def load_state_dict(self, state):
        self.momentum_encoder.load_state_dict(state["momentum_encoder"])
        device = next(self.momentum_encoder.parameters()).device
        self.queue = state["queue"].to(device)


METHOD_CLASSES: dict[str, type[Method]] = {m.name: m for m in (SimCSEUnsup, SimCSESup, ESimCSE)}


def build_method(cfg: MethodConfig, encoder, *, seed: int) -> Method:
    """The method object for ``cfg.name``, wired to ``encoder``'s tokenizer."""
    try:
        cls = METHOD_CLASSES[cfg.name]
    except KeyError:
        raise ValueError(f"unknown method {cfg.name!r}; choose one of {', '.join(METHOD_CLASSES)}") from None
    tok = encoder.tokenizer
    return cls(cfg, tokenizer_fn=encoder.tokenize, pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
               special_ids=set(tok.all_special_ids), max_seq_length=encoder.max_seq_length, seed=seed)
