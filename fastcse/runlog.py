"""What a training run records: ``train_log.jsonl``, TensorBoard scalars, a progress bar.

Only rank 0 writes (every method is a no-op on the others), so the trainer calls them on every rank
without asking which one it is.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


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


class RunLog:
    """Args:
        out: the run's output folder (``train_log.jsonl`` is appended to, ``tensorboard/`` written).
        enabled: True on rank 0.
        tensorboard: also write every numeric field as a TensorBoard scalar (needs ``tensorboard``).
        truncate_after: a resumed run's step: the log's records after it (the steps run again) are
            removed first, so each step appears once, as the run that counts logged it.
    """

    def __init__(self, out: Path, *, enabled: bool, tensorboard: bool = False, truncate_after: int | None = None):
        self.enabled = enabled
        self.file = self.tb = self.bar = None
        if not enabled:
            return
        if truncate_after is not None:
            truncate_log(Path(out) / "train_log.jsonl", truncate_after)
        self.file = open(Path(out) / "train_log.jsonl", "a", encoding="utf-8")  # a resumed run appends
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tensorboard"))

    def log(self, record: dict, step: int) -> None:
        """One JSON line; ``step`` places the TensorBoard scalars when ``record`` has no "step"."""
        if not self.enabled:
            return
        self.file.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self.file.flush()  # a killed run keeps every step it finished
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record.get("step", step))

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
        if self.tb is not None:
            self.tb.close()
