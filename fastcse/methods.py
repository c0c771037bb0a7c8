"""Training methods: a batch of examples in, the inputs of :func:`fastcse.info_nce` out.

A method does three things per micro-step: ``collate`` (examples -> token tensors, on CPU; every
random choice comes from the micro-step's own stream, so a resumed run repeats it),
``loss_inputs`` (forward through the model -> anchors / positives / hard negatives / queue), and
after the step ``after_micro_step`` / ``after_optimizer_step`` (ESimCSE's queue and momentum
encoder); ``on_epoch_start`` when the data starts an epoch (ESimCSE empties its queue).
``state_dict`` holds whatever must survive a resume and is the same on every rank (saved once),
``rank_state_dict`` what differs between ranks (saved for each rank).

- ``simcse-unsup``: the batch twice in one forward of 2N sequences (independent dropout masks);
  positive = the other copy.
- ``simcse-sup``: ``[sent0; sent1; hard_neg]`` in one forward of 3N; positive = sent1, hard negative
  = hard_neg (weighted by ``hard_negative_weight`` inside the loss). Pairs (``Triplet(sent0, sent1,
  None)``, data without a negative column): ``[sent0; sent1]`` in one forward of 2N, no hard negatives.
- ``esimcse``: anchor = the sentence, positive = its word-repetition view (both through the model in
  one forward); a momentum encoder (EMA of the model; under ZeRO-3 one fp32 shard per rank) embeds the
  original sentence in eval mode, and those embeddings enter this rank's FIFO queue after the step:
  extra negatives, without gradient, for the next steps; the queue is emptied at each epoch (the
  reference code's behaviour; :class:`ESimCSE` lists the deviations that can be chosen instead).
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

    and ``method.on_epoch_start(e)`` before the first micro-batch of each epoch ``e`` (0 included; a
    resumed run calls it only when it starts a new epoch).

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

    def setup(self, encoder: nn.Module, device, *, sharded: bool = False) -> None:
        """Called once with the plain encoder, before any distributed wrapping; ``sharded``: a ZeRO-3
        engine will partition its parameters (in place, this very module)."""

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

    def on_epoch_start(self, epoch: int) -> None:
        """Before the first micro-batch of epoch ``epoch`` (0-based)."""

    def state_dict(self) -> dict:
        """The state every rank holds alike (a checkpoint keeps rank 0's)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state_dict(self) -> dict:
        """The state that differs between ranks (a checkpoint keeps every rank's)."""
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
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


def _ema_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the momentum encoder and its embeddings (an EMA in bf16 stalls: 1 - lambda = 0.005 is
    below bf16's resolution near 1), float64 when the model is float64 (exact tests)."""
    return torch.promote_types(dtype, torch.float32)


class ESimCSE(Method):
    """ESimCSE as its reference code runs it (caskcsg/sentemb, ``ESimCSE/esimcse/trainers.py``
    ``compute_loss`` and ``models.py`` ``cl_forward``), each difference of fastcse's earlier version
    reachable as a documented deviation (:class:`fastcse.config.MethodConfig`):

    - the momentum encoder embeds without gradient in **eval mode** (no dropout);
      ``esimcse_momentum_dropout``: in the model's mode instead;
    - it embeds the **original** sentence (``input_ids[:, 0]``); ``esimcse_queue_view="repeated"``:
      the word-repetition view;
    - the queue is **per rank** (this rank's own rows, never gathered) and **emptied at each epoch**
      (:meth:`on_epoch_start`); ``esimcse_queue="global"``: every rank keeps the whole global batch's
      rows (then 2 ranks equal one process); ``esimcse_queue_reset="never"``.

    The momentum encoder theta_m <- lambda theta_m + (1 - lambda) theta (after each applied step)
    takes one of two forms, chosen at :meth:`setup`:

    - a full fp32 copy of the encoder (one process, ZeRO-1/2: every rank holds the whole model then);
    - under ZeRO-3 (``sharded=True``, or parameters already partitioned), **one fp32 shard per
      parameter**: the EMA of this rank's partition ``param.ds_tensor``, nothing more, so the momentum
      state is 4 Psi / N bytes per rank, and the EMA one pass over the local shards. Its forward runs
      through the ZeRO-3 module itself with the shards written into the partitions
      (:meth:`momentum_embeddings`): DeepSpeed gathers them layer by layer as for the model, and the
      model's partitions are put back afterwards (a transient copy of the local partitions, 2 Psi / N
      in the model's dtype). The forward then uses the momentum weights in the model's dtype (bf16
      under bf16), as the model's own forward does.
    """

    name = "esimcse"

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.momentum_encoder: nn.Module | None = None  # the full fp32 copy (not ZeRO-3)
        self.momentum_shards: list[Tensor] | None = None  # ZeRO-3: fp32 EMA of each local partition
        self._encoder: nn.Module | None = None  # ZeRO-3: the module whose partitions the shards follow
        self._sharded = False
        self.queue: Tensor | None = None  # (rows, dim) fp32, oldest first
        self._pending: Tensor | None = None

    def setup(self, encoder, device, *, sharded=False):
        params = list(encoder.parameters())
        # a model built under deepspeed.zero.Init is partitioned already
        self._sharded = sharded or any(hasattr(p, "ds_tensor") for p in params)
        self.queue = torch.zeros(0, encoder.embedding_dim, device=device)
        if self._sharded:
            # the shards are taken from the partitions once DeepSpeed has made them (first use):
            # a full copy, even a transient one, is what ZeRO-3 must avoid
            self._encoder = encoder
            return
        self.momentum_encoder = copy.deepcopy(encoder).to(device, _ema_dtype(next(encoder.parameters()).dtype))
        for p in self.momentum_encoder.parameters():
            p.requires_grad_(False)

    def _shards(self) -> list[Tensor]:
        if self.momentum_shards is None:
            params = list(self._encoder.parameters())
            missing = [n for n, p in self._encoder.named_parameters() if getattr(p, "ds_tensor", None) is None]
            if missing:
                raise RuntimeError(f"esimcse: the momentum encoder is sharded but {missing[0]} has no ZeRO-3 "
                                   "partition (ds_tensor); is the model wrapped by a ZeRO-3 engine?")
            # DeepSpeed's OffloadDeviceEnum is a str enum; CPU-offloaded partitions say "not-nvme" or None
            if any(getattr(p.ds_tensor, "final_location", None) == "nvme" for p in params):
                raise NotImplementedError("esimcse: ZeRO-3 parameters offloaded to NVMe are not supported")
            # the initial momentum encoder is the model (the reference's deepcopy), partition by partition
            self.momentum_shards = [p.ds_tensor.detach().to(_ema_dtype(p.ds_tensor.dtype), copy=True) for p in params]
        return self.momentum_shards

    def momentum_bytes(self) -> int:
        """Bytes of the momentum encoder's weights held by this rank (its shards under ZeRO-3)."""
        tensors = self._shards() if self._sharded else list(self.momentum_encoder.parameters())
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def momentum_embeddings(self, model: nn.Module, features: dict[str, Tensor]) -> Tensor:
        """The momentum encoder's embeddings of ``features`` (fp32; float64 for a float64 model),
        without gradient; in eval mode unless ``esimcse_momentum_dropout`` (then in the mode of
        ``model``: the encoder or its engine)."""
        if not self._sharded:
            self.momentum_encoder.train(self.cfg.esimcse_momentum_dropout and model.training)
            out = self.momentum_encoder(**features)
            return out.to(_ema_dtype(out.dtype))
        release = getattr(model, "empty_partition_cache", None)
        if release is None:
            raise RuntimeError("esimcse: a sharded momentum encoder runs through the ZeRO-3 engine (its "
                               "empty_partition_cache); got a plain module")
        module = model.module
        params = list(module.parameters())
        shards = self._shards()
        # every parameter back to its partition (persistent ones too): the gathers below then read the
        # partitions, where the momentum weights are about to be written
        release()
        saved = [p.ds_tensor.detach().clone() for p in params]
        was_training = module.training
        try:
            for p, m in zip(params, shards):
                p.ds_tensor.copy_(m)
            module.train(self.cfg.esimcse_momentum_dropout and was_training)
            out = module(**features)
            out = out.to(_ema_dtype(out.dtype))
        finally:
            release()  # nothing of the momentum weights stays gathered for the model's own forward
            for p, s in zip(params, saved):
                p.ds_tensor.copy_(s)
            module.train(was_training)
        return out

    def collate(self, examples, *, micro_step, rank):
        x = self.tokenize(list(examples))
        n = len(examples)
        # one stream per row of the global batch (rank r holds rows r*n ... r*n + n - 1)
        rngs = [step_rng(self.seed, micro_step, rank * n + i, "word_repetition") for i in range(n)]
        x_rep = word_repetition(x, dup_rate=self.cfg.dup_rate, rngs=rngs, special_ids=self.special_ids,
                                max_length=self.max_seq_length, pad_id=self.pad_id)
        return concat_features(x, x_rep, pad_id=self.pad_id)  # [x; repeated x], one forward

    def loss_inputs(self, model, batch):
        n = batch["input_ids"].shape[0] // 2
        rows = slice(0, n) if self.cfg.esimcse_queue_view == "original" else slice(n, None)
        # The momentum forward comes first: its embeddings enter the queue only after this step's loss,
        # so the order changes no value, and under ZeRO-3 it runs between two model steps, when no
        # parameter of the model's own forward or backward is gathered.
        self._pending = self.momentum_embeddings(model, {k: v[rows] for k, v in batch.items()})
        anchors, positives = _split(model(**batch), 2)
        queue = self.queue if self.queue is not None and self.queue.shape[0] else None
        if queue is not None:
            queue = queue.to(anchors.dtype)
        return LossInputs(anchors, positives, queue=queue)

    def after_micro_step(self):
        new = self._pending
        self._pending = None
        if new is None or self.cfg.queue_size == 0:
            return
        if self.cfg.esimcse_queue == "global" and is_distributed():
            # deviation: every rank keeps the same queue, the global batch's rows in rank order
            parts = [torch.empty_like(new) for _ in range(world_info()[1])]
            dist.all_gather(parts, new.contiguous())
            new = torch.cat(parts)
        self.queue = torch.cat([self.queue, new])[-self.cfg.queue_size:]

    def discard_pending(self):
        self._pending = None

    def on_epoch_start(self, epoch):
        if self.cfg.esimcse_queue_reset == "epoch":
            self.queue = self.queue[:0]

    @torch.no_grad()
    def after_optimizer_step(self, encoder, gathered=contextlib.nullcontext):
        lam = self.cfg.momentum
        if self._sharded:
            # one pass over this rank's partitions (the updated ones: ZeRO-3's step writes them)
            for m, p in zip(self._shards(), self._encoder.parameters()):
                m.mul_(lam).add_(p.ds_tensor.detach(), alpha=1.0 - lam)
            return
        params = list(encoder.parameters())
        with gathered(params):
            for pm, p in zip(self.momentum_encoder.parameters(), params):
                # theta_m <- lambda * theta_m + (1 - lambda) * theta
                pm.mul_(lam).add_(p.detach().to(pm.device, pm.dtype), alpha=1.0 - lam)

    # what every rank holds alike is saved once; the shards and a per-rank queue for every rank
    def state_dict(self):
        state = {}
        if not self._sharded:
            state["momentum_encoder"] = {k: v.detach().cpu() for k, v in self.momentum_encoder.state_dict().items()}
        if self.cfg.esimcse_queue == "global":
            state["queue"] = self.queue.detach().cpu()
        return state

    def rank_state_dict(self):
        state = {}
        if self._sharded:
            state["momentum_shards"] = [m.detach().cpu() for m in self._shards()]
            state["momentum_names"] = [n for n, _ in self._encoder.named_parameters()]
        if self.cfg.esimcse_queue == "rank":
            state["queue"] = self.queue.detach().cpu()
        return state

    def load_state_dict(self, state):
        device = self.queue.device
        if "queue" in state:  # a global queue (or a checkpoint from before per-rank queues)
            self.queue = state["queue"].to(device)
        if "momentum_encoder" not in state:
            return
        if not self._sharded:
            self.momentum_encoder.load_state_dict(state["momentum_encoder"])
            return
        # a full momentum encoder (a checkpoint from before sharding): this rank's partition of each
        # parameter, cut as DeepSpeed cuts it (the flattened tensor, zero-padded, in equal parts)
        rank = world_info()[0]
        full = state["momentum_encoder"]
        for m, (name, p) in zip(self._shards(), self._encoder.named_parameters()):
            flat = full[name].reshape(-1).to(m.device, m.dtype)
            part = m.numel()
            piece = flat[rank * part:(rank + 1) * part]
            m.zero_()
            m[:piece.numel()].copy_(piece)

    def load_rank_state_dict(self, state):
        if "queue" in state:
            self.queue = state["queue"].to(self.queue.device)
        if "momentum_shards" in state:
            shards = self._shards()
            names = [n for n, _ in self._encoder.named_parameters()]
            if state.get("momentum_names", names) != names:
                raise ValueError("esimcse: the checkpoint's momentum shards belong to other parameters "
                                 f"({len(state['momentum_names'])} saved, the model has {len(names)})")
            for m, saved in zip(shards, state["momentum_shards"]):
                m.copy_(saved.to(m.device))


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
