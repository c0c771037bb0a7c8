"""Issue #16, "nothing lost, nothing silently wrong": a used output folder, a resume with other
options, a diverging encoder, a damaged checkpoint, bad model input, values out of range: each is one
line and exit code 2 (or 3 for divergence), and nothing of an earlier run is changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from fastcse.checkpoint import list_checkpoints
from fastcse.train import main

from tests.helpers import TINY_BERT, write_tiny_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return write_tiny_assets(tmp_path_factory.mktemp("assets"))


def tiny_args(assets: Path, out: Path, *extra: str) -> list[str]:
    return ["--model-config", str(assets / "tiny.json"), "--tokenizer", str(assets / "tokenizer"),
            "--batch-size", "8", "--lr", "1e-3", "--max-examples", "200", "--no-evaluate", "--no-export",
            "--no-progress", "--output-dir", str(out), *extra]


def records(run_dir: Path) -> list[dict]:
    def no_nan(name):
        raise AssertionError(f"train_log.jsonl holds a bare {name} (not JSON)")

    return [json.loads(line, parse_constant=no_nan) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for r in records(run_dir):
        if "loss" in r:
            assert r["step"] not in losses, f"step {r['step']} logged twice"
            losses[r["step"]] = r["loss"]
    return losses


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("fastcse.train: error: "), err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_a_used_output_folder_is_refused_then_moved_aside_with_overwrite(assets, tmp_path, capsys):
    """D1: a second run into a used folder exits 2 and changes none of the first run's files."""
    out = tmp_path / "run"
    assert main(tiny_args(assets, out, "--max-steps", "3", "--save-steps", "1")) == 0
    before = checksums(out)
    capsys.readouterr()
    assert main(tiny_args(assets, out, "--max-steps", "2", "--save-steps", "1")) == 2
    one_error_line(capsys, "holds another run", "--resume", "--overwrite")
    assert checksums(out) == before
    # --overwrite: the old run is moved aside whole, and the message says where
    assert main(tiny_args(assets, out, "--max-steps", "2", "--save-steps", "1", "--overwrite")) == 0
    said = capsys.readouterr().out
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and f"moved the previous run in {out} to {aside[0]}" in said
    assert checksums(aside[0]) == before
    assert sorted(step_losses(out)) == [1, 2]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000001", "step-00000002"]


def test_resume_refuses_changed_trajectory_options(assets, tmp_path, capsys):
    """D2 (and D10's world size): options that change the trajectory are refused, each named."""
    out = tmp_path / "run"
    assert main(tiny_args(assets, out, "--max-steps", "2", "--save-steps", "1")) == 0
    before = checksums(out)
    capsys.readouterr()
    assert main(tiny_args(assets, out, "--max-steps", "4", "--resume", "--batch-size", "16", "--seed", "7",
                          "--max-seq-length", "8")) == 2
    one_error_line(capsys, "--batch-size 8 in the checkpoint, 16 now", "--seed 42 in the checkpoint, 7 now",
                   "--max-seq-length 32 in the checkpoint, 8 now")
    assert main(tiny_args(assets, out, "--max-steps", "4", "--resume", "--method", "esimcse")) == 2
    one_error_line(capsys, "--method simcse-unsup in the checkpoint, esimcse now")
    args = tiny_args(assets, out, "--max-steps", "4", "--resume")
    args[args.index("--lr") + 1] = "1e-2"
    assert main(args) == 2
    one_error_line(capsys, "--lr 0.001 in the checkpoint, 0.01 now", "--override-lr")
    assert checksums(out) == before
    # a checkpoint of 2 ranks cannot be resumed by 1
    meta_path = list_checkpoints(out / "checkpoints")[-1] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "world_size": 2}))
    assert main(tiny_args(assets, out, "--max-steps", "4", "--resume")) == 2
    one_error_line(capsys, "written by 2 rank(s); this run has 1")
    meta_path.write_text(json.dumps(meta))
    # --override-lr applies the new rate, and config.json records it
    assert main(args + ["--override-lr"]) == 0
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 0.01
    logged = {r["step"]: r["lr"] for r in records(out) if "lr" in r}
    assert logged[1] == pytest.approx(1e-3) and logged[3] == pytest.approx(1e-2 * 2 / 4)
    assert sorted(step_losses(out)) == [1, 2, 3, 4]


def test_a_diverging_encoder_is_a_bad_step_and_stops_with_exit_3(assets, tmp_path, capsys):
    """D5: non-finite embeddings (the loss would raise on them) count as bad steps."""
    out = tmp_path / "run"
    # lr 1e30: Adam moves every weight by about the rate, so step 2's attention scores overflow to
    # inf for certain (at 1e5 whether the tiny encoder overflowed within 30 steps depended on the
    # fixture's tokenizer, whose training is not deterministic: the test passed or failed by luck)
    rc = main(tiny_args(assets, out, "--lr", "1e30", "--max-grad-norm", "0", "--max-steps", "30",
                        "--save-steps", "1", "--max-bad-steps", "2"))
    said = capsys.readouterr().out
    assert rc == 3, said
    assert "2 consecutive steps with a non-finite loss or gradient" in said
    last = list_checkpoints(out / "checkpoints")[-1]
    assert f"Last good checkpoint: {last}" in said
    assert any(r.get("loss", 0) is None for r in records(out))  # logged as null, valid JSON


def test_resume_skips_a_damaged_newest_checkpoint(assets, tmp_path, capsys):
    """D6 (and D11's log): the damaged checkpoints are reported and skipped; the losses equal the
    uninterrupted run's, and the log holds each step once."""
    full = tmp_path / "full"
    args = ["--max-steps", "5", "--save-steps", "2", "--save-total-limit", "10", "--warmup-steps", "2"]
    assert main(tiny_args(assets, full, *args)) == 0
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    ckpts = cut / "checkpoints"
    (ckpts / "step-00000005" / "trainer.pt").unlink()
    trainer = ckpts / "step-00000004" / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    assert main(tiny_args(assets, cut, *args, "--resume")) == 0
    said = capsys.readouterr().out
    assert "skipping damaged checkpoint" in said and "step-00000005" in said and "step-00000004" in said
    assert f"resumed from {ckpts / 'step-00000002'} at step 2" in said
    ref, resumed = step_losses(full), step_losses(cut)
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    for step in (3, 4, 5):
        assert abs(resumed[step] - ref[step]) <= 1e-6, f"step {step}: {resumed[step]} vs {ref[step]}"


@pytest.fixture
def no_model(monkeypatch):
    import fastcse.train

    def fail(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(fastcse.train, "build_encoder", fail)


@pytest.mark.parametrize("extra,message", [
    (["--warmup-steps=-5"], "--warmup-steps must be >= 0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--max-examples", "-5"], "--max-examples must be at least 1"),
    (["--adam-beta1", "2"], "--adam-beta1 must be in [0, 1)"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be at least 1"),
    (["--attn-backend", "bogus"], "--attn-backend 'bogus' is not one of"),
    (["--lr", "-1e-3"], "--lr must be positive"),
    (["--tokenizer", "{tmp}/a_file"], "is a file; expected a tokenizer folder"),
    (["--output-dir", "{tmp}/a_file/out"], "cannot be created: {tmp}/a_file is a file"),
    (["--resume", "--overwrite"], "either --resume"),
])
def test_values_out_of_range_are_one_line_before_any_model(assets, tmp_path, capsys, no_model, extra, message):
    """D4, D10, D9, D11: every option checked before loading, one line, exit 2."""
    (tmp_path / "a_file").write_text("not a folder\n")
    args = tiny_args(assets, tmp_path / "out", *[a.format(tmp=tmp_path) for a in extra])
    if "--tokenizer" in extra:  # the later --tokenizer wins in argparse; drop the good one
        i = args.index("--tokenizer")
        del args[i:i + 2]
    assert main(args) == 2
    one_error_line(capsys, message.format(tmp=tmp_path))


def test_device_cuda_without_a_gpu(assets, tmp_path, capsys, no_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(tiny_args(assets, tmp_path / "out", "--device", "cuda")) == 2
    one_error_line(capsys, "--device 'cuda': no CUDA device")


def test_attn_backends_listed_in_config_are_the_encoders():
    from fastcse.config import ATTN_BACKENDS
    from fastcse.models.attention import ATTN_BACKENDS as REAL

    assert ATTN_BACKENDS == REAL


def _tiny_model_folder(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(**TINY_BERT, vocab_size=100)).save_pretrained(str(folder))
    return folder


def test_bad_model_input_is_one_line(tmp_path, capsys, no_model):
    """D8, D11 (--model a file) and #15 item 6 (a hub name offline)."""
    model = _tiny_model_folder(tmp_path / "model")
    capsys.readouterr()  # save_pretrained's progress bar
    out = ["--output-dir", str(tmp_path / "out")]
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert main(["--model", str(model), *out]) == 2
    one_error_line(capsys, f"cannot read the weights {weights}")
    (model / "config.json").write_text('{"model_type": "bert", ')
    assert main(["--model", str(model), *out]) == 2
    one_error_line(capsys, f"cannot read model config {model / 'config.json'}")
    bad_type = tmp_path / "bad_type.json"
    bad_type.write_text(json.dumps({"model_type": "no-such-model", "hidden_size": 32}))
    assert main(["--model-config", str(bad_type), *out]) == 2
    one_error_line(capsys, "unknown model_type 'no-such-model'")
    assert main(["--model", str(weights), *out]) == 2
    one_error_line(capsys, "is a file; expected a model folder")


def test_a_hub_name_offline_is_one_line(tmp_path, capsys, no_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--model", "no-such-org/no-such-model", "--output-dir", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "pass a local model folder")


def test_max_seq_length_beyond_the_position_table(assets, tmp_path, capsys):
    """D7: checked against models.folders.model_max_length before any step."""
    assert main(tiny_args(assets, tmp_path / "out", "--max-seq-length", "100", "--max-steps", "1")) == 2
    one_error_line(capsys, "--max-seq-length 100 exceeds the model's limit of 64 tokens")
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_hugging_face_names_in_a_config_file(assets, tmp_path):
    """#15 item 4: TrainingArguments names where the meaning is the same."""
    config = tmp_path / "hf.yaml"
    config.write_text("learning_rate: 5.0e-5\nmax_steps: 2\nsave_steps: 0\nper_device_train_batch_size: 8\n"
                      "gradient_accumulation_steps: 1\nreport_to: none\n")
    out = tmp_path / "run"
    args = [a for a in tiny_args(assets, out) if a not in ("--lr", "1e-3")]
    assert main(args + ["--config", str(config)]) == 0
    assert [r["lr"] for r in records(out) if "lr" in r] == [pytest.approx(5e-5), pytest.approx(2.5e-5)]
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 5e-5
    config.write_text("learning_rate: 5.0e-5\nnot_an_option: 1\n")
    assert main(args + ["--config", str(config)]) == 2
