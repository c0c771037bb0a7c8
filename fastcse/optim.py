"""The optimizer and learning-rate schedule of a training run (SimCSE's: AdamW, linear warm-up and decay)."""

from __future__ import annotations

import math

import torch

from fastcse.config import OptimConfig


def build_optimizer(model: torch.nn.Module, o: OptimConfig, *, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters, weight decay on matrices only.

    ``fused``: torch's fused AdamW (one multi-tensor kernel per ~110 tensors reading parameter,
    gradient and both moments once; the Hugging Face Trainer's default since torch 2.8) instead of
    the foreach update, which makes about ten passes over the same state; ``None`` takes it when
    every trainable parameter is on CUDA (BERT-base: ~0.7 ms of an H200 step instead of ~1.9 by
    bench/perf_model.py). Callers handing it to DeepSpeed ZeRO pass ``fused=False``.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # biases and LayerNorm weights are not decayed (as the Hugging Face Trainer SimCSE used)
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    if fused is None:
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                             **({"fused": True} if fused else {}))


def warmup_steps(o: OptimConfig, total_steps: int) -> int:
    """``--warmup-steps``, or ``--warmup-ratio`` of the run's steps when that is 0."""
    return o.warmup_steps or math.ceil(o.warmup_ratio * total_steps)


class LinearWarmupDecay:
    """lr factor: linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def build_scheduler(optimizer, o: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The linear warm-up / decay schedule over ``total_steps`` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmupDecay(warmup_steps(o, total_steps), total_steps))
