"""What a training run records: ``train_log.jsonl``, scalars for TensorBoard / W&B / MLflow, a
progress bar, and fastcse's messages through the ``fastcse`` logger.

Only rank 0 writes (every method is a no-op on the others), so the trainer calls them on every rank
without asking which one it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

logger = logging.getLogger("fastcse")


class _StdStreams(logging.Handler):
    """Info and warnings to the current ``sys.stdout``, errors to ``sys.stderr``, as the plain message
    (looked up per record: a stream captured at set-up would outlive a test's or a caller's swap)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.ERROR else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def configure_logging(level: str | int = "INFO") -> logging.Logger:
    """The ``fastcse`` logger at ``level``, with one handler of its own (calling again only changes
    the level); it does not propagate, so a root handler does not print each line twice."""
    if not any(isinstance(h, _StdStreams) for h in logger.handlers):
        logger.addHandler(_StdStreams())
    logger.propagate = False
    logger.setLevel(level)
    return logger


def format_loss(value: float) -> str:
    """The progress bar's loss: three significant digits at any scale (1.2e-05, not 0.0000)."""
    return f"{value:.3g}"


def _json_safe(value):
    """NaN / inf as null: JSON has no such numbers (``json.dumps`` would write bare ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def truncate_log(path: Path, step: int) -> None:
    """Keep only the records of ``path`` at or before ``step`` (a resume repeats the later ones)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except (ValueError, AttributeError, TypeError):
            pass  # not a record of ours: kept as it was
        kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


class _TensorBoard:
    def __init__(self, out: Path, config: dict | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(out) / "tensorboard"))

    def scalars(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, config: dict | None):
        import wandb  # only with --report-to wandb: the trainer's pre-flight checked it is installed

        self.wandb = wandb
        self.run = wandb.init(dir=str(out), config=config, name=Path(out).name, resume="allow")

    def scalars(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, out: Path, config: dict | None):
        import mlflow  # only with --report-to mlflow: the trainer's pre-flight checked it is installed

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # no server named: a local store in the run folder
            mlflow.set_tracking_uri((Path(out).resolve() / "mlruns").as_uri())
        self.run = mlflow.start_run(run_name=Path(out).name)
        if config:
            mlflow.log_params({f"{section}.{k}": v for section, fields in config.items() if isinstance(fields, dict)
                               for k, v in fields.items()})

    def scalars(self, values: dict, step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


REPORTERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
"""``--report-to`` target -> its writer; each imports its package only when chosen."""


class RunLog:
    """Args:
        out: the run's output folder (``train_log.jsonl`` is appended to; ``tensorboard/`` or
            ``mlruns/`` written there).
        enabled: True on rank 0.
        report_to: also write every numeric field as a scalar to ``tensorboard``, ``wandb`` or
            ``mlflow`` (the package must be installed); ``none``.
        tensorboard: the older spelling of ``report_to="tensorboard"``.
        config: the run's config (W&B's run config, MLflow's parameters).
        truncate_after: a resumed run's step: the log's records after it (the steps run again) are
            removed first, so each step appears once, as the run that counts logged it.
    """

    def __init__(self, out: Path, *, enabled: bool, report_to: str = "none", tensorboard: bool = False,
                 config: dict | None = None, truncate_after: int | None = None):
        self.enabled = enabled
        self.file = self.reporter = self.bar = None
        if not enabled:
            return
        if truncate_after is not None:
            truncate_log(Path(out) / "train_log.jsonl", truncate_after)
        self.file = open(Path(out) / "train_log.jsonl", "a", encoding="utf-8")  # a resumed run appends
        if tensorboard and report_to == "none":
            report_to = "tensorboard"
        if report_to != "none":
            self.reporter = REPORTERS[report_to](Path(out), config)

    def log(self, record: dict, step: int) -> None:
        """One JSON line; ``step`` places the reported scalars when ``record`` has no "step"."""
        if not self.enabled:
            return
        self.file.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self.file.flush()  # a killed run keeps every step it finished
        if self.reporter is not None:
            values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                      and not isinstance(v, bool)}
            if values:
                self.reporter.scalars(values, record.get("step", step))

    def start_progress(self, *, total: int, initial: int, desc: str) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", desc=desc, dynamic_ncols=True)

    def progress(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**postfix)
            self.bar.update(1)

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_progress()
        if self.file is not None:
            self.file.close()
        if self.reporter is not None:
            self.reporter.close()
            self.reporter = None
