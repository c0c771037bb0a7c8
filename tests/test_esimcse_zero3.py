"""ESimCSE's momentum encoder under ZeRO-3 on 2 CPU ranks (gloo): one fp32 shard per rank, never a
full copy, and the same training as one process.

One ``deepspeed --num_gpus 2`` launch runs this file as a worker: ESimCSE under
``ds_configs/zero3.json`` with ``--gradient-checkpointing``, ``--grad-accum 2`` and dropout 0,
with the gathered queue (``--esimcse-queue global``: the reference's per-rank queue would give the
two ranks other negatives than one process has). The reference is one process without DeepSpeed and
without checkpointing. Checked: per-step losses within 1e-4, the momentum encoder after the last
step (both ranks' shards, read from the checkpoint, put together) equal to the single process's
copy, and each rank's momentum state half of a full copy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
STEPS = 4
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
             "max_position_embeddings": 64}


def run_args(assets: Path, out: Path) -> list[str]:
    return ["--method", "esimcse", "--esimcse-queue", "global", "--model-config", str(assets / "tiny.json"),
            "--tokenizer", str(assets / "tokenizer"), "--pooler", "mean", "--dropout", "0",
            "--batch-size", "8", "--grad-accum", "2", "--max-steps", str(STEPS), "--lr", "1e-3",
            "--temperature", "0.1", "--queue-size", "16", "--momentum", "0.9", "--max-examples", "200",
            "--no-evaluate", "--no-export", "--no-progress", "--save-steps", str(STEPS), "--seed", "7",
            "--output-dir", str(out)]


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, str(ROOT))
    from fastcse.train import main

    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", "--local-rank", type=int, default=0)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--assets", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rc = main(run_args(args.assets, args.out) + ["--ds", str(ROOT / "ds_configs" / "zero3.json"),
                                                  "--gradient-checkpointing"])
    sys.exit(rc)

import pytest  # noqa: E402
import torch  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_momentum_encoder_under_zero3_equals_one_process(tmp_path):
    from fastcse.data import train_fallback_tokenizer
    from fastcse.train import main

    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "tiny.json").write_text(json.dumps(TINY_BERT))
    train_fallback_tokenizer(vocab_size=2000).save_pretrained(str(assets / "tokenizer"))
    single, zero3 = tmp_path / "single", tmp_path / "zero3"
    assert main(run_args(assets, single)) == 0
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()),
           str(HERE), "--worker", "--assets", str(assets), "--out", str(zero3)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"deepspeed run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    ref, got = step_losses(single), step_losses(zero3)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-4, f"step {step}: ZeRO-3 {got[step]:.7f} vs one process {ref[step]:.7f}"
    # the queue enters the loss from the second micro-batch on, and the losses move
    assert len({round(v, 4) for v in ref.values()}) == STEPS, ref

    last = f"step-{STEPS:08d}"
    full = torch.load(single / "checkpoints" / last / "trainer.pt", weights_only=False)["method"]["momentum_encoder"]
    state = torch.load(zero3 / "checkpoints" / last / "trainer.pt", weights_only=False)
    ranks = state["method_ranks"]
    assert len(ranks) == 2 and "momentum_encoder" not in state["method"]  # no full copy anywhere
    names = ranks[0]["momentum_names"]
    assert names == ranks[1]["momentum_names"] and set(names) <= set(full)
    full_numel = sum(full[n].numel() for n in names)
    for r, rank_state in enumerate(ranks):
        numel = sum(s.numel() for s in rank_state["momentum_shards"])
        # half of the copy (+ at most one element of padding per parameter)
        assert full_numel / 2 <= numel <= full_numel / 2 + len(names), (r, numel, full_numel)
        assert all(s.dtype == torch.float32 for s in rank_state["momentum_shards"])
    for i, name in enumerate(names):
        whole = torch.cat([ranks[0]["momentum_shards"][i], ranks[1]["momentum_shards"][i]])[:full[name].numel()]
        expected = full[name].reshape(-1)
        # the EMA of weights that moved: step 4's momentum is not the initial model
        assert (whole - expected).abs().max() <= 1e-5, f"{name}: {(whole - expected).abs().max():.2e}"
    print(f"momentum state per rank: {sum(s.numel() for s in ranks[0]['momentum_shards']) * 4} bytes "
          f"(rank 0), {sum(s.numel() for s in ranks[1]['momentum_shards']) * 4} (rank 1); "
          f"a full fp32 copy: {full_numel * 4} bytes")
