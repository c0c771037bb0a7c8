"""A DeBERTa-v2 shape trained a few steps under ZeRO-3 on 2 CPU ranks (gloo): measured peak resident
memory per rank and step time against ``fastcse.plan`` (issue #14's CPU benchmark run; not CI).

    python bench/bench_scale.py --shape xlarge --batch 8 --seq 32 [--offload | --ds-file F] [--precision fp32]

Launches ``deepspeed --num_gpus 2`` on this file as the worker: each rank runs ``fastcse.train.main``
(random init from the shape's config, the bundled wiki sample, ``--precision bf16`` by default, and
``--gradient-checkpointing``) and records ``/proc/self/status`` VmRSS right after importing torch /
deepspeed / transformers / fastcse (the baseline) and VmHWM (peak RSS) after the last step. On a CPU
without bf16 matrix units (AVX2 only) bf16 GEMMs run about 100x slower than fp32 (0.5 vs 41
GFLOP/s per core measured on an AMD EPYC, 2026-12-02): use ``--precision fp32`` there. The final
checkpoint is not written (``Trainer.save`` is replaced by the recording: a 900M ZeRO-3 checkpoint
is 14 GB of disk writes and not what is measured). A watchdog stops the run when the machine's
MemAvailable falls below ``--min-available-gb`` (other people's jobs share it).

Compared: the planner's per-rank figure for the same DeepSpeed file, precision and ``--device cpu``
(``total_gb``, plus the host-side states ``cpu_gb_per_node / 2`` when offloaded) against VmHWM
minus the baseline (the planner models tensors, not the interpreter and libraries). Results go to
``bench/results/scale_cpu.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
CSV = ROOT / "bench" / "results" / "scale_cpu.csv"

_DEBERTA = {"model_type": "deberta-v2", "attention_head_size": 64, "vocab_size": 128100, "hidden_act": "gelu",
            "max_position_embeddings": 512, "type_vocab_size": 0, "position_biased_input": False,
            "relative_attention": True, "position_buckets": 256, "max_relative_positions": -1,
            "pos_att_type": ["p2c", "c2p"], "norm_rel_ebd": "layer_norm", "share_att_key": True,
            "conv_kernel_size": 3, "conv_act": "gelu", "layer_norm_eps": 1e-7}
# microsoft/deberta-v2-xlarge (about 900M) and microsoft/deberta-v3-large's shape (about 435M)
SHAPES = {
    "xlarge": dict(_DEBERTA, hidden_size=1536, num_hidden_layers=24, num_attention_heads=24, intermediate_size=6144),
    "large": dict(_DEBERTA, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "tiny": dict(_DEBERTA, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, attention_head_size=16,
                 intermediate_size=256),  # smoke
}


def _status_kb(field: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise KeyError("MemAvailable")


def _tensor_census(top: int = 12) -> dict:
    """Every tensor storage the process holds (found through the garbage collector, views of one
    storage counted once): total GB, and the largest storages with a tensor's shape and dtype. What
    RSS holds beyond this is the allocator's and the libraries' (and glibc's retained heap)."""
    import gc

    import torch

    storages: dict = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu" or obj.is_meta:
                continue
            st = obj.untyped_storage()
        except Exception:  # noqa: BLE001 (some tensor subclasses refuse storage access)
            continue
        key = st.data_ptr()
        if key and key not in storages:
            storages[key] = (st.nbytes(), f"{tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}")
    biggest = sorted(storages.values(), key=lambda v: -v[0])[:top]
    return {"total_gb": round(sum(n for n, _ in storages.values()) / 1e9, 3), "storages": len(storages),
            "largest": [(round(n / 1e9, 3), what) for n, what in biggest]}


# ------------------------------------------------------------------------------------------------
# the worker (each rank)
# ------------------------------------------------------------------------------------------------

def _worker(argv: list[str]) -> int:
    import deepspeed  # noqa: F401  (the baseline includes every library the run imports)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import fastcse.train

    rank = int(os.environ.get("RANK", "0"))
    out = Path(argv[argv.index("--output-dir") + 1])
    baseline_kb = _status_kb("VmRSS")
    record = {"rank": rank, "baseline_rss_kb": baseline_kb}

    def save(self):  # after the last step: the peak of training, without the checkpoint's writes
        record["hwm_kb"] = _status_kb("VmHWM")
        record["rss_kb"] = _status_kb("VmRSS")

    fastcse.train.Trainer.save = save
    # where the peak comes from: VmHWM / VmRSS after the build, after the engine's set-up, after each step
    record["stages"] = stages = []
    real_build, real_setup, real_step = fastcse.train.build_encoder, fastcse.train.Trainer.setup, fastcse.train.Trainer.train_step

    def mark(name):
        stages.append({"at": name, "hwm_kb": _status_kb("VmHWM"), "rss_kb": _status_kb("VmRSS")})
        if name in ("engine", "step 1"):
            stages[-1]["tensors"] = _tensor_census()
        # kept on disk as it goes: a run the watchdog stops still shows where its memory went
        out.mkdir(parents=True, exist_ok=True)
        (out / f"marks-rank{rank}.json").write_text(json.dumps(  # (where, VmHWM GB, VmRSS GB)
            [(s["at"], round(s["hwm_kb"] * 1024 / 1e9, 2), round(s["rss_kb"] * 1024 / 1e9, 2)) for s in stages]))

    def build(*a, **k):
        encoder = real_build(*a, **k)
        mark("built")
        return encoder

    def setup(self):
        real_setup(self)
        mark("engine")

    def train_step(self, *a, **k):
        out = real_step(self, *a, **k)
        mark(f"step {len([s for s in stages if s['at'].startswith('step')]) + 1}")
        return out

    import fastcse.step

    real_backward, real_opt_step = fastcse.step.DeepSpeedStep.backward, fastcse.step.DeepSpeedStep.step

    def backward(self, *a, **k):  # the forward's peak, then the backward's (VmHWM only grows)
        mark("forward")
        real_backward(self, *a, **k)
        mark("backward")

    def opt_step(self, *a, **k):
        out = real_opt_step(self, *a, **k)
        mark("optimizer")
        return out

    fastcse.step.DeepSpeedStep.backward, fastcse.step.DeepSpeedStep.step = backward, opt_step
    fastcse.train.build_encoder, fastcse.train.Trainer.setup = build, setup
    fastcse.train.Trainer.train_step = train_step
    rc = fastcse.train.main(argv)
    record["rc"] = rc
    (out / f"memory-rank{rank}.json").write_text(json.dumps(record))
    return rc


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------

def _plan(config: Path, ds_file: str, args) -> dict:
    cmd = [sys.executable, "-m", "fastcse.plan", "--model", str(config), "--gpus", "2", "--gpu-mem", "24",
           "--batch", str(args.batch), "--seq", str(args.seq), "--ds", ds_file, "--checkpointing",
           "--precision", args.precision, "--device", "cpu", "--json"]
    rows = json.loads(subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    row = next(r for r in rows if r["gpus"] == 2)
    row["command"] = " ".join(["python", "-m", "fastcse.plan"] + cmd[3:])
    return row


def append_csv(result: dict) -> None:
    import deepspeed
    import torch
    import transformers

    ranks, steps, plan, planned = result["ranks"], result["steps"], result["plan"], result["planned_gb"]
    batch, n = result["batch"], len(result["steps"])
    step_s = [batch / r["sentences_per_s"] for r in steps]
    measured = [(r["hwm_kb"] - r["baseline_rss_kb"]) * 1024 / 1e9 for r in ranks]
    row = {"date": result["date"], "commit": result["commit"],
           "device": f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} threads, "
                     f"{_status_total_gb():.1f} GB RAM",
           "torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
           "shape": f"deberta-v2-{result['shape']}", "ranks": 2, "ds_config": result["config"],
           "malloc_mmap_threshold": result.get("malloc_mmap_threshold", "glibc default"), "precision": result.get("precision", "bf16"),
           "checkpointing": 1, "batch": batch, "seq": result["seq"], "steps": n,
           "step_s_first": round(step_s[0], 2), "step_s_rest_mean": round(sum(step_s[1:]) / max(1, n - 1), 2),
           "hwm_gb_rank0": round(ranks[0]["hwm_kb"] * 1024 / 1e9, 3),
           "hwm_gb_rank1": round(ranks[1]["hwm_kb"] * 1024 / 1e9, 3),
           "baseline_gb_rank0": round(ranks[0]["baseline_rss_kb"] * 1024 / 1e9, 3),
           "baseline_gb_rank1": round(ranks[1]["baseline_rss_kb"] * 1024 / 1e9, 3),
           "measured_gb_max": round(max(measured), 3), "planned_gb": round(planned, 3),
           "planned_vs_measured": round((planned - max(measured)) / max(measured), 4),
           "plan_states_gb": plan["model_states_gb"], "plan_cpu_gb_per_node": plan.get("cpu_gb_per_node") or 0,
           "plan_buffers_gb": plan["buffers_gb"], "plan_step_gb": plan["step_gb"],
           "plan_activations_gb": plan["activations_gb"], "lowest_available_gb": round(result["lowest_available_gb"], 2),
           "wall_s": round(result["wall_s"], 1)}
    new = not CSV.is_file()
    with CSV.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    print(f"appended to {CSV}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="xlarge")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--offload", action="store_true", help="ds_configs/zero3_offload.json (else zero3.json)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/fastcse-bench-scale"))
    ap.add_argument("--min-available-gb", type=float, default=1.0)
    ap.add_argument("--port", type=int, default=29650)
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--csv-from", type=Path, help="append the CSV row of an earlier run's result-*.json and exit")
    ap.add_argument("--ds-file", help="a DeepSpeed config instead of ds_configs/zero3[_offload].json")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="fp32 on CPUs without bf16 matrix units (AVX2 only: bf16 GEMMs run ~100x slower there)")
    args = ap.parse_args()
    if args.csv_from:
        append_csv(json.loads(args.csv_from.read_text()))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    config = args.out / f"deberta-v2-{args.shape}.json"
    config.write_text(json.dumps(SHAPES[args.shape], indent=1))
    ds_file = args.ds_file or f"ds_configs/{'zero3_offload' if args.offload else 'zero3'}.json"
    plan = _plan(config, ds_file, args)
    ds = Path(ds_file).stem
    run_dir = args.out / f"{args.shape}-{ds}"
    train_args = ["--model-config", str(config), "--ds", ds_file, "--precision", args.precision,
                  "--gradient-checkpointing", "--batch-size", str(args.batch), "--max-seq-length", str(args.seq),
                  "--max-steps", str(args.steps), "--max-examples", "2000", "--no-evaluate", "--no-export",
                  "--no-progress", "--overwrite", "--output-dir", str(run_dir)]
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(args.port), str(HERE), "--worker"] + train_args
    print("plan:", plan["command"], flush=True)
    print("run: ", " ".join(cmd), flush=True)
    available_before = _mem_available_gb()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=open(args.out / "run.log", "w"),
                            stderr=subprocess.STDOUT)
    lowest, stopped = available_before, None
    while proc.poll() is None:
        time.sleep(0.2)
        lowest = min(lowest, _mem_available_gb())
        if lowest < args.min_available_gb:
            stopped = f"MemAvailable fell to {lowest:.2f} GB (< {args.min_available_gb}): stopped"
            for rank in (0, 1):  # each rank's marks so far (a rank rewrites its file at every mark)
                print(f"rank {rank} marks before the stop:", (run_dir / f"marks-rank{rank}.json").read_text()
                      if (run_dir / f"marks-rank{rank}.json").is_file() else "none", flush=True)
            os.killpg(proc.pid, signal.SIGKILL)  # our own launch (its own session): launcher and ranks
            proc.wait()
    wall = time.perf_counter() - t0
    for rank in (0, 1):  # DeepSpeed's shared-memory allreduce buffers outlive the run: remove ours
        Path(f"/dev/shm/deepspeed_allreduce_buffer_0_127.0.0.1_{args.port}_{rank}").unlink(missing_ok=True)
    ranks = []
    for rank in (0, 1):
        f = run_dir / f"memory-rank{rank}.json"
        ranks.append(json.loads(f.read_text()) if f.is_file() else None)
    steps = []
    log = run_dir / "train_log.jsonl"
    if log.is_file():
        steps = [r for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]
    print(f"rc={proc.returncode} wall={wall:.0f}s lowest MemAvailable={lowest:.2f} GB "
          f"(before {available_before:.2f}){' ' + stopped if stopped else ''}", flush=True)
    # the planner's GPU figure plus, offloaded, this rank's share of the host-side states
    planned = plan["total_gb"] + plan["cpu_gb_per_node"] / 2
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    result = {"date": datetime.date.today().isoformat(), "commit": commit, "batch": args.batch, "seq": args.seq,
              "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
              "shape": args.shape, "config": ds, "precision": args.precision, "rc": proc.returncode, "stopped": stopped, "wall_s": wall,
              "available_before_gb": available_before, "lowest_available_gb": lowest, "planned_gb": planned,
              "plan": plan, "ranks": ranks, "steps": steps}
    (args.out / f"result-{args.shape}-{ds}.json").write_text(json.dumps(result, indent=1))
    if proc.returncode != 0 or not all(ranks) or len(steps) < args.steps:
        print(f"run did not complete; see {args.out / 'run.log'}")
        return 1
    step_s = [args.batch / r["sentences_per_s"] for r in steps]
    measured = [(r["hwm_kb"] - r["baseline_rss_kb"]) * 1024 / 1e9 for r in ranks]
    for r, m in zip(ranks, measured):
        print(f"rank {r['rank']}: VmHWM {r['hwm_kb'] * 1024 / 1e9:.2f} GB, baseline {r['baseline_rss_kb'] * 1024 / 1e9:.2f}"
              f" GB, peak - baseline {m:.2f} GB; planned {planned:.2f} GB ({(planned - m) / m:+.1%})")
    for r in ranks:
        print(f"rank {r['rank']} stages (GB, hwm/rss):", " ".join(
            f"{s['at']}={s['hwm_kb'] * 1024 / 1e9:.2f}/{s['rss_kb'] * 1024 / 1e9:.2f}" for s in r["stages"]))
    print("step times (s):", " ".join(f"{s:.1f}" for s in step_s), "losses:", [r["loss"] for r in steps])
    if not args.no_csv:
        append_csv(result)
    return 0


def _status_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        argv = [a for a in sys.argv[1:] if a != "--worker" and not a.startswith("--local_rank")]
        sys.path.insert(0, str(ROOT))
        sys.exit(_worker(argv))
    sys.exit(main())
