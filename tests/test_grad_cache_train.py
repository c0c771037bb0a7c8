"""``--grad-cache-chunk K`` through the training program (``fastcse.train``): per-step losses.

What "the same run without caching" is (see fastcse/grad_cache.py): every encoder call draws its
own dropout masks, so a run whose encoder forward is cut into chunks cannot draw the masks of the
run that forwards all rows in one call. Hence two references, each through the whole program
(options, data schedule, method, optimizer, schedule, log):

- dropout 0: the plain uncached run. Per-step losses equal within 1e-5 for every method
  (simcse-sup with hard negatives and their weight, ESimCSE with its momentum encoder and queue),
  chunk sizes that divide no forward, with ``--grad-accum 2`` too, and once as two literal
  ``python -m fastcse.train`` processes;
- dropout on (BERT's 0.1): the uncached run whose encoder forward (and ESimCSE's momentum
  forward) is cut into the same chunks, all with a graph and one backward (``ChunksWithGraph``,
  written here without fastcse.grad_cache). Per-step losses equal within 1e-5; the plain run
  differs (the masks matter, so the comparison can fail); with one chunk (K >= rows) the cached
  run is the plain run, masks included.

Also: a resumed cached run repeats the uninterrupted one and refuses another K; ESimCSE's momentum
embeddings are computed once per micro-step, in chunks, without a graph; K is range-checked; and
under DeepSpeed ZeRO-2 on 2 gloo ranks (``deepspeed --num_gpus 2`` runs this file as its worker),
with negatives gathered across ranks and ``--grad-accum 2``, the cached run's per-step losses equal
the uncached run's, and no gradient reduction runs inside any chunk's ``engine.backward``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcse.grad_cache import chunk_ranges, slice_features
from fastcse.train import Trainer, main

from tests.helpers import write_tiny_assets

ROOT = Path(__file__).resolve().parents[1]
# Mean pooling: with the cls / cls_mlp pooler this random tiny BERT embeds every sentence almost alike
# (the same [CLS] token at the same position), its loss sits at log(batch) and the parameter gradients
# are sums of large per-row terms that cancel, so that even the plain fp32 step is 7e-4 (relative) off
# the float64 one; fp32 noise of that size moves ESimCSE's losses by 3e-4 in a few steps. Mean pooling is
# well conditioned (the cached and plain fp32 gradients agree within 5e-7).
POOLER = "mean"
CHUNK = 5  # divides none of the forwards of a batch of 8: 16 rows (unsup, esimcse), 24 (sup), 8 (momentum)
STEPS = 4
METHOD_ARGS = {
    "simcse-unsup": [],
    "simcse-sup": ["--hard-negative-weight", "0.3"],  # the bundled SNLI triplets: hard negatives
    "esimcse": ["--queue-size", "12", "--momentum", "0.9"],  # the queue fills from step 2 on
}
TOL = 1e-5


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return write_tiny_assets(tmp_path_factory.mktemp("assets"))


def tiny_args(assets: Path, out: Path, method: str, *extra: str) -> list[str]:
    return ["--model-config", str(assets / "tiny.json"), "--tokenizer", str(assets / "tokenizer"),
            "--method", method, *METHOD_ARGS[method], "--pooler", POOLER, "--batch-size", "8",
            "--lr", "1e-3", "--max-examples", "200", "--max-steps", str(STEPS), "--save-steps", "0",
            "--no-evaluate", "--no-export", "--no-progress", "--output-dir", str(out), *extra]


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_losses_equal(got: dict, want: dict, what: str, tol: float = TOL) -> None:
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), (what, got, want)
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= tol, f"{what}: per-step losses differ by up to {worst:.2e} > {tol}: {got} vs {want}"
    # the losses move: equal lists of constants would prove nothing
    assert len({round(v, 6) for v in want.values()}) == len(want), f"{what}: constant losses {want}"


# --------------------------------------------------------------------------------------------
# the reference with dropout on: the uncached program over the same chunks
# --------------------------------------------------------------------------------------------


class ChunksWithGraph:
    """Stands in for the model in the uncached step: the forward cut into the chunks a cached step
    uses (``chunk_ranges``, trailing padding trimmed by ``slice_features``), each with its graph,
    concatenated; one backward of the loss then follows as in any uncached step. Everything else
    (``parameters()`` for clipping, ``training``) is the model's."""

    def __init__(self, model, chunk_size: int):
        self.model, self.chunk_size = model, chunk_size

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __call__(self, **features):
        rows = features["input_ids"].shape[0]
        return torch.cat([self.model(**slice_features(features, a, b))
                          for a, b in chunk_ranges(rows, self.chunk_size)])


class MomentumChunks(ChunksWithGraph):
    """ESimCSE's momentum encoder the same way (it runs under ``no_grad`` in the method)."""

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self


@pytest.fixture
def chunked_forward(monkeypatch):
    """``chunked_forward(K)``: later runs of the program in this process forward in chunks of K."""

    def install(chunk_size: int):
        real_setup = Trainer.setup

        def setup(self):
            real_setup(self)
            self.stepper.model = ChunksWithGraph(self.stepper.model, chunk_size)
            if getattr(self.method, "momentum_encoder", None) is not None:
                self.method.momentum_encoder = MomentumChunks(self.method.momentum_encoder, chunk_size)

        monkeypatch.setattr(Trainer, "setup", setup)

    return install


# --------------------------------------------------------------------------------------------
# per-step losses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_dropout_zero_equals_the_uncached_run(assets, tmp_path, method):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert main(tiny_args(assets, plain, method, "--dropout", "0")) == 0
    assert main(tiny_args(assets, cached, method, "--dropout", "0", "--grad-cache-chunk", str(CHUNK))) == 0
    assert_losses_equal(step_losses(cached), step_losses(plain), f"{method}, dropout 0, K={CHUNK}")
    recorded = json.loads((cached / "config.json").read_text())
    assert recorded["run"]["grad_cache_chunk"] == CHUNK
    assert json.loads((plain / "config.json").read_text())["run"]["grad_cache_chunk"] is None


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_dropout_on_equals_the_uncached_run_over_the_same_chunks(assets, tmp_path, method, chunked_forward):
    cached, plain, chunks = tmp_path / "cached", tmp_path / "plain", tmp_path / "chunks"
    assert main(tiny_args(assets, cached, method, "--grad-cache-chunk", str(CHUNK))) == 0
    assert main(tiny_args(assets, plain, method)) == 0
    chunked_forward(CHUNK)
    assert main(tiny_args(assets, chunks, method)) == 0
    got = step_losses(cached)
    assert_losses_equal(got, step_losses(chunks), f"{method}, dropout on, K={CHUNK}")
    # the masks matter: the plain run (one encoder call of all rows) draws others, and its losses differ
    differs = max(abs(got[s] - v) for s, v in step_losses(plain).items())
    assert differs > 100 * TOL, f"{method}: dropout on, yet the plain run's losses equal the chunked ones"


def test_one_chunk_is_the_uncached_run_with_dropout_on(assets, tmp_path):
    """K >= rows: one chunk, kept from phase 1 and not replayed: the uncached step, masks included."""
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert main(tiny_args(assets, plain, "simcse-sup")) == 0
    assert main(tiny_args(assets, cached, "simcse-sup", "--grad-cache-chunk", "24")) == 0  # 3 x 8 rows
    assert_losses_equal(step_losses(cached), step_losses(plain), "simcse-sup, dropout on, one chunk")


@pytest.mark.parametrize("method,dropout", [("simcse-sup", "0"), ("esimcse", None)])
def test_with_grad_accum_two(assets, tmp_path, method, dropout, chunked_forward):
    """Two micro-batches per step, each its own cached step: the chunks' backwards scaled by 1/2 as the
    uncached loss is; ESimCSE's second micro-batch sees the queue the first one filled."""
    extra = ["--grad-accum", "2"] + (["--dropout", dropout] if dropout is not None else [])
    cached, ref = tmp_path / "cached", tmp_path / "ref"
    assert main(tiny_args(assets, cached, method, *extra, "--grad-cache-chunk", str(CHUNK))) == 0
    if dropout is None:  # dropout on: the same chunks are the reference
        chunked_forward(CHUNK)
    assert main(tiny_args(assets, ref, method, *extra)) == 0
    assert_losses_equal(step_losses(cached), step_losses(ref), f"{method}, --grad-accum 2, dropout {dropout or 0.1}")


def test_python_m_fastcse_train(assets, tmp_path):
    """The bar as written: two ``python -m fastcse.train`` processes, with and without
    ``--grad-cache-chunk 8`` (batch 10: 20 rows, chunks 8 + 8 + 4), dropout 0."""
    runs = {}
    for name, extra in (("plain", []), ("cached", ["--grad-cache-chunk", "8"])):
        out = tmp_path / name
        args = tiny_args(assets, out, "simcse-unsup", "--dropout", "0", *extra)
        args[args.index("--batch-size") + 1] = "10"
        proc = subprocess.run([sys.executable, "-m", "fastcse.train", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = step_losses(out)
    assert "grad_cache_chunk=8" in proc.stdout  # the start line says the run caches
    assert_losses_equal(runs["cached"], runs["plain"], "python -m fastcse.train, --grad-cache-chunk 8")


# --------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2, 2 gloo ranks, through the training program
# --------------------------------------------------------------------------------------------

DS_ARGS = ["--grad-accum", "2", "--dropout", "0", "--max-steps", "3"]
DS_RUNS = {"plain": [], "cached": ["--grad-cache-chunk", str(CHUNK)]}  # 12 rows per rank: chunks 5, 5, 2
REDUCTIONS = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor")


def _ds_worker(argv: list[str]) -> None:
    """On every rank: both runs of ``DS_RUNS``, counting calls into DeepSpeed's reduction
    collectives (its gloo backend; fastcse's own gathers and finiteness checks call torch.distributed
    directly) during training steps, and those of them made inside ``engine.backward``."""
    import argparse

    from deepspeed.comm.torch import TorchBackend
    from deepspeed.runtime.engine import DeepSpeedEngine

    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", "--local-rank", type=int, default=0)
    ap.add_argument("--ds-worker", action="store_true")
    ap.add_argument("--assets", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # two ranks on two cores
    where = {"step": False, "backward": False}
    counts = {"step": 0, "backward": 0}

    def counted(fn):
        def call(*a, **k):
            counts["step"] += where["step"]
            counts["backward"] += where["step"] and where["backward"]
            return fn(*a, **k)
        return call

    def flagged(fn, key):
        def call(*a, **k):
            where[key] = True
            try:
                return fn(*a, **k)
            finally:
                where[key] = False
        return call

    for name in REDUCTIONS:  # on the class: the backend object is made when the program joins
        setattr(TorchBackend, name, counted(getattr(TorchBackend, name)))
    DeepSpeedEngine.backward = flagged(DeepSpeedEngine.backward, "backward")
    Trainer.train_step = flagged(Trainer.train_step, "step")
    result = {}
    for run, extra in DS_RUNS.items():
        counts.update(step=0, backward=0)
        argv = tiny_args(args.assets, args.out / run, "simcse-sup", *DS_ARGS, *extra,
                         "--ds", str(ROOT / "ds_configs" / "zero2.json"))
        assert main(argv) == 0, run
        result[run] = dict(counts)
    rank = int(os.environ.get("RANK", "0"))
    (args.out / f"reductions-rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero2_two_ranks_cached_equals_uncached(assets, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(port),
           str(Path(__file__).resolve()), "--ds-worker", "--assets", str(assets), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"deepspeed run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    got, want = step_losses(tmp_path / "cached"), step_losses(tmp_path / "plain")
    assert sorted(got) == sorted(want) == [1, 2, 3], (got, want)
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= TOL, f"ZeRO-2, 2 ranks: cached vs uncached per-step losses differ by {worst:.2e}: {got} vs {want}"
    assert len({round(v, 6) for v in want.values()}) == len(want), want
    for rank in range(2):
        counts = json.loads((tmp_path / f"reductions-rank{rank}.json").read_text())
        # uncached, ZeRO-2 reduces its gradients in each micro-batch's backward; cached, no chunk's
        # backward reduces anything: the window's one reduction runs when the coalescing block closes
        assert counts["plain"]["backward"] > 0, counts
        assert counts["cached"]["backward"] == 0, counts
        assert 0 < counts["cached"]["step"] < counts["plain"]["step"], counts


# --------------------------------------------------------------------------------------------
# resume, the momentum encoder, the option
# --------------------------------------------------------------------------------------------


def test_resume_repeats_the_cached_run_and_keeps_its_chunk_size(assets, tmp_path, capsys):
    """Dropout on: K decides the masks, so a resume must keep it (one error line otherwise); with
    it, the resumed steps are the uninterrupted run's (the replay leaves the RNG where the uncached
    step would, and the checkpoint restores it)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--grad-cache-chunk", str(CHUNK), "--save-steps", "2", "--save-total-limit", "10"]
    assert main(tiny_args(assets, full, "esimcse", *args)) == 0
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / f"step-{STEPS:08d}")
    (cut / "train_log.jsonl").unlink()
    capsys.readouterr()
    assert main(tiny_args(assets, cut, "esimcse", *args, "--resume", "--grad-cache-chunk", "7")) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastcse.train: error: ") and len(err.strip().splitlines()) == 1, err
    assert "--grad-cache-chunk 5 in the checkpoint, 7 now" in err, err
    assert main(tiny_args(assets, cut, "esimcse", *args, "--resume")) == 0
    ref, resumed = step_losses(full), step_losses(cut)
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        assert abs(resumed[step] - ref[step]) <= 1e-6, f"step {step}: {resumed[step]} vs {ref[step]}"


def test_momentum_embeddings_once_per_micro_step_in_chunks_without_graph(assets, tmp_path):
    from fastcse.config import parse_args
    from fastcse.train import preflight

    trainer = Trainer(preflight(parse_args(tiny_args(assets, tmp_path / "run", "esimcse",
                                                     "--grad-cache-chunk", str(CHUNK)))))
    trainer.setup()
    momentum, model_calls, momentum_calls = trainer.method.momentum_encoder, [], []

    def record(calls):
        def hook(module, args, kwargs, out):
            calls.append((kwargs["input_ids"].shape[0], torch.is_grad_enabled(), out.requires_grad))
        return hook

    handles = [momentum.register_forward_hook(record(momentum_calls), with_kwargs=True),
               trainer.encoder.register_forward_hook(record(model_calls), with_kwargs=True)]
    queue_rows = []
    try:
        for step in range(2):
            model_calls.clear(), momentum_calls.clear()
            out = trainer.train_step(trainer.micro_batches(step))
            assert out.finite
            # the positive views of the 8 sentences, once, in chunks of 5 rows, no graph anywhere
            assert momentum_calls == [(5, False, False), (3, False, False)], momentum_calls
            # the model: [x; repeated x] = 16 rows in chunks 5, 5, 5, 1; the last kept with its graph
            # from phase 1, the other three replayed with one in phase 3
            assert [c[0] for c in model_calls] == [5, 5, 5, 1, 5, 5, 5], model_calls
            assert [c[1] for c in model_calls] == [False, False, False, True, True, True, True], model_calls
            queue_rows.append(trainer.method.queue.shape[0])
        assert queue_rows == [8, 12]  # one batch of momentum embeddings per step, the queue holds 12
    finally:
        for h in handles:
            h.remove()
        trainer.close()


@pytest.mark.parametrize("value,message", [
    ("0", "--grad-cache-chunk must be at least 1 (sequences per encoder chunk)"),
    ("-3", "--grad-cache-chunk must be at least 1"),
    ("2.5", "--grad-cache-chunk: expected an integer, got '2.5'"),
    ("many", "--grad-cache-chunk: expected an integer, got 'many'"),
])
def test_chunk_size_out_of_range_is_one_line_before_any_model(assets, tmp_path, capsys, monkeypatch, value, message):
    import fastcse.train

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the option was checked")

    monkeypatch.setattr(fastcse.train, "build_encoder", no_model)
    assert main(tiny_args(assets, tmp_path / "out", "simcse-unsup", f"--grad-cache-chunk={value}")) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastcse.train: error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err, err


def test_help_names_the_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--grad-cache-chunk" in out and "Gradient caching" in out


if __name__ == "__main__" and "--ds-worker" in sys.argv:
    _ds_worker(sys.argv[1:])
