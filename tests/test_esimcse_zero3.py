"""ESimCSE's momentum encoder under ZeRO-3 on 2 CPU ranks (gloo): one fp32 shard per rank, never a
full copy, and the same training as one process.

One ``deepspeed --num_gpus 2`` launch runs this file as a worker: ESimCSE on reduced BERT,
DeBERTa-v2 and T5 encoders (2 layers, hidden 32; the issue's 1.5B architectures at reduced width and
depth) under ``ds_configs/zero3.json`` with ``--gradient-checkpointing``, ``--grad-accum 2`` and dropout 0,
with the gathered queue (``--esimcse-queue global``: the reference's per-rank queue would give the
two ranks other negatives than one process has). The reference is one process without DeepSpeed and
without checkpointing. Checked: per-step losses within 1e-4, the momentum encoder after the last
step (both ranks' shards, read from the checkpoint, put together) equal to the single process's
copy, and each rank's momentum state half of a full copy. The same launch also trains BERT with the
reference's per-rank queue and resumes it from its step-2 checkpoint: each rank gets its own queue
and shards back, and the resumed losses are the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
STEPS = 4
ARCHS = {
    "bert": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
             "max_position_embeddings": 64},
    "deberta-v2": {"model_type": "deberta-v2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "intermediate_size": 64, "max_position_embeddings": 64, "relative_attention": True,
                   "pos_att_type": ["c2p", "p2c"], "position_buckets": 16, "max_relative_positions": 32},
    # dropout_rate 0 in the config as well as --dropout 0: HF's T5Attention keeps config.dropout_rate as
    # a float read when it is built (fastcse.build.set_dropout reaches it too since, tested in
    # tests/test_train.py::test_dropout_override_reaches_attention_modules_that_keep_a_float)
    "t5": {"model_type": "t5", "d_model": 32, "num_layers": 2, "num_heads": 4, "d_kv": 8, "d_ff": 64,
           "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 8, "dropout_rate": 0.0},
}


def run_args(assets: Path, out: Path, arch: str) -> list[str]:
    # --adam-eps 1e-4, not AdamW's 1e-8: the two runs sum their gradients in other orders, and AdamW
    # divides each gradient element by its own magnitude plus eps, so an element whose gradient is as
    # small as that round-off (T5's tied embedding rows, its gated FFN) takes an update anywhere in
    # +-lr in one run and not the other. With eps 1e-8 the momentum copies then differed by 3e-7 to
    # 1e-5 from run to run (seen 1.02e-5 in CI); with eps above the gradients' round-off AdamW's
    # update is smooth in them and the copies differ by 1-2 float32 ulps (<= 2.4e-7), so 1e-5 still
    # catches a shard misplaced or an EMA step missed (a 1e-4-scale error at lr 1e-3, momentum 0.9).
    return ["--method", "esimcse", "--esimcse-queue", "global", "--model-config", str(assets / f"{arch}.json"),
            "--tokenizer", str(assets / "tokenizer"), "--pooler", "mean", "--dropout", "0",
            "--batch-size", "8", "--grad-accum", "2", "--max-steps", str(STEPS), "--lr", "1e-3",
            "--adam-eps", "1e-4",
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
    for arch in ARCHS:
        rc = main(run_args(args.assets, args.out / arch, arch) + ["--ds", str(ROOT / "ds_configs" / "zero3.json"),
                                                                  "--gradient-checkpointing"])
        assert rc == 0, f"{arch} exited with {rc}"
    import torch.distributed as dist

    per_rank = run_args(args.assets, args.out / "per-rank", "bert") + [
        "--ds", str(ROOT / "ds_configs" / "zero3.json"), "--esimcse-queue", "rank", "--save-steps", "2"]
    assert main(per_rank) == 0
    resumed = args.out / "per-rank-resumed"
    if dist.get_rank() == 0:  # the run cut after its step-2 checkpoint
        shutil.copytree(args.out / "per-rank", resumed)
        shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:08d}")
        (resumed / "train_log.jsonl").unlink()
    dist.barrier()
    assert main(per_rank + ["--output-dir", str(resumed), "--resume"]) == 0
    sys.exit(0)

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import free_port  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")]


def test_sharded_momentum_encoder_under_zero3_equals_one_process(tmp_path):
    """BERT, DeBERTa-v2 and T5, reduced: one launch for the three (its start-up is most of the time)."""
    from fastcse.data import train_fallback_tokenizer
    from fastcse.train import main

    assets = tmp_path / "assets"
    assets.mkdir()
    for arch, config in ARCHS.items():
        (assets / f"{arch}.json").write_text(json.dumps(config))
    train_fallback_tokenizer(vocab_size=2000).save_pretrained(str(assets / "tokenizer"))
    for arch in ARCHS:
        assert main(run_args(assets, tmp_path / "single" / arch, arch)) == 0
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
           str(HERE), "--worker", "--assets", str(assets), "--out", str(tmp_path / "zero3")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"deepspeed run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for arch in ARCHS:
        _check(arch, tmp_path / "single" / arch, tmp_path / "zero3" / arch)
    # the per-rank queue: saved for each rank, restored to each rank
    run = tmp_path / "zero3" / "per-rank"
    ranks = torch.load(run / "checkpoints" / "step-00000002" / "trainer.pt", weights_only=False)["method_ranks"]
    queues = [r["queue"] for r in ranks]
    assert queues[0].shape == queues[1].shape == (16, 32) and (queues[0] - queues[1]).abs().max() > 1e-3
    full, resumed = step_losses(run), step_losses(tmp_path / "zero3" / "per-rank-resumed")
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        assert abs(resumed[step] - full[step]) <= 1e-6, f"per-rank queue, resumed step {step}: {resumed} vs {full}"
    # the queue entered the loss: these losses are not the gathered-queue run's
    assert abs(full[4] - step_losses(tmp_path / "zero3" / "bert")[4]) > 1e-5


def _check(arch: str, single: Path, zero3: Path) -> None:
    ref, got = step_losses(single), step_losses(zero3)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-4, f"{arch} step {step}: ZeRO-3 {got[step]:.7f} vs one process {ref[step]:.7f}"
    # the queue enters the loss from the second micro-batch on, and the losses move
    assert len({round(v, 4) for v in ref.values()}) == STEPS, (arch, ref)

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
        assert full_numel / 2 <= numel <= full_numel / 2 + len(names), (arch, r, numel, full_numel)
        assert all(s.dtype == torch.float32 for s in rank_state["momentum_shards"])
    for i, name in enumerate(names):
        whole = torch.cat([ranks[0]["momentum_shards"][i], ranks[1]["momentum_shards"][i]])[:full[name].numel()]
        expected = full[name].reshape(-1)
        # the EMA of weights that moved: step 4's momentum is not the initial model
        assert (whole - expected).abs().max() <= 1e-5, f"{arch} {name}: {(whole - expected).abs().max():.2e}"
    print(f"{arch}: momentum state per rank: {sum(s.numel() for s in ranks[0]['momentum_shards']) * 4} bytes "
          f"(rank 0), {sum(s.numel() for s in ranks[1]['momentum_shards']) * 4} (rank 1); "
          f"a full fp32 copy: {full_numel * 4} bytes")
