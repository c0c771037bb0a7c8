"""The two ends of a GPU run (``bench/gpu_check.sh``): the card's ceilings first, the bars table last.

    python3 -m bench.gpu_report ceilings --device cuda --out $OUT/ceilings.json
    python3 -m bench.gpu_report table --dir $OUT [--steps "name rc seconds" ...]

``ceilings`` writes the card file that ``bench/perf_model.py --card FILE`` reads (format in
:func:`bench._common.measure_card`: name, matmul_tflops per dtype at 8192^3, copy_gbps, launch_us,
kernel_us, sm_count, memory_gb, gpu).

``table`` reads the benchmark CSVs in ``--dir`` (``infonce.csv``, ``rope.csv``,
``biased_attention.csv``, ``encoder.csv``; any of them may be missing or cut short), turns them
into the issue's bars, asks ``python3 -m bench.perf_model --card DIR/ceilings.json --json`` for its
predictions when that module exists, and prints one row per bar: prediction, measurement, target,
PASS / FAIL, or why there is no measurement. Bars are joined to predictions by name, so the names
built here follow the performance model's. Writes ``report.json`` (the table as its ``text``) beside the
CSVs.

Which timing a bar uses (bench/_common.py's methods): the rotary bars ``graph`` (device time, the
launcher's host work excluded; the ``sync`` figure is in the detail), everything else ``sync`` (one
call end to end), ``wall`` on CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
CSV_FILES = ("infonce.csv", "rope.csv", "biased_attention.csv", "encoder.csv", "train.csv")
ROPE_ISSUE_SHAPE = (8, 4096, 32, 128, "bf16")
# Timing methods in order of preference: the kernel bars want device time; the others one call.
KERNEL_TIMINGS = ("graph", "device", "sync", "wall")
CALL_TIMINGS = ("sync", "wall", "device", "graph")


@dataclass
class Measured:
    """One bar as measured: ``value`` None means no figure (``detail`` says why)."""

    bar: str
    value: Optional[float]
    target: float
    cmp: str
    unit: str
    detail: str = ""


def judge(value: float, target: float, cmp: str) -> bool:
    return {"<=": value <= target, ">=": value >= target, "<": value < target, ">": value > target}[cmp]


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_csv(path: Path) -> list[dict]:
    """Rows of a benchmark CSV, [] when it is missing; a row cut mid-write is skipped."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            try:
                row["cfg"] = json.loads(row.get("extra_config") or "{}")
            except ValueError:
                continue
            rows.append(row)
        return rows


class Points:
    """Latest p50 per (key..., timing) of a CSV, picked by a timing preference."""

    def __init__(self):
        self.values: dict[tuple, dict[str, tuple[float, dict]]] = {}

    def add(self, key: tuple, timing: str, value: float, cfg: dict) -> None:
        self.values.setdefault(key, {})[timing] = (value, cfg)

    def get(self, key: tuple, prefer=CALL_TIMINGS, timing: Optional[str] = None):
        """(value, cfg, timing) or None; ``timing`` forces one method."""
        by_timing = self.values.get(key, {})
        for method in ([timing] if timing else prefer):
            if method in by_timing:
                value, cfg = by_timing[method]
                return value, cfg, method
        return None


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


# --- the bars, from the CSVs --------------------------------------------------------------------


def loss_bars(rows: list[dict]) -> list[Measured]:
    """InfoNCE bars (infonce.csv): fused/eager time (fwd+bwd and no-grad forward), memory.

    A provider that ran out of memory counts as infinitely slow and large (its rows carry
    ``oom``): the ratio goes to 0 or infinity on the side that lost, and the detail says so.
    """
    points = Points()
    for r in rows:
        if r["kernel"] != "infonce":
            continue
        cfg = r["cfg"]
        key = (int(cfg["N"]), int(cfg["D"]), cfg["dtype"])
        timing = cfg.get("timing", "sync")
        if cfg.get("oom"):
            for metric in ("time", "peak_memory"):
                points.add((r["provider"], r["mode"], metric) + key, timing, math.inf, cfg)
        else:
            points.add((r["provider"], r["mode"], r["metric"]) + key, timing, _float(r["p50"]), cfg)

    def ratio(name, num, den, target, cmp, unit):
        """(label, point) / (label, point), points as Points.get returns them; out of memory is
        infinity on its side, so the ratio goes to 0 or infinity against the side that lost."""
        (num_label, a), (den_label, b) = num, den
        if a is None or b is None or math.isnan(a[0]) or math.isnan(b[0]):
            return None
        if math.isinf(a[0]) and math.isinf(b[0]):
            return Measured(name, None, target, cmp, "x", "both out of memory")
        show = lambda label, x: f"{label} out of memory" if math.isinf(x) else f"{label} {x:.3f} {unit}"  # noqa: E731
        return Measured(name, a[0] / b[0], target, cmp, "x", f"{show(num_label, a[0])}, {show(den_label, b[0])} ({a[2]})")

    out = []
    for d, dt in sorted({k[4:] for k in points.values}):
        suffix = "" if d == 768 else f", D={d}"
        ns = sorted({k[3] for k in points.values if k[4:] == (d, dt)})
        for fused in ("triton", "chunked"):
            if not any(k[0] == fused and k[4:] == (d, dt) for k in points.values):
                continue

            def get(provider, mode, metric, n):
                return points.get((provider, mode, metric, n, d, dt))

            def add(bar):
                if bar is not None:
                    out.append(bar)

            for n in ns:
                add(ratio(f"loss {fused}/eager time, fwd+bwd, {dt}, N={n}{suffix}",
                          (fused, get(fused, "full", "time", n)), ("eager", get("eager", "full", "time", n)),
                          1.0, "<=", "ms"))
            if 32768 in ns:
                add(ratio(f"loss memory eager/{fused}, fwd+bwd, {dt}, N=32768{suffix}",
                          ("eager", get("eager", "full", "peak_memory", 32768)),
                          (fused, get(fused, "full", "peak_memory", 32768)), 25.0, ">=", "MiB"))
            for n in ns:
                f, e = get(fused, "full", "peak_memory", n), get("eager", "full", "peak_memory", n)
                if f is not None and e is not None and math.isfinite(e[0]):
                    out.append(Measured(f"loss {fused} memory above inputs, fwd+bwd, {dt}, N={n}{suffix}",
                                        f[0], e[0], "<", "MiB", "target: eager's measured peak; gradients included"))
            for n in (n for n in ns if n >= 131072):
                peak = get(fused, "full", "peak_memory", n)
                if peak is None:
                    continue
                itemsize = {"bfloat16": 2, "float16": 2}.get(dt, 4)
                inputs = 3 * n * d * itemsize
                total = (inputs + peak[0] * 2 ** 20) / 1e9
                out.append(Measured(f"loss {fused} N={n} fwd+bwd fits in 80 GB", total, 80.0, "<=", "GB",
                                    "out of memory on this card" if math.isinf(total) else
                                    f"inputs {inputs / 1e9:.2f} GB + peak above them {peak[0] / 1024:.2f} GiB"))
            for n in ns:
                add(ratio(f"loss {fused}/eager time, no-grad forward, {dt}, N={n}{suffix}",
                          (fused, get(fused, "fwd", "time", n)), ("eager", get("eager", "fwd", "time", n)),
                          1.0, "<=", "ms"))
    return out


def rope_bars(rows: list[dict], ceilings: Optional[dict]) -> list[Measured]:
    """Rotary bars (rope.csv): eager/fused time and fused bandwidth / copy, fwd+bwd, q and k."""
    points = Points()
    shapes = set()
    for r in rows:
        if r["kernel"] != "rope":
            continue
        cfg = r["cfg"]
        timing = cfg.get("timing", "sync")
        if r["provider"] == "copy":
            points.add(("copy", r["metric"]), timing, _float(r["p50"]), cfg)
            continue
        if r["mode"] != "full":
            continue
        shape = (cfg["batch"], cfg["seqlen"], cfg["heads_q"], cfg["head_dim"], cfg["dtype"])
        shapes.add(shape)
        points.add((r["provider"], r["metric"], shape), timing, _float(r["p50"]), cfg)
    if not shapes:
        return []
    shape = ROPE_ISSUE_SHAPE if ROPE_ISSUE_SHAPE in shapes else max(
        shapes, key=lambda s: s[0] * s[1] * s[2] * s[3])
    label = f"{shape[4]} ({shape[0]}, {shape[1]}, {shape[2]}, {shape[3]}) q+k fwd+bwd"
    out = []
    fused = points.get(("triton", "time", shape), KERNEL_TIMINGS)
    speed_name, bw_name = f"rotary eager/fused time, {label}", f"rotary fused bandwidth / copy bandwidth, {label}"
    if fused is None:
        return [Measured(speed_name, None, 5.0, ">=", "x", "no fused (triton) rows"),
                Measured(bw_name, None, 0.75, ">=", "", "no fused (triton) rows")]
    method = fused[2]
    sync = points.get(("triton", "time", shape), timing="sync")
    host = (f"; as one call (sync): fused {sync[0]:.3f} ms, host work adds {sync[0] - fused[0]:+.3f} ms"
            if sync and method != "sync" else "")
    eager = points.get(("eager", "time", shape), timing=method)
    if eager is None:
        out.append(Measured(speed_name, None, 5.0, ">=", "x", f"no eager row timed {method}"))
    else:
        out.append(Measured(speed_name, eager[0] / fused[0], 5.0, ">=", "x",
                            f"{method}: fused {fused[0]:.3f} ms, eager {eager[0]:.3f} ms{host}"))
    bw = points.get(("triton", "bandwidth", shape), timing=method)
    copy = points.get(("copy", "bandwidth"), timing=method)
    if bw is None:
        out.append(Measured(bw_name, None, 0.75, ">=", "", f"no fused bandwidth row timed {method}"))
    elif copy is not None:
        out.append(Measured(bw_name, bw[0] / copy[0], 0.75, ">=", "",
                            f"{method}: {bw[0]:.0f} GB/s of a copy's {copy[0]:.0f} GB/s (rope.csv){host}"))
    elif ceilings and ceilings.get("copy_gbps"):
        out.append(Measured(bw_name, bw[0] / ceilings["copy_gbps"], 0.75, ">=", "",
                            f"{method}: {bw[0]:.0f} GB/s of the ceilings' {ceilings['copy_gbps']:.0f} GB/s{host}"))
    else:
        out.append(Measured(bw_name, None, 0.75, ">=", "", "no copy bandwidth measured"))
    return out


def _attention_label(model: str, heads: int, head_dim: int) -> str:
    base = heads == 12 and head_dim == 64
    if model == "deberta":
        return "DeBERTa-v3-base" if base else f"DeBERTa-v3 tiny ({heads} heads x {head_dim})"
    return "T5-base encoder" if base else f"T5 tiny encoder ({heads} heads x {head_dim})"


def attention_bars(rows: list[dict]) -> list[Measured]:
    """One layer's self-attention (biased_attention.csv): HF eager / biased time and memory."""
    points = Points()
    for r in rows:
        if not r["kernel"].startswith("biased_attention_") or r["kernel"] == "biased_attention_tiles":
            continue
        cfg = r["cfg"]
        key = (cfg["model"], int(r["x_value"]), cfg["batch"], cfg["heads"], cfg["head_dim"], cfg["dtype"],
               cfg["dropout"])
        points.add((r["provider"], r["mode"], r["metric"]) + key, cfg.get("timing", "sync"), _float(r["p50"]), cfg)
    out = []
    for model in ("deberta", "t5"):
        keys = sorted({k[3:] for k in points.values if k[3] == model and k[1] == "full"}, key=lambda k: k[1])
        if not keys:
            continue
        key = next((k for k in keys if k[1] == 512), keys[-1])  # the bar's L=512, else the longest
        _, seq, batch, heads, head_dim, dtype, dropout = key
        where = f"fwd+bwd, L={seq} batch {batch}, {dtype}, dropout {dropout:g}"
        label = _attention_label(model, heads, head_dim)
        if model == "deberta":
            e, b = points.get(("eager", "full", "peak_memory") + key), points.get(("biased", "full", "peak_memory") + key)
            if e and b:
                out.append(Measured(f"{label} attention memory HF eager / biased, {where}", e[0] / b[0], 3.0, ">=",
                                    "x", f"eager {e[0]:.1f} MiB, biased {b[0]:.1f} MiB"))
        e, b = points.get(("eager", "full", "time") + key), points.get(("biased", "full", "time") + key)
        if e and b:
            out.append(Measured(f"{label} attention module HF eager / biased time, {where}", e[0] / b[0],
                                1.5 if model == "deberta" else 1.3, ">=", "x",
                                f"eager {e[0]:.3f} ms, biased {b[0]:.3f} ms ({b[2]})"))
    return out


def encoder_bars(rows: list[dict]) -> list[Measured]:
    """Whole-encoder training steps (encoder.csv): varlen vs padded for BERT, biased vs eager."""
    points = Points()
    for r in rows:
        if not r["kernel"].startswith("encoder_") or r["metric"] != "latency":
            continue
        cfg = r["cfg"]
        points.add((r["kernel"][len("encoder_"):], r["x_value"], r["provider"]), cfg.get("timing", "sync"),
                   _float(r["p50"]), cfg)
    out = []

    def get(model, workload, backend):
        return points.get((model, workload, backend))

    v = get("bert", "wiki32", "varlen")
    if v:
        cfg = v[1]
        label = (f"BERT-{cfg['shape']} {cfg['batch']} sentences <= 32 tokens")
        for other, name, target in (("sdpa", "padded SDPA", 1.5), ("eager", "HF eager", 2.0)):
            o = get("bert", "wiki32", other)
            if o:
                out.append(Measured(f"{label}: varlen vs {name} time", o[0] / v[0], target, ">=", "x",
                                    f"varlen {v[0]:.2f} ms, {other} {o[0]:.2f} ms ({v[2]})"))
    for model, label, other_name, target in (("deberta-v3", "DeBERTa-v3", "HF eager", 1.5),
                                             ("t5", "T5", "eager", 1.3)):
        b, e = get(model, "long512", "biased"), get(model, "long512", "eager")
        if b and e:
            cfg = b[1]
            length = cfg["padded_tokens"] // cfg["batch"]
            shape = cfg["shape"]
            name = (f"DeBERTa-v3-{shape} L={length} batch {cfg['batch']} (whole encoder): biased vs HF eager time"
                    if model == "deberta-v3" else f"T5-{shape} encoder L={length} (whole encoder): biased vs eager time")
            out.append(Measured(name, e[0] / b[0], target, ">=", "x",
                                f"biased {b[0]:.2f} ms, eager {e[0]:.2f} ms, batch {cfg['batch']} ({b[2]})"))
    return out


def train_bars(rows: list[dict]) -> list[Measured]:
    """Whole training steps (train.csv, bench/bench_train.py on CUDA): the step bars of issue #12, named
    as bench/perf_model.py's STEP_BARS / STEP_MEMORY_BARS (one home for the names and targets)."""
    try:
        from bench.perf_model import STEP_BARS, STEP_MEMORY_BARS
    except Exception:  # noqa: BLE001 - the model cannot load: its bars then have no name to join on
        return []
    latest: dict[tuple, float] = {}
    for r in rows:  # later rows win: the newest run of each point
        if r["device_name"].startswith("CPU") or not r["kernel"].startswith("train_"):
            continue
        key = (r["kernel"][len("train_"):], r["mode"], int(float(r["x_value"])), r["provider"], r["metric"])
        latest[key] = _float(r["p50"])
    out = []
    for name, model, shape, batch, num, den, target in STEP_BARS:
        a, b = (latest.get((model, shape, batch, p, "sentences_per_s")) for p in (num, den))
        if a and b:
            out.append(Measured(f"{name}, bf16 (predicted)", a / b, target, ">=", "x",
                                f"{num} {a:.0f} sent/s, {den} {b:.0f} sent/s"))
    for name, model, shape, batch, target in STEP_MEMORY_BARS:
        f, e = (latest.get((model, shape, batch, p, "peak_memory")) for p in ("fused", "eager"))
        if f and e:
            out.append(Measured(f"{name}, bf16 (predicted)", f / e, target, "<=", "x",
                                f"peak fused {f / 2 ** 30:.2f} GiB, eager {e / 2 ** 30:.2f} GiB"))
    return out


def measured_bars(directory: Path, ceilings: Optional[dict]) -> list[Measured]:
    return (loss_bars(read_csv(directory / "infonce.csv"))
            + rope_bars(read_csv(directory / "rope.csv"), ceilings)
            + attention_bars(read_csv(directory / "biased_attention.csv"))
            + encoder_bars(read_csv(directory / "encoder.csv"))
            + train_bars(read_csv(directory / "train.csv")))


# --- predictions ---------------------------------------------------------------------------------


PREDICTIONS_CSV = REPO / "bench" / "results" / "perf_model.csv"


def committed_predictions(card_name: str, path: Path = PREDICTIONS_CSV) -> tuple[list[dict], str]:
    """The newest committed prediction of every bar for ``card_name`` (bench/results/perf_model.csv,
    written by ``python -m bench.perf_model --card ...`` before any card ran), in ``--json``'s shape;
    [] when the CSV holds no row for that card. The card matches exactly, else by prefix ("NVIDIA
    H100 80GB HBM3" measures what "NVIDIA H100 80GB" predicted)."""
    if not path.exists():
        return [], ""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cards = {r["card"] for r in rows}
    match = card_name if card_name in cards else next(
        (c for c in sorted(cards, key=len, reverse=True) if card_name.startswith(c) or c.startswith(card_name)), None)
    if match is None:
        return [], ""
    newest: dict[str, dict] = {}
    for r in rows:  # appended in time order: the last row of a bar is its newest prediction
        if r["card"] == match:
            newest[r["bar"]] = r
    bars = []
    for r in newest.values():
        cmp, _, value = (r.get("target") or "").partition(" ")
        bars.append({"bar": r["bar"], "predicted": _float(r["predicted"]) if r["predicted"] else None,
                     "target": _float(value) if value else None, "cmp": cmp, "unit": r.get("unit", ""),
                     "pass": {"PASS": True, "FAIL": False}.get(r.get("pass")), "detail": r.get("detail", "")})
    dates = sorted({r["date"][:10] for r in newest.values()})
    commits = sorted({r["commit"] for r in newest.values()})
    return bars, (f"predictions: bench/results/perf_model.csv for {match}, written {dates[0]}..{dates[-1]} "
                  f"at commit(s) {', '.join(commits)}, before this run")


def predictions(card: Optional[Path], timeout: float = 120.0, *, committed: bool = True) -> tuple[list[dict], str]:
    """The model's bars for ``card`` (a ceilings.json; the built-in H200 when None), and a note: the
    predictions committed for that card when there are any (written down before the run, and the step
    bars trace for minutes), else bench/perf_model.py's ``--json`` run on the card file."""
    if committed:
        name = "NVIDIA H200"
        if card is not None:
            try:
                name = json.loads(Path(card).read_text()).get("name") or name
            except (OSError, ValueError):
                pass
        bars, note = committed_predictions(name)
        if bars:
            return bars, note
    if not (REPO / "bench" / "perf_model.py").exists():
        return [], "no performance model (bench/perf_model.py absent): predictions left empty"
    cmd = [sys.executable, "-m", "bench.perf_model", "--json", "--no-csv"]
    if card is not None:
        cmd += ["--card", str(card)]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], f"performance model timed out after {timeout:.0f} s"
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return [], f"performance model failed (rc {done.returncode}): {tail}"
    text = done.stdout
    try:
        bars, _ = json.JSONDecoder().raw_decode(text[text.index("["):])
    except ValueError as err:
        return [], f"performance model printed no JSON list ({err})"
    where = f"--card {card}" if card is not None else "its default card (no ceilings.json)"
    return [b for b in bars if isinstance(b, dict) and "bar" in b], f"predictions: bench/perf_model.py {where}"


# --- the table -----------------------------------------------------------------------------------


def _key(name: str) -> str:
    return " ".join(name.lower().split())


def assemble(predicted: list[dict], measured: list[Measured]) -> list[dict]:
    """One row per bar: the model's bars in its order, then bars measured but not predicted."""
    by_name = {}
    for m in measured:
        by_name[_key(m.bar)] = m
    rows = []

    def row(bar, p, m):
        target, cmp, unit = (m.target, m.cmp, m.unit) if m else (p.get("target"), p.get("cmp", ""), p.get("unit", ""))
        value = m.value if m else None
        if value is None:
            result = "no measurement" + (f" ({m.detail})" if m and m.detail else "")
        else:
            result = "PASS" if judge(value, target, cmp) else "FAIL"
        pred = p.get("predicted") if p else None
        error = None
        if pred is not None and value not in (None, 0.0) and math.isfinite(value):
            error = pred / value - 1
        return {"bar": bar, "predicted": pred, "measured": value, "target": target, "cmp": cmp, "unit": unit,
                "result": result, "model_error": error,
                "detail": (m.detail if m else "") if value is not None else (p.get("detail", "") if p else ""),
                "predicted_pass": p.get("pass") if p else None}

    for p in predicted:
        m = by_name.pop(_key(p["bar"]), None)
        rows.append(row(p["bar"], p, m))
    for m in by_name.values():
        rows.append(row(m.bar, None, m))
    return rows


def format_table(rows: list[dict]) -> str:
    width = min(max([len(r["bar"]) for r in rows] + [3]), 110)
    head = f"{'bar':<{width}} | {'predicted':>9} | {'measured':>9} | {'target':>13} | {'model err':>9} | result"
    lines = [head, "-" * len(head)]
    for r in rows:
        target = "-" if r["target"] is None else f"{r['cmp']} {_fmt(r['target'])} {r['unit']}".rstrip()
        error = "-" if r["model_error"] is None else f"{100 * r['model_error']:+.0f}%"
        bar = r["bar"] if len(r["bar"]) <= width else r["bar"][: width - 3] + "..."
        lines.append(f"{bar:<{width}} | {_fmt(r['predicted']):>9} | {_fmt(r['measured']):>9} | {target:>13} | "
                     f"{error:>9} | {r['result']}")
    n_pass = sum(r["result"] == "PASS" for r in rows)
    n_fail = sum(r["result"] == "FAIL" for r in rows)
    lines.append(f"{len(rows)} bars: {n_pass} PASS, {n_fail} FAIL, {len(rows) - n_pass - n_fail} without a measurement")
    return "\n".join(lines)


def report(directory: Path, steps: list[str], perf_timeout: float = 120.0, rehearse_gpu: bool = False) -> str:
    """The whole report (steps, card, notes, details, then the table), also written to
    ``report.json`` in ``directory`` (its ``text`` is the returned report).

    ``rehearse_gpu`` (the CPU dry run): the predictions committed for the default card (H200) are
    read, as a card run reads those of its own card.
    """
    ceilings_path = directory / "ceilings.json"
    ceilings = None
    notes = []
    if ceilings_path.exists():
        try:
            ceilings = json.loads(ceilings_path.read_text())
        except ValueError:
            notes.append("ceilings.json unreadable")
    else:
        notes.append("no ceilings.json (its step did not finish)")
    card = ceilings_path if ceilings else None
    if rehearse_gpu:
        # a card run reads the predictions committed for its card; the CPU's ceilings name none
        card = None
        notes.append("dry run: the committed predictions for the default card (what a card run reads)")
    predicted, note = predictions(card, perf_timeout)
    notes.append(note)
    present = [name for name in CSV_FILES if (directory / name).exists()]
    notes.append("CSVs read: " + (", ".join(present) if present else "none"))
    rows = assemble(predicted, measured_bars(directory, ceilings))
    lines = []
    if steps:
        lines.append("steps (name, exit status, seconds; 124 = cut at its timeout):")
        lines += [f"  {s}" for s in steps]
    if ceilings:
        t = ceilings.get("matmul_tflops", {})
        lines.append(f"card: {ceilings.get('name')}: matmul bf16 {_fmt(t.get('bf16'))} / fp16 {_fmt(t.get('fp16'))} / "
                     f"fp32 {_fmt(t.get('fp32'))} TFLOP/s, copy {_fmt(ceilings.get('copy_gbps'))} GB/s, "
                     f"launch {_fmt(ceilings.get('launch_us'))} us, kernel {_fmt(ceilings.get('kernel_us'))} us")
    lines += [f"note: {n}" for n in notes]
    details = [f"  {r['bar']}: {r['detail']}" for r in rows if r["detail"] and r["measured"] is not None]
    if details:
        lines.append("measurement details:")
        lines += details
    lines.append("")
    lines.append(format_table(rows))
    text = "\n".join(lines)
    # one file (the device tool returns at most 8): the printed table is its "text"
    (directory / "report.json").write_text(json.dumps({"ceilings": ceilings, "notes": notes, "steps": steps,
                                                       "bars": rows, "text": text}, indent=1, default=str) + "\n")
    return text


def write_ceilings(device: str, out: Path) -> dict:
    import torch

    from bench._common import measure_card

    card = measure_card(torch.device(device))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(card, indent=1) + "\n")
    os.replace(tmp, out)
    return card


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("ceilings", help="measure the card's ceilings into a card JSON file")
    c.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    c.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("table", help="the bars table from the CSVs in --dir (and the model's predictions)")
    t.add_argument("--dir", type=Path, required=True)
    t.add_argument("--steps", nargs="*", default=[], help="'name rc seconds' per step of the run, printed first")
    t.add_argument("--perf-timeout", type=float, default=120.0, help="seconds for bench/perf_model.py")
    t.add_argument("--rehearse-gpu", action="store_true",
                   help="dry run: read the predictions committed for the default card, as a card run does (see report())")
    args = parser.parse_args(argv)
    if args.command == "ceilings":
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        card = write_ceilings(device, args.out)
        print(json.dumps(card, indent=1))
        return 0
    print(report(args.dir, args.steps, args.perf_timeout, args.rehearse_gpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
