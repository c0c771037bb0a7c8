"""Test helpers: assertions that say where and by how much two tensors differ, and the tiny
training assets (a random BERT config and a tokenizer) the training-program tests share."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# A random BERT small enough for CPU steps in milliseconds; BERT's default dropout 0.1 stays on
# unless a test passes --dropout.
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
             "max_position_embeddings": 64}


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
