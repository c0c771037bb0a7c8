"""Atomic, resumable checkpoints.

Layout under ``<output_dir>/checkpoints``::

    step-00000125/            a complete checkpoint (a folder only gets this name by a rename)
        trainer.pt            step, counters, best score, method state (momentum encoder, queue),
                              and without DeepSpeed: model, optimizer, scheduler, grad scaler
        rng-rank0.pt ...      each rank's RNG streams (torch, CUDA, Python, NumPy)
        ds/                   with DeepSpeed: its own ``save_checkpoint`` (sharded ZeRO states)
        meta.json             step, world size, DeepSpeed or not, the run's config; written last
    .tmp-step-00000250-*/     a save in progress or killed half-way: ignored, removed by the next save

A save writes everything into a temporary folder, fsyncs it, then renames it into place: a crash at
any moment leaves the previous checkpoints untouched and loadable.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from fastcse.config import ConfigError
from fastcse.distributed import barrier, world_info
from fastcse.files import atomic_replace_dir

STEP_DIR = re.compile(r"^step-(\d{8})$")
TMP_PREFIX = ".tmp-step-"
DS_TAG = "ds"


class CheckpointMismatch(ConfigError):
    """A complete checkpoint this run cannot continue (other world size, DeepSpeed or not)."""


class DamagedCheckpoint(RuntimeError):
    """A checkpoint folder whose files are missing or unreadable (deleted, truncated)."""


def read_meta(path: str | Path) -> dict:
    """The ``meta.json`` of checkpoint ``path``; :class:`DamagedCheckpoint` when unreadable."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{path}: meta.json unreadable ({e})") from e
    if not isinstance(meta, dict) or "step" not in meta or "world_size" not in meta:
        raise DamagedCheckpoint(f"{path}: meta.json lacks step / world_size")
    return meta


def check_compatible(path: str | Path, meta: dict, *, world: int, deepspeed: bool) -> None:
    """Raise :class:`CheckpointMismatch` when ``path`` cannot be resumed by this run."""
    if meta["world_size"] != world:
        raise CheckpointMismatch(f"{path} was written by {meta['world_size']} rank(s); this run has {world} "
                                 "(resume with the same number of processes for the same trajectory)")
    if bool(meta.get("deepspeed", False)) != deepspeed:
        raise CheckpointMismatch(f"{path} was written {'with' if meta.get('deepspeed') else 'without'} "
                                 "DeepSpeed; resume it the same way")


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
             and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | Path, step: int, *, trainer_state: dict, model=None, optimizer=None,
                    scheduler=None, scaler=None, engine=None, keep: int | None = None,
                    config: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically; every rank calls it. Returns the final folder.

    ``engine`` (a DeepSpeed engine) saves model, optimizer and scheduler itself (sharded under ZeRO);
    otherwise ``model`` / ``optimizer`` / ``scheduler`` / ``scaler`` state dicts go into trainer.pt.
    ``keep``: complete checkpoints to keep afterwards (oldest removed first).
    ``config``: the run's configuration, recorded in meta.json (a resume checks its options against it).
    """
    root = Path(root)
    rank, world = world_info()
    final = root / f"step-{step:08d}"
    tmp = root / f"{TMP_PREFIX}{step:08d}-{world}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(TMP_PREFIX + "*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    if engine is not None:
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        state = dict(trainer_state)
        if engine is None:
            state["model"] = model.state_dict()
            state["optimizer"] = optimizer.state_dict()
            state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
            state["scaler"] = scaler.state_dict() if scaler is not None else None
        torch.save(state, tmp / "trainer.pt")
    barrier()
    if rank == 0:
        meta = {"step": step, "world_size": world, "deepspeed": engine is not None, "config": config}
        (tmp / "meta.json").write_text(json.dumps(meta, default=str) + "\n")
        # a step saved again (after a resume) replaces the old folder; the old one is parked under
        # the temporary prefix, so a save killed mid-replacement is cleaned up by the next one
        atomic_replace_dir(tmp, final)
        if keep:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | Path, *, model=None, optimizer=None, scheduler=None, scaler=None,
                    engine=None) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns the trainer state.

    Restores this rank's RNG streams too (the checkpoint must come from the same world size).
    """
    path = Path(path)
    rank, world = world_info()
    check_compatible(path, read_meta(path), world=world, deepspeed=engine is not None)
    # every file is read before anything is restored: a damaged checkpoint changes nothing
    try:
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        rng = torch.load(path / f"rng-rank{rank}.pt", weights_only=False)
    except Exception as e:  # missing (FileNotFoundError), truncated (RuntimeError from the zip reader), ...
        raise DamagedCheckpoint(f"{path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from e
    if engine is None and not {"model", "optimizer", "scheduler", "scaler"} <= state.keys():
        raise DamagedCheckpoint(f"{path}: trainer.pt lacks the model / optimizer state")
    if engine is not None:
        load_path, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise DamagedCheckpoint(f"DeepSpeed could not load {path / DS_TAG}")
    else:
        model.load_state_dict(state.pop("model"))
        optimizer.load_state_dict(state.pop("optimizer"))
        sched_state, scaler_state = state.pop("scheduler"), state.pop("scaler")
        if scheduler is not None and sched_state is not None:
            scheduler.load_state_dict(sched_state)
        if scaler is not None and scaler_state is not None:
            scaler.load_state_dict(scaler_state)
    set_rng_state(rng)
    return state
