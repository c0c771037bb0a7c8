"""Rotary embedding benchmark: eager (rotate_half as Hugging Face writes it) vs the fused kernel.

    python -m bench.bench_rope                    # sweep seqlen, then heads; rows -> bench/results/rope.csv
    python -m bench.bench_rope --quick            # CUDA: the issue's shape only, plus the copy roofline
    python -m bench.bench_rope --plot             # PNGs from the CSV (no measuring)
    python -m bench.bench_rope --device cuda --quick --csv $OUT/rope.csv --timing graph,sync

Timing (``--timing``, bench/_common.py; default ``graph`` on CUDA, gpu_check.sh asks for
``graph,sync``): the kernel bars are judged
on ``graph`` figures, CUDA-graph replays queued behind a GPU sleep, i.e. device time without the
launcher's host work (60-130 us per call against a 0.5 ms kernel at the issue's shape, measured
in issue #17, which made the bandwidth bar a coin flip under per-call timing); ``sync`` rows
record the same call as one eager call costs end to end, host work included. Every row carries
its method in ``extra_config["timing"]``; rows are appended to the CSV as each point is measured.

Modes: ``fwd`` (forward with autograd recording, as in training), ``bwd`` (backward only), ``full``
(both). Metrics: time (ms, median and 20/80th percentiles), achieved bandwidth (GB/s, counting
every byte of q, k, their outputs and cos/sin read or written once) and peak memory above the
inputs (MB). On CUDA the ``copy`` provider measures the card's device-to-device copy bandwidth,
the roofline the fused kernel is judged against. On CPU the sizes are small and only ``eager``
runs, unless Triton's interpreter is on (TRITON_INTERPRET=1), which adds ``triton`` at tiny sizes.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Callable, Optional, Sequence

import torch

from bench._common import (RESULTS_DIR, append_rows, csv_path, make_row, peak_memory_bytes,  # noqa: F401
                           read_rows, time_fn, timing_methods, timings_for)
from fastcse.kernels._triton_utils import interpreted as triton_interpreted

CSV_NAME = "rope.csv"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The issue's performance bar: bf16, (batch 8, seq 4096, 32 heads, head_dim 128), q and k.
ISSUE_SHAPE = dict(batch=8, seqlen=4096, heads=32, head_dim=128, dtype="bf16")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary(q, k, cos, sin):
    """Hugging Face's eager RoPE (Llama/ModernBERT style) on (batch, seq, heads, dim) tensors.

    cos, sin: (seq, head_dim) with both halves equal, in q's dtype, as HF caches them.
    """
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def make_inputs(batch, seqlen, heads, head_dim, dtype, device):
    q = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(seqlen, device=device, dtype=torch.float32)[:, None] * inv_freq
    cos_half, sin_half = angles.cos().to(dtype), angles.sin().to(dtype)
    return q, k, cos_half, sin_half


def provider_fn(provider: str, q, k, cos_half, sin_half) -> Callable[[], tuple]:
    if provider == "eager":
        cos_full, sin_full = torch.cat((cos_half, cos_half), -1), torch.cat((sin_half, sin_half), -1)
        return lambda: hf_apply_rotary(q, k, cos_full, sin_full)
    if provider == "triton":
        from fastcse.rotary import apply_rotary

        return lambda: apply_rotary(q, k, cos_half, sin_half, layout="half", backend="triton",
                                    validate=False)
    raise ValueError(f"unknown provider {provider!r}")


def bytes_moved(mode: str, q, k, cos_half) -> int:
    """Bytes read + written once: q and k in, their rotations out (x2 for full), cos/sin once."""
    qk = (q.numel() + k.numel()) * q.element_size()
    tables = 2 * cos_half.numel() * cos_half.element_size()
    one_pass = 2 * qk + tables
    return 2 * one_pass if mode == "full" else one_pass


def measure(provider, mode, batch, seqlen, heads, head_dim, dtype_name, device, reps, x_name, x_value,
            timings: Sequence[str] = ("sync",)):
    """Rows of one point: time and bandwidth per timing method, then peak memory once."""
    dtype = DTYPES[dtype_name]
    q, k, cos_half, sin_half = make_inputs(batch, seqlen, heads, head_dim, dtype, device)
    forward = provider_fn(provider, q, k, cos_half, sin_half)
    grads = (torch.randn_like(q), torch.randn_like(k))
    if mode == "fwd":
        fn = forward
    elif mode == "bwd":
        outputs = forward()
        fn = lambda: torch.autograd.grad(outputs, (q, k), grads, retain_graph=True)  # noqa: E731
    else:
        fn = lambda: torch.autograd.grad(forward(), (q, k), grads)  # noqa: E731
    moved = bytes_moved(mode, q, k, cos_half)
    config = dict(batch=batch, seqlen=seqlen, heads_q=heads, heads_k=heads, head_dim=head_dim,
                  dtype=dtype_name, layout="half", bytes=moved)
    common = dict(kernel="rope", provider=provider, mode=mode, x_name=x_name, x_value=x_value, device=device)
    rows = []
    for method in timings:
        note = ""
        if mode == "bwd" and method == "graph":
            # backward of a forward recorded outside the capture runs on the forward's stream, which
            # a capture cannot take: queue the plain calls instead (device time all the same)
            method, note = "device", "bwd: graph capture impossible, timed 'device'"
        timing = time_fn(fn, device, warmup=2, reps=reps, method=method)
        note = "; ".join(n for n in (note, timing.note) if n)
        timed = dict(common, extra_config=dict(config, timing=timing.method, **({"timing_note": note} if note else {})))
        rows += [
            make_row(metric="time", unit="ms", p50=timing.p50, p20=timing.p20, p80=timing.p80, **timed),
            # A low time percentile is a high bandwidth one: p20 of GB/s comes from p80 of time.
            make_row(metric="bandwidth", unit="GB/s", p50=moved / timing.p50 / 1e6,
                     p20=moved / timing.p80 / 1e6, p80=moved / timing.p20 / 1e6, **timed),
        ]
    peak = peak_memory_bytes(fn, device)
    rows.append(make_row(metric="peak_memory", unit="MB", p50=peak / 2**20, extra_config=config, **common))
    return rows


def copy_bandwidth(device, nbytes: int, reps: int, timings: Sequence[str] = ("sync",)) -> list[dict]:
    """Device-to-device copy of ``nbytes``: the achievable streaming bandwidth (read + write),
    timed by the same methods as the kernel so the fraction compares like with like."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    rows = []
    for method in timings:
        timing = time_fn(lambda: dst.copy_(src), device, warmup=3, reps=reps, method=method)
        common = dict(kernel="rope", provider="copy", mode="copy", x_name="bytes", x_value=moved,
                      extra_config={"bytes": moved, "timing": timing.method}, device=device)
        rows.append(make_row(metric="bandwidth", unit="GB/s", p50=moved / timing.p50 / 1e6,
                             p20=moved / timing.p80 / 1e6, p80=moved / timing.p20 / 1e6, **common))
    return rows


def print_rows(rows: Sequence[dict]) -> None:
    for r in rows:
        timing = json.loads(r["extra_config"]).get("timing", "")
        print(f"{r['provider']:>7} {r['mode']:>5} {r['x_name']}={r['x_value']:<6} "
              f"{r['metric']:>11}: {float(r['p50']):10.3f} {r['unit']:<5} {timing}", flush=True)


def check_bars(rows: Sequence[dict]) -> None:
    """Print the issue's bars at its shape: full >= 5x faster than eager, >= 75% of copy GB/s.

    Judged per timing method present (``graph`` is the kernel bar; ``sync`` shows what host work
    adds); the copy is timed by the same method as the kernel.
    """
    def at_issue_shape(r):
        config = json.loads(r["extra_config"])
        return r["provider"] == "copy" or all(
            config.get(key) == value for key, value in
            dict(ISSUE_SHAPE, heads_q=ISSUE_SHAPE["heads"], heads_k=ISSUE_SHAPE["heads"]).items()
            if key != "heads")

    def pick(provider, mode, metric, method):
        for r in rows:
            if ((r["provider"], r["mode"], r["metric"]) == (provider, mode, metric) and at_issue_shape(r)
                    and json.loads(r["extra_config"]).get("timing") == method):
                return float(r["p50"])
        return None

    methods = dict.fromkeys(json.loads(r["extra_config"]).get("timing") for r in rows if r["metric"] == "time")
    for method in methods:
        eager_ms, triton_ms = pick("eager", "full", "time", method), pick("triton", "full", "time", method)
        triton_bw, copy_bw = pick("triton", "full", "bandwidth", method), pick("copy", "copy", "bandwidth", method)
        if None not in (eager_ms, triton_ms):
            speedup = eager_ms / triton_ms
            print(f"BAR [{method}] speedup full (eager/triton): {speedup:.2f}x (need >= 5) -> "
                  f"{'PASS' if speedup >= 5 else 'FAIL'}")
        if None not in (triton_bw, copy_bw):
            fraction = triton_bw / copy_bw
            print(f"BAR [{method}] triton full bandwidth {triton_bw:.0f} GB/s = {100 * fraction:.1f}% of copy "
                  f"{copy_bw:.0f} GB/s (need >= 75%) -> {'PASS' if fraction >= 0.75 else 'FAIL'}")


def plot(csv_name: str = CSV_NAME) -> list[str]:
    """One PNG per (device, x_name, metric): p50 with p20-p80 bands, a line per provider/mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(csv_name) if r["kernel"] == "rope" and r["provider"] != "copy"]

    def fixed_config(r):  # the run's configuration without the swept quantity and the timing
        config = json.loads(r["extra_config"])
        swept = {"seqlen": "seqlen", "heads": "heads_q"}.get(r["x_name"])
        return json.dumps({k: v for k, v in config.items()
                           if k not in (swept, "heads_k", "bytes", "timing", "timing_note")}, sort_keys=True)

    def timing(r):
        return json.loads(r["extra_config"]).get("timing", "")

    # Per (device, sweep) plot the configuration of the most recent run; later rows of the same
    # point replace earlier ones.
    newest_config = {(r["device_name"], r["x_name"]): fixed_config(r) for r in rows}
    latest: dict[tuple, dict] = {}
    for r in rows:
        if fixed_config(r) == newest_config[(r["device_name"], r["x_name"])]:
            latest[(r["device_name"], r["x_name"], r["metric"], r["provider"], r["mode"], timing(r),
                    r["x_value"])] = r
    groups: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for (dev, x_name, metric, provider, mode, method, _), r in latest.items():
        groups[(dev, x_name, metric)][(provider, mode, method)].append(r)
    written = []
    for (dev, x_name, metric), lines in groups.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for (provider, mode, method), points in sorted(lines.items()):
            points.sort(key=lambda r: float(r["x_value"]))
            xs = [float(r["x_value"]) for r in points]
            ax.plot(xs, [float(r["p50"]) for r in points], marker="o",
                    label=" ".join(x for x in (provider, mode, method) if x))
            ax.fill_between(xs, [float(r["p20"]) for r in points], [float(r["p80"]) for r in points], alpha=0.2)
        unit = next(iter(lines.values()))[0]["unit"]
        ax.set(xlabel=x_name, ylabel=f"{metric} ({unit})", title=f"rope {metric}: {dev}"[:80], xscale="log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        slug = "".join(c if c.isalnum() else "_" for c in dev)[:40]
        path = csv_path(csv_name).parent / f"rope_{x_name}_{metric}_{slug}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


def parse_args(argv: Optional[Sequence[str]]):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--providers", nargs="+", default=None, help="eager triton (default: what runs here)")
    p.add_argument("--modes", nargs="+", default=["fwd", "bwd", "full"], choices=["fwd", "bwd", "full"])
    p.add_argument("--sweep", nargs="+", default=["seqlen", "heads"], choices=["seqlen", "heads"])
    p.add_argument("--batch", type=int)
    p.add_argument("--seqlen", type=int, help="fixed seqlen of the heads sweep")
    p.add_argument("--heads", type=int, help="fixed heads of the seqlen sweep")
    p.add_argument("--head-dim", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--seqlens", type=int, nargs="+")
    p.add_argument("--heads-list", type=int, nargs="+")
    p.add_argument("--reps", type=int)
    p.add_argument("--quick", action="store_true", help="the issue's shape only (small on CPU)")
    p.add_argument("--plot", action="store_true", help="draw PNGs from the CSV and exit")
    p.add_argument("--csv", default=CSV_NAME,
                   help="a file name under bench/results/, or a path; rows are appended as measured")
    p.add_argument("--timing", type=timing_methods, default=None,
                   help="comma-separated of sync,device,graph (default: graph on CUDA; wall clock on CPU)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = parse_args(argv)
    if args.plot:
        for path in plot(args.csv):
            print(path)
        return []
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    interpreted = triton_interpreted()
    providers = args.providers or (["eager", "triton"] if cuda or interpreted else ["eager"])
    if cuda:
        defaults = dict(batch=8, heads=32, head_dim=128, dtype="bf16", seqlen=4096,
                        seqlens=[512, 1024, 2048, 4096, 8192], heads_list=[8, 16, 32, 64], reps=20)
        if args.quick:
            defaults.update(seqlens=[4096], sweep=["seqlen"])
    elif interpreted and "triton" in providers:  # the interpreter runs Python per program
        defaults = dict(batch=1, heads=2, head_dim=32, dtype="fp32", seqlen=16,
                        seqlens=[8, 16], heads_list=[1, 2], reps=2)
    else:
        defaults = dict(batch=2, heads=4, head_dim=64, dtype="fp32", seqlen=256,
                        seqlens=[64, 256, 1024], heads_list=[2, 4, 8], reps=5)
        if args.quick:
            defaults.update(seqlens=[256], sweep=["seqlen"])
    get = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name]  # noqa: E731
    sweeps = defaults.get("sweep", args.sweep) if args.quick else args.sweep

    timings = timings_for(args.timing, device, default=["graph"])
    rows: list[dict] = []
    for sweep in sweeps:
        values = get("seqlens") if sweep == "seqlen" else get("heads_list")
        for value in values:
            seqlen = value if sweep == "seqlen" else get("seqlen")
            heads = value if sweep == "heads" else get("heads")
            for provider in providers:
                for mode in args.modes:
                    new = measure(provider, mode, get("batch"), seqlen, heads, get("head_dim"),
                                  get("dtype"), device, get("reps"), sweep, value, timings)
                    print_rows(new)
                    append_rows(args.csv, new)
                    rows += new
    # The roofline: a copy of as many bytes as q and k (the whole pair on CUDA: 512 MiB at the
    # issue's shape, far past the L2 cache).
    q_bytes = get("batch") * get("seqlen") * get("heads") * get("head_dim") * DTYPES[get("dtype")].itemsize
    new = copy_bandwidth(device, 2 * q_bytes, get("reps"), timings)
    print_rows(new)
    append_rows(args.csv, new)
    rows += new
    check_bars(rows)
    print(f"{len(rows)} rows appended to {csv_path(args.csv)}")
    return rows


if __name__ == "__main__":
    main()
