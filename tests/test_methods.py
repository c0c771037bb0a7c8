"""Methods: batch -> loss inputs (SimCSE unsup/sup), ESimCSE's momentum encoder and FIFO queue."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from fastcse.config import MethodConfig
from fastcse.data import read_training_data
from fastcse.methods import ESimCSE, build_method
from tests.helpers import assert_close, free_port, gloo_group


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


SENTENCES = read_training_data("simcse-unsup", None, max_examples=16)[0]
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


def test_esimcse_queue_is_fifo_of_momentum_embeddings_of_the_original_sentences(tokenizer):
    """The reference's queue: the momentum encoder (an EMA of the model, eval mode) embeds the
    *original* sentences, FIFO of queue_size rows; compared with a hand-kept EMA copy, in float64."""
    import copy

    enc = make_encoder(tokenizer, dropout=0.1).double()  # dropout on: eval mode must switch it off
    method = build_method(MethodConfig(name="esimcse", queue_size=6, momentum=0.9), enc, seed=5)
    assert isinstance(method, ESimCSE)
    method.setup(enc, torch.device("cpu"))
    by_hand = copy.deepcopy(enc).eval()  # theta_m, kept by hand below
    queue_rows = []
    for step in range(3):
        sentences = SENTENCES[4 * step:4 * step + 4]
        batch = method.collate(sentences, micro_step=step, rank=0)
        # the positive view is the word-repeated batch: never shorter than the anchor view
        n_tokens = batch["attention_mask"].sum(1)
        assert (n_tokens[4:] >= n_tokens[:4]).all()
        out = method.loss_inputs(enc, batch)
        expected_queue = torch.cat(queue_rows)[-6:] if queue_rows else None
        if expected_queue is None:
            assert out.queue is None
        else:
            assert_close(out.queue, expected_queue, rtol=0, atol=1e-12, name=f"queue at step {step}")
        with torch.no_grad():  # the hand-kept momentum encoder's embeddings of the original sentences
            queue_rows.append(by_hand(**method.tokenize(sentences)))
            repeated = by_hand(**{k: v[4:] for k, v in batch.items()})
        method.after_micro_step()
        assert_close(method.queue[-4:], queue_rows[-1], rtol=0, atol=1e-12, name=f"rows queued at step {step}")
        # the repeated view embeds differently: the check above can tell the two apart
        assert (method.queue[-4:] - repeated).abs().max() > 1e-3
        # an optimizer step on the model, then the EMA
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(torch.randn_like(p) * 0.01)
            for pm, p in zip(by_hand.parameters(), enc.parameters()):
                pm.copy_(0.9 * pm + 0.1 * p)
        method.after_optimizer_step(enc)
        for pm, ph in zip(method.momentum_encoder.parameters(), by_hand.parameters()):
            assert_close(pm, ph, rtol=0, atol=1e-15, name="EMA")
    assert method.queue.shape == (6, 32) and method.queue.dtype == torch.float64

    state, rank_state = method.state_dict(), method.rank_state_dict()
    assert "queue" in rank_state and "queue" not in state  # the per-rank queue is saved for each rank
    other = build_method(MethodConfig(name="esimcse", queue_size=6, momentum=0.9), enc, seed=5)
    other.setup(make_encoder(tokenizer, 0.0).double(), torch.device("cpu"))
    other.load_state_dict(state)
    other.load_rank_state_dict(rank_state)
    assert torch.equal(other.queue, method.queue)
    for a, b in zip(other.momentum_encoder.parameters(), method.momentum_encoder.parameters()):
        assert torch.equal(a, b)


def test_esimcse_momentum_encoder_runs_in_eval_mode(tokenizer):
    """Dropout configured (0.1), model in training mode: the momentum embeddings are the same on
    every call (eval mode, as the reference); the deviation --esimcse-momentum-dropout draws masks."""
    torch.manual_seed(0)
    enc = make_encoder(tokenizer, dropout=0.1)
    features = enc.tokenize(SENTENCES[:6])
    method = build_method(MethodConfig(name="esimcse"), enc, seed=0)
    method.setup(enc, torch.device("cpu"))
    a, b = method.momentum_embeddings(enc, features), method.momentum_embeddings(enc, features)
    assert torch.equal(a, b) and not a.requires_grad
    assert enc.training and not method.momentum_encoder.training
    # one process: a full fp32 copy of the encoder (ZeRO-3's shards: tests/test_esimcse_zero3.py)
    assert method.momentum_bytes() == 4 * sum(p.numel() for p in enc.parameters())
    with torch.no_grad():
        assert_close(a, enc.eval()(**features), rtol=0, atol=1e-6, name="momentum = the eval-mode model at start")
    enc.train()
    deviation = build_method(MethodConfig(name="esimcse", esimcse_momentum_dropout=True), enc, seed=0)
    deviation.setup(enc, torch.device("cpu"))
    c, d = deviation.momentum_embeddings(enc, features), deviation.momentum_embeddings(enc, features)
    assert (c - d).abs().max() > 1e-3  # dropout masks: the eval-mode result above is not trivially equal
    assert torch.equal(deviation.momentum_embeddings(enc.eval(), features), a)  # the model's mode: eval now


def test_esimcse_queue_deviations_and_epoch_reset(tokenizer):
    enc = make_encoder(tokenizer, dropout=0.0)

    def run(cfg, steps):
        method = build_method(cfg, enc, seed=3)
        method.setup(enc, torch.device("cpu"))
        for step in range(steps):
            batch = method.collate(SENTENCES[3 * step:3 * step + 3], micro_step=step, rank=0)
            method.loss_inputs(enc, batch)
            method.after_micro_step()
        return method, batch

    # the reference empties the queue at each epoch; "never" keeps it
    method, _ = run(MethodConfig(name="esimcse", queue_size=8), 2)
    assert method.queue.shape[0] == 6
    method.on_epoch_start(1)
    assert method.queue.shape == (0, 32)
    kept, _ = run(MethodConfig(name="esimcse", queue_size=8, esimcse_queue_reset="never"), 2)
    before = kept.queue.clone()
    kept.on_epoch_start(1)
    assert torch.equal(kept.queue, before)
    # --esimcse-queue-view repeated: the word-repetition view's momentum embeddings (fastcse's old queue)
    repeated, batch = run(MethodConfig(name="esimcse", queue_size=8, esimcse_queue_view="repeated"), 1)
    with torch.no_grad():
        assert_close(repeated.queue, repeated.momentum_encoder(**{k: v[3:] for k, v in batch.items()}),
                     rtol=0, atol=1e-6, name="repeated-view queue")


def test_esimcse_queue_is_per_rank_on_two_gloo_ranks(tokenizer, tmp_path):
    """Two gloo ranks, each with half of every global batch: by default each rank queues only its own
    rows' momentum embeddings (the reference); with --esimcse-queue global both hold every row."""
    import torch.multiprocessing as mp

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    mp.start_processes(_per_rank_queue_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    # one process: the momentum embeddings of each rank's rows (no optimizer step: the EMA is the model)
    torch.manual_seed(0)
    enc = make_encoder(tokenizer, dropout=0.0)
    method = build_method(MethodConfig(name="esimcse"), enc, seed=3)
    method.setup(enc, torch.device("cpu"))
    own = {r: [] for r in range(2)}
    for step in range(2):
        for r in range(2):
            rows = SENTENCES[8 * step + 4 * r:8 * step + 4 * r + 4]
            own[r].append(method.momentum_embeddings(enc, method.tokenize(rows)))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, res in enumerate(results):
        assert_close(res["rank"], torch.cat(own[r]), rtol=0, atol=1e-6, name=f"rank {r}'s own queue")
        assert_close(res["global"], torch.cat([own[0][0], own[1][0], own[0][1], own[1][1]]), rtol=0, atol=1e-6,
                     name=f"rank {r}'s global queue")
    assert (results[0]["rank"] - results[1]["rank"]).abs().max() > 1e-3  # the two ranks' queues differ


def _per_rank_queue_worker(rank, port, folder):
    import os

    from transformers import PreTrainedTokenizerFast

    with gloo_group(rank, port, 2):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(folder, "tok"))
        out = {}
        for scope in ("rank", "global"):
            torch.manual_seed(0)  # the same weights on both ranks, as DeepSpeed's broadcast makes them
            enc = make_encoder(tokenizer, dropout=0.0)
            method = build_method(MethodConfig(name="esimcse", esimcse_queue=scope), enc, seed=3)
            method.setup(enc, torch.device("cpu"))
            for step in range(2):  # global batches of 8: rank r holds rows 4r ... 4r + 3
                rows = SENTENCES[8 * step + 4 * rank:8 * step + 4 * rank + 4]
                method.loss_inputs(enc, method.collate(rows, micro_step=step, rank=rank))
                method.after_micro_step()
            out[scope] = method.queue
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))


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
