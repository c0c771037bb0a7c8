"""Shared benchmark plumbing: timing, peak memory, the CSV schema and provenance columns."""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import json
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

CSV_COLUMNS = [
    "kernel", "provider", "mode", "metric", "unit", "x_name", "x_value",
    "p50", "p20", "p80", "extra_config", "device_name", "timestamp", "version", "commit",
]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> str:
    parts = [f"torch={torch.__version__}"]
    try:
        import triton

        parts.append(f"triton={triton.__version__}")
    except Exception:
        pass
    import fastcse

    parts.append(f"fastcse={fastcse.__version__}")
    return " ".join(parts)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Times in milliseconds: median and the 20th / 80th percentiles over the repetitions."""

    p50: float
    p20: float
    p80: float
    samples: list[float] = field(default_factory=list)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 5,
            max_seconds: float = 30.0) -> Timing:
    """Wall-clock (CPU) or CUDA-event (GPU) timing of ``fn``; stops early past ``max_seconds``."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    start_all = time.perf_counter()
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > max_seconds:
            break
    qs = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return Timing(p50=statistics.median(samples), p20=qs[1], p80=qs[7], samples=samples)


class _LiveTensorBytes:
    """Counts bytes of tensor storage created while active, minus storage freed since: a CPU
    stand-in for CUDA's peak-allocated statistic.

    Built on a TorchDispatchMode, so it sees every op PyTorch dispatches on this thread (autograd
    runs CPU backward on the calling thread). A storage is counted once, when the first tensor
    using it comes out of an op, and released when that tensor dies; a view that outlives its base
    is therefore released early, which no code measured here does.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                counter._track(out)
                return out

        self.mode = _Mode()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _release(self, key: int, n_bytes: int) -> None:
        self.seen.discard(key)
        self.live -= n_bytes

    def _track(self, out) -> None:
        import weakref

        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, n_bytes = storage.data_ptr(), storage.nbytes()
            if n_bytes == 0 or key in self.seen:
                continue
            self.seen.add(key)
            self.live += n_bytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key, n_bytes)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was live before it.

    CUDA: the caching allocator's peak statistic. CPU: tensor storage created and freed during
    ``fn`` as seen by a dispatch mode (:class:`_LiveTensorBytes`); Python objects are not counted.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    counter = _LiveTensorBytes()
    with counter.mode:
        fn()
    return counter.peak


def append_rows(csv_name: str, rows: list[dict]) -> Path:
    """Append rows (dicts with CSV_COLUMNS keys) to ``bench/results/<csv_name>``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / csv_name
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
    return path


def make_row(*, kernel: str, provider: str, mode: str, metric: str, unit: str, x_name: str,
             x_value, p50: float, p20: float | None = None, p80: float | None = None,
             extra_config: dict | None = None, device: torch.device | str = "cpu") -> dict:
    return {
        "kernel": kernel, "provider": provider, "mode": mode, "metric": metric, "unit": unit,
        "x_name": x_name, "x_value": x_value, "p50": p50,
        "p20": p50 if p20 is None else p20, "p80": p50 if p80 is None else p80,
        "extra_config": json.dumps(extra_config or {}, sort_keys=True),
        "device_name": device_name(device),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "version": versions(), "commit": git_commit(),
    }


def read_rows(csv_name: str) -> list[dict]:
    path = RESULTS_DIR / csv_name
    if not path.exists():
        raise FileNotFoundError(f"no results yet at {path}: run the benchmark first")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def as_dict(obj) -> dict:
    return asdict(obj)
