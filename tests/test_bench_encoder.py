"""The encoder benchmark's peer provider (disentangled-flash): when it runs, when it is skipped and
why, and that its encoder is put into the backbone on the same weights."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from bench import bench_encoder
from fastcse.models import SentenceEncoder

PEER = "disentangled-flash"


def _pretend_installed(monkeypatch, installed: bool):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "disentangled_flash"
                        else real(name, *a))


def test_the_peer_runs_only_for_deberta_on_cuda_when_installed(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    _pretend_installed(monkeypatch, False)
    assert "not installed" in bench_encoder.backend_runs("deberta-v3", PEER, cuda)
    _pretend_installed(monkeypatch, True)
    assert bench_encoder.backend_runs("deberta-v3", PEER, cuda) is None
    assert "CUDA-only" in bench_encoder.backend_runs("deberta-v3", PEER, cpu)
    for model in ("bert", "t5"):
        assert "DeBERTa" in bench_encoder.backend_runs(model, PEER, cuda)


def _fake_peer(monkeypatch, swaps: bool):
    """A stand-in ``disentangled_flash`` whose ``enable_deberta_training`` wraps the encoder (as the
    real one does on CUDA) or leaves it (as it does elsewhere)."""
    class DebertaV2OptimizedEncoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    calls = []

    def enable_deberta_training(backbone, *, backend):
        calls.append(backend)
        if swaps:
            backbone.encoder = DebertaV2OptimizedEncoder(backbone.encoder)
        return backbone

    module = types.ModuleType("disentangled_flash")
    module.enable_deberta_training = enable_deberta_training
    monkeypatch.setitem(sys.modules, "disentangled_flash", module)
    return calls


@pytest.mark.parametrize("swaps", [True, False])
def test_install_peer_keeps_the_weights_and_reports_a_no_op(monkeypatch, swaps):
    calls = _fake_peer(monkeypatch, swaps)
    enc = SentenceEncoder.from_config(bench_encoder.model_config("deberta-v3", tiny=True), pooling="cls",
                                      attn_backend="eager", dtype=torch.float32, max_seq_length=512)
    before = {id(p) for p in enc.parameters()}
    reason = bench_encoder.install_peer(enc, PEER)
    assert calls == ["triton"]
    assert {id(p) for p in enc.parameters()} == before  # the same parameters: the same function to compare
    if swaps:
        assert reason is None
    else:
        assert reason == f"{PEER} left the encoder as DebertaV2Encoder"


def test_a_run_with_the_peer_uninstalled_skips_it_and_measures_the_rest(monkeypatch, capsys):
    _pretend_installed(monkeypatch, False)
    rows = bench_encoder.main(["--quick", "--models", "deberta-v3", "--workloads", "long512",
                               "--backends", "eager", PEER, "--reps", "1", "--no-write"])
    assert {r["provider"] for r in rows} == {"eager"} and len(rows) == 3
    assert f"skip deberta-v3  {PEER}: not installed" in capsys.readouterr().out


def test_varlen_kernels_are_rows_of_their_own_and_one_that_cannot_run_is_skipped(capsys):
    """--varlen-kernels: the varlen backend once per kernel (provider varlen[KERNEL], auto as
    varlen); on the CPU the CUDA-only aten_flash is skipped with its reason and the rest measured."""
    rows = bench_encoder.main(["--quick", "--models", "bert", "--workloads", "wiki32", "--backends", "varlen",
                               "--varlen-kernels", "auto", "padded_sdpa", "aten_flash", "--reps", "1", "--no-write"])
    assert sorted({r["provider"] for r in rows}) == ["varlen", "varlen[padded_sdpa]"] and len(rows) == 6
    assert "skip bert        varlen[aten_flash]:" in capsys.readouterr().out
