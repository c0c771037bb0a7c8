"""T5 / DeBERTa-v2 patched onto the fused biased kernel against Hugging Face's eager attention.

Tiny random configs (no downloads), padded batches with ragged lengths, sequences longer than the
bucketing / clamping distances so log buckets and clamped positions are exercised.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    DebertaConfig,
    DebertaModel,
    DebertaV2Config,
    DebertaV2Model,
    T5Config,
    T5EncoderModel,
    T5Model,
    UMT5Config,
    UMT5EncoderModel,
)

from fastcse.models import biased as biased_module
from fastcse.models.biased import patch_biased_attention, unpatch_biased_attention
from tests.helpers import assert_close, rel_error

SEQ = 29
# the interpreter on CPU; on a GPU machine the same tests run compiled on the GPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _default_device():
    with torch.device(DEVICE):
        yield

LENGTHS = [SEQ, 17, 5]


def _batch(lengths=LENGTHS):
    seq = max(lengths)
    ids = torch.randint(1, 100, (len(lengths), seq))
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def _t5_config(**kw):
    base = dict(vocab_size=100, d_model=32, d_kv=16, num_heads=2, num_layers=2, num_decoder_layers=2,
                d_ff=64, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                dropout_rate=0.1, attn_implementation="eager")
    return T5Config(**{**base, **kw})


def _deberta_config(**kw):
    base = dict(vocab_size=100, hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                intermediate_size=64, relative_attention=True, max_position_embeddings=64,
                attn_implementation="eager")
    return DebertaV2Config(**{**base, **kw})


DEBERTA_VARIANTS = {
    # DeBERTa-v3 style: log buckets (8 < SEQ, so distances share buckets), shared keys, LN on rel
    "v3_buckets_shared": dict(pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=32,
                              norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False),
    # DeBERTa-v2 style: no buckets, span 12 < SEQ (clamped), separate position projections
    "v2_clamped": dict(pos_att_type=["p2c", "c2p"], position_buckets=-1, max_relative_positions=12,
                       share_att_key=False),
    "c2p_only": dict(pos_att_type=["c2p"], position_buckets=-1, max_relative_positions=12, share_att_key=False),
    # span 64 > SEQ: only the 2 SEQ - 1 relative embeddings around the centre are used (window)
    "v3_wide_span": dict(pos_att_type=["p2c", "c2p"], position_buckets=64, max_relative_positions=128,
                         norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False),
    # max_relative_positions ~ position_buckets: bucketing can move distances outwards, no window
    "no_window": dict(pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=16,
                      share_att_key=False),
}


def _hidden(model, ids, mask, encoder_only=True):
    if encoder_only:
        return model(input_ids=ids, attention_mask=mask).last_hidden_state
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :7])
    return out.encoder_last_hidden_state, out.last_hidden_state


def _assert_same_as_eager(reference, expect_patched: int):
    """Hidden states of real tokens and every parameter gradient equal HF eager."""
    fast = copy.deepcopy(reference)
    assert patch_biased_attention(fast) == expect_patched
    reference.eval(), fast.eval()
    ids, mask = _batch()
    ref_out = _hidden(reference, ids, mask)
    out = _hidden(fast, ids, mask)
    real = mask.bool()
    assert_close(out[real], ref_out[real], rtol=1e-5, atol=1e-5, name="last_hidden_state")

    weight = torch.randn_like(ref_out) * mask[..., None]  # a loss over real tokens only
    (ref_out * weight).sum().backward()
    (out * weight).sum().backward()
    checked = 0
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), fast.named_parameters()):
        if p_ref.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        # relative to the parameter's gradient scale (some are analytically zero: a bias added
        # to a whole softmax row, e.g. pos_key_proj.bias, leaves only rounding noise)
        scale = p_ref.grad.abs().max().item()
        assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4 * scale + 1e-8, name=f"grad {name}")
        checked += 1
    assert checked > 10
    return reference, fast


def test_t5_encoder_matches_hf_eager():
    torch.manual_seed(0)
    reference, fast = _assert_same_as_eager(T5EncoderModel(_t5_config()), expect_patched=2)
    table = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert dict(fast.named_parameters())[table].grad.abs().sum() > 0


def test_umt5_encoder_matches_hf_eager():
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=100, d_model=32, d_kv=16, num_heads=2, num_layers=2, d_ff=64,
                        relative_attention_num_buckets=8, relative_attention_max_distance=20,
                        attn_implementation="eager")
    _assert_same_as_eager(UMT5EncoderModel(config), expect_patched=2)


def test_t5_full_model_patches_the_encoder_only():
    torch.manual_seed(0)
    reference = T5Model(_t5_config())
    fast = copy.deepcopy(reference)
    assert patch_biased_attention(fast) == 2  # decoder self- and cross-attention stay HF's
    reference.eval(), fast.eval()
    ids, mask = _batch()
    (enc_ref, dec_ref), (enc, dec) = _hidden(reference, ids, mask, False), _hidden(fast, ids, mask, False)
    real = mask.bool()
    assert_close(enc[real], enc_ref[real], rtol=1e-5, atol=1e-5, name="encoder")
    assert_close(dec, dec_ref, rtol=1e-5, atol=1e-5, name="decoder")


@pytest.mark.parametrize("variant", sorted(DEBERTA_VARIANTS))
def test_deberta_matches_hf_eager(variant):
    torch.manual_seed(0)
    _assert_same_as_eager(DebertaV2Model(_deberta_config(**DEBERTA_VARIANTS[variant])), expect_patched=2)


def test_deberta_output_attentions_falls_back_to_hf():
    torch.manual_seed(0)
    reference = DebertaV2Model(_deberta_config(**DEBERTA_VARIANTS["v2_clamped"])).eval()
    fast = copy.deepcopy(reference)
    patch_biased_attention(fast)
    ids, mask = _batch()
    out = fast(input_ids=ids, attention_mask=mask, output_attentions=True)
    ref = reference(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert_close(out.attentions[-1], ref.attentions[-1], rtol=1e-6, atol=1e-6, name="attentions")


@pytest.mark.parametrize("family", ["t5", "deberta"])
def test_dropout_train_forwards_differ_eval_deterministic(family):
    torch.manual_seed(0)
    if family == "t5":
        model = T5EncoderModel(_t5_config(dropout_rate=0.2))
    else:
        model = DebertaV2Model(_deberta_config(**DEBERTA_VARIANTS["v3_buckets_shared"],
                                               attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.0))
    patch_biased_attention(model)
    ids, mask = _batch()
    real = mask.bool()
    model.train()
    a, b = (_hidden(model, ids, mask)[real] for _ in range(2))
    assert rel_error(a, b) > 1e-3
    model.eval()
    c, d = (_hidden(model, ids, mask)[real] for _ in range(2))
    assert torch.equal(c, d)


def test_dropout_gradient_is_the_gradient_of_the_dropped_forward():
    """Attention dropout only (hidden dropout 0); with the RNG re-seeded every forward draws the
    same kernel masks, so a central finite difference along a random direction must match the
    autograd directional derivative: the backward regenerates the forward's masks."""
    torch.manual_seed(0)
    model = DebertaV2Model(_deberta_config(**DEBERTA_VARIANTS["v3_buckets_shared"],
                                           attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.0))
    patch_biased_attention(model)
    model.train()
    ids, mask = _batch([21, 9])
    weight = torch.randn(*ids.shape, 32) * mask[..., None]
    params = [p for p in model.parameters() if p.requires_grad]

    def loss():
        torch.manual_seed(1234)
        return (_hidden(model, ids, mask) * weight).sum()

    loss().backward()
    direction = [torch.randn_like(p) for p in params]
    norm = torch.sqrt(sum(d.square().sum() for d in direction))
    direction = [d / norm for d in direction]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()

    eps = 1e-2
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        plus = loss().item()
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        minus = loss().item()
        for p, d in zip(params, direction):
            p.add_(eps * d)
        # a different dropout draw changes the loss by far more than the FD tolerance
        torch.manual_seed(99)
        other = (_hidden(model, ids, mask) * weight).sum().item()
    numeric = (plus - minus) / (2 * eps)
    assert abs(numeric - analytic) <= 1e-2 * abs(analytic) + 1e-3, (numeric, analytic)
    assert abs(other - loss().item()) > 100 * abs(numeric - analytic)


def test_unpatch_restores_hf_forward():
    torch.manual_seed(0)
    model = T5EncoderModel(_t5_config()).eval()
    ids, mask = _batch()
    before = _hidden(model, ids, mask)
    assert patch_biased_attention(model) == 2
    assert patch_biased_attention(model) == 2  # idempotent
    assert unpatch_biased_attention(model) == 2
    assert torch.equal(_hidden(model, ids, mask), before)


def test_t5_norms_run_as_one_rms_norm_and_unpatch(monkeypatch):
    """Every T5LayerNorm (encoder and decoder) is one F.rms_norm call when input and weight share
    a dtype (HF's own forward otherwise); unpatching restores HF's."""
    torch.manual_seed(0)
    config = _t5_config()
    model = T5Model(config).eval()
    norms = [m for m in model.modules() if type(m).__name__ == "T5LayerNorm"]
    # two per encoder block, three per decoder block, a final one each
    assert len(norms) == 2 * config.num_layers + 3 * config.num_decoder_layers + 2
    patch_biased_attention(model)
    calls = []
    # torch.rms_norm: what F.rms_norm calls once (F.rms_norm itself is re-entered through
    # handle_torch_function while a torch-function mode is active, so spying on it counts twice)
    rms_norm = torch.rms_norm
    monkeypatch.setattr(torch, "rms_norm", lambda *a, **k: (calls.append(a[0].dtype), rms_norm(*a, **k))[1])
    ids, mask = _batch()
    _hidden(model, ids, mask, encoder_only=False)
    assert len(calls) == len(norms) and set(calls) == {torch.float32}
    calls.clear()
    norms[0](torch.randn(3, norms[0].weight.shape[0], dtype=torch.float64))  # mixed: HF's forward
    assert calls == []
    unpatch_biased_attention(model)
    assert not any("forward" in vars(m) or hasattr(m, "_fastcse_rms_norm") for m in norms)
    _hidden(model, ids, mask, encoder_only=False)
    assert calls == []


@pytest.mark.cuda
def test_t5_norm_is_torchs_fused_kernel_on_cuda():
    """What bench/perf_model.py assumes of a card: the patched norm runs aten::_fused_rms_norm
    forward and its fused backward (torch >= 2.9), within bf16 rounding of HF's."""
    torch.manual_seed(0)
    reference = T5EncoderModel(_t5_config()).cuda().to(torch.bfloat16)
    norm = reference.encoder.final_layer_norm
    fast = copy.deepcopy(norm)
    fast.forward = types.MethodType(biased_module._t5_norm_forward, fast)
    x = torch.randn(4, 9, norm.weight.shape[0], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fast(x).float().pow(2).sum().backward()
    names = {e.name for e in prof.events()}
    assert {"aten::_fused_rms_norm", "aten::_fused_rms_norm_backward"} <= names, sorted(names)
    assert_close(fast(x).float(), norm(x).float(), rtol=1e-2, atol=1e-2, name="fused vs HF bf16")


@pytest.mark.parametrize("build", [
    lambda: BertModel(BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                 intermediate_size=64)),
    lambda: DebertaModel(DebertaConfig(vocab_size=50, hidden_size=32, num_attention_heads=2,
                                       num_hidden_layers=1, intermediate_size=64)),
], ids=["bert", "deberta_v1"])
def test_unsupported_model_raises_clear_error(build):
    with pytest.raises(ValueError, match="attn_backend='biased' supports"):
        patch_biased_attention(build())


@pytest.mark.parametrize("family", ["t5", "deberta"])
def test_bf16_model_within_twice_hf_bf16_error(family):
    """bf16 end to end (tables, scale rounding, dtype plumbing): the patched model's error against
    the fp32 HF model is at most twice HF eager's own bf16 error (plus a small floor)."""
    torch.manual_seed(0)
    if family == "t5":
        reference = T5EncoderModel(_t5_config())
    else:
        reference = DebertaV2Model(_deberta_config(**DEBERTA_VARIANTS["v3_buckets_shared"]))
    reference.eval()
    eager_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    fast_bf16 = copy.deepcopy(eager_bf16)
    patch_biased_attention(fast_bf16)
    ids, mask = _batch()
    real = mask.bool()
    ref = _hidden(reference, ids, mask)[real]
    err_fast = rel_error(_hidden(fast_bf16, ids, mask)[real], ref)
    err_hf = rel_error(_hidden(eager_bf16, ids, mask)[real], ref)
    assert err_fast <= 2 * err_hf + 2e-3, f"patched bf16 {err_fast:.2e} vs HF bf16 {err_hf:.2e}"


def test_gradient_checkpointing_replays_the_dropout_masks():
    """The kernel's dropout seed comes from torch's generator, so HF gradient checkpointing (which
    restores the RNG state for the recomputation) recomputes the same masks: with the same seed,
    checkpointed and plain training steps give the same gradients."""
    torch.manual_seed(0)
    model = DebertaV2Model(_deberta_config(**DEBERTA_VARIANTS["v3_buckets_shared"],
                                           attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.0))
    patch_biased_attention(model)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()
    ids, mask = _batch([14, 9])
    weight = torch.randn(*ids.shape, 32) * mask[..., None]
    for m in (model, checkpointed):
        m.train()
        torch.manual_seed(7)
        (_hidden(m, ids, mask) * weight).sum().backward()
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        if p.grad is not None:
            assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, name=f"grad {name}")


@pytest.mark.parametrize("family", ["t5", "deberta"])
def test_chunked_pytorch_path_matches_hf_eager(family, monkeypatch):
    """Where Triton cannot run (CPU without its interpreter) the patched modules use the chunked
    PyTorch twin: same outputs and gradients as HF eager; dropout on in training only."""
    import fastcse.biased_attention as biased

    monkeypatch.setattr(biased, "triton_can_run", lambda tensor: False)
    torch.manual_seed(0)
    if family == "t5":
        model = T5EncoderModel(_t5_config())
    else:
        model = DebertaV2Model(_deberta_config(**DEBERTA_VARIANTS["v3_buckets_shared"]))
    _, fast = _assert_same_as_eager(model, expect_patched=2)
    ids, mask = _batch()
    fast.train()
    real = mask.bool()
    assert rel_error(_hidden(fast, ids, mask)[real], _hidden(fast, ids, mask)[real]) > 1e-3

