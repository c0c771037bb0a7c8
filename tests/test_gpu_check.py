"""bench/gpu_check.sh and its plumbing: the plan fits the device window, the CPU dry run produces
what a GPU run sends back (at most 8 files, 2 folders deep, the table last), the report turns
GPU-shaped CSVs into the right bars, and the timing methods of bench/_common.py."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_report
from bench._common import CSV_COLUMNS, append_rows, csv_path, make_row, read_rows, time_fn, timing_methods

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
EXPECTED_FILES = {"gpu_check.log", "ceilings.json", "infonce.csv", "rope.csv", "biased_attention.csv",
                  "encoder.csv", "train.csv", "report.json"}
TABLE_HEAD = re.compile(r"^bar\s+\| predicted \|\s+measured \|\s+target \| model err \| result$")
RESULT = re.compile(r"\| (PASS|FAIL|no measurement.*)$")


def _plan() -> tuple[dict[str, int], int]:
    out = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=30, check=True)
    steps = {m.group(1): int(m.group(2)) for m in re.finditer(r"^step (\S+)\s+(\d+) s$", out.stdout, re.M)}
    total = int(re.search(r"^total (\d+) s in (\d+) steps", out.stdout, re.M).group(1))
    return steps, total


def test_plan_fits_the_device_window():
    steps, total = _plan()
    assert sum(steps.values()) == total <= 450, steps
    # the bars before the tests, the report last, every kernel/model test file on the card
    names = list(steps)
    assert names[0] == "install" and names[1] == "ceilings" and names[-1] == "report"
    first_test = min(i for i, n in enumerate(names) if n.startswith("tests_"))
    assert all(not n.startswith("tests_") for n in names[:first_test])
    assert all(n.startswith("tests_") for n in names[first_test:-1])
    text = SCRIPT.read_text()
    for test_file in ("test_infonce.py", "test_rope.py", "test_biased_attention.py", "test_biased_models.py",
                      "test_rope_models.py", "test_encoder.py"):
        assert f"tests/{test_file}" in text
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\bpython(?!3)\b", code), "the device image has python3 only"
    # every timeout in the script sends SIGINT first and SIGKILL 10 s later
    calls = re.findall(r"(?<![\w-])timeout\s+[-\d][^\n]*", code)
    assert calls == ['timeout -s INT -k 10 "$t" "${RESET_INT[@]}" "$@"'], calls


def test_fallback_without_an_install_maps_fastcse_kernels(tmp_path):
    """The script's fallback when `pip install -e .` fails on the card: PYTHONPATH=<checkout> plus
    the sitecustomize.py of kernels_finder(), run from the repository root (where its own fastcse/
    folder comes first on sys.path and has no kernels/)."""
    text = SCRIPT.read_text()
    function = re.search(r"^kernels_finder\(\) \{\n.*?^\}\n", text, re.M | re.S).group(0)
    probe = ("import sys, fastcse, fastcse.kernels.rope as rope, fastcse.rotary; "
             "print(type(sys.meta_path[0]).__name__, fastcse.__file__, rope.__file__)")
    shell = f'{function}\nREPO="{REPO}"\nroot=$(kernels_finder)\nPYTHONPATH="$root:$REPO" "{sys.executable}" -c "{probe}"'
    done = subprocess.run(["bash", "-c", shell], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    finder, fastcse_file, rope_file = done.stdout.split()
    assert finder == "_FastcseKernels"
    assert Path(fastcse_file) == REPO / "fastcse" / "__init__.py" and Path(rope_file) == REPO / "kernels" / "rope.py"


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_dry_run_sends_back_what_a_gpu_run_would(tmp_path):
    """The whole script on CPU (tiny sizes, Triton's interpreter, pytest --collect-only)."""
    out = tmp_path / "out"
    results = REPO / "bench" / "results"
    before = set(results.rglob("*")) if results.exists() else set()
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["OUT"] = str(out)
    t0 = time.perf_counter()
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    print(f"dry run: {seconds:.0f} s")

    # what comes back: at most 8 files, at most 2 folders deep (here: exactly these, flat)
    files = _files_under(out)
    assert {p.name for p in files} == EXPECTED_FILES and len(files) <= 8
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)
    assert (set(results.rglob("*")) if results.exists() else set()) == before, "the dry run wrote into bench/results"

    # the card file perf_model --card reads
    card = json.loads((out / "ceilings.json").read_text())
    assert set(card["matmul_tflops"]) == {"bf16", "fp16", "fp32"} and card["gpu"] is False
    assert card["copy_gbps"] > 0 and card["launch_us"] > 0 and card["name"].startswith("CPU")
    if (REPO / "bench" / "perf_model.py").exists():
        from bench import perf_model

        loaded = perf_model.load_card(str(out / "ceilings.json"))
        assert loaded.gpu is False and loaded.copy_gbps == pytest.approx(card["copy_gbps"])

    # every benchmark wrote rows into $OUT, each timed row saying how it was timed
    for name in ("infonce.csv", "rope.csv", "biased_attention.csv", "encoder.csv"):
        rows = read_rows(out / name)
        assert rows and list(rows[0]) == CSV_COLUMNS, name
        timed = [r for r in rows if r["metric"] in ("time", "latency")]
        assert timed and all(json.loads(r["extra_config"])["timing"] == "wall" for r in timed), name
    rope = read_rows(out / "rope.csv")
    assert {r["provider"] for r in rope} == {"eager", "triton", "copy"}
    loss = read_rows(out / "infonce.csv")
    assert {json.loads(r["extra_config"])["N"] for r in loss} == {32, 64, 128}

    # each step of the plan ran, under its dry timeout, and finished
    log = (out / "gpu_check.log").read_text()
    steps, _ = _plan()
    for step in steps:
        assert re.search(rf"^=== {step} \(timeout \d+ s", log, re.M), step
    assert not re.search(r"^=== \S+: (cut at its|failed)", log, re.M)
    assert re.search(r"^tests/test_encoder.py: \d+$", log, re.M)  # collected, not "no tests ran"

    # the last lines are the table: header, rule, one row per bar, a count
    lines = done.stdout.rstrip("\n").splitlines()
    head = max(i for i, line in enumerate(lines) if TABLE_HEAD.match(line))
    rows, summary = lines[head + 2:-1], lines[-1]
    assert rows and all(RESULT.search(line) for line in rows), rows
    n_pass, n_fail = sum(" | PASS" in r for r in rows), sum(" | FAIL" in r for r in rows)
    assert summary == (f"{len(rows)} bars: {n_pass} PASS, {n_fail} FAIL, "
                       f"{len(rows) - n_pass - n_fail} without a measurement")
    assert n_pass + n_fail > 0 and len(rows) - n_pass - n_fail > 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["bars"]) == len(rows)
    assert report["text"].rstrip("\n").splitlines()[-1] == summary
    assert (out / "gpu_check.log").read_text().rstrip("\n").splitlines()[-1] == summary


# --- the report on GPU-shaped rows ----------------------------------------------------------------


def _loss_rows(n, provider, mode, ms, peak_mib=None, oom=False):
    cfg = {"N": n, "M": 2 * n, "D": 768, "dtype": "bfloat16", "timing": "sync"}
    if oom:
        return [make_row(kernel="infonce", provider=provider, mode=mode, metric="time", unit="ms", x_name="N",
                         x_value=n, p50=math.nan, extra_config={**cfg, "oom": True})]
    rows = [make_row(kernel="infonce", provider=provider, mode=mode, metric="time", unit="ms", x_name="N",
                     x_value=n, p50=ms, extra_config=cfg)]
    if peak_mib is not None:
        rows.append(make_row(kernel="infonce", provider=provider, mode=mode, metric="peak_memory", unit="MiB",
                             x_name="N", x_value=n, p50=peak_mib, extra_config=cfg))
    return rows


def _rope_rows():
    shape = dict(batch=8, seqlen=4096, heads_q=32, heads_k=32, head_dim=128, dtype="bf16", layout="half")
    moved = 4 * 2 * (8 * 4096 * 32 * 128) * 2 + 2 * 2 * 4096 * 64 * 2
    rows = []
    for provider, ms in (("eager", {"graph": 6.0, "sync": 6.1}), ("triton", {"graph": 0.5, "sync": 0.6})):
        for timing, t in ms.items():
            cfg = dict(shape, bytes=moved, timing=timing)
            for metric, unit, value in (("time", "ms", t), ("bandwidth", "GB/s", moved / t / 1e6)):
                rows.append(make_row(kernel="rope", provider=provider, mode="full", metric=metric, unit=unit,
                                     x_name="seqlen", x_value=4096, p50=value, extra_config=cfg))
    for timing, gbs in (("graph", 4000.0), ("sync", 3900.0)):
        rows.append(make_row(kernel="rope", provider="copy", mode="copy", metric="bandwidth", unit="GB/s",
                             x_name="bytes", x_value=1, p50=gbs, extra_config={"bytes": 1, "timing": timing}))
    return rows, moved


def test_report_turns_gpu_rows_into_bars(tmp_path):
    loss = (_loss_rows(4096, "eager", "full", 2.0, 200.0) + _loss_rows(4096, "triton", "full", 1.5, 250.0)
            + _loss_rows(4096, "eager", "fwd", 0.5, 50.0) + _loss_rows(4096, "triton", "fwd", 0.6, 10.0)
            + _loss_rows(32768, "eager", "full", 0, oom=True) + _loss_rows(32768, "triton", "full", 40.0, 800.0)
            + _loss_rows(262144, "triton", "full", 900.0, 6000.0))
    append_rows(tmp_path / "infonce.csv", loss)
    rope, moved = _rope_rows()
    append_rows(tmp_path / "rope.csv", rope)
    bars = {b.bar: b for b in gpu_report.measured_bars(tmp_path, None)}

    t = bars["loss triton/eager time, fwd+bwd, bfloat16, N=4096"]
    assert t.value == pytest.approx(0.75) and gpu_report.judge(t.value, t.target, t.cmp)
    f = bars["loss triton/eager time, no-grad forward, bfloat16, N=4096"]
    assert f.value == pytest.approx(1.2) and not gpu_report.judge(f.value, f.target, f.cmp)
    m = bars["loss triton memory above inputs, fwd+bwd, bfloat16, N=4096"]
    assert (m.value, m.target, m.cmp) == (250.0, 200.0, "<")
    # eager out of memory: the fused loss wins both the time and the memory bar, and says why
    oom_time = bars["loss triton/eager time, fwd+bwd, bfloat16, N=32768"]
    assert oom_time.value == 0.0 and "eager out of memory" in oom_time.detail
    assert math.isinf(bars["loss memory eager/triton, fwd+bwd, bfloat16, N=32768"].value)
    assert "loss triton memory above inputs, fwd+bwd, bfloat16, N=32768" not in bars
    fits = bars["loss triton N=262144 fwd+bwd fits in 80 GB"]
    assert fits.value == pytest.approx((3 * 262144 * 768 * 2 + 6000 * 2**20) / 1e9)

    # rotary: judged on graph (device) time, copy timed the same way; sync shown in the detail
    speed = bars["rotary eager/fused time, bf16 (8, 4096, 32, 128) q+k fwd+bwd"]
    assert speed.value == pytest.approx(12.0) and "graph" in speed.detail and "sync" in speed.detail
    bw = bars["rotary fused bandwidth / copy bandwidth, bf16 (8, 4096, 32, 128) q+k fwd+bwd"]
    assert bw.value == pytest.approx(moved / 0.5 / 1e6 / 4000.0)

    # the join with the model's bars: by name; unmatched on either side still get a row
    predicted = [{"bar": speed.bar, "predicted": 6.0, "target": 5.0, "cmp": ">=", "unit": "x", "pass": True},
                 {"bar": "a bar nobody measured", "predicted": 1.0, "target": 2.0, "cmp": "<=", "unit": "x"}]
    table = gpu_report.assemble(predicted, list(bars.values()))
    assert table[0]["result"] == "PASS" and table[0]["model_error"] == pytest.approx(6.0 / 12.0 - 1)
    assert table[1]["result"] == "no measurement" and table[1]["measured"] is None
    assert len(table) == len(bars) + 1
    text = gpu_report.format_table(table)
    assert TABLE_HEAD.match(text.splitlines()[0])

    # every bar measured here has a bar of the same name in the performance model (names only:
    # bar_specs traces nothing) and a committed prediction under that name (what a card run reads)
    if (REPO / "bench" / "perf_model.py").exists():
        from bench import perf_model

        names = {name for name, _ in perf_model.bar_specs(perf_model.CARDS["h200"])}
        missing = [b for b in bars if b not in names]
        assert not missing, f"bars the model names differently: {missing}"
        committed, note = gpu_report.predictions(None)
        assert committed and "perf_model.csv" in note, note
        stale = [b for b in bars if b not in {p["bar"] for p in committed}]
        assert not stale, f"no committed prediction (run python -m bench.perf_model --card h200): {stale}"


def test_committed_predictions_cover_every_bar_of_the_model():
    """The card run joins its measurements to the predictions committed in bench/results/perf_model.csv:
    each bar the model has for the H200 must have one there, under its current name."""
    pytest.importorskip("bench.perf_model")
    from bench import perf_model

    names = [name for name, _ in perf_model.bar_specs(perf_model.CARDS["h200"])]
    committed, note = gpu_report.committed_predictions("NVIDIA H200")
    have = {p["bar"] for p in committed}
    missing = [n for n in names if n not in have]
    assert not missing, f"regenerate with python -m bench.perf_model --card h200: {missing}"
    by_name = {p["bar"]: p for p in committed}
    for n in names:  # a prediction's verdict is its figure against its target, as the model judged it
        p = by_name[n]
        if p["predicted"] is not None and p["pass"] is not None:
            assert p["pass"] == gpu_report.judge(p["predicted"], p["target"], p["cmp"]), p


def test_report_turns_gpu_training_steps_into_the_step_bars(tmp_path):
    """bench_train's CUDA rows (train.csv) become issue #12's step bars, under the model's names;
    CPU rows of the same shape are not GPU figures and stay out."""
    pytest.importorskip("bench.perf_model")
    rows = []
    for device_label, scale in (("NVIDIA H200", 1.0), ("CPU Intel(R) Xeon(R) Processor (2 threads)", 0.01)):
        for batch, per_s, peaks in ((64, {"fused": 9000.0, "eager": 3000.0, "st": 7000.0}, None),
                                    (512, {"fused": 20000.0, "eager": 12000.0},
                                     {"fused": 4 * 2**30, "eager": 10 * 2**30})):
            for path, v in per_s.items():
                row = make_row(kernel="train_bert-base", provider=path, mode="unsup", metric="sentences_per_s",
                               unit="sentences/s", x_name="batch", x_value=batch, p50=v * scale)
                rows.append(dict(row, device_name=device_label))
            for path, v in (peaks or {}).items():
                row = make_row(kernel="train_bert-base", provider=path, mode="unsup", metric="peak_memory",
                               unit="bytes", x_name="batch", x_value=batch, p50=float(v))
                rows.append(dict(row, device_name=device_label))
    append_rows(tmp_path / "train.csv", rows)
    bars = {b.bar: b for b in gpu_report.measured_bars(tmp_path, None)}
    eager64 = bars["step BERT-base unsup SimCSE 64 wiki sentences: fused vs eager sentences/s, bf16 (predicted)"]
    assert eager64.value == pytest.approx(3.0) and gpu_report.judge(eager64.value, eager64.target, eager64.cmp)
    st64 = bars["step BERT-base unsup SimCSE 64 wiki sentences: fused vs st (MNRL) sentences/s, bf16 (predicted)"]
    assert st64.value == pytest.approx(9 / 7) and not gpu_report.judge(st64.value, st64.target, st64.cmp)
    eager512 = bars["step BERT-base unsup SimCSE 512 wiki sentences: fused vs eager sentences/s, bf16 (predicted)"]
    assert eager512.value == pytest.approx(20 / 12) and not gpu_report.judge(eager512.value, 2.0, ">=")
    memory = bars["step BERT-base unsup SimCSE 512 wiki sentences: peak memory fused / eager, bf16 (predicted)"]
    assert memory.value == pytest.approx(0.4) and memory.cmp == "<=" and gpu_report.judge(0.4, memory.target, "<=")
    # no supervised rows were written: those bars have no measurement (only the model's row)
    assert not any("triplets" in name for name in bars)


def test_report_without_any_results(tmp_path):
    """A run cut before any benchmark still ends in a table, every bar without a measurement."""
    text = gpu_report.report(tmp_path, ["install rc=124 20s"], perf_timeout=120)
    lines = text.splitlines()
    assert "install rc=124 20s" in text and "no ceilings.json" in text
    assert re.match(r"^\d+ bars: 0 PASS, 0 FAIL, \d+ without a measurement$", lines[-1])
    assert json.loads((tmp_path / "report.json").read_text())["text"] == text


# --- bench/_common.py plumbing ---------------------------------------------------------------------


def test_csv_names_and_paths(tmp_path):
    assert csv_path("rope.csv") == REPO / "bench" / "results" / "rope.csv"
    assert csv_path(tmp_path / "a.csv") == tmp_path / "a.csv"
    assert csv_path("out/a.csv") == Path("out/a.csv")
    path = tmp_path / "deep" / "x.csv"
    append_rows(path, [make_row(kernel="k", provider="p", mode="fwd", metric="time", unit="ms", x_name="n",
                                x_value=1, p50=2.0)])
    append_rows(path, [make_row(kernel="k", provider="p", mode="fwd", metric="time", unit="ms", x_name="n",
                                x_value=2, p50=3.0)])
    rows = read_rows(path)
    assert [r["x_value"] for r in rows] == ["1", "2"] and path.read_text().count("kernel,provider") == 1


def test_timing_methods_on_cpu_are_one_wall_clock():
    x = torch.randn(64, 64)
    for method in ("sync", "device", "graph"):
        t = time_fn(lambda: x @ x, "cpu", warmup=1, reps=3, method=method)
        assert t.method == "wall" and len(t.samples) == 3 and t.p20 <= t.p50 <= t.p80
    assert timing_methods("graph,sync") == ["graph", "sync"]
    with pytest.raises(Exception, match="--timing"):
        timing_methods("graph,events")
    with pytest.raises(ValueError, match="timing method"):
        time_fn(lambda: None, "cpu", method="events")


@pytest.mark.cuda
def test_queued_timing_hides_host_work_on_cuda():
    """Half a millisecond of host work per call: in the 'sync' figure, not in 'device' or 'graph'."""
    x = torch.randn(1 << 20, device="cuda")

    def call():
        time.sleep(0.0005)
        x.mul_(1.0001)

    sync = time_fn(call, "cuda", reps=20, method="sync")
    device = time_fn(call, "cuda", reps=20, method="device")
    graph = time_fn(call, "cuda", reps=20, method="graph")
    assert sync.method == "sync" and device.method == "device" and graph.method == "graph", graph.note
    assert sync.p50 > 0.5
    assert device.p50 < 0.25 and graph.p50 < 0.25, (sync, device, graph)
    assert not device.note and not graph.note


def test_gpu_report_cli_ceilings(tmp_path):
    out = tmp_path / "ceilings.json"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_report", "ceilings", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == json.loads(done.stdout)
