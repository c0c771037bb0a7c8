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


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was live before it.

    CUDA: the caching allocator's peak statistic. CPU: torch's profiler memory events, summed as a
    running total of allocations minus frees (tensors only; Python objects are not counted).
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
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = sorted(
        (e for e in prof.events() if getattr(e, "cpu_memory_usage", 0)),
        key=lambda e: e.time_range.start,
    )
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


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
