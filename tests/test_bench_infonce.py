"""Smoke test of the InfoNCE benchmark: it runs, writes well-formed rows, and plots them."""

from __future__ import annotations

import csv
import json

import pytest

from bench import bench_infonce
from bench._common import CSV_COLUMNS


def test_benchmark_appends_rows_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "infonce.csv"
    bench_infonce.main(["--device", "cpu", "--ns", "32,64", "--dims", "16", "--reps", "1",
                        "--providers", "eager,chunked,triton", "--csv", str(out)])
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    # 2 N x 3 providers x 3 modes: time + throughput each, peak memory for fwd and full
    assert len(rows) == 2 * 3 * (3 * 2 + 2)
    for row in rows:
        assert float(row["p50"]) > 0, row
        cfg = json.loads(row["extra_config"])
        assert cfg["M"] == 2 * cfg["N"] and cfg["D"] == 16
        assert row["device_name"].startswith("CPU") and row["commit"]
    peaks = {(r["provider"], int(r["x_value"])): float(r["p50"]) for r in rows
             if r["metric"] == "peak_memory" and r["mode"] == "full"}
    # the eager provider materialises the N x 2N logits; chunked with the default chunk does too at
    # these tiny sizes, so only check that memory grows with N
    assert peaks[("eager", 64)] > peaks[("eager", 32)]
    pngs = bench_infonce.plot(str(out))
    assert pngs and all(p.exists() and p.stat().st_size > 0 for p in pngs)


def test_a_cut_run_keeps_every_point_it_finished(tmp_path, monkeypatch):
    """Rows reach the CSV as each point is measured: a run stopped on its third point (as a
    timeout's SIGINT stops it) leaves the first two points' rows, whole, in the file."""
    out = tmp_path / "cut.csv"
    real = bench_infonce._bench_mode
    calls = []

    def bench_mode(*args, **kwargs):
        calls.append(args[:2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_infonce, "_bench_mode", bench_mode)
    with pytest.raises(KeyboardInterrupt):
        bench_infonce.main(["--device", "cpu", "--ns", "16", "--dims", "8", "--reps", "1",
                            "--providers", "eager,chunked", "--modes", "fwd,full", "--csv", str(out)])
    with out.open() as f:
        rows = list(csv.DictReader(f))
    # two points (eager fwd, eager full), each: time, throughput, peak memory
    assert [(r["provider"], r["mode"], r["metric"]) for r in rows] == [
        ("eager", mode, metric) for mode in ("fwd", "full") for metric in ("time", "throughput", "peak_memory")]
    assert all(json.loads(r["extra_config"])["timing"] == "wall" for r in rows)
