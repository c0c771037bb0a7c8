"""Write ``bench/RESULTS.md``, the one-page summary of every benchmark, from the CSVs in ``bench/results/``.

    python -m bench.results_page                 # regenerate bench/RESULTS.md
    python -m bench.results_page --out -         # print it instead

The page holds, per CSV and per device, the latest figures (the newest run of each measured point),
with date, commit and the card's ceilings where the CSV records them; the command that reproduces
each table; the performance model's prediction beside every GPU figure (``extra_config.prediction``
where the benchmark wrote one, else "no prediction yet"); "not yet measured on a GPU" where no GPU
row exists; and the PNGs found in ``bench/results/``. Every CSV is optional: a missing file is
listed as not measured yet. Rows of ``--quick`` runs (CI sizes) are left out.

Sources: ``train.csv`` (bench/bench_train.py, with its bars and quality gate), ``infonce.csv``,
``encoder.csv``, ``quality.csv`` (bench/quality_bar.py), ``perf_model.csv`` (predictions),
``grad_cache.csv`` and ``gpu_*.csv`` (any other CSV is shown as a plain table too).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PAGE = Path(__file__).resolve().parent / "RESULTS.md"
NOT_ON_GPU = "not yet measured on a GPU"
NO_PREDICTION = "no prediction yet"
FULL_PREDICTION_CARDS = ("NVIDIA H200",)  # the card lent to this project: every bar listed
# extra_config fields that change from run to run without changing what was measured
VOLATILE_EXTRA = {"reps", "timing_note", "load", "command", "run", "steps", "final_loss", "mean_sentences_per_s",
                  "flops_per_step", "ceiling_tflops", "real_tokens_per_step", "memory_counter", "prediction",
                  "quick", "threads", "warmup", "rounds", "block", "seed", "memory_ratio", "uncommitted", "ceiling"}


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def extra(row: dict) -> dict:
    try:
        return json.loads(row.get("extra_config") or "{}")
    except json.JSONDecodeError:
        return {}


def is_gpu(device: str) -> bool:
    return not device.startswith("CPU")


def fmt(value, unit: str = "") -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if unit == "bytes":
        return f"{x / 2**20:,.1f} MiB"
    if unit == "fraction":
        return f"{x * 100:.2f}%"
    if unit == "x":
        return f"{x:.2f}x"
    if abs(x) >= 1000:
        return f"{x:,.0f}" + (f" {unit}" if unit else "")
    return f"{x:.3g}" + (f" {unit}" if unit else "")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def provenance(rows: list[dict]) -> str:
    dates = sorted({r.get("timestamp", "")[:10] for r in rows if r.get("timestamp")})
    commits = sorted({r.get("commit", "") for r in rows if r.get("commit")})
    versions = sorted({r.get("version", "") for r in rows if r.get("version")})
    span = dates[0] if len(dates) == 1 else f"{dates[0]} .. {dates[-1]}" if dates else "?"
    return f"date {span}; commit {', '.join(commits) or '?'}; {'; '.join(versions)}"


def latest_per_point(rows: list[dict], key: Callable[[dict], tuple]) -> list[dict]:
    """The newest row (by timestamp) of each point ``key(row)``, in first-seen order."""
    best: dict = {}
    for r in rows:
        k = key(r)
        if k not in best or r.get("timestamp", "") >= best[k].get("timestamp", ""):
            best[k] = r
    return list(best.values())


def point_key(r: dict) -> tuple:
    e = {k: v for k, v in extra(r).items() if k not in VOLATILE_EXTRA}
    return (r["device_name"], r["kernel"], r["provider"], r["mode"], r["metric"], r["x_name"], r["x_value"],
            json.dumps(e, sort_keys=True))


# ----------------------------------------------------------------------------------------------
# train.csv
# ----------------------------------------------------------------------------------------------

TRAIN_PATHS = ("eager", "sdpa", "fused", "st", "st+fused")


@dataclass
class Bar:
    """A CPU or GPU bar of issue #12, judged on the latest run of its point."""

    name: str
    model: str
    shape: str
    batch: int
    check: Callable[[dict], tuple[Optional[bool], str]]  # runs[path] -> (pass, figures)
    device_kind: str = "cpu"


def _speed_ratio_bar(target: float) -> Callable[[dict], tuple[Optional[bool], str]]:
    def check(m):
        if "fused" not in m or "st" not in m:
            return None, "fused or st not measured"
        ratio = m["fused"]["sentences_per_s"] / m["st"]["sentences_per_s"]
        return ratio >= target, (f"fused {m['fused']['sentences_per_s']:.1f} vs st {m['st']['sentences_per_s']:.1f} "
                                 f"sentences/s: {ratio:.2f}x (bar >= {target}x)")
    return check


def _large_batch_bar(m):
    if "fused" not in m or "st" not in m:
        return None, "fused or st not measured"
    f, s = m["fused"], m["st"]
    speed = f["sentences_per_s"] / s["sentences_per_s"]
    if f.get("peak_memory") is None or s.get("peak_memory") is None:
        return None, f"speed {speed:.2f}x; memory not measured"
    mem = f["peak_memory"] / s["peak_memory"]
    return speed > 1.0 and mem < 1.0, (f"fused {f['sentences_per_s']:.1f} vs st {s['sentences_per_s']:.1f} sentences/s "
                                       f"({speed:.2f}x, bar > 1x); peak {f['peak_memory'] / 2**20:,.0f} vs "
                                       f"{s['peak_memory'] / 2**20:,.0f} MiB ({mem:.2f}x, bar < 1x)")


BARS = [
    Bar("fused >= 1.3x st, all-MiniLM-L6-v2, 64 sentences <= 32 tokens, fp32", "minilm", "unsup", 64,
        _speed_ratio_bar(1.3)),
    Bar("fused faster than st and less memory, 4096 sentences, small encoder (BERT-Tiny shape: 2 layers, "
        "hidden 128)", "bert-l2-h128", "large", 4096, _large_batch_bar),
]


def train_runs(rows: list[dict]) -> dict:
    """{(device, model, shape, batch): {path: {metric: p50, ...}, "_rows": [...]}} of the newest run
    of each (device, model, shape, batch)."""
    groups: dict = {}
    for r in rows:
        if r["mode"] == "quality":
            continue
        key = (r["device_name"], r["kernel"].removeprefix("train_"), r["mode"], int(float(r["x_value"])))
        groups.setdefault(key, []).append(r)
    runs = {}
    for key, rs in groups.items():
        run_of = lambda r: extra(r).get("run") or r["timestamp"]  # noqa: E731
        newest = max(rs, key=lambda r: r["timestamp"])
        chosen = [r for r in rs if run_of(r) == run_of(newest)]
        paths: dict = {"_rows": chosen}
        for r in chosen:
            if r["metric"] == "ratio_sentences_per_s":
                paths.setdefault("_ratios", {})[r["provider"]] = float(r["p50"])
                continue
            d = paths.setdefault(r["provider"], {"_extra": extra(r)})
            d[r["metric"]] = float(r["p50"])
            d[r["metric"] + "_p20"], d[r["metric"] + "_p80"] = float(r["p20"]), float(r["p80"])
        runs[key] = paths
    return runs


def train_section(rows: list[dict], include_quick: bool = False) -> list[str]:
    out = ["## Training step, end to end (`bench/results/train.csv`)", "",
           "One optimizer step (collate, forward, loss, backward, clipping, AdamW) per path on the same model "
           "and the same examples, paths interleaved in one process (`bench/bench_train.py` says how each is "
           "measured). sentences/s = examples per step over the median step time (p20-p80 in brackets); "
           "tokens/s counts real tokens of every sequence the encoder ran; peak = memory of one step above "
           "what was live before it; MFU = model FLOPs over the measured matmul ceiling.", ""]
    if not rows:
        return out + ["Not measured yet: `python -m bench.bench_train`.", ""]
    quick = [] if include_quick else [r for r in rows if extra(r).get("quick")]
    rows = [r for r in rows if include_quick or not extra(r).get("quick")]
    if quick:
        out += [f"({len(quick)} rows of `--quick` runs left out.)", ""]
    runs = train_runs(rows)
    devices = sorted({k[0] for k in runs} | {r["device_name"] for r in rows})
    if not any(is_gpu(d) for d in devices):
        out += [f"**GPU: {NOT_ON_GPU}.** (The CUDA run: `python -m bench.bench_train --device cuda`; every "
                f"GPU row carries the performance model's prediction, today \"{NO_PREDICTION}\".)", ""]
    for device in devices:
        dev_rows = [r for r in rows if r["device_name"] == device]
        dev_runs = {k: v for k, v in runs.items() if k[0] == device}
        chosen = [r for v in dev_runs.values() for r in v["_rows"]]
        ceilings = sorted({extra(r).get("ceiling_tflops") for r in chosen if extra(r).get("ceiling_tflops")})
        loads = [x for r in chosen for x in (extra(r).get("load") or []) if x is not None]
        out += [f"### {device}", "",
                f"{provenance(chosen or dev_rows)}. Card: matmul ceiling "
                f"{', '.join(f'{c:.3g}' for c in ceilings) or '?'} TFLOP/s "
                f"({'bf16' if is_gpu(device) else 'fp32'}, measured at the start of each run); 1-minute load "
                f"average during the runs {min(loads, default=float('nan')):.2f} .. {max(loads, default=float('nan')):.2f}.", ""]
        dirty = sorted({f for r in chosen for f in (extra(r).get("uncommitted") or [])})
        if dirty:
            out += [f"Measured on a shared working tree: the named commit plus uncommitted edits to "
                    f"{', '.join(f'`{f}`' for f in dirty)}.", ""]
        if not is_gpu(device):
            out += ["CPU memory: `fastcse.memory.StorageCounter` (tensor storage created during the step, "
                    "custom-op bodies included); not process RSS.", ""]
        header = ["model", "shape", "batch", "path", "sentences/s", "tokens/s", "peak", "MFU", "attn / loss / dtype",
                  "vs eager", "vs sdpa", "vs st"]
        if is_gpu(device):
            header.append("prediction")
        body, commands = [], []
        for (_, model, shape, batch), paths in sorted(dev_runs.items()):
            for p in TRAIN_PATHS:
                if p not in paths:
                    continue
                m = paths[p]
                e = m["_extra"]
                rel = []
                for base in ("eager", "sdpa", "st"):
                    if base in paths and base != p and "sentences_per_s" in paths[base]:
                        rel.append(f"{m['sentences_per_s'] / paths[base]['sentences_per_s']:.2f}x")
                    else:
                        rel.append("")
                row = [model, shape, batch, p,
                       f"{m['sentences_per_s']:.1f} ({m['sentences_per_s_p20']:.1f}-{m['sentences_per_s_p80']:.1f})",
                       fmt(m.get("tokens_per_s", "")), fmt(m["peak_memory"], "bytes") if "peak_memory" in m else "-",
                       fmt(m["mfu"], "fraction") if "mfu" in m else "-",
                       f"{e.get('attn_backend')} / {e.get('loss_backend')} / {e.get('precision')}", *rel]
                if is_gpu(device):
                    row.append(e.get("prediction") or NO_PREDICTION)
                body.append(row)
                cmd = e.get("command")
                if cmd and cmd not in commands:
                    commands.append(cmd)
        if body:
            out += [table(header, body), "", "Reproduce:", ""] + [f"    {c}" for c in commands] + [""]
        bars = [b for b in BARS if (b.device_kind == "gpu") == is_gpu(device)]
        if bars:
            out += ["Bars (issue #12):", ""]
            brows = []
            for b in bars:
                m = dev_runs.get((device, b.model, b.shape, b.batch))
                if m is None:
                    brows.append([b.name, "not measured", ""])
                    continue
                ok, figures = b.check({p: v for p, v in m.items() if not p.startswith("_")})
                brows.append([b.name, "n/a" if ok is None else "PASS" if ok else "FAIL", figures])
            out += [table(["bar", "status", "figures"], brows), ""]
        gates = latest_per_point([r for r in dev_rows if r["mode"] == "quality" and r["metric"] == "loss_max_diff"],
                                 key=lambda r: (r["kernel"],))
        if gates:
            grows, gcmds = [], []
            for r in gates:
                g = extra(r)
                grows.append([r["kernel"].removeprefix("train_"), g.get("steps"), g.get("batch"),
                              f"{g.get('loss_max_diff', 0):.3g} (rel {g.get('loss_max_rel_diff', 0):.3g})",
                              g.get("tolerance_rule"), "PASS" if g.get("loss_pass") else "FAIL",
                              f"{g.get('stsb_fused', float('nan')):.2f} / {g.get('stsb_eager', float('nan')):.2f} "
                              f"(before {g.get('stsb_before', float('nan')):.2f})",
                              f"{g.get('stsb_diff', float('nan')):.2f} (<= {g.get('stsb_limit')})",
                              "PASS" if g.get("stsb_pass") else "FAIL", r["timestamp"][:10], r["commit"]])
                for c in (g.get("command"), g.get("command_eager"), g.get("command_fused")):
                    if c and c not in gcmds:
                        gcmds.append(c)
            out += ["Quality gate, fused vs eager from one seed on the wiki sample: per-step losses of K ESimCSE steps "
                    "with `--dropout 0` (padded and unpadded paths draw different dropout masks; without dropout "
                    "unsupervised SimCSE's positive is its anchor and a trained encoder's loss is ~0), and STS-B dev "
                    "after K steps of unsupervised SimCSE with dropout (the real recipe).", "",
                    table(["model", "K", "batch", "max per-step loss diff", "tolerance", "loss", "STS-B dev fused / eager",
                           "STS-B diff", "STS-B", "date", "commit"], grows), "", "Reproduce:", ""]
            out += [f"    {c}" for c in gcmds] + [""]
    return out


# ----------------------------------------------------------------------------------------------
# the other benchmarks
# ----------------------------------------------------------------------------------------------


@dataclass
class Source:
    file: str
    title: str
    commands: dict  # "cpu" / "gpu" -> command
    metrics: tuple = ()  # shown metrics, in order (empty: all)
    modes: tuple = ()  # shown modes (empty: all)


SOURCES = [
    Source("infonce.csv", "InfoNCE loss, forward + backward (`bench/bench_infonce.py`)",
           {"cpu": "python -m bench.bench_infonce", "gpu": "python -m bench.bench_infonce --device cuda --dtype bf16 --ceilings"},
           metrics=("time", "throughput", "peak_memory"), modes=("full",)),
    Source("encoder.csv", "Encoder forward + backward per attention backend (`bench/bench_encoder.py`)",
           {"cpu": "python -m bench.bench_encoder --quick", "gpu": "python -m bench.bench_encoder"},
           metrics=("throughput", "latency", "peak_memory")),
    Source("grad_cache.csv", "GradCache (`grad_cache.csv`)", {"cpu": "see bench/gpu_check.sh and the GradCache benchmark"}),
]


def common_schema(rows: list[dict]) -> bool:
    return bool(rows) and {"kernel", "provider", "metric", "p50", "device_name"} <= set(rows[0])


def pivot_section(src: Source, rows: list[dict]) -> list[str]:
    """Common-schema rows: per device, kernel and metric a table of points x providers (newest rows)."""
    out = [f"## {src.title}", ""]
    if not rows:
        return out + [f"Not measured yet: `{src.commands.get('cpu', '')}`.", ""]
    if not common_schema(rows):
        return out + plain_table(rows)
    rows = latest_per_point([r for r in rows if not extra(r).get("quick")], point_key)
    if not any(is_gpu(r["device_name"]) for r in rows):
        out += [f"**GPU: {NOT_ON_GPU}** (`{src.commands.get('gpu', 'bash bench/gpu_check.sh')}`).", ""]
    for device in sorted({r["device_name"] for r in rows}):
        dev = [r for r in rows if r["device_name"] == device]
        cmd = src.commands.get("gpu" if is_gpu(device) else "cpu", "bash bench/gpu_check.sh")
        out += [f"### {device}", "", f"{provenance(dev)}. Reproduce: `{cmd}`", ""]
        for kernel in sorted({r["kernel"] for r in dev}):
            metrics = src.metrics or tuple(sorted({r["metric"] for r in dev if r["kernel"] == kernel}))
            for metric in metrics:
                sel = [r for r in dev if r["kernel"] == kernel and r["metric"] == metric
                       and (not src.modes or r["mode"] in src.modes)]
                if not sel:
                    continue
                providers = sorted({r["provider"] for r in sel})
                points: dict = {}
                for r in sel:
                    e = {k: v for k, v in extra(r).items() if k not in VOLATILE_EXTRA}
                    label = f"{r['mode']} {r['x_name']}={r['x_value']}" + "".join(
                        f" {k}={e[k]}" for k in ("D", "dtype", "shape") if k in e)
                    points.setdefault(label, {})[r["provider"]] = r
                unit = sel[0]["unit"]
                header = ["point", *providers]
                gpu = is_gpu(device)
                if gpu:
                    header.append("prediction")
                body = []
                for label, by_p in points.items():
                    row = [label, *[fmt(by_p[p]["p50"], unit) if p in by_p else "" for p in providers]]
                    if gpu:
                        preds = {extra(r).get("prediction") for r in by_p.values()} - {None}
                        row.append("; ".join(sorted(map(str, preds))) or NO_PREDICTION)
                    body.append(row)
                out += [f"**{kernel}: {metric} ({unit})**", "", table(header, body), ""]
    return out


def plain_table(rows: list[dict], limit: int = 40) -> list[str]:
    cols = list(rows[0])
    shown = rows[-limit:]
    out = [table(cols, [[r.get(c, "") for c in cols] for r in shown]), ""]
    if len(rows) > limit:
        out.insert(0, f"(last {limit} of {len(rows)} rows)")
    return out


def quality_section(rows: list[dict]) -> list[str]:
    out = ["## Training quality from scratch (`bench/results/quality.csv`)", ""]
    if not rows:
        return out + ["Not measured yet: `python -m bench.quality_bar --jobs 2 --plot`.", ""]
    latest = latest_per_point(rows, key=lambda r: (r.get("run"),))
    body = [[r.get("run"), r.get("method"), r.get("seed"), r.get("loss_backend"), r.get("untrained"), r.get("final"),
             r.get("gain"), r.get("best"), r.get("steps"), r.get("device"), r.get("date"), r.get("commit")] for r in latest]
    out += ["STS-B dev Spearman of a random small BERT before and after SimCSE (every run on CPU).", "",
            table(["run", "method", "seed", "loss", "untrained", "final", "gain", "best", "steps", "device", "date",
                   "commit"], body), "",
            f"**GPU: {NOT_ON_GPU}** (a CPU-sized recipe).", "", "Reproduce: `python -m bench.quality_bar --jobs 2 --plot` "
            "(each run's own command is in the CSV's `command` column).", ""]
    return out


def perf_model_section(rows: list[dict]) -> list[str]:
    out = ["## Performance model predictions (`bench/results/perf_model.csv`)", ""]
    if not rows:
        return out + ["None yet: `python -m bench.perf_model`.", ""]
    out += ["Predictions from `bench/perf_model.py` (meta-device traces over the card's ceilings), not measurements; "
            "the newest prediction per card and bar. Reproduce: `python -m bench.perf_model --card h200|h100|a100|cpu`.",
            ""]
    summary = []
    for card in sorted({r["card"] for r in rows}):
        by_bar: dict[str, dict] = {}
        for r in rows:  # the newest prediction of each bar (a run with --only renews some bars alone)
            if r["card"] == card and (r["bar"] not in by_bar or r["date"] >= by_bar[r["bar"]]["date"]):
                by_bar[r["bar"]] = r
        sel = list(by_bar.values())
        dates = sorted({r["date"][:10] for r in sel})
        when = dates[-1] if len(dates) == 1 else f"{dates[0]}..{dates[-1]}"
        commits = ", ".join(dict.fromkeys(r.get("commit", "?") for r in sorted(sel, key=lambda r: r["date"])))
        if card not in FULL_PREDICTION_CARDS and not card.startswith("CPU"):
            counts = {s: sum(r["pass"] == s for r in sel) for s in sorted({r["pass"] for r in sel})}
            summary.append([card, when, commits, ", ".join(f"{n} {s}" for s, n in counts.items())])
            continue
        out += [f"### {card} (predicted {when}, commit {commits})", "",
                table(["bar", "predicted", "target", "status", "detail"],
                      [[r["bar"], fmt(r["predicted"], r.get("unit", "")) if r["predicted"] else "-", r["target"],
                        r["pass"], r["detail"]] for r in sel]), ""]
    if summary:
        out += ["Other cards (the full list: `python -m bench.perf_model --card NAME`):", "",
                table(["card", "predicted", "commit", "bars"], summary), ""]
    return out


def plots_section(results_dir: Path, page_dir: Path) -> list[str]:
    pngs = sorted(results_dir.glob("*.png"))
    out = ["## Plots", ""]
    if not pngs:
        return out + ["None yet (`python -m bench.bench_train --plot-only`, `python -m bench.bench_infonce --plot`, "
                      "`python -m bench.quality_bar --plot`).", ""]
    for p in pngs:
        rel = Path(__import__("os").path.relpath(p, page_dir)).as_posix()
        out += [f"![{p.stem}]({rel})", ""]
    return out


def build_page(results_dir: Path = RESULTS_DIR, page_dir: Path | None = None, *, include_quick: bool = False) -> str:
    """The page's text; ``include_quick`` keeps the rows of ``--quick`` runs (tests, CI)."""
    page_dir = page_dir or results_dir.parent
    out = ["# fastcse benchmark results", "",
           "Generated by `python -m bench.results_page` from the CSVs in `bench/results/`; edit those (by running "
           "the benchmarks), not this page. Figures are the newest run of each point per device; every table says "
           "which command reproduces it. CPU figures come from shared 2-core machines: compare only rows of one "
           "run (the load average is recorded with them).", ""]
    files = sorted(p.name for p in results_dir.glob("*.csv")) if results_dir.is_dir() else []
    out += ["Sources: " + (", ".join(f"`{f}`" for f in files) or "none yet") + ".", ""]
    out += train_section(read_csv(results_dir / "train.csv"), include_quick)
    out += quality_section(read_csv(results_dir / "quality.csv"))
    for src in SOURCES:
        out += pivot_section(src, read_csv(results_dir / src.file))
    known = {"train.csv", "quality.csv", "perf_model.csv"} | {s.file for s in SOURCES}
    for name in files:
        if name in known:
            continue
        src = Source(name, f"`{name}`", {"cpu": "bash bench/gpu_check.sh", "gpu": "bash bench/gpu_check.sh"})
        out += pivot_section(src, read_csv(results_dir / name))
    out += perf_model_section(read_csv(results_dir / "perf_model.csv"))
    out += plots_section(results_dir, page_dir)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--out", default=str(PAGE), help="the page to write ('-': print it)")
    ap.add_argument("--include-quick", action="store_true", help="keep the rows of --quick runs")
    args = ap.parse_args(argv)
    page_dir = Path(args.out).resolve().parent if args.out != "-" else args.results_dir.resolve().parent
    text = build_page(args.results_dir, page_dir, include_quick=args.include_quick)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()
