"""Shared benchmark plumbing: timing, peak memory, the CSV schema and provenance columns, and
the card's measured ceilings.

Timing methods (``time_fn(method=...)``; on CPU every method is a wall clock, recorded as "wall"):

- ``sync``: CUDA events around one call, a device synchronisation after each. Host work before
  the call's first kernel (Python, dispatch, launch) is inside the figure: what one eager call
  costs end to end.
- ``device``: the calls are queued back to back behind a GPU sleep long enough for the host to
  enqueue all of them, with an event between consecutive calls: each interval is device time
  only (host work overlaps the sleep), as in a model step where the host runs ahead. Host syncs
  inside the call defeat it; the Timing's ``note`` says so when the host did not stay ahead.
- ``graph``: the call captured once in a CUDA graph, its replays queued as in ``device``: no host
  work at all and no launch gaps between the call's own kernels. Falls back to ``device`` (with a
  note) when the call cannot be captured.

CSV files: ``--csv NAME`` (a bare file name) lands in ``bench/results/``; a value with a folder
part (``$OUT/rope.csv``) is used as the path. :func:`append_rows` appends and flushes on every
call, and the benchmarks call it after each measured point, so a run cut by a timeout keeps every
point it finished.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TIMING_METHODS = ("sync", "device", "graph")

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


_PROVENANCE: dict[str, str] = {}


def git_commit() -> str:
    """The checkout's short commit (asked once per process: every row carries it)."""
    if "commit" not in _PROVENANCE:
        _PROVENANCE["commit"] = _git_commit()
    return _PROVENANCE["commit"]


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> str:
    if "versions" not in _PROVENANCE:
        _PROVENANCE["versions"] = _versions()
    return _PROVENANCE["versions"]


def _versions() -> str:
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
    """Times in milliseconds: median and the 20th / 80th percentiles over the repetitions.

    ``method``: how they were taken (``sync`` / ``device`` / ``graph`` on CUDA, ``wall`` on CPU);
    ``note``: why the method differs from the one asked for, or why its figure may include host
    time.
    """

    p50: float
    p20: float
    p80: float
    samples: list[float] = field(default_factory=list)
    method: str = "sync"
    note: str = ""


def _summary(samples: list[float], method: str, note: str = "") -> Timing:
    qs = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return Timing(p50=statistics.median(samples), p20=qs[1], p80=qs[7], samples=samples,
                  method=method, note=note)


_SLEEP_CYCLES_PER_MS: dict[int, float] = {}


def _sleep_cycles_per_ms(device: torch.device) -> float:
    """Clock cycles of ``torch.cuda._sleep`` per millisecond on ``device``, measured once."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SLEEP_CYCLES_PER_MS:
        cycles = 2_000_000
        rates = []
        for _ in range(3):  # the first can include a clock ramp-up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            torch.cuda.synchronize(device)
            rates.append(cycles / max(start.elapsed_time(end), 1e-3))
        _SLEEP_CYCLES_PER_MS[index] = max(rates)
    return _SLEEP_CYCLES_PER_MS[index]


def _queued_times(launch: Callable[[], object], device: torch.device, reps: int,
                  host_ms: float) -> tuple[list[float], str]:
    """Per-call device times of ``reps`` calls queued behind a GPU sleep (see the module doc).

    ``host_ms``: the host's time to enqueue one call, from the warm-up; the sleep covers twice
    all of them (capped at 2 s), so the device never waits for the host inside the timed region.
    """
    sleep_ms = min(2000.0, 2.0 * reps * host_ms + 1.0)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    torch.cuda._sleep(int(sleep_ms * _sleep_cycles_per_ms(device)))
    events[0].record()
    for event in events[1:]:
        launch()
        event.record()
    enqueue_ms = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize(device)
    samples = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    note = ""
    if enqueue_ms > sleep_ms:
        note = (f"host enqueue {enqueue_ms:.1f} ms outlasted the {sleep_ms:.1f} ms sleep: host time may be "
                "inside the figure (a sync in the call?)")
    return samples, note


def _capture_graph(fn: Callable[[], object], device: torch.device) -> "torch.cuda.CUDAGraph":
    """``fn`` captured in a CUDA graph (warmed up on a side stream first, as capture requires)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 5,
            max_seconds: float = 30.0, method: str = "sync") -> Timing:
    """Time ``fn`` by ``method`` (module doc); ``sync`` stops early past ``max_seconds``, the queued
    methods take as many repetitions as the warm-up says fit in it."""
    if method not in TIMING_METHODS:
        raise ValueError(f"timing method must be one of {TIMING_METHODS}, got {method!r}")
    device = torch.device(device)
    for _ in range(max(warmup, 1 if method != "sync" else 0)):
        fn()
    synchronize(device)
    if device.type == "cuda" and method != "sync":
        # one call after the warm-up (compilation done), on an idle GPU: the enqueue time is the
        # host's work per call, the time to the sync the whole call
        t0 = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - t0) * 1e3
        synchronize(device)
        call_ms = (time.perf_counter() - t0) * 1e3
        reps = max(1, min(reps, int(max_seconds * 1e3 / max(call_ms, 1e-3))))
        note = ""
        if method == "graph":
            try:
                graph = _capture_graph(fn, device)
            except Exception as err:  # noqa: BLE001 - any capture failure: time without a graph
                torch.cuda.synchronize(device)
                note = f"graph capture failed ({type(err).__name__}: {str(err)[:120]}); timed as 'device'"
                method = "device"
            else:
                graph.replay()  # the first replay uploads the graph
                t0 = time.perf_counter()
                graph.replay()
                replay_ms = (time.perf_counter() - t0) * 1e3
                samples, queue_note = _queued_times(graph.replay, device, reps, replay_ms)
                graph.reset()
                return _summary(samples, "graph", queue_note)
        samples, queue_note = _queued_times(fn, device, reps, host_ms)
        return _summary(samples, method, "; ".join(n for n in (note, queue_note) if n))
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
    return _summary(samples, "sync" if device.type == "cuda" else "wall")


def timings_for(methods, device: torch.device | str, default: Sequence[str] = ("sync",)) -> list[str]:
    """The timing methods to run on ``device``: ``methods`` (or ``default``) on CUDA; one wall clock
    on CPU, where every method is the same."""
    return list(methods or default) if torch.device(device).type == "cuda" else ["sync"]


def timing_methods(text: str) -> list[str]:
    """argparse type of ``--timing``: a comma-separated list of :data:`TIMING_METHODS`."""
    methods = [m for m in text.split(",") if m]
    bad = [m for m in methods if m not in TIMING_METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"--timing takes a comma-separated list of {TIMING_METHODS}, got {text!r}")
    return methods


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


def csv_path(csv_name: str | os.PathLike) -> Path:
    """A bare file name -> ``bench/results/<name>``; anything with a folder part -> itself."""
    path = Path(csv_name)
    return path if path.is_absolute() or path.parent != Path(".") else RESULTS_DIR / path


def append_rows(csv_name: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Append rows (dicts with CSV_COLUMNS keys) to :func:`csv_path` ``(csv_name)`` and flush them
    to the file system before returning (a header first when the file is new or empty)."""
    path = csv_path(csv_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
        f.flush()
        os.fsync(f.fileno())
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


def read_rows(csv_name: str | os.PathLike) -> list[dict]:
    path = csv_path(csv_name)
    if not path.exists():
        raise FileNotFoundError(f"no results yet at {path}: run the benchmark first")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def as_dict(obj) -> dict:
    return asdict(obj)


# --- the card's ceilings -----------------------------------------------------------------------


def measure_card(device: torch.device | str, *, matmul_size: int | None = None,
                 copy_bytes: int | None = None, reps: int = 10) -> dict:
    """The ceilings every bar is judged against, in the card format ``bench/perf_model.py`` reads
    (``--card FILE``)::

        {"name": str, "matmul_tflops": {"bf16": f, "fp16": f, "fp32": f}, "copy_gbps": f,
         "launch_us": f, "kernel_us": f, "sm_count": int, "memory_gb": f, "gpu": bool, ...}

    matmul_tflops: ``a @ b`` of random (size, size) operands per dtype (8192 on CUDA; fp32 without
    TF32, PyTorch's default), 2 size^3 / median time, timed ``device`` (queued, host hidden).
    copy_gbps: ``dst.copy_(src)`` of ``copy_bytes`` (1 GiB on CUDA), bytes read + written / time.
    launch_us: host time per tiny op (``x.add(1)`` on 16 floats) while the GPU sleeps, so only
    Python + dispatch + launch are counted; kernel_us: device time per such tiny kernel queued back
    to back (0 on CPU, where host and device are one). On CPU (``--dry-run``) the sizes are small
    and ``gpu`` is false, so the performance model takes its CPU branches.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    size = matmul_size or (8192 if cuda else 512)
    n_bytes = copy_bytes or ((1 << 30) if cuda else (1 << 26))
    method = "device" if cuda else "sync"
    tflops = {}
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        t = time_fn(lambda: torch.mm(a, b), device, warmup=2, reps=reps, method=method)
        tflops[key] = 2 * size ** 3 / (t.p50 * 1e-3) / 1e12
        del a, b
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, reps=2 * reps, method=method)
    copy_gbps = 2 * src.numel() * 4 / (t.p50 * 1e-3) / 1e9
    del src, dst
    x = torch.randn(16, device=device)
    n_ops = 500
    if cuda:
        for _ in range(10):
            x.add(1)
        torch.cuda.synchronize(device)
        # the host's cost per op, measured while the GPU sleeps (so the queue never blocks it)
        torch.cuda._sleep(int(50 * _sleep_cycles_per_ms(device)))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(n_ops):
            x.add(1)
        end.record()
        launch_us = (time.perf_counter() - t0) / n_ops * 1e6
        torch.cuda.synchronize(device)
        kernel_us = start.elapsed_time(end) / n_ops * 1e3
        props = torch.cuda.get_device_properties(device)
        sm_count, memory_gb = props.multi_processor_count, props.total_memory / 1e9
    else:
        for _ in range(10):
            x.add(1)
        t0 = time.perf_counter()
        for _ in range(n_ops):
            x.add(1)
        launch_us = (time.perf_counter() - t0) / n_ops * 1e6
        kernel_us, sm_count, memory_gb = 0.0, 1, None
    return {
        "name": device_name(device), "matmul_tflops": tflops, "copy_gbps": copy_gbps,
        "launch_us": launch_us, "kernel_us": kernel_us, "sm_count": sm_count, "memory_gb": memory_gb,
        "gpu": cuda, "matmul_size": size, "copy_bytes": 2 * n_bytes,
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "timing": "device (queued behind a GPU sleep), median" if cuda else "wall clock, median",
        "versions": versions(), "commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
