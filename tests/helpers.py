"""Test helpers: assertions that say where and by how much two tensors differ, the tiny
training assets (a random BERT config and a tokenizer) the training-program tests share, and the
two-process gloo plumbing of the distributed tests."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import torch

# A random BERT small enough for CPU steps in milliseconds; BERT's default dropout 0.1 stays on
# unless a test passes --dropout.
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
             "max_position_embeddings": 64}


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous: MASTER_PORT, ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, port: int, world_size: int):
    """A gloo process group for a spawned test worker; on a clean exit every rank meets at a
    barrier before the group is destroyed. Without it rank 0, which hosts the rendezvous store,
    could tear it down while another rank still talks to it, and the store's thread then aborts
    the process ("terminate called without an active exception", SIGABRT, seen once in a full
    run)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def write_tiny_assets(folder: Path, config: dict = TINY_BERT) -> Path:
    """``folder/tiny.json`` (``--model-config``) and ``folder/tokenizer`` (``--tokenizer``: a
    2,000-token WordPiece trained on the bundled wiki sample; its training is not reproducible across
    processes, so a module's tests share one folder)."""
    from fastcse.data import train_fallback_tokenizer

    (folder / "tiny.json").write_text(json.dumps(config))
    train_fallback_tokenizer(vocab_size=2000).save_pretrained(str(folder / "tokenizer"))
    return folder


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str:
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    diff = (a - e).abs()
    flat = int(diff.argmax()) if diff.numel() else 0
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return (
        f"max abs diff {diff.max().item():.3e} at {idx} (actual {a[idx].item():.6e}, "
        f"expected {e[idx].item():.6e}); mean abs diff {diff.mean().item():.3e}; "
        f"max |expected| {e.abs().max().item():.3e}; {int((diff > 0).sum())}/{diff.numel()} differ"
    )


def assert_close(actual, expected, *, rtol: float, atol: float, name: str = "tensor"):
    """torch.testing-style closeness with a mismatch report naming the worst element."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if not torch.allclose(a, e, rtol=rtol, atol=atol):
        raise AssertionError(f"{name} mismatch (rtol={rtol}, atol={atol}): {describe_mismatch(a, e)}")


def rel_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Norm-wise relative error ||actual - reference|| / ||reference|| in float64."""
    a = actual.detach().double().cpu()
    r = reference.detach().double().cpu()
    return float((a - r).norm() / r.norm().clamp_min(1e-300))


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual.detach().double().cpu() - reference.detach().double().cpu()).abs().max())
