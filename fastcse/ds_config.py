"""DeepSpeed's "auto" fields filled from the training CLI, so one set of flags drives both paths.

The shipped files (``ds_configs/*.json``) are plain DeepSpeed JSON whose sizes, rates and precision
say "auto". A value the file sets itself wins, except the three batch sizes: those must agree with
``--batch-size`` / ``--grad-accum`` (the data schedule depends on them), so a disagreement is a
:class:`~fastcse.config.ConfigError` that names the file.
"""

from __future__ import annotations

import copy

import torch

from fastcse.config import ConfigError, TrainConfig, resolve_precision
from fastcse.optim import warmup_steps

_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def _set_auto(section: dict, key: str, value, where: str) -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif key in _BATCH_KEYS and current != value:
        raise ConfigError(f"DeepSpeed config {where}: {key}={current} disagrees with the CLI ({value}); "
                          f"set it to \"auto\" or change --batch-size / --grad-accum")


def find_auto(obj, prefix: str = "") -> list[str]:
    """Dotted names of every field of ``obj`` still set to "auto"."""
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in find_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if obj == "auto" else []


def fill_ds_config(ds: dict, cfg: TrainConfig, world_size: int, total_steps: int | None = None,
                   hidden_size: int | None = None, where: str = "") -> dict:
    """Fill DeepSpeed's "auto" fields from the CLI (batch sizes, lr, precision, clipping, buckets).

    Returns a copy. ``total_steps`` (the scheduler's) and ``hidden_size`` (ZeRO's bucket sizes) are
    known only once the model and data are; pre-flight calls it without them to catch the batch-size
    conflicts before any model is loaded. ``where``: the file, named in error messages.
    """
    ds = copy.deepcopy(ds)
    r, o = cfg.run, cfg.optim
    if r.batch_size % world_size:
        raise ConfigError(f"--batch-size {r.batch_size} is not divisible by the {world_size} ranks")
    _set_auto(ds, "train_micro_batch_size_per_gpu", r.batch_size // world_size, where)
    _set_auto(ds, "gradient_accumulation_steps", o.grad_accum, where)
    _set_auto(ds, "train_batch_size", r.batch_size * o.grad_accum, where)
    _set_auto(ds, "gradient_clipping", o.max_grad_norm, where)
    precision = resolve_precision(r.precision, "cuda" if torch.cuda.is_available() else "cpu")
    for key in ("bf16", "fp16"):
        section = ds.setdefault(key, {"enabled": "auto"})
        _set_auto(section, "enabled", precision == key, where)
    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        for key, value in (("lr", o.lr), ("betas", [o.adam_beta1, o.adam_beta2]), ("eps", o.adam_eps),
                           ("weight_decay", o.weight_decay)):
            _set_auto(params, key, value, where)
    sched = ds.get("scheduler")
    if sched is not None and total_steps is not None:
        params = sched.setdefault("params", {})
        for key, value in (("warmup_min_lr", 0.0), ("warmup_max_lr", o.lr),
                           ("warmup_num_steps", warmup_steps(o, total_steps)), ("total_num_steps", total_steps)):
            _set_auto(params, key, value, where)
    zero = ds.get("zero_optimization", {})
    if hidden_size is not None:
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(key) == "auto":
                zero[key] = value
    return ds


def engine_config(ds: dict, cfg: TrainConfig, world_size: int, total_steps: int, hidden_size: int,
                  where: str) -> dict:
    """The complete config ``deepspeed.initialize`` gets: filled, with fastcse's two defaults, and
    no "auto" left (a field no CLI value fills is a ConfigError naming it)."""
    ds = fill_ds_config(ds, cfg, world_size, total_steps, hidden_size, where=where)
    ds.setdefault("zero_allow_untested_optimizer", True)  # fastcse's AdamW when the file names none
    ds.setdefault("steps_per_print", 10 ** 9)  # fastcse logs every step itself
    leftover = find_auto(ds)
    if leftover:
        raise ConfigError(f"DeepSpeed config {where}: no CLI value fills {', '.join(leftover)}")
    return ds


def zero_stage(ds: dict | None) -> int:
    return int((ds or {}).get("zero_optimization", {}).get("stage", 0))


def zero_init_config(ds: dict, cfg: TrainConfig, world_size: int, where: str = "") -> dict:
    """The config ``deepspeed.zero.Init`` builds a ZeRO-3 model under, before the model exists.

    Filled as :func:`engine_config` fills it (precision, batch sizes, offload, the optimizer), less
    what only the model and the data decide and ``zero.Init`` does not read: the scheduler's step
    counts and the hidden-size buckets (reduce / prefetch buckets, persistence threshold) are left
    to DeepSpeed's defaults here; the engine gets :func:`engine_config`'s values.
    """
    ds = fill_ds_config(ds, cfg, world_size, where=where)
    ds.pop("scheduler", None)
    zero = ds.get("zero_optimization", {})
    for key in [k for k, v in zero.items() if v == "auto"]:
        del zero[key]
    leftover = find_auto(ds)
    if leftover:
        raise ConfigError(f"DeepSpeed config {where}: no CLI value fills {', '.join(leftover)}")
    return ds
