"""Hugging Face RoPE encoders with the fused rotary swapped in equal the unpatched models.

Tiny random configs built in code (no download). The fused kernel runs in Triton's interpreter on
CPU; a launch counter proves the patched path really went through it.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastcse.kernels.rope as rope_kernels
from fastcse.models.rope_patch import patch_rotary, unpatch_rotary
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYERS = 2


@pytest.fixture
def launches(monkeypatch):
    """Counts fused-kernel launches (forward and backward both go through rotary_launch)."""
    calls = []
    original = rope_kernels.rotary_launch

    def counting(*args, **kwargs):
        calls.append(kwargs["conjugate"])
        return original(*args, **kwargs)

    monkeypatch.setattr(rope_kernels, "rotary_launch", counting)
    return calls


def roformer(rotary_value=False):
    config = transformers.RoFormerConfig(
        vocab_size=60, embedding_size=32, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, rotary_value=rotary_value,
    )
    return transformers.RoFormerModel(config).to(DEVICE).train()


def modernbert():
    config = transformers.ModernBertConfig(
        vocab_size=60, hidden_size=32, num_attention_heads=4, num_hidden_layers=LAYERS + 1,
        intermediate_size=48, max_position_embeddings=64, global_attn_every_n_layers=2,
        local_attention=8, embedding_dropout=0.0, attention_dropout=0.0, mlp_dropout=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        attn_implementation="eager",
    )
    return transformers.ModernBertModel(config).to(DEVICE).train()


def run(model, inputs, grad_out):
    model.zero_grad(set_to_none=True)
    out = model(**inputs).last_hidden_state
    (out * grad_out).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(patched, reference, inputs):
    out_ref = reference(**inputs).last_hidden_state
    grad_out = torch.randn_like(out_ref)
    out, grads = run(patched, inputs, grad_out)
    out_ref, grads_ref = run(reference, inputs, grad_out)
    assert_close(out, out_ref, rtol=1e-5, atol=1e-5, name="last_hidden_state")
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name in grads:
        assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, name=f"grad {name}")


def batch_inputs(batch=2, seqlen=9, with_padding=True):
    input_ids = torch.randint(3, 60, (batch, seqlen), device=DEVICE)
    mask = torch.ones(batch, seqlen, dtype=torch.long, device=DEVICE)
    if with_padding:
        mask[1, 6:] = 0
    return {"input_ids": input_ids, "attention_mask": mask}


@pytest.mark.parametrize("rotary_value", [False, True])
def test_roformer_patched_equals_unpatched(rotary_value, launches):
    reference = roformer(rotary_value)
    patched = copy.deepcopy(reference)
    assert patch_rotary(patched, backend="triton") == LAYERS
    compare(patched, reference, batch_inputs())
    per_layer = 2 if rotary_value else 1  # (q, k) in one launch, v in a second
    assert launches.count(False) == LAYERS * per_layer  # forward launches
    assert launches.count(True) == LAYERS * per_layer  # backward: conjugate rotations


def test_roformer_auto_on_cpu_is_bit_identical_and_unpatch(launches):
    reference = roformer()
    patched = copy.deepcopy(reference)
    assert patch_rotary(patched) == LAYERS
    assert patch_rotary(patched) == LAYERS  # idempotent
    inputs = batch_inputs()
    if DEVICE == "cpu":  # auto -> the model's own eager code
        assert torch.equal(patched(**inputs).last_hidden_state, reference(**inputs).last_hidden_state)
        assert launches == []
    assert unpatch_rotary(patched) == LAYERS
    assert unpatch_rotary(patched) == 0
    attention = patched.encoder.layer[0].attention.self
    assert "apply_rotary_position_embeddings" not in vars(attention)
    assert torch.equal(patched(**inputs).last_hidden_state, reference(**inputs).last_hidden_state)


@pytest.mark.parametrize("custom_positions", [False, True])
def test_modernbert_patched_equals_unpatched(custom_positions, launches):
    reference = modernbert()
    patched = copy.deepcopy(reference)
    assert patch_rotary(patched, backend="triton") == LAYERS + 1
    inputs = batch_inputs()
    if custom_positions:  # per-row cos/sin: the patch flattens them into a position table
        # Shuffled, not shifted: rotary attention is blind to a uniform shift of positions.
        inputs["position_ids"] = torch.stack([torch.randperm(9), torch.randperm(9) + 5]).to(DEVICE)
    compare(patched, reference, inputs)
    assert launches.count(False) == LAYERS + 1 and launches.count(True) == LAYERS + 1
    assert unpatch_rotary(patched) == LAYERS + 1
    assert "forward" not in vars(patched.layers[0].attn)


def test_patch_leaves_other_models_alone():
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)
    assert patch_rotary(transformers.BertModel(config)) == 0
    with pytest.raises(ValueError, match="backend must be"):
        patch_rotary(roformer(), backend="fused")


@pytest.mark.parametrize("family", ["roformer", "modernbert"])
def test_patched_bf16_error_no_worse_than_eager(family):
    """bf16 patched model vs the float64 model: at most twice the unpatched bf16 model's error."""
    build = roformer if family == "roformer" else modernbert
    reference = build().eval()
    inputs = batch_inputs(with_padding=False)
    exact = copy.deepcopy(reference).double()(**inputs).last_hidden_state
    eager = copy.deepcopy(reference).to(torch.bfloat16)
    patched = copy.deepcopy(eager)
    patch_rotary(patched, backend="triton")
    with torch.no_grad():
        err_eager = (eager(**inputs).last_hidden_state.double() - exact).abs().max().item()
        err_patched = (patched(**inputs).last_hidden_state.double() - exact).abs().max().item()
    assert 0 < err_patched <= 2 * err_eager, (err_patched, err_eager)


@pytest.mark.parametrize("family", ["roformer", "modernbert"])
def test_patched_models_compile_in_one_graph(family, launches):
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    reference = roformer() if family == "roformer" else modernbert()
    patched = copy.deepcopy(reference)
    patch_rotary(patched, backend="triton")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(patched, backend=counter)
    inputs = batch_inputs()
    out = compiled(**inputs).last_hidden_state
    out.sum().backward()
    assert_close(out, reference(**inputs).last_hidden_state, rtol=1e-5, atol=1e-5, name="compiled output")
    assert counter.frame_count == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert launches.count(False) > 0 and launches.count(True) > 0
