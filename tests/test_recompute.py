"""Saved-activation recomputation (fastcse.models.recompute) and the varlen BERT layer's memory
choices: the MLP activation recomputed in backward, q / k / v as one GEMM. Bitwise the same
results; the bytes kept for backward drop by exactly what was designed away."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from fastcse.memory import StorageCounter
from fastcse.models import attention as attn
from fastcse.models.recompute import recompute_saved
from tests.test_encoder import SMALL, ragged_batch


def _mlp(x, w1, w2, *, recompute: bool):
    h = F.linear(x, w1)
    a = F.gelu(h)
    if not recompute:
        return F.linear(a, w2)
    with recompute_saved(a, F.gelu, h):
        return F.linear(a, w2)


def test_recompute_saved_is_exact_and_keeps_less():
    torch.manual_seed(0)
    x = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(48, 16, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(5, 48, dtype=torch.float64, requires_grad=True)
    kept, grads = {}, {}
    for recompute in (False, True):
        with StorageCounter() as counter:
            y = _mlp(x, w1, w2, recompute=recompute)
            kept[recompute] = counter.current  # y and what backward needs
        grads[recompute] = torch.autograd.grad((y * y).sum(), (x, w1, w2))
    # the gelu output (37 x 48 doubles) is no longer kept; h is, by gelu itself
    assert kept[False] - kept[True] == 37 * 48 * 8
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)
    assert torch.autograd.gradcheck(lambda *t: _mlp(*t, recompute=True), (x, w1, w2))
    # second derivatives: the recipe runs with grad on under create_graph
    assert torch.autograd.gradgradcheck(lambda *t: _mlp(*t, recompute=True), (x, w1, w2))


def test_recompute_saved_leaves_other_tensors_and_no_grad_alone():
    x = torch.randn(4, 6, requires_grad=True)
    h = x * 2
    a = torch.tanh(h)
    calls = []

    def fn(t):
        calls.append(1)
        return torch.tanh(t)

    with recompute_saved(a, fn, h):
        y = (x * 3).exp()  # exp saves its own output, not `a`: passes through
    y.sum().backward()
    assert calls == [] and torch.allclose(x.grad, 3 * (x * 3).exp())
    with torch.no_grad(), recompute_saved(a, fn, h):
        (a * x).sum()
    assert calls == []


def _bert(intermediate_act: str = "gelu"):
    config = transformers.BertConfig(**SMALL, max_position_embeddings=64, hidden_act=intermediate_act)
    torch.manual_seed(1)
    return transformers.BertModel(config, add_pooling_layer=False)


def _varlen_step(model, ids, mask, **kwargs):
    """Training-mode forward (dropout on, one seed) and backward; bytes live after the forward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with StorageCounter() as counter:
        hidden, packed = attn.bert_varlen_forward(model, ids, mask, kernel="padded_sdpa", **kwargs)
        kept = counter.current
    w = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(4))
    (hidden * w).sum().backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, kept, packed


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_new"])
def test_varlen_bert_recomputed_activation_is_bitwise_and_smaller(act):
    """fp32: the same hidden states and gradients as keeping the activation, and exactly one
    (tokens, intermediate) fp32 tensor per layer fewer kept; ReLU keeps its output for its own
    backward, so nothing is saved there (and nothing breaks)."""
    model = _bert(act).train()
    ids, mask, _ = ragged_batch(model.config, batch=6, seqlen=13)
    out_a, grads_a, kept_a, packed = _varlen_step(model, ids, mask, recompute_activation=False)
    out_b, grads_b, kept_b, _ = _varlen_step(model, ids, mask, recompute_activation=True)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    per_layer = packed.total_tokens * model.config.intermediate_size * 4
    expected = 0 if act == "relu" else model.config.num_hidden_layers * per_layer
    assert kept_a - kept_b == expected


def test_varlen_bert_qkv_one_gemm_under_autocast():
    """CPU bf16 autocast: q / k / v as one GEMM keep one bf16 copy of the layer input instead of
    three; the outputs equal the three modules' to bf16 rounding (the same products, one GEMM)."""
    model = _bert().eval()
    ids, mask, _ = ragged_batch(model.config, batch=6, seqlen=13)
    ref = transformers.BertModel._from_config(model.config, attn_implementation="eager", add_pooling_layer=False).eval()
    ref.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, packed = attn.bert_varlen_forward(model, ids, mask, kernel="padded_sdpa")
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)

    model.train()
    kept = {}
    for fused in (True, False):
        if not fused:  # a forward hook on the projections makes the layer call the modules
            handles = [m.register_forward_pre_hook(lambda *a: None)
                       for layer in model.encoder.layer for m in (layer.attention.self.query,)]
        with torch.autocast("cpu", dtype=torch.bfloat16), StorageCounter() as counter:
            torch.manual_seed(3)
            out, _ = attn.bert_varlen_forward(model, ids, mask, kernel="padded_sdpa")
            kept[fused] = counter.current
        del out
    for h in handles:
        h.remove()
    hidden, bf16 = model.config.hidden_size, 2
    # per layer: two bf16 copies of the input fewer, and no cached bf16 casts of the three biases
    # (autocast keeps a leaf's cast for the region; the stacked bias is cast per call, unkept)
    per_layer = 2 * packed.total_tokens * hidden * bf16 + 3 * hidden * bf16
    assert kept[False] - kept[True] == model.config.num_hidden_layers * per_layer


def test_varlen_bert_calls_the_modules_of_zero3_partitions(monkeypatch):
    """Parameters DeepSpeed ZeRO-3 has partitioned (``ds_id``) are gathered by their modules'
    hooks, so those projections are called as modules; others are read directly (one GEMM)."""
    model = _bert().eval()
    ids, mask, _ = ragged_batch(model.config)
    calls = []
    linear_forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: (calls.append(1), linear_forward(self, x))[1])
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        fused, _ = attn.bert_varlen_forward(model, ids, mask)
        assert len(calls) == 3 * layers  # attention output, intermediate, output: q / k / v are one F.linear
        calls.clear()
        for p in model.parameters():
            p.ds_id = 0
        modules, _ = attn.bert_varlen_forward(model, ids, mask)
    assert len(calls) == 6 * layers
    torch.testing.assert_close(fused, modules, rtol=1e-5, atol=1e-5)
