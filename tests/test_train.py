"""The training program in one process: resume equivalence, kill during save, non-finite steps,
bad input, and the embedded default end to end (shortened)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastcse.checkpoint import latest_checkpoint, list_checkpoints
from fastcse.train import main

from tests.helpers import TINY_BERT, write_tiny_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return write_tiny_assets(tmp_path_factory.mktemp("assets"))


def tiny_args(assets: Path, out: Path, *extra: str) -> list[str]:
    return ["--model-config", str(assets / "tiny.json"), "--tokenizer", str(assets / "tokenizer"),
            "--pooler", "cls_mlp", "--batch-size", "8", "--lr", "1e-3", "--max-examples", "400",
            "--no-evaluate", "--no-export", "--no-progress", "--output-dir", str(out), *extra]


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("method,extra", [
    ("simcse-unsup", []),
    ("simcse-sup", ["--hard-negative-weight", "0.3", "--grad-accum", "2"]),
    ("esimcse", ["--queue-size", "12", "--momentum", "0.9"]),
])
def test_resume_gives_the_uninterrupted_losses(assets, tmp_path, method, extra):
    full = tmp_path / "full"
    args = ["--method", method, "--max-steps", "5", "--save-steps", "2", "--save-total-limit", "10",
            "--warmup-steps", "2", *extra]
    assert main(tiny_args(assets, full, *args)) == 0
    assert [p.name for p in list_checkpoints(full / "checkpoints")] == ["step-00000002", "step-00000004",
                                                                       "step-00000005"]
    # an interrupted run: only the step-2 checkpoint survived
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for name in ("step-00000004", "step-00000005"):
        shutil.rmtree(cut / "checkpoints" / name)
    (cut / "train_log.jsonl").unlink()
    assert main(tiny_args(assets, cut, *args, "--resume")) == 0
    ref, resumed = step_losses(full), step_losses(cut)
    assert sorted(resumed) == [3, 4, 5]
    for step in resumed:
        assert abs(resumed[step] - ref[step]) <= 1e-6, f"step {step}: {resumed[step]} vs {ref[step]}"
    # dropout is on: a run that does not restore the RNG would differ (the comparison can fail)
    assert len(set(ref.values())) == len(ref)


def test_train_step_takes_micro_batches_built_outside_the_loop(assets, tmp_path):
    """``Trainer.train_step(micro_batches)`` is the loop's step: micro-batches collated here, from the
    same start, give the losses the loop logged and the weights it saved."""
    from fastcse.config import parse_args
    from fastcse.data import BatchSchedule
    from fastcse.train import Trainer, preflight

    # ESimCSE with accumulation: each micro-batch's loss also depends on the queue the earlier ones filled
    args = ["--method", "esimcse", "--queue-size", "12", "--grad-accum", "2", "--max-steps", "3",
            "--save-steps", "0", "--warmup-steps", "1"]
    loop = tmp_path / "loop"
    assert main(tiny_args(assets, loop, *args)) == 0
    logged = step_losses(loop)

    trainer = Trainer(preflight(parse_args(tiny_args(assets, tmp_path / "by-hand", *args))))
    trainer.setup()
    examples, run = trainer.prep.examples, trainer.cfg.run
    schedule = BatchSchedule(len(examples), run.batch_size, seed=run.seed, rank=0, world_size=1)
    by_hand = {}
    for step in range(3):
        micro_steps = (2 * step, 2 * step + 1)
        batches = [trainer.method.collate([examples[i] for i in schedule.indices(m)], micro_step=m, rank=0)
                   for m in micro_steps]
        out = trainer.train_step(batches)
        assert out.finite and out.grad_norm is not None
        by_hand[step + 1] = out.loss
    with pytest.raises(ValueError, match="takes 2 micro-batches"):
        trainer.train_step(batches[:1])
    trainer.close()
    assert by_hand == logged
    assert len(set(logged.values())) == len(logged)  # the steps differ: equal lists were not constants
    saved = torch.load(latest_checkpoint(loop / "checkpoints") / "trainer.pt", weights_only=False)["model"]
    for name, value in trainer.encoder.state_dict().items():
        assert torch.equal(value, saved[name]), f"{name} differs from the loop's final weights"


def test_kill_during_save_leaves_the_last_checkpoint(assets, tmp_path):
    """A real SIGKILL in the middle of writing the second checkpoint; then resume."""
    out = tmp_path / "run"
    args = tiny_args(assets, out, "--max-steps", "6", "--save-steps", "2")
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        import fastcse.checkpoint as ck
        from fastcse.train import main
        real_save = torch.save
        calls = {{"n": 0}}
        def dying_save(obj, f, *a, **k):
            calls["n"] += 1
            if "trainer.pt" in str(f) and ck.list_checkpoints({str(out / 'checkpoints')!r}):
                with open(f, "wb") as fh:  # half a file, then the process dies
                    fh.write(b"partial")
                    fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **k)
        ck.torch.save = dying_save
        sys.exit(main({args!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000002"]
    assert any(p.name.startswith(".tmp-step-00000004") for p in (out / "checkpoints").iterdir())
    # the surviving checkpoint loads
    state = torch.load(ckpts[0] / "trainer.pt", weights_only=False)
    assert state["step"] == 2 and "model" in state and "optimizer" in state
    # and the run resumes from it, cleaning the half-written folder on its next save
    assert main(args + ["--resume"]) == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000004", "step-00000006"]
    assert not any(p.name.startswith(".tmp") for p in (out / "checkpoints").iterdir())
    assert sorted(step_losses(out)) == [1, 2, 3, 4, 5, 6]  # steps 1-4 (killed run) then 3-6 logged


def test_non_finite_steps_are_skipped_then_stop(assets, tmp_path, monkeypatch, capsys):
    import fastcse.losses

    real = fastcse.losses.info_nce
    calls = {"n": 0}
    bad_calls = {3, 6, 7, 8}  # one isolated bad step, then three in a row

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in bad_calls else loss

    monkeypatch.setattr(fastcse.losses, "info_nce", flaky)
    out = tmp_path / "run"
    rc = main(tiny_args(assets, out, "--max-steps", "20", "--save-steps", "2", "--max-bad-steps", "3"))
    assert rc == 3
    message = capsys.readouterr().out
    assert "3 consecutive steps with a non-finite loss or gradient" in message
    assert "4 skipped in all" in message and "step-00000004" in message
    logged = step_losses(out)
    assert sorted(logged) == list(range(1, 9))
    assert all(logged[s] is None for s in bad_calls)  # null (JSON has no NaN) logged for the skipped steps
    # the last good checkpoint is intact; nothing was written after the bad steps
    last = latest_checkpoint(out / "checkpoints")
    assert last.name == "step-00000004"
    state = torch.load(last / "trainer.pt", weights_only=False)
    assert state["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("argv,message", [
    (["--train-file", "{tmp}/missing.txt"], "training file not found"),
    (["--method", "simcse-sup", "--train-file", "{tmp}/anchors.csv"], "missing column(s) sent1, hard_neg"),
    (["--method", "simcse-sup", "--train-file", "{tmp}/bad.csv", "--on-bad-row", "error"],
     "{tmp}/bad.csv:3: expected 3 fields"),
    (["--config", "{tmp}/unknown_method.yaml"], "'moco' is not one of"),
    (["--config", "{tmp}/broken.yaml"], "cannot parse config file"),
    (["--model", "{tmp}/no_model_here"], "model folder not found"),
    (["--model-config", "{tmp}/missing.json"], "model config not found"),
    (["--ds", "{tmp}/missing_ds.json"], "DeepSpeed config not found"),
    (["--method", "esimcse", "--hard-negative-weight", "1"], "applies to simcse-sup only"),
    (["--train-file", "{tmp}/few.txt"], "fewer than one batch"),
])
def test_bad_input_is_one_clear_error_before_any_model(tmp_path, monkeypatch, capsys, argv, message):
    import fastcse.train

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(fastcse.train, "build_encoder", no_model)
    (tmp_path / "anchors.csv").write_text("sent0,label\na,1\n")  # pairs train; a lone column does not
    (tmp_path / "bad.csv").write_text("sent0,sent1,hard_neg\na,b,c\nd,e\n")
    (tmp_path / "unknown_method.yaml").write_text("method: {name: moco}\n")
    (tmp_path / "broken.yaml").write_text("lr: [1,\n")
    (tmp_path / "few.txt").write_text("one\ntwo\n")
    rc = main([a.format(tmp=tmp_path) for a in argv] + ["--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("fastcse.train: error: ") and message.format(tmp=tmp_path) in err, err
    assert len(err.strip().splitlines()) == 1  # one message, no traceback


def test_a_model_folder_is_checked_by_its_kind_before_loading(tmp_path, monkeypatch, capsys):
    """--model folders go through models.folders.detect_model_kind: an empty folder and a config.json
    without weights are each one error line (exit 2) before any model is loaded."""
    import fastcse.train

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the folder was checked")

    monkeypatch.setattr(fastcse.train, "build_encoder", no_model)
    empty, config_only = tmp_path / "empty", tmp_path / "config_only"
    empty.mkdir()
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps({"model_type": "bert"}))
    for folder, message in ((empty, f"{empty} is not a model folder (no config.json / modules.json)"),
                            (config_only, "it has config.json but no weights file")):
        rc = main(["--model", str(folder), "--output-dir", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("fastcse.train: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1


def test_bad_rows_are_skipped_and_counted(assets, tmp_path, capsys):
    data = tmp_path / "nli.csv"
    rows = [f"anchor {i},positive {i},negative {i}" for i in range(20)]
    rows.insert(5, "broken,row")
    data.write_text("sent0,sent1,hard_neg\n" + "\n".join(rows) + "\n\n")
    assert main(tiny_args(assets, tmp_path / "run", "--method", "simcse-sup", "--train-file", str(data),
                          "--max-steps", "1", "--save-steps", "0")) == 0
    out = capsys.readouterr().out
    assert "20 examples from 23 lines; 1 empty lines skipped, 1 bad rows skipped" in out


def test_tensorboard_logs_what_the_jsonl_log_holds(assets, tmp_path):
    pytest.importorskip("tensorboard")  # in the test extras; optional for users
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(tiny_args(assets, out, "--max-steps", "3", "--save-steps", "0", "--tensorboard")) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "grad_norm", "sentences_per_s"} <= set(events.Tags()["scalars"])
    logged = step_losses(out)
    board = {e.step: e.value for e in events.Scalars("loss")}
    assert sorted(board) == sorted(logged) == [1, 2, 3]
    for step, loss in logged.items():  # TensorBoard stores float32
        assert abs(board[step] - loss) <= 1e-6 * max(1.0, abs(loss))


@pytest.mark.slow
def test_embedded_default_end_to_end(tmp_path, capsys):
    """The README's main job, shortened: default model and data, STS-B dev before/after, export."""
    from sentence_transformers import SentenceTransformer

    from fastcse.models import SentenceEncoder
    from fastcse.data import minilm_path

    out = tmp_path / "default"
    assert main(["--max-steps", "2", "--batch-size", "16", "--eval-steps", "0", "--no-progress",
                 "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "STS-B dev Spearman before training:" in text and "STS-B dev Spearman after training:" in text
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["stsb_dev"] for r in records if "stsb_dev" in r}
    assert sorted(scores) == [0, 2]
    if minilm_path() is not None:
        assert scores[0] > 80  # the real all-MiniLM-L6-v2 weights were loaded (86.7 on STS-B dev)
    # final and best (the only evaluation during training is the last one) load in sentence-transformers
    sentences = ["A man is playing a guitar.", "A woman slices an onion.", "The stock market fell."]
    for name in ("final", "best"):
        model = SentenceTransformer(str(out / name), device="cpu")
        emb = model.encode(sentences, convert_to_tensor=True)
        assert emb.shape == (3, 384 if minilm_path() else 256) and torch.isfinite(emb).all()
    # the export holds the trained weights: fastcse reads the same folder to the same embeddings
    reloaded = SentenceEncoder.from_pretrained(str(out / "final"), attn_backend="eager")
    ours = reloaded.encode(sentences, progress=False)
    assert (ours - emb.cpu()).abs().max() < 1e-4
    if minilm_path() is not None:  # and training moved them away from the original model
        original = SentenceEncoder.from_pretrained(minilm_path(), attn_backend="eager").encode(sentences, progress=False)
        assert (original - ours).abs().max() > 1e-4


def test_embedded_default_is_sized_for_a_laptop():
    """No options: the bundled data, the embedded model, a fixed short budget; options override it."""
    from fastcse.config import parse_args
    from fastcse.data import minilm_path
    from fastcse.train import EMBEDDED_DEFAULT, preflight

    prep = preflight(parse_args([]))
    assert prep.model_source == ("minilm" if minilm_path() else "random-default")
    assert prep.cfg.run.max_steps == EMBEDDED_DEFAULT["max_steps"] and prep.cfg.run.eval_steps == 25
    assert len(prep.examples) == 11914 and prep.cfg.method.name == "simcse-unsup"
    assert preflight(parse_args(["--epochs", "1"])).cfg.run.max_steps is None
    assert preflight(parse_args(["--max-steps", "7"])).cfg.run.max_steps == 7


def test_quality_bar_commands_are_valid_runs(tmp_path):
    """bench/quality_bar.py's documented commands pass the training program's checks (no model load)."""
    from bench.quality_bar import RUNS
    from fastcse.config import parse_args
    from fastcse.train import preflight

    (tmp_path / "small.json").write_text(json.dumps(TINY_BERT))
    tokenizer = str(tmp_path / "tok")
    from fastcse.data import train_fallback_tokenizer

    train_fallback_tokenizer(vocab_size=500).save_pretrained(tokenizer)
    seen = set()
    for run in RUNS:
        argv = run.args(tmp_path / "small.json", tokenizer, tmp_path)[3:]  # after `python -m fastcse.train`
        prep = preflight(parse_args(argv))
        cfg = prep.cfg
        assert (cfg.method.name, cfg.method.loss_backend, cfg.run.seed) == (run.method, run.backend, run.seed)
        assert cfg.run.epochs == 10 and cfg.optim.lr == 1e-3 and cfg.method.temperature == 0.1
        assert prep.model_source == "config" and cfg.run.output_dir == str(tmp_path / run.name)
        seen.add((run.method, run.backend))
    # the bar's comparisons are all there: unsupervised fused and eager, supervised
    assert {("simcse-unsup", "chunked"), ("simcse-unsup", "eager"), ("simcse-sup", "chunked")} <= seen


def test_esimcse_queue_is_emptied_at_each_epoch_and_a_resume_keeps_to_it(assets, tmp_path, monkeypatch):
    """The reference empties ESimCSE's queue at the start of each epoch: 24 examples, batch 8, are
    3 steps per epoch, so the queue holds 0, 8, 16 rows, then 0 again. A resume from the checkpoint
    at the epoch's end continues with the losses of the uninterrupted run (a resumed run that kept
    the queue across the boundary, or emptied it mid-epoch, would differ)."""
    from fastcse.methods import ESimCSE

    seen = []
    real = ESimCSE.loss_inputs

    def recording(self, model, batch):
        seen.append(self.queue.shape[0])
        return real(self, model, batch)

    monkeypatch.setattr(ESimCSE, "loss_inputs", recording)
    args = ["--method", "esimcse", "--queue-size", "64", "--max-examples", "24", "--epochs", "2",
            "--save-steps", "3", "--save-total-limit", "10"]
    full = tmp_path / "full"
    assert main(tiny_args(assets, full, *args)) == 0
    assert seen == [0, 8, 16, 0, 8, 16]
    # the epoch boundary inside an accumulation window (micro-batches 2 | 3): emptied before micro-batch 3
    seen.clear()
    assert main(tiny_args(assets, tmp_path / "accum", *args, "--grad-accum", "2")) == 0
    assert seen == [0, 8, 16, 0]
    # resume at the epoch boundary (the step-3 checkpoint)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000006")
    (cut / "train_log.jsonl").unlink()
    seen.clear()
    assert main(tiny_args(assets, cut, *args, "--resume")) == 0
    assert seen == [0, 8, 16]
    ref, resumed = step_losses(full), step_losses(cut)
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert abs(resumed[step] - ref[step]) <= 1e-6, f"step {step}: {resumed[step]} vs {ref[step]}"


@pytest.mark.parametrize("backend", ["auto", "eager"])  # fastcse's varlen layers; HF's own checkpointing
def test_gradient_checkpointing_gives_the_stored_activation_gradients(assets, tmp_path, backend):
    """--gradient-checkpointing, dropout on (BERT's 0.1): one step's loss and every parameter's
    gradient equal the run that stores its activations (the recomputed layers replay their dropout
    masks), while each layer really runs twice (forward, then recomputed in backward)."""
    from fastcse.config import parse_args
    from fastcse.train import Trainer, preflight
    from tests.helpers import assert_close

    def one_step(name, *extra):
        trainer = Trainer(preflight(parse_args(tiny_args(assets, tmp_path / name, "--method", "esimcse",
                                                         "--max-steps", "1", "--save-steps", "0",
                                                         "--max-grad-norm", "0", "--attn-backend", backend,
                                                         *extra))))
        trainer.setup()
        trainer.stepper.zero_grad = lambda: None  # keep the step's gradients for the comparison
        # a module that runs inside layer 0 on every attention backend (varlen calls its parts, not it)
        layer = trainer.encoder.backbone.encoder.layer[0].attention.self.query
        calls = []
        handle = layer.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
        out = trainer.train_step(trainer.micro_batches(0))
        handle.remove()
        assert trainer.encoder.attn_backend == backend or backend == "auto"
        grads = {n: p.grad.clone() for n, p in trainer.encoder.named_parameters() if p.grad is not None}
        trainer.close()
        return out, grads, calls

    stored, stored_grads, stored_calls = one_step("stored")
    ckpt, ckpt_grads, ckpt_calls = one_step("checkpointed", "--gradient-checkpointing")
    no_dropout, _, _ = one_step("no-dropout", "--dropout", "0")
    assert abs(no_dropout.loss - stored.loss) > 1e-3  # dropout is on: its masks had to be replayed
    # the momentum encoder is a copy (its own layers): the model's layer runs once, or twice with recompute
    assert len(stored_calls) == 1 and len(ckpt_calls) == 2, (stored_calls, ckpt_calls)
    assert abs(ckpt.loss - stored.loss) <= 1e-6 * abs(stored.loss), (ckpt.loss, stored.loss)
    assert stored_grads.keys() == ckpt_grads.keys() and len(stored_grads) > 10
    for name, g in stored_grads.items():
        assert_close(ckpt_grads[name], g, rtol=1e-5, atol=1e-7, name=name)


@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_dropout_override_reaches_attention_modules_that_keep_a_float(backend):
    """--dropout 0 (fastcse.build.set_dropout) must also reach HF attention modules that copy the
    probability into a plain float when built (T5Attention.dropout = config.dropout_rate): in training
    mode two forwards are then identical, where the config's 0.1 makes them differ."""
    from transformers import T5Config, T5EncoderModel

    from fastcse.build import set_dropout
    from fastcse.models.encoder import SentenceEncoder

    cfg = T5Config(d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=64, vocab_size=100,
                   relative_attention_num_buckets=8, dropout_rate=0.1)
    ids = torch.randint(1, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0

    def two_forwards(encoder):
        encoder.train()
        return [encoder(input_ids=ids, attention_mask=mask) for _ in range(2)]

    kept = SentenceEncoder(T5EncoderModel(cfg), pooling="mean", attn_backend=backend)
    a, b = two_forwards(kept)
    assert not torch.allclose(a, b)  # the config's dropout is live
    # the hidden dropouts alone would already differ: switch them off first, so the float is what is tested
    for m in kept.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    a, b = two_forwards(kept)
    assert not torch.allclose(a, b), "attention dropout kept as a float should still be live here"
    set_dropout(kept, 0.0)
    a, b = two_forwards(kept)
    assert torch.equal(a, b)
    assert all(getattr(m, "dropout") == 0.0 for m in kept.modules() if isinstance(getattr(m, "dropout", None), float))
