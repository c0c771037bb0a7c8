"""DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU ranks (gloo) against one process over the same global batch.

One ``deepspeed --num_gpus 2`` launch per shipped config (ZeRO-2, ZeRO-3, ZeRO-3 with optimizer and
parameters offloaded to the CPU, DeepSpeed's CPU Adam) runs this very file as a worker, which trains
all three methods in turn (dropout 0, so the two runs see the same augmentation noise: none from
dropout, the same word repetitions from the per-step streams). Per-step losses must agree within
1e-4. The ZeRO-3 launch also resumes ESimCSE from a checkpoint (sharded states, momentum encoder,
queue) and exports a consolidated sentence-transformers folder.
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
METHODS = ("simcse-unsup", "simcse-sup", "esimcse")
STEPS = 4
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
             "max_position_embeddings": 64}


def common_args(assets: Path) -> list[str]:
    return ["--model-config", str(assets / "tiny.json"), "--tokenizer", str(assets / "tokenizer"),
            "--pooler", "mean", "--dropout", "0", "--batch-size", "8", "--max-steps", str(STEPS),
            "--lr", "1e-3", "--temperature", "0.1", "--queue-size", "16", "--max-grad-norm", "1.0",
            "--max-examples", "400", "--no-evaluate", "--no-progress", "--save-steps", "2",
            "--save-total-limit", "5", "--seed", "7"]


def method_args(method: str) -> list[str]:
    # ESimCSE's default queue is per rank (its reference code's): 2 ranks then see other negatives than
    # one process over the same global batch; the gathered queue is the one a single process keeps
    esimcse = ["--esimcse-queue", "global"] if method == "esimcse" else []
    return ["--method", method] + (["--hard-negative-weight", "0.5"] if method == "simcse-sup" else []) + esimcse


# A bad micro-batch in the middle of an accumulation window: the second of step 2's three micro-batches
# returns a NaN loss, after the first one's gradients were accumulated. The window must be dropped
# whole and the next windows must stay aligned with the data schedule, under DeepSpeed as in one process.
NAN_RUN = ["--method", "simcse-sup", "--batch-size", "12", "--grad-accum", "3", "--max-bad-steps", "3",
           "--no-export"]
NAN_CALL = 5  # info_nce calls count micro-batches: step 2, micro-batch 2 of 3


def run_with_a_nan_micro_batch(main, argv: list[str]) -> int:
    import fastcse.losses

    real, calls = fastcse.losses.info_nce, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == NAN_CALL else loss

    fastcse.losses.info_nce = flaky
    try:
        return main(argv)
    finally:
        fastcse.losses.info_nce = real


# Sharded creation under ZeRO-3: a deep, narrow BERT (no module dominates: the largest, the word
# embeddings, is 14 % of it), built in the training process right after the run's own model
PROBE_BERT = {"model_type": "bert", "vocab_size": 2000, "hidden_size": 64, "num_hidden_layers": 16,
              "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 64}


def record_sharded_build(out: Path):
    """Wrap ``fastcse.train.build_encoder`` so that its first ZeRO-3 call records, per rank, into
    ``out/build-rank{r}.json``: the ZeRO status of every backbone parameter right after the build,
    and for :data:`PROBE_BERT`, built the same way, the peak bytes of tensor storage created during
    its build (``fastcse.memory.StorageCounter``) against the whole model's bytes; and for a
    pretrained folder (written by rank 0 from a plain build), the statuses and whether the sharded
    load holds the folder's weights exactly. Measured before this check was written: sharded peak
    2.40 MB of a 3.75 MB model per rank; the whole-model build (no ``zero3_config``) 3.75 MB."""
    import torch
    import torch.distributed as dist

    import fastcse.train
    from fastcse.memory import StorageCounter

    real = fastcse.train.build_encoder

    def build(m, **kwargs):
        encoder = real(m, **kwargs)
        target = out / f"build-rank{dist.get_rank()}.json"
        if not target.exists():
            rng = torch.get_rng_state()  # the probes' draws must not shift the run's own stream
            record = {"zero3_config": kwargs.get("zero3_config") is not None,
                      "status": sorted({str(getattr(p, "ds_status", "whole")) for p in encoder.backbone.parameters()})}
            probe_kwargs = dict(kwargs, model_config=dict(PROBE_BERT))
            with StorageCounter() as counter:
                probe = real(m, **probe_kwargs)
            params = list(probe.parameters()) + [p for mod in probe.unused_backbone_modules.values()
                                                 for p in mod.parameters()]
            record["probe_peak_bytes"] = counter.peak
            record["probe_model_bytes"] = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
            record["probe_largest_tensor_bytes"] = max(getattr(p, "ds_numel", p.numel()) * p.element_size()
                                                       for p in params)
            record["probe_status"] = sorted({str(getattr(p, "ds_status", "whole")) for p in probe.backbone.parameters()})
            del probe
            # a pretrained folder (transformers' from_pretrained under the ZeRO-3 flag): sharded, and
            # the weights (backbone, cls_mlp pooler, BERT's CLS pooler kept aside) are the folder's
            import dataclasses

            import deepspeed

            folder = out / "pretrained"
            if dist.get_rank() == 0:
                plain = real(dataclasses.replace(m, pooling="cls_mlp"), **dict(kwargs, zero3_config=None))
                plain.save(folder)
            dist.barrier()
            pm = dataclasses.replace(m, name_or_path=str(folder), config=None, pooling="cls_mlp")
            plain = real(pm, **dict(kwargs, model_path=str(folder), model_config=None, zero3_config=None))
            sharded = real(pm, **dict(kwargs, model_path=str(folder), model_config=None))
            record["pretrained_status"] = sorted({str(getattr(p, "ds_status", "whole"))
                                                  for p in sharded.backbone.parameters()})
            with deepspeed.zero.GatheredParameters([p for p in sharded.parameters() if hasattr(p, "ds_id")]):
                got, want = sharded.state_dict(), plain.state_dict()
                record["pretrained_differ"] = sorted(k for k in want if not torch.equal(got[k], want[k]))
            got, want = (x.unused_backbone_modules["pooler"].state_dict() for x in (sharded, plain))
            record["pretrained_differ"] += sorted(f"pooler.{k}" for k in want if not torch.equal(got[k], want[k]))
            record["pretrained_tensors"] = len(want) + len(plain.state_dict())
            torch.set_rng_state(rng)
            target.write_text(json.dumps(record))
        return encoder

    fastcse.train.build_encoder = build


def step_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


# ------------------------------------------------------------------------------------------------
# the worker (runs on every rank under the deepspeed launcher)
# ------------------------------------------------------------------------------------------------

def _worker(argv: list[str]) -> None:
    import torch.distributed as dist

    from fastcse.train import main

    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", "--local-rank", type=int, default=0)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--config", required=True, help="a ds_configs/ name: zero2, zero3, zero3_offload")
    ap.add_argument("--assets", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    ds = str(ROOT / "ds_configs" / f"{args.config}.json")
    base = common_args(args.assets) + ["--ds", ds]
    if args.config.startswith("zero3"):
        args.out.mkdir(parents=True, exist_ok=True)
        record_sharded_build(args.out)
    for method in METHODS:
        extra = ["--export", "--evaluate", "--eval-steps", "0"] if (args.config == "zero3" and method == "simcse-unsup") \
            else ["--no-export"]
        rc = main(base + method_args(method) + extra + ["--output-dir", str(args.out / method)])
        assert rc == 0, f"{method} exited with {rc}"
    rc = run_with_a_nan_micro_batch(main, base + NAN_RUN + ["--output-dir", str(args.out / "nan-window")])
    assert rc == 0, f"the run with a NaN micro-batch exited with {rc}"
    if args.config == "zero3":
        # resume: a copy of the ESimCSE run without its last checkpoint and log, continued from step 2
        src, dst = args.out / "esimcse", args.out / "esimcse-resumed"
        if dist.get_rank() == 0:
            shutil.copytree(src, dst)
            shutil.rmtree(dst / "checkpoints" / f"step-{STEPS:08d}")
            (dst / "train_log.jsonl").unlink()
        dist.barrier()
        rc = main(base + method_args("esimcse") + ["--no-export", "--resume", "--output-dir", str(dst)])
        assert rc == 0, f"resumed esimcse exited with {rc}"


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(sys.argv[1:])
    sys.exit(0)

# ------------------------------------------------------------------------------------------------
# the tests (pytest side)
# ------------------------------------------------------------------------------------------------

import pytest  # noqa: E402

from tests.helpers import free_port  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    from fastcse.data import train_fallback_tokenizer

    folder = tmp_path_factory.mktemp("ds_assets")
    (folder / "tiny.json").write_text(json.dumps(TINY_BERT))
    train_fallback_tokenizer(vocab_size=2000).save_pretrained(str(folder / "tokenizer"))
    return folder


@pytest.fixture(scope="module")
def single_process(assets, tmp_path_factory) -> Path:
    """The reference: each method in one process over the same global batch of 8."""
    from fastcse.train import main

    out = tmp_path_factory.mktemp("single")
    for method in METHODS:
        extra = ["--export", "--evaluate", "--eval-steps", "0"] if method == "simcse-unsup" else ["--no-export"]
        assert main(common_args(assets) + method_args(method) + extra + ["--output-dir", str(out / method)]) == 0
    assert run_with_a_nan_micro_batch(main, common_args(assets) + NAN_RUN + ["--output-dir", str(out / "nan-window")]) == 0
    return out


def _cpu_adam_buildable() -> bool:
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except ImportError:
        return False
    return CPUAdamBuilder().is_compatible(verbose=False)


@pytest.mark.parametrize("config", [
    "zero2", "zero3",
    pytest.param("zero3_offload", marks=pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is not None and not _cpu_adam_buildable(),
        reason="DeepSpeed's CPU Adam op cannot be built here (no C++ compiler?)")),
])
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero_matches_single_process(config, assets, single_process, tmp_path):
    stage = config.removeprefix("zero")
    out = tmp_path / config
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
           str(HERE), "--worker", "--config", config, "--assets", str(assets), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"deepspeed run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for method in METHODS:
        ref, got = step_losses(single_process / method), step_losses(out / method)
        assert sorted(got) == list(range(1, STEPS + 1)), f"{method}: logged steps {sorted(got)}"
        for step in ref:
            assert abs(got[step] - ref[step]) <= 1e-4, (
                f"ZeRO-{stage} {method} step {step}: loss {got[step]:.7f} vs single process {ref[step]:.7f}")
        # the losses move (a comparison of constants would prove nothing)
        assert len({round(v, 4) for v in ref.values()}) > 1, f"{method}: losses did not change: {ref}"
    if config.startswith("zero3"):
        # parameters created sharded: no rank ever held the whole model (the old build made it whole
        # on every rank, then DeepSpeed partitioned it: statuses "whole", peak = 100 % of the model)
        for rank in (0, 1):
            rec = json.loads((out / f"build-rank{rank}.json").read_text())
            assert rec["zero3_config"] and rec["status"] == ["ZeroParamStatus.NOT_AVAILABLE"], rec
            assert rec["probe_status"] == ["ZeroParamStatus.NOT_AVAILABLE"], rec
            # at most: this rank's half of the model, plus one module gathered whole for its weight init
            # (the largest, the word embeddings, 14 %), plus slack for the biases' small tensors
            assert rec["probe_peak_bytes"] < 0.75 * rec["probe_model_bytes"], rec
            assert rec["probe_peak_bytes"] < rec["probe_model_bytes"] / 2 + 1.5 * rec["probe_largest_tensor_bytes"], rec
            assert rec["pretrained_status"] == ["ZeroParamStatus.NOT_AVAILABLE"], rec
            assert rec["pretrained_differ"] == [] and rec["pretrained_tensors"] > 30, rec
    # the window with the NaN micro-batch is dropped whole, then training goes on in step
    ref, got = step_losses(single_process / "nan-window"), step_losses(out / "nan-window")
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    assert ref[2] is None and got[2] is None, (ref, got)  # skipped: a non-finite loss is logged as null (valid JSON)
    for step in (1, 3, 4):  # steps 3 and 4 would differ had half of window 2 been applied or misaligned
        assert abs(got[step] - ref[step]) <= 1e-4, f"ZeRO-{stage} after a NaN micro-batch, step {step}: {got} vs {ref}"
    if config == "zero3":
        ref = step_losses(single_process / "esimcse")
        resumed = step_losses(out / "esimcse-resumed")
        assert sorted(resumed) == [3, 4]
        for step, loss in resumed.items():
            assert abs(loss - ref[step]) <= 1e-4, f"resumed ZeRO-3 esimcse step {step}: {loss} vs {ref[step]}"
        # STS-B dev evaluated on every rank through the sharded model, before and after training
        def scores(run):
            lines = (run / "train_log.jsonl").read_text().splitlines()
            return {r["step"]: r["stsb_dev"] for r in map(json.loads, lines) if "stsb_dev" in r}

        ref_scores, got_scores = scores(single_process / "simcse-unsup"), scores(out / "simcse-unsup")
        assert sorted(got_scores) == sorted(ref_scores) == [0, STEPS]
        for step in ref_scores:
            assert abs(got_scores[step] - ref_scores[step]) < 1e-3, (got_scores, ref_scores)
        # the consolidated ZeRO-3 export embeds like the single-process export
        from sentence_transformers import SentenceTransformer

        sentences = ["A man is playing a guitar.", "Two dogs run across a field.", "stock prices fell today"]
        a = SentenceTransformer(str(out / "simcse-unsup" / "final"), device="cpu").encode(
            sentences, convert_to_tensor=True)
        b = SentenceTransformer(str(single_process / "simcse-unsup" / "final"), device="cpu").encode(
            sentences, convert_to_tensor=True)
        assert (a - b).abs().max().item() < 1e-4
