"""How an optimizer step is applied: in one process (:class:`PlainStep`) or by DeepSpeed (:class:`DeepSpeedStep`).

Both have one small interface, which ``Trainer.train_step`` calls in this order for each window of
``grad_accum`` micro-batches::

    with step.autocast():
        loss = ...                                   # forward through step.model
    step.backward(loss, finite=ok, last=k == accum - 1)   # per micro-batch; stop after a bad one
    result = step.step(finite)                       # once: clip, apply or skip -> StepResult
    step.zero_grad()

With gradient caching (``--grad-cache-chunk``) the forward is ``cached = cached_method_step(...)``
(:mod:`fastcse.grad_cache`: the loss over the whole batch from chunks embedded without a graph) and
``step.backward_cached(cached, finite=ok, last=...)`` takes the place of ``step.backward``: it
replays the chunks and backpropagates them with the same scaling (1/accum, the fp16 loss scale) and
the same accumulation boundaries as ``backward`` gives the uncached loss; ``step`` is unchanged.

and both hold ``model`` (what the forward pass calls), ``optimizer``, ``scheduler``, ``scaler``,
``engine`` (the objects a checkpoint saves), ``precision`` and ``zero_stage``.

``finite`` is the verdict of every rank on the window's losses (``distributed.all_finite``): a
window with one non-finite micro-batch is dropped whole, and the next one starts clean.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from fastcse.config import OptimConfig
from fastcse.optim import build_optimizer, build_scheduler


class StepResult(NamedTuple):
    finite: bool
    """False: the step was skipped (a non-finite loss or gradient); nothing was applied."""
    grad_norm: float | None
    """The gradients' global norm before clipping; None for a skipped step (or one DeepSpeed did
    not measure)."""


class PlainStep:
    """One process, no DeepSpeed: autocast for bf16 / fp16, a GradScaler for fp16, clipping.

    Args:
        encoder: the model to train (its trainable parameters get AdamW).
        o: the optimizer section of the config (rates, betas, clipping, ``grad_accum``).
        precision: "fp32", "bf16" or "fp16" (already resolved for the device).
        device_type: "cpu" or "cuda" (autocast's and the scaler's device).
        total_steps: optimizer steps of the run (the schedule decays to 0 there).
    """

    zero_stage = 0
    engine = None

    def __init__(self, encoder: torch.nn.Module, o: OptimConfig, precision: str, device_type: str,
                 total_steps: int):
        self.model = encoder
        self.precision = precision
        self.device_type = device_type
        self.grad_accum = o.grad_accum
        self.max_grad_norm = o.max_grad_norm if o.max_grad_norm > 0 else float("inf")
        self.optimizer = build_optimizer(encoder, o)
        self.scheduler = build_scheduler(self.optimizer, o, total_steps)
        self.scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

    def backward(self, loss: torch.Tensor, *, finite: bool, last: bool) -> None:
        # a bad micro-batch adds nothing: step() then sees finite=False and drops the whole window
        if not finite:
            return
        scaled = loss / self.grad_accum  # the window's gradient is the mean over its micro-batches
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def backward_cached(self, cached, *, finite: bool, last: bool) -> None:
        """:meth:`backward` for a :class:`fastcse.grad_cache.CachedStep`: each chunk's surrogate is
        scaled as :meth:`backward` scales the loss (the chunks' gradients sum to the loss's)."""
        if not finite:
            return  # as backward(): nothing replayed, step() drops the window
        cached.backward(backward=lambda surrogate: self.backward(surrogate, finite=True, last=last))

    def step(self, finite: bool) -> StepResult:
        if not finite:
            return StepResult(False, None)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm))
        if self.scaler:
            # fp16: the scaler skips overflowing steps and lowers its scale (expected early on)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        elif math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
        else:
            return StepResult(False, grad_norm)
        return StepResult(True, grad_norm)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def gathered(self, params):
        """Full parameters inside the block (they always are in one process)."""
        return contextlib.nullcontext()

    def release_prefetched(self) -> None:
        """Nothing to release outside ZeRO-3."""


class DeepSpeedStep:
    """A DeepSpeed engine (ZeRO-1/2/3, offload) drives backward, clipping, scaling and the update.

    Args:
        encoder: the model to train; wrapped by ``deepspeed.initialize``.
        ds: the complete DeepSpeed config (``ds_config.engine_config``: no "auto" left).
        o: the optimizer section; used when ``ds`` names no optimizer or scheduler of its own.
        total_steps: optimizer steps of the run (fastcse's schedule decays to 0 there).
        last_checkpoint: returns the run's last good checkpoint, named when a damaged step stops it.
    """

    scaler = None

    def __init__(self, encoder: torch.nn.Module, ds: dict, o: OptimConfig, total_steps: int,
                 last_checkpoint: Callable[[], Path | None]):
        import deepspeed

        self.zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        self._last_checkpoint = last_checkpoint
        kwargs = {}
        if "optimizer" not in ds:
            # torch's foreach AdamW: ZeRO re-points its groups to the flat fp32 partitions, a use of
            # the fused kernel not tried here (a DeepSpeed file can name DeepSpeed's FusedAdam)
            kwargs["optimizer"] = build_optimizer(encoder, o, fused=False)
        else:
            kwargs["model_parameters"] = [p for p in encoder.parameters() if p.requires_grad]
        if "scheduler" not in ds:
            kwargs["lr_scheduler"] = lambda opt: build_scheduler(opt, o, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(model=encoder, config=ds, **kwargs)
        self.model = self.engine
        self._cached_backward = None  # built on the first cached micro-batch; holds the open window
        self.precision = "bf16" if ds["bf16"]["enabled"] else "fp16" if ds["fp16"]["enabled"] else "fp32"

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the model itself

    def backward(self, loss: torch.Tensor, *, finite: bool, last: bool) -> None:
        # The window ends here when this micro-batch is bad: DeepSpeed holds the earlier
        # micro-batches' gradients in its own buffers, so the bad one is handed over poisoned
        # (NaN in every gradient it touches) at an early boundary; DeepSpeed's overflow check
        # then drops the whole window, and our loop, not its micro-step counter, keeps the
        # boundaries aligned with the data schedule.
        self.engine.set_gradient_accumulation_boundary(last or not finite)
        self.engine.backward(loss if finite else loss * float("nan"))  # scales by 1/accum
        self.engine.step()  # an optimizer step only at the accumulation boundary

    def backward_cached(self, cached, *, finite: bool, last: bool) -> None:
        """:meth:`backward` for a :class:`fastcse.grad_cache.CachedStep`, through
        :class:`fastcse.grad_cache.DeepSpeedCachedBackward`: every chunk's backward of the window's
        micro-batches goes through ``engine.backward`` inside one ``coalesce_grad_reduction`` block
        (one gradient reduction per optimizer step, where this DeepSpeed supports it), and the
        engine's ``step()`` runs once, when the window ends (``last``, or a bad micro-batch, whose
        poisoned chunk makes DeepSpeed drop the window as :meth:`backward` does)."""
        if self._cached_backward is None:
            from fastcse.grad_cache import DeepSpeedCachedBackward

            self._cached_backward = DeepSpeedCachedBackward(self.engine)
        self._cached_backward.backward(cached, finite=finite, last=last)

    def step(self, finite: bool) -> StepResult:
        # the update already happened (or not) in the boundary micro-batch's engine.step(): read it
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None and finite else None
        applied = self.engine.was_step_applied()
        if not applied and finite and self.precision != "fp16":
            finite = False  # DeepSpeed found non-finite gradients and dropped the window
        # (fp16: a dropped step is the loss scaler's overflow, expected early on, as without --ds)
        if applied and (not finite or (grad_norm is not None and not math.isfinite(grad_norm))):
            raise RuntimeError(
                "DeepSpeed applied an optimizer step with non-finite gradients (this DeepSpeed "
                "version or precision does not check them); the weights in memory are damaged. "
                f"Last good checkpoint: {self._last_checkpoint() or 'none yet'}.")
        return StepResult(finite, grad_norm)

    def zero_grad(self) -> None:
        """Nothing to do: the engine zeroes its gradients after its boundary step."""

    def gathered(self, params):
        """Full parameters inside the block on every rank (ZeRO-3 shards them)."""
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
        return contextlib.nullcontext()

    def release_prefetched(self) -> None:
        # ZeRO-3: forwards outside the engine's own (evaluation) leave prefetched parameters in
        # flight; release them all, or the next gather / training step trips over their status
        if self.zero_stage == 3:
            self.engine.empty_partition_cache()
