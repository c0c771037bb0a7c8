"""Gradient caching (GradCache): contrastive batches larger than activation memory.

The contrastive loss couples every row of a batch to every other, so a batch cannot be split into
independent micro-batches the way a classification batch can. Gradient caching (Gao, Zhang, Han,
Callan 2021) splits the *encoder* instead and keeps the loss whole, in three phases:

1. **embed** the whole batch in chunks of ``chunk_size`` rows without a graph (the RNG state of
   every chunk is recorded), giving the full ``(rows, D)`` embeddings as a leaf;
2. **loss**: the loss at full batch size on those embeddings, and its gradient ``G`` with respect
   to them (the loss's graph is small: the embeddings, not the encoder's activations);
3. **replay** each chunk with a graph, under the RNG state recorded for it in phase 1, and
   backpropagate ``<emb_chunk, G_chunk>`` (a surrogate whose gradient is ``G_chunk``) through the
   encoder. Only one chunk's activations are alive at a time. The last chunk is not replayed: phase
   1 runs it with its graph, and phase 3 backpropagates it first (``keep_last``).

The parameter gradients are those of ``loss.backward()`` on the uncached graph with the same dropout
masks. The price is a second forward of every chunk but one: with n chunks, (n - 1) / n of a
forward on top of the uncached step's forward and backward (about three forwards' worth), so at
most a third more FLOPs and nothing with one chunk; per-chunk overhead comes on top for small
chunks (bench/bench_grad_cache.py measures both).

API
---
- :func:`cached_method_step`: a fastcse training method's micro-step (phases 1 and 2) from the
  encoder, the :class:`~fastcse.methods.Method`, the collated batch and a loss callable
  ``loss_fn(LossInputs) -> scalar``; returns a :class:`CachedStep` whose ``loss`` is the value
  and whose :meth:`CachedStep.backward` runs phase 3 through a pluggable ``backward`` (DeepSpeed's
  ``engine.backward``) and ``boundary(is_last)`` hook. The method's own ``loss_inputs`` runs
  unchanged: it is handed a :class:`ChunkedEncoder` in place of the model, so what the method
  forwards (SimCSE's ``[x; x]``, supervised ``[sent0; sent1; hard_neg]``, ESimCSE's
  ``[x; repeated x]``) is exactly what it forwards without caching, cut into chunks of rows.
  ESimCSE's momentum encoder runs in chunks without a graph for the duration
  (:class:`NoGradChunks`). The training program's ``--grad-cache-chunk K`` is this function
  followed by ``step.backward_cached`` (:mod:`fastcse.step`: ``CachedStep.backward`` in one
  process, :class:`DeepSpeedCachedBackward` under DeepSpeed).
- :func:`grad_cache`: the same for any encoder and sentence groups: token dicts, each embedded as
  one forward in chunks, optionally ``split`` into equal parts for ``loss_fn(*parts)``; all three
  phases in one call.
- :func:`embed_no_grad`: chunked embedding without a graph (momentum encoders, evaluation).
- :func:`chunk_ranges` / :func:`slice_features`: how a batch is cut (also what a reference
  computation must use to draw the same dropout masks).
- :class:`DeepSpeedCachedBackward`: phase 3 on a DeepSpeed engine, one gradient reduction per
  optimizer step where the engine can coalesce (:func:`deepspeed_reduction_window`).

What "the same batch without caching" means with dropout on
--------------------------------------------------------
Unsupervised SimCSE forwards the 2N sequences ``[x; x]`` in **one** encoder call, so the two
copies of a sentence get different masks. With chunks of K rows the encoder is called on slices of
those 2N rows, one call per chunk, and each call draws its own masks (a mask's shape and the
position in torch's random stream depend on the call), so no chunked run can draw the masks of the
unchunked one. What caching guarantees is: the gradients equal those of the *uncached* computation
over the same chunks, i.e. the chunks run with a graph one after the other from the same RNG state
and the loss backpropagated once (tests/test_grad_cache.py checks this, with dropout inside the
attention kernel too). Each copy of a sentence still gets its own mask (different rows of a call,
or different calls), which is all SimCSE asks of the augmentation. With dropout 0, or one chunk
(``chunk_size`` >= rows), the cached step equals the plain uncached step.

RNG replay: restore the generators, per chunk
---------------------------------------------
Before each chunk's phase-1 forward, the state of torch's default CPU generator and of the default
CUDA generator of every CUDA device the chunk touches is captured (``torch.get_rng_state``,
``torch.cuda.get_rng_state(device)``); phase 3 restores it before replaying that chunk, and at the
end the generators are put back where phase 1 left them, so what runs after the step draws the
numbers it would have drawn without caching. Why this rather than a seed-and-offset scheme: the
randomness lives in code fastcse does not own (Hugging Face's ``nn.Dropout`` modules, the
varlen / SDPA dropout) and in fastcse's own kernels, which take their Philox seed from
``torch.randint`` on the default generator of the activations' device
(``fastcse.kernels.biased_attention._draw_seed``). Restoring the default generators replays every
one of them without any of them taking a seed argument; a seed-and-offset scheme would have to be
threaded through each dropout site. The cost is small: 5 KiB (CPU Mersenne-Twister state) plus
16 bytes per CUDA device (Philox seed and offset) per chunk. Autocast is recorded with the RNG and
re-entered for the replayed forward, so phase 3 may run outside the caller's autocast block. What
replay needs of the model: a forward draws the same random numbers with and without a graph. That
holds for ``nn.Dropout``, for fastcse's kernels and for every path tested here; a model whose
attention picks a different dropout kernel when inputs require grad (PyTorch's SDPA can, for
some head sizes on some GPUs) would break it, as it breaks activation checkpointing.

DeepSpeed (ZeRO-2 / ZeRO-3)
---------------------------
Each chunk's surrogate goes through the ``backward`` callable: pass ``engine.backward``, never a
plain ``Tensor.backward`` (ZeRO's per-parameter hooks would then fire once per chunk without the
engine's epilogue, and ZeRO-2 stops with "gradient computed twice"). ``engine.backward`` divides
by ``gradient_accumulation_steps``: hand it the surrogate as it is, exactly as the uncached step
hands it the loss (the chunk surrogates' gradients sum to the loss's, so the same 1/accum and the
same loss scale reach every chunk); a plain-PyTorch caller passes
``backward=lambda s: (s / accum).backward()`` (or ``scaler.scale(s / accum).backward()``) just as
it treats its loss. ``boundary(is_last)`` is called before each chunk's backward with
``is_last=True`` for the last chunk only; a DeepSpeed caller passes
``lambda last: engine.set_gradient_accumulation_boundary(last and last_micro_batch)``.

The boundary flag alone does not stop ZeRO-2 / ZeRO-3 from reducing gradients at every
``engine.backward`` (they reduce-scatter on each backward to free the full gradients), so with the
flag alone each chunk costs one reduction (correct gradients, K times the traffic). DeepSpeed
>= 0.18's ``engine.coalesce_grad_reduction()`` keeps every backward's gradients local and reduces
once when the block exits: :func:`deepspeed_reduction_window` returns it where the engine supports
it, and :class:`DeepSpeedCachedBackward` uses it: the block spans the whole accumulation window
(every micro-batch of one optimizer step) and ``engine.step()`` runs once after it (inside,
``engine.step()`` raises). The gradients then live
unpartitioned on every rank until the flush (ZeRO-2: a full gradient copy per rank; ZeRO-3: all
of them, so for models near ZeRO-3's limit the per-chunk reduction is the one that fits).

Distributed negatives: ``loss_fn`` may call ``info_nce(..., gather_across_ranks=True)``. Phase 2
then gathers the cached embeddings (no encoder graph to carry), and the gradient it returns for
the local rows is the all-reduced sum over every rank's loss, from ``all_gather_with_grad``'s
backward, which is what each rank's uncached backward would hand its encoder.

References: Gao, Zhang, Han, Callan. Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup (RepL4NLP 2021). sentence-transformers' ``CachedMultipleNegativesRankingLoss``
applies the same idea to its losses (:class:`fastcse.losses.FusedCachedMultipleNegativesRankingLoss`
builds on it).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "CachedStep", "ChunkedEncoder", "DeepSpeedCachedBackward", "NoGradChunks", "RNGState",
    "cached_method_step", "cached_step",
    "chunk_ranges", "deepspeed_can_coalesce", "deepspeed_reduction_window", "embed_no_grad",
    "feature_rows", "grad_cache", "slice_features",
]

Features = Mapping[str, Any]
Backward = Callable[[Tensor], Any]
Boundary = Callable[[bool], Any]
_AUTOCAST_DEVICES = ("cpu", "cuda")


# --------------------------------------------------------------------------------------------
# cutting a batch into chunks of rows
# --------------------------------------------------------------------------------------------


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
    return chunk_size


def feature_rows(features: Features) -> int:
    """Rows (sentences) of a token dict: the first dimension of ``input_ids`` (or of any tensor)."""
    for key in ("input_ids", "attention_mask"):
        value = features.get(key)
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    for value in features.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("the features hold no batched tensor: cannot tell how many rows they have")


def chunk_ranges(rows: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(0, K), (K, 2K), ..., (., rows)]``: the last chunk is shorter when K does not divide rows."""
    _check_chunk_size(chunk_size)
    return [(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]


def slice_features(features: Features, start: int, end: int, *, trim_padding: bool = True) -> dict:
    """Rows ``start:end`` of every batched tensor in ``features`` (other values passed as they are).

    With ``trim_padding`` and a 2-D ``attention_mask`` (right padding), the trailing columns that
    are padding in every row of the chunk are dropped from every tensor of that width, so a chunk
    of short sentences is not run at the longest sentence's length. Leading or inner padding is
    kept. A chunk holding the batch's longest row keeps its full width (one chunk of the whole
    batch is the batch itself).
    """
    width = None
    mask = features.get("attention_mask")
    if trim_padding and isinstance(mask, Tensor) and mask.dim() == 2:
        active = mask[start:end].bool().any(dim=0)
        if bool(active.any()):
            last = int(active.nonzero().max()) + 1
            if last < mask.shape[1]:
                width = (mask.shape[1], last)
    out = {}
    for key, value in features.items():
        if not isinstance(value, Tensor) or value.dim() == 0:
            out[key] = value
            continue
        value = value[start:end]
        if width is not None and value.dim() >= 2 and value.shape[1] == width[0]:
            value = value[:, :width[1]]
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# RNG and autocast replay
# --------------------------------------------------------------------------------------------


def _cuda_devices(features: Features) -> list[int]:
    """CUDA devices whose default generator a forward of ``features`` may draw from."""
    devices = {v.device.index for v in features.values() if isinstance(v, Tensor) and v.is_cuda}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.add(torch.cuda.current_device())
    return sorted(d for d in devices if d is not None)


@dataclass
class RNGState:
    """torch's default CPU generator state and the default CUDA generators of ``cuda_devices``."""

    cpu: Tensor
    cuda: dict[int, Tensor] = field(default_factory=dict)

    @classmethod
    def capture(cls, cuda_devices: Sequence[int] = ()) -> "RNGState":
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in cuda_devices})

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)


@dataclass(frozen=True)
class _AutocastState:
    """Which devices autocast was enabled for, and to what dtype, when a chunk was embedded."""

    enabled: tuple[tuple[str, torch.dtype], ...]

    @classmethod
    def capture(cls) -> "_AutocastState":
        on = []
        for device in _AUTOCAST_DEVICES:
            if device == "cuda" and not torch.cuda.is_available():
                continue
            if torch.is_autocast_enabled(device):
                on.append((device, torch.get_autocast_dtype(device)))
        return cls(tuple(on))

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for device, dtype in self.enabled:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            yield


# --------------------------------------------------------------------------------------------
# phase 1: chunked embedding without a graph
# --------------------------------------------------------------------------------------------


def _call(encoder: Callable[..., Tensor], features: Features) -> Tensor:
    out = encoder(**features)
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(f"the encoder must return (rows, dim) embeddings for a token dict, got {shape}")
    return out


def embed_no_grad(encoder: Callable[..., Tensor], features: Features, chunk_size: int, *,
                  trim_padding: bool = True) -> Tensor:
    """``encoder(**features)`` in chunks of ``chunk_size`` rows under ``no_grad``, concatenated.

    For what needs embeddings and no gradient once per step: ESimCSE's momentum encoder, evaluation.
    The encoder's mode (train / eval) is the caller's: ESimCSE's reference encodes in eval mode.
    """
    rows = feature_rows(features)
    with torch.no_grad():
        parts = [_call(encoder, slice_features(features, a, b, trim_padding=trim_padding))
                 for a, b in chunk_ranges(rows, chunk_size)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class NoGradChunks:
    """A stand-in for a module that is only ever called under ``no_grad`` (a momentum encoder):
    calls run in chunks (:func:`embed_no_grad`); ``train`` / ``eval`` / ``training`` reach the module."""

    def __init__(self, module: nn.Module, chunk_size: int, *, trim_padding: bool = True):
        self.module = module
        self.chunk_size = _check_chunk_size(chunk_size)
        self.trim_padding = trim_padding

    def __call__(self, **features) -> Tensor:
        return embed_no_grad(self.module, features, self.chunk_size, trim_padding=self.trim_padding)

    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True) -> "NoGradChunks":
        self.module.train(mode)
        return self

    def eval(self) -> "NoGradChunks":
        return self.train(False)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["module"], name)


@dataclass
class _Forward:
    """One encoder call of phase 1: what phase 3 needs to replay it chunk by chunk."""

    features: Features
    ranges: list[tuple[int, int]]
    rng: list[RNGState]
    autocast: _AutocastState
    embeddings: Tensor  # (rows, D) leaf with requires_grad, the concatenated chunk embeddings
    kept: Optional[Tensor] = None  # the last chunk's embeddings with their graph (see ChunkedEncoder)


class ChunkedEncoder:
    """Stands in for the encoder in phase 1: ``proxy(**features)`` embeds the rows in chunks
    without a graph, records each chunk's RNG state, and returns the embeddings as a leaf tensor
    that requires grad. Any number of calls; each one is replayed as it ran. Attributes
    (``training``, ``embedding_dim``, ...) are the encoder's.

    ``keep_last`` (default): the last chunk of the last call runs *with* its graph, which phase 3
    then backpropagates first instead of replaying it: one chunk's forward less per step (with a
    single chunk, none: the cached step costs what the uncached one does). Its activations are
    alive through phase 2, as one replayed chunk's are in phase 3, so the peak stays one chunk's
    activations plus the loss. A later call drops the graph an earlier call kept (that chunk is
    replayed), so at most one chunk's graph is ever held.
    """

    def __init__(self, encoder: Callable[..., Tensor], chunk_size: int, *, trim_padding: bool = True,
                 keep_last: bool = True):
        self.encoder = encoder
        self.chunk_size = _check_chunk_size(chunk_size)
        self.trim_padding = trim_padding
        self.keep_last = keep_last
        self.forwards: list[_Forward] = []

    @property
    def training(self) -> bool:
        return bool(getattr(self.encoder, "training", True))

    def __getattr__(self, name: str):
        return getattr(self.__dict__["encoder"], name)

    def __call__(self, **features) -> Tensor:
        if self.forwards:
            self.forwards[-1].kept = None  # only the last call's last chunk keeps its graph
        rows = feature_rows(features)
        ranges = chunk_ranges(rows, self.chunk_size)
        devices = _cuda_devices(features)
        autocast = _AutocastState.capture()
        keep = self.keep_last and torch.is_grad_enabled()
        states, parts, kept = [], [], None
        for i, (a, b) in enumerate(ranges):
            states.append(RNGState.capture(devices))
            chunk = slice_features(features, a, b, trim_padding=self.trim_padding)
            if keep and i == len(ranges) - 1:
                kept = _call(self.encoder, chunk)
                parts.append(kept.detach())
            else:
                with torch.no_grad():
                    parts.append(_call(self.encoder, chunk))
        embeddings = (torch.cat(parts) if len(parts) > 1 else parts[0]).detach().requires_grad_(True)
        self.forwards.append(_Forward(dict(features), ranges, states, autocast, embeddings, kept))
        return embeddings


# --------------------------------------------------------------------------------------------
# phases 2 and 3
# --------------------------------------------------------------------------------------------


def _default_backward(surrogate: Tensor) -> None:
    surrogate.backward()


def _surrogate(embeddings: Tensor, grad: Tensor) -> Tensor:
    # <emb, G>: its gradient with respect to emb is exactly G (in emb's dtype); summed in fp32 or
    # better so that a low-precision product does not round the value (the value is not used,
    # only its graph, but engine.backward checks it for overflow)
    acc = torch.promote_types(embeddings.dtype, torch.float32)
    return (embeddings.to(acc) * grad.to(acc)).sum()


class CachedStep:
    """A micro-step after phases 1 and 2: ``loss`` (detached) is known, the encoder has no gradient
    yet. :meth:`backward` (once) replays the chunks and accumulates the parameter gradients.

    Attributes: ``loss`` (0-d tensor, the value ``loss_fn`` returned), ``inputs`` (what the method
    or the groups produced: views of the cached embeddings, for logging), ``chunks`` (encoder
    chunks phase 3 will run).
    """

    def __init__(self, encoder, forwards: list[_Forward], grads: list[Tensor], loss: Tensor, inputs: Any,
                 loss_parameters: Sequence[Tensor], loss_parameter_grads: Sequence[Optional[Tensor]],
                 trim_padding: bool, end_rng: RNGState):
        self._encoder = encoder
        self._forwards = forwards
        self._grads = grads
        self._loss_params = [(p, g) for p, g in zip(loss_parameters, loss_parameter_grads) if g is not None]
        self._trim_padding = trim_padding
        self._end_rng = end_rng
        self._done = False
        self.loss = loss
        self.inputs = inputs

    @property
    def chunks(self) -> int:
        return sum(len(f.ranges) for f in self._forwards)

    def backward(self, *, backward: Optional[Backward] = None, boundary: Optional[Boundary] = None,
                 poison: bool = False) -> None:
        """Phase 3: re-embed each chunk with a graph under its recorded RNG state and backpropagate
        ``<emb_chunk, G_chunk>`` through ``backward(surrogate)`` (default ``surrogate.backward()``),
        calling ``boundary(is_last)`` before each (``is_last`` for the last chunk only).

        ``backward`` receives each chunk's surrogate as the uncached step's backward receives its
        loss: scale it the same way (1/accum, a loss scaler; DeepSpeed's ``engine.backward`` does
        both itself). The loss's own parameters (``loss_parameters`` of phase 2) join the last
        chunk's surrogate, so they get the same scaling.

        ``poison=True`` (the loss was not finite on some rank): backpropagate only one chunk (the
        kept one, else the first, replayed), with a NaN surrogate and ``boundary(True)``, so that
        the gradients of this accumulation window are non-finite and the optimizer step is
        dropped, as ``backward(loss * nan)`` does uncached.
        """
        if self._done:
            raise RuntimeError("CachedStep.backward() already ran: a cached step replays its chunks once")
        self._done = True
        backward = backward or _default_backward
        # (forward, its gradient, chunk index, the chunk's embeddings if phase 1 kept their graph):
        # the kept chunk first, so its activations die before any replay
        work = [(f, g, i, None) for f, g in zip(self._forwards, self._grads) for i in range(len(f.ranges))]
        kept = [n for n, (f, _, i, _) in enumerate(work) if f.kept is not None and i == len(f.ranges) - 1]
        if kept:
            f, g, i, _ = work.pop(kept[0])
            work.insert(0, (f, g, i, f.kept))
            f.kept = None
        if poison:
            work = work[:1]
        try:
            with torch.enable_grad():
                for n in range(len(work)):
                    fwd, grad, i, emb = work[n]
                    work[n] = None  # the list lets go: the kept chunk's graph dies with its backward
                    last = n == len(work) - 1
                    a, b = fwd.ranges[i]
                    if emb is None:
                        fwd.rng[i].restore()
                        chunk = slice_features(fwd.features, a, b, trim_padding=self._trim_padding)
                        with fwd.autocast.entered():
                            emb = _call(self._encoder, chunk)
                    surrogate = _surrogate(emb, grad[a:b])
                    if last:
                        for p, g in self._loss_params:
                            surrogate = surrogate + _surrogate(p, g)
                    if poison:
                        surrogate = surrogate * float("nan")
                    if boundary is not None:
                        boundary(last)
                    backward(surrogate)
                    del emb, surrogate  # this chunk's activations die before the next chunk's forward
        finally:
            self._end_rng.restore()
            for f in self._forwards:
                f.kept = None
            self._forwards, self._grads, self._loss_params = [], [], []


def cached_step(encoder: Callable[..., Tensor], run: Callable[[ChunkedEncoder], Any],
                loss_fn: Callable[[Any], Tensor], *, chunk_size: int, loss_parameters: Sequence[Tensor] = (),
                trim_padding: bool = True, keep_last: bool = True) -> CachedStep:
    """Phases 1 and 2 for any computation: ``inputs = run(proxy)`` (the proxy embeds in chunks
    without a graph), ``loss = loss_fn(inputs)``, and the loss's gradient with respect to every
    embedding the proxy returned (and to ``loss_parameters``, e.g. a learnable temperature).
    ``keep_last``: see :class:`ChunkedEncoder` (False: every chunk is replayed).

    Raises ``ValueError`` when the loss did not use some forward's embeddings, ``TypeError`` when
    it is not a scalar.
    """
    proxy = ChunkedEncoder(encoder, chunk_size, trim_padding=trim_padding, keep_last=keep_last)
    inputs = run(proxy)
    if not proxy.forwards:
        raise ValueError("the computation never called the encoder: nothing to cache")
    loss = loss_fn(inputs)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
    # the RNG as the uncached step would leave it (phase 3 restores it when it is done)
    end_rng = RNGState.capture(sorted({d for f in proxy.forwards for s in f.rng for d in s.cuda}))
    leaves = [f.embeddings for f in proxy.forwards]
    params = [p for p in loss_parameters if p.requires_grad]
    grads = torch.autograd.grad(loss.reshape(()), leaves + params, allow_unused=True)
    emb_grads, param_grads = list(grads[:len(leaves)]), list(grads[len(leaves):])
    unused = [i for i, g in enumerate(emb_grads) if g is None]
    if unused:
        raise ValueError(f"the loss did not use the embeddings of encoder call(s) {unused}: they would get "
                         "no gradient, yet caching would embed them twice; leave them out of the batch")
    return CachedStep(encoder, proxy.forwards, emb_grads, loss.detach().reshape(()), inputs, params,
                      param_grads, trim_padding, end_rng)


def cached_method_step(model: Callable[..., Tensor], method, batch: Features,
                       loss_fn: Callable[[Any], Tensor], *, chunk_size: int,
                       loss_parameters: Sequence[Tensor] = (), trim_padding: bool = True,
                       keep_last: bool = True) -> CachedStep:
    """Phases 1 and 2 of a fastcse training method's micro-step, with chunks of ``chunk_size`` rows.

    Args:
        model: what the uncached step passes to ``method.loss_inputs``: the encoder, or the
            DeepSpeed engine wrapping it (called as ``model(**features) -> (rows, D)``).
        method: a :class:`fastcse.methods.Method`; its ``loss_inputs(model, batch)`` runs unchanged
            on a :class:`ChunkedEncoder`. A ``momentum_encoder`` attribute (ESimCSE) is swapped for
            :class:`NoGradChunks` of it during the call; a method whose momentum encoder is no
            module (ESimCSE under ZeRO-3: fp32 shards run through the engine's module) has its
            ``momentum_embeddings(model, features)`` called chunk by chunk instead (the method's
            queue bookkeeping is untouched: call ``after_micro_step`` / ``discard_pending`` as
            without caching).
        batch: the collated batch, on the model's device.
        loss_fn: ``LossInputs -> scalar``, e.g. ``lambda x: info_nce(x.anchors, x.positives,
            x.hard_negatives, queue=x.queue, temperature=0.05, gather_across_ranks=world > 1)``.
        chunk_size: rows per encoder chunk (rows of the method's forward: SimCSE forwards 2N rows).
        loss_parameters: trainable tensors inside ``loss_fn`` (a learnable temperature).
        trim_padding: drop each chunk's all-padding trailing columns (:func:`slice_features`).
        keep_last: keep the last chunk's graph from phase 1 instead of replaying it
            (:class:`ChunkedEncoder`).

    Returns a :class:`CachedStep`: check ``step.loss``, then call ``step.backward(...)``.
    """
    momentum = getattr(method, "momentum_encoder", None)
    swap = isinstance(momentum, nn.Module)
    # a momentum encoder that is no module of its own (ESimCSE's ZeRO-3 shards, run through the
    # engine's module by ``method.momentum_embeddings(model, features)``): that call, in chunks
    embed = None if swap else getattr(method, "momentum_embeddings", None)
    wrap = callable(embed)
    own = "momentum_embeddings" in getattr(method, "__dict__", {})  # already an instance attribute

    def chunked_momentum(model, features):
        return embed_no_grad(lambda **chunk: embed(model, chunk), features, chunk_size, trim_padding=trim_padding)

    def run(proxy: ChunkedEncoder):
        if swap:
            method.momentum_encoder = NoGradChunks(momentum, chunk_size, trim_padding=trim_padding)
        if wrap:
            method.momentum_embeddings = chunked_momentum  # an instance attribute, over the bound method
        try:
            return method.loss_inputs(proxy, batch)
        finally:
            if swap:
                method.momentum_encoder = momentum
            if wrap:
                if own:
                    method.momentum_embeddings = embed
                else:
                    del method.momentum_embeddings  # the class's bound method again

    return cached_step(model, run, loss_fn, chunk_size=chunk_size, loss_parameters=loss_parameters,
                       trim_padding=trim_padding, keep_last=keep_last)


def grad_cache(encoder: Callable[..., Tensor], features: Union[Features, Sequence[Features]],
               loss_fn: Callable[..., Tensor], *, chunk_size: int, split: Optional[int] = None,
               backward: Optional[Backward] = None, boundary: Optional[Boundary] = None,
               loss_parameters: Sequence[Tensor] = (), trim_padding: bool = True,
               keep_last: bool = True) -> Tensor:
    """One gradient-cached loss and backward: returns the loss (detached) with the encoder's
    parameter gradients accumulated as ``loss.backward()`` on the uncached graph would (same
    dropout masks, see the module docstring).

    Args:
        encoder: ``encoder(**token_dict) -> (rows, D)``: a SentenceEncoder, a DeepSpeed engine, any
            callable module.
        features: one token dict (one forward of all its rows, e.g. SimCSE's ``[x; x]``) or a
            sequence of them (one forward each: anchors, positives, hard negatives).
        loss_fn: called with the embeddings, one tensor per forward in order, each cut into
            ``split`` equal row blocks when ``split`` is given: ``loss_fn(a, p)`` for
            ``[x; x]`` with ``split=2``, ``loss_fn(a, p, h)`` for three token dicts.
        chunk_size: rows per encoder chunk.
        backward, boundary: :meth:`CachedStep.backward`'s hooks (DeepSpeed's ``engine.backward``
            and accumulation boundary).
        loss_parameters: trainable tensors inside ``loss_fn``.

    Example:
        >>> import torch, fastcse
        >>> from fastcse.grad_cache import grad_cache
        >>> enc = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Dropout(0.1))
        >>> encoder = lambda input_ids: enc(input_ids).mean(1)
        >>> x = {"input_ids": torch.randint(0, 50, (8, 5))}
        >>> doubled = {"input_ids": torch.cat([x["input_ids"]] * 2)}   # SimCSE: one forward of 2N
        >>> loss = grad_cache(encoder, doubled, lambda a, p: fastcse.info_nce(a, p), chunk_size=5, split=2)
        >>> enc[0].weight.grad.shape
        torch.Size([50, 16])
    """
    groups = [features] if isinstance(features, Mapping) else list(features)
    if not groups:
        raise ValueError("grad_cache needs at least one token dict")
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split < 1):
        raise ValueError(f"split must be a positive int, got {split!r}")

    def run(proxy: ChunkedEncoder) -> list[Tensor]:
        parts = []
        for g in groups:
            emb = proxy(**g)
            if split is not None:
                if emb.shape[0] % split:
                    raise ValueError(f"split={split} does not divide the {emb.shape[0]} rows of a forward")
                parts.extend(emb.chunk(split))
            else:
                parts.append(emb)
        return parts

    step = cached_step(encoder, run, lambda parts: loss_fn(*parts), chunk_size=chunk_size,
                       loss_parameters=loss_parameters, trim_padding=trim_padding, keep_last=keep_last)
    step.backward(backward=backward, boundary=boundary)
    return step.loss


# --------------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------------


def deepspeed_can_coalesce(engine) -> bool:
    """Whether ``engine.coalesce_grad_reduction()`` exists and supports this engine (ZeRO 1-3 on
    DeepSpeed's ZeRO optimizer, managed gradient accumulation, no pipeline)."""
    if not hasattr(engine, "coalesce_grad_reduction"):
        return False
    try:
        stage = int(engine.zero_optimization_stage())
    except (AttributeError, TypeError):
        return False
    managed = getattr(engine, "managed_gradient_accumulation", lambda: True)()
    return (1 <= stage <= 3 and managed and not getattr(engine, "pipeline_parallelism", False)
            and hasattr(getattr(engine, "optimizer", None), "_coalesce_grad_reduction"))


def deepspeed_reduction_window(engine):
    """A context for one optimizer step's accumulation window: every ``engine.backward`` inside
    keeps its gradients local and the exit runs one reduction (``engine.coalesce_grad_reduction``),
    where :func:`deepspeed_can_coalesce`; otherwise a no-op context (each backward reduces, as
    ZeRO-2 / ZeRO-3 always do) with a warning. Call ``engine.step()`` after the block, not inside."""
    if deepspeed_can_coalesce(engine):
        return engine.coalesce_grad_reduction()
    logger.warning("this DeepSpeed engine cannot coalesce gradient reductions (needs DeepSpeed >= 0.18 and "
                   "the ZeRO optimizer): each cached chunk's backward reduces its gradients")
    return contextlib.nullcontext()


class DeepSpeedCachedBackward:
    """Phase 3 of cached micro-steps on a DeepSpeed engine, in place of ``engine.backward(loss);
    engine.step()`` per micro-batch (what ``fastcse.step.DeepSpeedStep.backward`` does uncached).

    Call ``backward(step, finite=..., last=...)`` once per micro-batch of an accumulation window,
    ``last`` on its final one; ``finite=False`` (some rank's loss was not finite) ends the window
    there with a poisoned chunk, so DeepSpeed drops the whole window as it does uncached. The
    engine's optimizer step runs inside the call that ends the window; read
    ``engine.was_step_applied()`` after it, as uncached.

    ``coalesce`` (default: where :func:`deepspeed_can_coalesce`): the window's micro-batches and
    chunks all run inside one ``engine.coalesce_grad_reduction()`` block, entered at the window's
    first micro-batch and left at its last, then one ``engine.step()``: one gradient reduction per
    optimizer step. ``coalesce=False``: the accumulation boundary is set on the window's last chunk
    only and ``engine.step()`` follows every micro-batch, as uncached; ZeRO-2 / ZeRO-3 then reduce
    at every chunk's backward (same gradients, more traffic; the gradients stay partitioned).
    """

    def __init__(self, engine, *, coalesce: Optional[bool] = None):
        can = deepspeed_can_coalesce(engine)
        if coalesce and not can:
            raise ValueError("coalesce=True needs engine.coalesce_grad_reduction() (DeepSpeed >= 0.18, "
                             "ZeRO 1-3 on DeepSpeed's ZeRO optimizer)")
        self.engine = engine
        self.coalesce = can if coalesce is None else coalesce
        self._window = None

    def backward(self, step: CachedStep, *, finite: bool, last: bool) -> None:
        engine = self.engine
        ends_window = last or not finite
        if not self.coalesce:
            step.backward(backward=engine.backward, poison=not finite,
                          boundary=lambda last_chunk: engine.set_gradient_accumulation_boundary(
                              ends_window and last_chunk))
            engine.step()  # an optimizer step only at the accumulation boundary
            return
        if self._window is None:
            self._window = engine.coalesce_grad_reduction()
            self._window.__enter__()
        try:
            step.backward(backward=engine.backward, poison=not finite)
        except BaseException:
            self._close(*sys.exc_info())
            raise
        if ends_window:
            self._close(None, None, None)  # the window's one reduction
            engine.set_gradient_accumulation_boundary(True)
            engine.step()

    def _close(self, *exc) -> None:
        window, self._window = self._window, None
        if window is not None:
            window.__exit__(*exc)
