"""bench/bench_train.py end to end at CI size, and bench/results_page.py on what it writes.

One ``--quick`` run (tiny BERT, paths fused and eager, the unsupervised shape, the quality gate)
in a subprocess, so its thread setting and seeds stay out of this process; then checks of the CSV
rows it appended, of the gate's figures against their own definitions, and of the page built from
that CSV (and from an empty folder: every CSV is optional).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import results_page

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("fused", "eager")
METRICS = {"sentences_per_s", "tokens_per_s", "step_time", "mfu", "peak_memory"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_train")
    out = tmp / "results" / "train.csv"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "bench.bench_train", "--quick", "--models", "tiny-bert", "--shapes", "unsup",
           "--paths", *PATHS, "--csv", str(out), "--work-dir", str(tmp / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, proc.stdout, out


def test_speed_rows(quick_run):
    rows, stdout, _ = quick_run
    speed = [r for r in rows if r["mode"] == "unsup"]
    for path in PATHS:
        got = {r["metric"]: r for r in speed if r["provider"] == path}
        assert set(got) == METRICS, (path, sorted(got))
        for r in got.values():
            value = float(r["p50"])
            assert math.isfinite(value) and value > 0, r
            assert float(r["p20"]) <= value <= float(r["p80"]) or r["metric"] in ("mfu", "peak_memory"), r
            assert r["kernel"] == "train_tiny-bert" and r["x_name"] == "batch" and r["x_value"] == "16"
            for col in ("device_name", "timestamp", "version", "commit"):
                assert r[col], (col, r)
            extra = json.loads(r["extra_config"])
            assert len(extra["load"]) == 2 and extra["command"].startswith("python -m bench.bench_train")
            assert extra["steps"] == 2 and extra["quick"] is True
        # the figures are each other's: sentences/s = batch / median step time
        step_ms = float(got["step_time"]["p50"])
        assert float(got["sentences_per_s"]["p50"]) == pytest.approx(16 / (step_ms / 1e3), rel=1e-9)
        tokens = json.loads(got["tokens_per_s"]["extra_config"])["real_tokens_per_step"]
        assert float(got["tokens_per_s"]["p50"]) == pytest.approx(tokens / (step_ms / 1e3), rel=1e-3)
    fused = json.loads(next(r for r in speed if r["provider"] == "fused")["extra_config"])
    eager = json.loads(next(r for r in speed if r["provider"] == "eager")["extra_config"])
    assert (fused["attn_backend"], fused["loss_backend"]) == ("varlen", "chunked")
    assert (eager["attn_backend"], eager["loss_backend"]) == ("eager", "eager")
    ratio = next(r for r in rows if r["metric"] == "ratio_sentences_per_s")
    assert ratio["provider"] == "fused/eager"
    sent = {r["provider"]: float(r["p50"]) for r in speed if r["metric"] == "sentences_per_s"}
    assert float(ratio["p50"]) == pytest.approx(sent["fused"] / sent["eager"], rel=1e-9)
    assert "| tiny-bert | unsup | 16 | fused |" in stdout


def test_quality_gate_rows(quick_run):
    rows, stdout, _ = quick_run
    gate = {r["metric"]: r for r in rows if r["mode"] == "quality"}
    assert set(gate) == {"loss_max_diff", "stsb_diff"}
    g = json.loads(gate["loss_max_diff"]["extra_config"])
    assert g["steps"] == 3 and len(g["losses_eager"]) == len(g["losses_fused"]) == len(g["loss_tolerance"]) == 3
    diffs = [abs(a - b) for a, b in zip(g["losses_fused"], g["losses_eager"])]
    assert float(gate["loss_max_diff"]["p50"]) == pytest.approx(max(diffs), abs=1e-12)
    assert g["loss_pass"] == all(d <= t for d, t in zip(diffs, g["loss_tolerance"]))
    assert all(math.isfinite(x) and x > 0 for x in g["losses_eager"])
    # the two trajectories really trained (the loss moved) and agree: fp32 on CPU
    assert g["loss_pass"] and g["tolerance_rule"].startswith("fp32")
    assert float(gate["stsb_diff"]["p50"]) == pytest.approx(abs(g["stsb_fused"] - g["stsb_eager"]))
    assert g["stsb_pass"] == (g["stsb_diff"] <= 0.5) and g["stsb_pass"]
    assert g["pass"] is True
    assert "quality gate tiny-bert" in stdout and "PASS" in stdout


def test_results_page(quick_run, tmp_path):
    _, _, csv_file = quick_run
    page = results_page.build_page(csv_file.parent, include_quick=True)
    assert "not yet measured on a GPU" in page
    assert "| tiny-bert | unsup | 16 | fused |" in page
    assert "python -m bench.bench_train --models tiny-bert --shapes unsup --quick" in page
    assert "Quality gate" in page and "PASS" in page
    # quick rows are CI figures: the published page leaves them out
    assert "| tiny-bert | unsup | 16 | fused |" not in results_page.build_page(csv_file.parent)
    empty = results_page.build_page(tmp_path)
    assert "Not measured yet" in empty and "## Plots" in empty


def test_plot(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    from bench.bench_train import plot

    _, _, csv_file = quick_run
    written = plot(csv_file, out_dir=tmp_path)
    assert len(written) == 1 and written[0].stat().st_size > 0


def test_results_page_keeps_the_newest_prediction_of_every_bar():
    """A perf_model run with --only renews some bars: the page must keep every bar, each at its
    newest prediction, not only the bars of the newest run."""
    from bench import results_page

    def row(date, commit, bar, predicted, status):
        return {"date": date, "commit": commit, "card": "NVIDIA H200", "bar": bar, "predicted": predicted,
                "target": ">= 1.5", "unit": "x", "pass": status, "detail": ""}

    rows = [row("2026-12-01T10:00:00+00:00", "aaa", "bar one", "1.2", "FAIL"),
            row("2026-12-01T10:00:00+00:00", "aaa", "bar two", "2.0", "PASS"),
            row("2026-12-02T09:00:00+00:00", "bbb", "bar one", "1.6", "PASS")]
    text = "\n".join(results_page.perf_model_section(rows))
    assert "| bar one | 1.60x | >= 1.5 | PASS |" in text and "1.20x" not in text
    assert "| bar two | 2.00x | >= 1.5 | PASS |" in text
    assert "predicted 2026-12-01..2026-12-02, commit aaa, bbb" in text
