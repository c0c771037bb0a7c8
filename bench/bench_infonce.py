"""Microbenchmark of the InfoNCE loss: eager vs chunked vs triton, forward / backward / full.

    python -m bench.bench_infonce                       # CPU default sweep (fp32, N up to 8192)
    python -m bench.bench_infonce --device cuda --dtype bf16 --ceilings
    python -m bench.bench_infonce --plot                # PNGs from bench/results/infonce.csv

Shapes follow supervised SimCSE: N anchors, M = 2N candidates (positives + hard negatives), D
the embedding width. FLOPs counted as the model's matmuls: forward 2NMD, backward 4NMD, full
6NMD (recomputation inside the fused kernels is not credited). Every row lands in
``bench/results/infonce.csv`` (or the ``--csv`` path) with device, date, versions and commit,
appended as each point is measured, so a run cut by a timeout keeps what it finished.

Timing: ``--timing sync`` by default (one call between CUDA events, host work included: the
loss checks its inputs for non-finite values, which reads them on the host, so the queued
``device`` / ``graph`` methods of bench/_common.py cannot hide its host time anyway). Peak memory:
bytes allocated above the inputs during one call, the new gradients included (the previous
call's ``.grad`` is dropped before the measurement, as on CPU).
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

import torch

from bench._common import (Timing, append_rows, csv_path, device_name, make_row, measure_card,
                           peak_memory_bytes, read_rows, synchronize, time_fn, timing_methods, timings_for)
from fastcse.infonce import info_nce

CSV = "infonce.csv"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODE_FLOPS = {"fwd": 2, "bwd": 4, "full": 6}  # x N * M * D


def _make_inputs(n: int, d: int, dtype, device):
    return [torch.randn(n, d, dtype=dtype, device=device, requires_grad=True) for _ in range(3)]


def _loss_fn(provider: str, inputs) -> Callable[[], torch.Tensor]:
    anchors, positives, hard = inputs
    return lambda: info_nce(anchors, positives, hard, temperature=0.05, backend=provider)


def _clear_grads(inputs):
    for x in inputs:
        x.grad = None


def _bench_mode(provider, mode, inputs, device, reps, method="sync"):
    loss_fn = _loss_fn(provider, inputs)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                loss_fn()
        return time_fn(run, device, reps=reps, method=method), peak_memory_bytes(run, device)
    if mode == "full":
        def run():
            _clear_grads(inputs)
            loss_fn().backward()
        timing = time_fn(run, device, reps=reps, method=method)
        _clear_grads(inputs)  # the baseline holds the inputs only: the new gradients count
        return timing, peak_memory_bytes(run, device)
    # bwd: time backward alone; each repetition runs its own (untimed) forward first
    samples = []
    for i in range(reps + 1):
        _clear_grads(inputs)
        loss = loss_fn()
        synchronize(device)
        t = time_fn(lambda: loss.backward(), device, warmup=0, reps=1)
        if i:  # the first one warms up
            samples.append(t.p50)
    samples.sort()
    q = lambda f: samples[min(len(samples) - 1, int(f * len(samples)))]  # noqa: E731
    return Timing(p50=q(0.5), p20=q(0.2), p80=q(0.8), samples=samples, method=t.method), None


def measure_ceilings(device: torch.device, dtype) -> list[dict]:
    """The two limits the loss is judged against, as CSV rows: dense matmul TFLOP/s in ``dtype``
    and copy GB/s (measured by bench/_common.py's :func:`measure_card`)."""
    card = measure_card(device)
    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    tflops, gbs = card["matmul_tflops"][key], card["copy_gbps"]
    rows = [make_row(kernel="ceiling", provider="torch.matmul", mode="fwd", metric="throughput",
                     unit="TFLOP/s", x_name="size", x_value=card["matmul_size"], p50=tflops,
                     extra_config={"dtype": str(dtype)}, device=device),
            make_row(kernel="ceiling", provider="copy_", mode="fwd", metric="bandwidth", unit="GB/s",
                     x_name="bytes", x_value=card["copy_bytes"] // 2, p50=gbs, device=device)]
    print(f"ceilings on {device_name(device)}: matmul {tflops:.1f} TFLOP/s ({dtype}), copy {gbs:.0f} GB/s")
    return rows


def run(ns, dims, providers, modes, dtype, device, reps, matmul_ceiling: Optional[float] = None,
        *, timings=("sync",), sink: Optional[Callable[[list], object]] = None):
    """Measure every (D, N, provider, mode, timing); ``sink(rows)`` gets each point's rows as soon
    as they are measured (``append_rows`` into the CSV in :func:`main`). Returns all rows."""
    rows = []

    def emit(new):
        rows.extend(new)
        if sink is not None:
            sink(new)

    for d in dims:
        for n in ns:
            m = 2 * n
            times = {}
            for provider in providers:
                for mode in modes:
                    for method in timings:
                        inputs = _make_inputs(n, d, dtype, device)
                        extra = {"N": n, "M": m, "D": d, "dtype": str(dtype).replace("torch.", "")}
                        try:
                            timing, peak = _bench_mode(provider, mode, inputs, device, reps, method)
                        except torch.cuda.OutOfMemoryError:
                            print(f"  D={d} N={n} {provider:8s} {mode:4s}: out of memory", flush=True)
                            del inputs
                            torch.cuda.empty_cache()
                            emit([make_row(kernel="infonce", provider=provider, mode=mode, metric="time",
                                           unit="ms", x_name="N", x_value=n, p50=math.nan,
                                           extra_config={**extra, "oom": True, "timing": method}, device=device)])
                            continue
                        extra["timing"] = timing.method
                        if timing.note:
                            extra["timing_note"] = timing.note
                        flops = MODE_FLOPS[mode] * n * m * d
                        tflops = flops / (timing.p50 * 1e-3) / 1e12
                        times[(provider, mode, timing.method)] = timing.p50
                        if matmul_ceiling:
                            extra["fraction_of_matmul_ceiling"] = round(tflops / matmul_ceiling, 4)
                        new = [make_row(kernel="infonce", provider=provider, mode=mode, metric="time",
                                        unit="ms", x_name="N", x_value=n, p50=timing.p50, p20=timing.p20,
                                        p80=timing.p80, extra_config=extra, device=device),
                               make_row(kernel="infonce", provider=provider, mode=mode, metric="throughput",
                                        unit="TFLOP/s", x_name="N", x_value=n, p50=tflops,
                                        extra_config=extra, device=device)]
                        if peak is not None:
                            new.append(make_row(kernel="infonce", provider=provider, mode=mode,
                                                metric="peak_memory", unit="MiB", x_name="N", x_value=n,
                                                p50=peak / 2**20, extra_config=extra, device=device))
                        emit(new)
                        mem = f", peak {peak / 2**20:8.1f} MiB" if peak is not None else ""
                        print(f"  D={d} N={n:6d} {provider:8s} {mode:4s} {timing.method:6s}: {timing.p50:9.3f} ms "
                              f"(p20 {timing.p20:.3f}, p80 {timing.p80:.3f}), {tflops:7.3f} TFLOP/s{mem}",
                              flush=True)
                        del inputs
            for (provider, mode, method), t in times.items():
                if provider != "eager" and ("eager", mode, method) in times:
                    print(f"  D={d} N={n:6d} eager/{provider} {mode} {method}: "
                          f"{times[('eager', mode, method)] / t:.2f}x")
    return rows


def plot(csv_name: str = CSV) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import json

    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(csv_name) if r["kernel"] == "infonce"]
    groups = {}
    for r in rows:
        cfg = json.loads(r["extra_config"])
        key = (r["device_name"], cfg.get("dtype"), cfg.get("D"))
        groups.setdefault(key, []).append((r, cfg))
    written = []
    for (dev, dtype, d), items in groups.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for metric, ax, unit in (("time", axes[0], "ms (forward + backward)"),
                                 ("peak_memory", axes[1], "peak MiB (forward + backward)")):
            series = {}
            for r, cfg in items:
                if r["metric"] == metric and r["mode"] == "full" and r["p50"] not in ("", "nan"):
                    series.setdefault(r["provider"], {})[int(r["x_value"])] = float(r["p50"])
            for provider, pts in sorted(series.items()):
                xs = sorted(pts)
                ax.plot(xs, [pts[x] for x in xs], marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N anchors (M = 2N candidates)")
            ax.set_ylabel(unit)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"InfoNCE, {dtype}, D={d}\n{dev}", fontsize=9)
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() else "_" for ch in f"{dev}_{dtype}_D{d}")[:80]
        path = csv_path(csv_name).parent / f"infonce_{safe}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        print(f"wrote {path}")
    return written


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--ns", type=_ints, default=None, help="comma-separated N values")
    parser.add_argument("--dims", type=_ints, default=None, help="comma-separated D values")
    parser.add_argument("--providers", default=None, help="comma-separated: eager,chunked,triton")
    parser.add_argument("--modes", default="fwd,bwd,full")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a small sweep (smoke test / CI-sized)")
    parser.add_argument("--ceilings", action="store_true", help="also measure matmul and copy ceilings")
    parser.add_argument("--plot", action="store_true", help="only draw PNGs from the CSV")
    parser.add_argument("--csv", default=CSV,
                        help="a file name under bench/results/, or a path; rows are appended as measured")
    parser.add_argument("--timing", type=timing_methods, default=None,
                        help="comma-separated of sync,device,graph (default sync; wall clock on CPU)")
    args = parser.parse_args(argv)
    if args.plot:
        plot(args.csv)
        return
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    if args.quick:
        ns = args.ns or ([1024, 4096] if cuda else [256, 1024])
        dims = args.dims or [768]
    else:
        ns = args.ns or ([2 ** k for k in range(6, 17)] if cuda else [512, 2048, 8192])
        dims = args.dims or [384, 768, 1024]
    providers = (args.providers.split(",") if args.providers
                 else (["eager", "chunked", "triton"] if cuda else ["eager", "chunked"]))
    reps = args.reps or (20 if cuda else 3)
    ceiling = None
    n_rows = 0
    if args.ceilings:
        ceil_rows = measure_ceilings(device, dtype)
        append_rows(args.csv, ceil_rows)
        n_rows += len(ceil_rows)
        ceiling = ceil_rows[0]["p50"]
    print(f"InfoNCE on {device_name(device)}, {dtype}, M = 2N", flush=True)
    rows = run(ns, dims, providers, args.modes.split(","), dtype, device, reps, ceiling,
               timings=timings_for(args.timing, device), sink=lambda new: append_rows(args.csv, new))
    print(f"appended {n_rows + len(rows)} rows to {csv_path(args.csv)}")


if __name__ == "__main__":
    main()
