"""Methods: batch -> loss inputs (SimCSE unsup/sup), ESimCSE's momentum encoder and FIFO queue."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from fastcse.config import MethodConfig
from fastcse.data import read_training_data
from fastcse.methods import ESimCSE, build_method
from tests.helpers import assert_close


@pytest.fixture(scope="module")
def tokenizer():
    from fastcse.data import train_fallback_tokenizer

    return train_fallback_tokenizer(vocab_size=1000)


def make_encoder(tokenizer, dropout: float):
    from fastcse.models import SentenceEncoder

    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                     max_position_embeddings=64)
    enc = SentenceEncoder.from_config(cfg, tokenizer=tokenizer, pooling="mean", attn_backend="eager",
                                      max_seq_length=32)
    return enc.train()


SENTENCES = read_training_data("simcse-unsup", None, max_examples=12)[0]
TRIPLETS = read_training_data("simcse-sup", None, max_examples=6)[0]


def test_simcse_unsup_positive_is_the_same_sentence_through_dropout(tokenizer):
    enc = make_encoder(tokenizer, dropout=0.0)
    method = build_method(MethodConfig(name="simcse-unsup"), enc, seed=0)
    batch = method.collate(SENTENCES[:5], micro_step=0, rank=0)
    out = method.loss_inputs(enc, batch)
    assert out.anchors.shape == (5, 32) and out.hard_negatives is None and out.queue is None
    assert_close(out.positives, out.anchors, rtol=0, atol=1e-6, name="dropout 0: identical copies")
    enc = make_encoder(tokenizer, dropout=0.1)
    method = build_method(MethodConfig(name="simcse-unsup"), enc, seed=0)
    out = method.loss_inputs(enc, method.collate(SENTENCES[:5], micro_step=0, rank=0))
    assert (out.positives - out.anchors).abs().max() > 1e-3  # two dropout masks


def test_simcse_sup_splits_one_forward_into_three(tokenizer):
    enc = make_encoder(tokenizer, dropout=0.0)
    method = build_method(MethodConfig(name="simcse-sup", hard_negative_weight=1.0), enc, seed=0)
    batch = method.collate(TRIPLETS, micro_step=0, rank=0)
    assert batch["input_ids"].shape[0] == 18
    out = method.loss_inputs(enc, batch)
    for got, column in zip((out.anchors, out.positives, out.hard_negatives), zip(*TRIPLETS)):
        expected = enc(**enc.tokenize(list(column)))
        assert_close(got, expected, rtol=1e-5, atol=1e-5, name="3N forward vs separate")


def test_esimcse_queue_is_fifo_of_momentum_embeddings(tokenizer):
    enc = make_encoder(tokenizer, dropout=0.0)
    method = build_method(MethodConfig(name="esimcse", queue_size=6, momentum=0.9), enc, seed=5)
    assert isinstance(method, ESimCSE)
    method.setup(enc, torch.device("cpu"))
    queue_rows = []
    for step in range(3):
        batch = method.collate(SENTENCES[4 * step:4 * step + 4], micro_step=step, rank=0)
        # the positive view is the word-repeated batch: never shorter than the anchor view
        n_tokens = batch["attention_mask"].sum(1)
        assert (n_tokens[4:] >= n_tokens[:4]).all()
        out = method.loss_inputs(enc, batch)
        expected_queue = torch.cat(queue_rows)[-6:] if queue_rows else None
        if expected_queue is None:
            assert out.queue is None
        else:
            assert_close(out.queue, expected_queue, rtol=0, atol=0, name=f"queue at step {step}")
        with torch.no_grad():  # the momentum encoder's embedding of the positive view
            queue_rows.append(method.momentum_encoder(**{k: v[4:] for k, v in batch.items()}))
        method.after_micro_step()
        # an optimizer step on the model, then the EMA
        before = [p.detach().clone() for p in method.momentum_encoder.parameters()]
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        method.after_optimizer_step(enc)
        for pm, old, p in zip(method.momentum_encoder.parameters(), before, enc.parameters()):
            assert_close(pm, 0.9 * old + 0.1 * p, rtol=1e-6, atol=1e-7, name="EMA")
    assert method.queue.shape == (6, 32)

    state = method.state_dict()
    other = build_method(MethodConfig(name="esimcse", queue_size=6, momentum=0.9), make_encoder(tokenizer, 0.0), seed=5)
    other.setup(make_encoder(tokenizer, 0.0), torch.device("cpu"))
    other.load_state_dict(state)
    assert torch.equal(other.queue, method.queue)
    for a, b in zip(other.momentum_encoder.parameters(), method.momentum_encoder.parameters()):
        assert torch.equal(a, b)


def test_esimcse_collate_is_the_same_on_any_split(tokenizer):
    """Rank r of W sees exactly the rows a single process builds for the same global batch."""
    enc = make_encoder(tokenizer, dropout=0.0)
    method = build_method(MethodConfig(name="esimcse"), enc, seed=1)
    sents = SENTENCES[:8]
    whole = method.collate(sents, micro_step=4, rank=0)
    halves = [method.collate(sents[4 * r:4 * r + 4], micro_step=4, rank=r) for r in range(2)]

    def rows(batch, n):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        return [ids[i][mask[i].bool()].tolist() for i in range(2 * n)]

    whole_rows = rows(whole, 8)
    half_rows = [rows(h, 4) for h in halves]
    assert whole_rows[8:] == half_rows[0][4:] + half_rows[1][4:]  # repeated views
    assert whole_rows[8:] != whole_rows[:8]


def test_simcse_sup_pairs_are_one_forward_of_two_without_hard_negatives(tokenizer):
    from fastcse.data import Triplet

    enc = make_encoder(tokenizer, dropout=0.0)
    method = build_method(MethodConfig(name="simcse-sup"), enc, seed=0)
    pairs = [Triplet(t.sent0, t.sent1, None) for t in TRIPLETS]
    batch = method.collate(pairs, micro_step=0, rank=0)
    assert batch["input_ids"].shape[0] == 12
    out = method.loss_inputs(enc, batch)
    assert out.hard_negatives is None
    for got, column in zip((out.anchors, out.positives), zip(*[p[:2] for p in pairs])):
        assert_close(got, enc(**enc.tokenize(list(column))), rtol=1e-5, atol=1e-5, name="2N forward vs separate")
    with pytest.raises(ValueError, match="mixes pairs and triplets"):
        method.collate(pairs[:3] + list(TRIPLETS[3:]), micro_step=0, rank=0)
