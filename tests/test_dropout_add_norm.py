"""The fused bias + dropout + residual add + LayerNorm against a float64 reference of its formula.

The reference is written here, independently of fastcse.dropout_add_norm: it takes the kernel's
own keep-mask (:func:`dropout_keep_rows`) and rounds where eager PyTorch rounds (x's dtype after
the bias and after dropout, the add's dtype after the add), in float64 otherwise. The Triton
kernels run in Triton's CPU interpreter here (tests/conftest.py), so shapes stay small; the
CUDA-marked test reruns the checks at BERT-base's shape on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from fastcse.dropout_add_norm import dropout_add_layer_norm, dropout_add_layer_norm_eager, resolve_backend
from fastcse.kernels.dropout_add_norm import dropout_keep_rows
from tests.helpers import assert_close, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x, residual, weight, bias, x_bias, keep, dropout_p, eps):
    """float64 ``LayerNorm(residual + dropout(x + x_bias))`` with eager's roundings; returns the
    output and the float64 leaves its gradients are taken against."""
    leaves = [t.detach().double().requires_grad_() for t in (x, residual, weight, bias)]
    xd, rd, wd, bd = leaves
    a = xd
    if x_bias is not None:
        xb = x_bias.detach().to(x.dtype).double().requires_grad_()
        leaves.append(xb)
        a = _round(a + xb, x.dtype)
    if keep is not None:
        a = _round(a * keep.double() / (1.0 - dropout_p), x.dtype)
    z = _round(a + rd, torch.promote_types(x.dtype, residual.dtype))
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).mean(-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps) * wd + bd, leaves


class _Round(torch.autograd.Function):
    """Rounds to a dtype in the forward; the gradient passes straight through (the roundings of
    eager's backward are the kernel's business, checked by the tolerance)."""

    @staticmethod
    def forward(ctx, t, dtype):
        return t.to(dtype).double()

    @staticmethod
    def backward(ctx, g):
        return g, None


def _round(t, dtype):
    return t if dtype == torch.float64 else _Round.apply(t, dtype)


def _inputs(shape, x_dtype, residual_dtype, param_dtype=torch.float32, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    dim = shape[-1]

    def make(*size, dtype, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale + shift).to(device, dtype)

    x = make(*shape, dtype=x_dtype).requires_grad_()
    residual = make(*shape, dtype=residual_dtype, scale=2.0, shift=0.5).requires_grad_()
    weight = make(dim, dtype=param_dtype, scale=0.5, shift=1.0).requires_grad_()
    bias = make(dim, dtype=param_dtype, scale=0.5).requires_grad_()
    x_bias = make(dim, dtype=param_dtype, scale=0.5).requires_grad_()
    return x, residual, weight, bias, x_bias


# fp32 everywhere; a bf16 / fp16 model (everything low); autocast's mix (a bf16 GEMM output, the
# fp32 residual stream and parameters)
CASES = [
    pytest.param(torch.float32, torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, torch.float16, torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, torch.float32, torch.float32, id="bf16-x-fp32-residual"),
]
# norm-wise relative error allowed for a tensor stored in a dtype: twice one rounding to it (the
# measured errors are one rounding: 1.7e-3 in bf16, 2e-4 in fp16, 1e-7 in fp32); a gradient
# twice that (x's gradient is rounded twice: the add's cast, then dropout's)
TOLERANCE = {torch.float32: 5e-7, torch.bfloat16: 4e-3, torch.float16: 5e-4}


@pytest.mark.parametrize("shape", [(1, 8), (7, 24), (3, 5, 100), (33, 768)], ids=str)
@pytest.mark.parametrize("x_dtype, residual_dtype, param_dtype", CASES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_matches_float64_reference(shape, x_dtype, residual_dtype, param_dtype, dropout_p):
    x, residual, weight, bias, x_bias = _inputs(shape, x_dtype, residual_dtype, param_dtype)
    seed = torch.tensor([20261203], device=DEVICE)
    out = dropout_add_layer_norm(x, residual, weight, bias, x_bias=x_bias, dropout_p=dropout_p, seed=seed,
                                 stream=5, backend="triton")
    assert out.dtype == torch.promote_types(x_dtype, residual_dtype) and out.shape == x.shape
    dim = shape[-1]
    keep = dropout_keep_rows(seed, 5, x.numel() // dim, dim, dropout_p).view(shape) if dropout_p else None
    ref, leaves = reference(x, residual, weight, bias, x_bias, keep, dropout_p, 1e-5)
    assert rel_error(out, ref) < TOLERANCE[out.dtype], rel_error(out, ref)

    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (x, residual, weight, bias, x_bias), grad.to(DEVICE, out.dtype))
    ref_grads = torch.autograd.grad(ref, leaves, grad.to(DEVICE, out.dtype).double())
    for name, got, want, leaf in zip(("x", "residual", "weight", "bias", "x_bias"), grads, ref_grads,
                                     (x, residual, weight, bias, x_bias)):
        assert got.dtype == leaf.dtype, name
        # x_bias's gradient sums x's (rounded) gradient, so it carries x's dtype's error
        tol = TOLERANCE[x_dtype if name == "x_bias" else got.dtype]
        assert rel_error(got, want) < 2 * tol, (name, rel_error(got, want))
        if dropout_p and name == "x":  # the backward drops exactly the forward's dropped entries
            assert torch.equal(got == 0, ~keep | (want == 0))


@pytest.mark.parametrize("used", ["both", "low only"])
def test_low_copy_is_the_cast_and_its_gradient_adds(used):
    """low_dtype: the second output is exactly ``out.to(low_dtype)`` and the gradients are those of
    the output taking the sum of both outputs' gradients (autograd's add of the cast's gradient),
    against the float64 reference; also when only the copy is used (the output's gradient is None)."""
    shape, dropout_p = (9, 40), 0.25
    x, residual, weight, bias, x_bias = _inputs(shape, torch.bfloat16, torch.float32, seed=4)
    seed = torch.tensor([77], device=DEVICE)
    out, low = dropout_add_layer_norm(x, residual, weight, bias, x_bias=x_bias, dropout_p=dropout_p, seed=seed,
                                      stream=3, low_dtype=torch.bfloat16, backend="triton")
    assert out.dtype == torch.float32 and low.dtype == torch.bfloat16 and low.shape == shape
    assert torch.equal(low, out.to(torch.bfloat16))
    only = dropout_add_layer_norm(x, residual, weight, bias, x_bias=x_bias, dropout_p=dropout_p, seed=seed,
                                  stream=3, backend="triton")
    assert torch.equal(only, out)  # the copy changes nothing about the output

    gen = torch.Generator().manual_seed(5)
    g_out = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, torch.float32)
    g_low = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, torch.bfloat16)
    leaves_in = (x, residual, weight, bias, x_bias)
    if used == "both":
        grads = torch.autograd.grad((out, low), leaves_in, (g_out, g_low))
        total = g_out.double() + g_low.double()
    else:
        grads = torch.autograd.grad(low, leaves_in, g_low)
        total = g_low.double()
    keep = dropout_keep_rows(seed, 3, shape[0], shape[1], dropout_p)
    ref, leaves = reference(x, residual, weight, bias, x_bias, keep, dropout_p, 1e-5)
    ref_grads = torch.autograd.grad(ref, leaves, total)
    for name, got, want in zip(("x", "residual", "weight", "bias", "x_bias"), grads, ref_grads):
        tol = TOLERANCE[torch.bfloat16 if name in ("x", "x_bias") else got.dtype]
        assert rel_error(got, want) < 2 * tol, (name, rel_error(got, want))
    # the eager twin returns the same pair
    eager_out, eager_low = dropout_add_layer_norm(x, residual, weight, bias, x_bias=x_bias,
                                                  low_dtype=torch.bfloat16, backend="eager")
    assert eager_out.dtype == torch.float32 and torch.equal(eager_low, eager_out.to(torch.bfloat16))
    with pytest.raises(ValueError, match="low_dtype"):
        dropout_add_layer_norm(x, residual, weight, bias, low_dtype=torch.int8, backend="eager")


def test_autocast_output_is_fp32_like_layer_norm():
    x, residual, weight, bias, x_bias = _inputs((6, 40), torch.bfloat16, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        fused = dropout_add_layer_norm(x, residual, weight, bias, x_bias=x_bias, backend="triton")
        eager = dropout_add_layer_norm(x, residual, weight, bias, x_bias=x_bias, backend="eager")
    assert fused.dtype == eager.dtype == torch.float32
    assert rel_error(fused, eager) < 2e-6


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_eval_and_no_grad(dropout_p):
    """training=False never drops (and ignores the seed); under no_grad nothing is saved and the
    output is the gradient-tracking one."""
    x, residual, weight, bias, x_bias = _inputs((9, 48), torch.float32, torch.float32)
    evaluated = dropout_add_layer_norm(x, residual, weight, bias, x_bias=x_bias, dropout_p=dropout_p,
                                       training=False, backend="triton")
    eager = dropout_add_layer_norm_eager(x, residual, weight, bias, x_bias=x_bias, dropout_p=dropout_p,
                                         training=False)
    assert_close(evaluated, eager, rtol=1e-5, atol=1e-5, name="eval")
    seed = torch.tensor([3], device=DEVICE)
    trained = dropout_add_layer_norm(x, residual, weight, bias, x_bias=x_bias, dropout_p=dropout_p, seed=seed,
                                     backend="triton")
    with torch.no_grad():
        again = dropout_add_layer_norm(x, residual, weight, bias, x_bias=x_bias, dropout_p=dropout_p, seed=seed,
                                       backend="triton")
    assert torch.equal(trained, again)
    assert torch.equal(trained, evaluated) == (dropout_p == 0.0)


def test_mask_rate_streams_and_independence_of_blocks():
    seed = torch.tensor([77], device=DEVICE)
    rows, dim, p = 256, 768, 0.1
    keep = dropout_keep_rows(seed, 0, rows, dim, p)
    sigma = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # each column position is dropped at the rate too (the 16-bit halves of one Philox word)
    column_rate = keep.float().mean(0)
    assert (column_rate - (1 - p)).abs().max() < 5 * (p * (1 - p) / rows) ** 0.5
    other_stream = dropout_keep_rows(seed, 1, rows, dim, p)
    other_seed = dropout_keep_rows(torch.tensor([78], device=DEVICE), 0, rows, dim, p)
    for other in (other_stream, other_seed):  # independent masks agree where both keep or both drop
        agree = (other == keep).float().mean().item()
        assert abs(agree - ((1 - p) ** 2 + p ** 2)) < 0.01
    assert torch.equal(dropout_keep_rows(seed, 0, rows, dim, p), keep)
    # a 3-row call draws the same first rows with other block sizes
    assert torch.equal(dropout_keep_rows(seed, 0, 3, dim, p), keep[:3])


def test_no_parameters_grad_and_no_x_bias():
    x, residual, weight, bias, _ = _inputs((5, 16), torch.float32, torch.float32)
    weight.requires_grad_(False)
    out = dropout_add_layer_norm(x, residual, weight, bias, backend="triton")
    ref, leaves = reference(x, residual, weight, bias, None, None, 0.0, 1e-5)
    assert rel_error(out, ref) < 2e-6
    dx, dres = torch.autograd.grad(out.square().sum(), (x, residual))
    ref_dx, ref_dres = torch.autograd.grad(ref.square().sum(), leaves[:2])
    assert rel_error(dx, ref_dx) < 1e-5 and rel_error(dres, ref_dres) < 1e-5


def test_input_errors_are_clear():
    x, residual, weight, bias, x_bias = _inputs((4, 8), torch.float32, torch.float32)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        dropout_add_layer_norm(x, residual[:3], weight, bias)
    with pytest.raises(ValueError, match=r"weight must be \(8,\)"):
        dropout_add_layer_norm(x, residual, weight[:4], bias)
    with pytest.raises(ValueError, match="x_bias must be fp32"):
        dropout_add_layer_norm(x, residual, weight, bias, x_bias=torch.ones(8, dtype=torch.long))
    with pytest.raises(ValueError, match="dropout_p"):
        dropout_add_layer_norm(x, residual, weight, bias, dropout_p=1.0)
    with pytest.raises(ValueError, match="eps"):
        dropout_add_layer_norm(x, residual, weight, bias, eps=0.0)
    with pytest.raises(ValueError, match="seed must be an int64"):
        dropout_add_layer_norm(x, residual, weight, bias, dropout_p=0.1, seed=torch.tensor([1.0]), backend="triton")
    with pytest.raises(ValueError, match="stream"):
        dropout_add_layer_norm(x, residual, weight, bias, stream=-1)
    with pytest.raises(ValueError, match="of one dtype"):
        dropout_add_layer_norm(x, residual, weight, bias.half(), backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        dropout_add_layer_norm(x, residual, weight, bias, backend="cuda")
    with pytest.raises(ValueError, match="dim <= 16384"):
        resolve_backend("triton", torch.empty(2, 16385, device=DEVICE))
    assert resolve_backend("auto", torch.empty(2, 8)) == "eager"  # the CPU stays on eager by default


def test_op_schemas_and_fakes():
    """torch.library's own consistency checks of the registration (schema, fake kernel, autograd)."""
    x, residual, weight, bias, x_bias = _inputs((6, 24), torch.bfloat16, torch.float32)
    seed = torch.tensor([9], device=DEVICE)
    args = (x, x_bias, residual, weight, bias, seed, 2, 0.2, 1e-5, torch.float32)
    ops = torch.ops.fastcse
    torch.library.opcheck(ops.dropout_add_norm_fwd.default, args + (False,), test_utils=("test_schema", "test_faketensor"))
    every = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(ops.dropout_add_norm_fwd.default, args + (True,), test_utils=every)
    torch.library.opcheck(ops.dropout_add_norm_low_fwd.default, args + (True, torch.bfloat16), test_utils=every)


def test_torch_compile_keeps_one_graph_across_sizes():
    from torch._dynamo.testing import CompileCounterWithBackend

    from fastcse.kernels._triton_utils import triton_available

    triton_available()  # (its first call in a process fills a cache, which a trace would guard on)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    seed = torch.tensor([11], device=DEVICE)

    def block(x, residual, weight, bias, x_bias):
        out = dropout_add_layer_norm(x, residual, weight, bias, x_bias=x_bias, dropout_p=0.2, seed=seed,
                                     backend="triton")
        return out * 2

    compiled = torch.compile(block, backend=counter, fullgraph=True, dynamic=True)
    first = None
    for rows in (3, 5, 9):
        x, residual, weight, bias, x_bias = _inputs((rows, 16), torch.float32, torch.float32, seed=rows)
        got = compiled(x, residual, weight, bias, x_bias)
        want = block(x, residual, weight, bias, x_bias)
        assert torch.equal(got, want)
        grads = torch.autograd.grad(got.sum(), (x, residual, weight))
        want_grads = torch.autograd.grad(want.sum(), (x, residual, weight))
        for g, w in zip(grads, want_grads):
            assert_close(g, w, rtol=1e-6, atol=1e-6)
        first = first or counter.frame_count
    # one frame (dynamo's restart that specialises the float arguments counts it twice), never
    # recompiled for a new size
    assert first <= 2 and counter.frame_count == first


@pytest.mark.cuda
@pytest.mark.parametrize("x_dtype, residual_dtype, param_dtype", CASES)
def test_cuda_bert_base_shape(x_dtype, residual_dtype, param_dtype):
    """The checks at a wiki batch's shape (1,400 tokens of 768) with many programs per SM."""
    test_matches_float64_reference((1400, 768), x_dtype, residual_dtype, param_dtype, 0.1)



# --- in the BERT varlen encoder ---------------------------------------------------------------


def _tiny(model_class="BertModel", config_class="BertConfig", **overrides):
    import transformers

    from tests.test_encoder import SMALL

    torch.manual_seed(1)
    config = getattr(transformers, config_class)(**{**SMALL, "max_position_embeddings": 64, **overrides})
    return getattr(transformers, model_class)(config, add_pooling_layer=False).to(DEVICE)


def _encode(model, ids, mask, weight, **kwargs):
    from fastcse.models import attention as attn

    model.zero_grad(set_to_none=True)
    hidden, _ = attn.bert_varlen_forward(model, ids, mask, kernel="padded_sdpa", **kwargs)
    (hidden * weight).sum().backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", [("BertModel", "BertConfig"), ("RobertaModel", "RobertaConfig")], ids=str)
def test_fused_tails_match_the_hf_modules_in_eval(family):
    """Eval mode (no dropout): the encoder with fused sublayer tails equals the HF modules'
    forward (fp32, 1e-5) and every parameter's gradient (1e-4 of the largest)."""
    from tests.test_encoder import ragged_batch

    model = _tiny(*family).eval()
    ids, mask = (t.to(DEVICE) for t in ragged_batch(model.config, batch=5, seqlen=19)[:2])
    weight = torch.randn(int(mask.sum()), model.config.hidden_size, device=DEVICE)
    ref, ref_grads = _encode(model, ids, mask, weight, residual_norm="eager")
    ours, grads = _encode(model, ids, mask, weight, residual_norm="triton")
    assert_close(ours, ref, rtol=1e-5, atol=1e-5, name="hidden")
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5 * scale, name=name)


def test_autocast_low_copies_change_nothing(monkeypatch):
    """Under autocast the fused tails hand the next GEMM their output already in bf16 (the
    kernel's second output) instead of autocast casting it: the encoder's output and every
    gradient are bitwise those of the same fused encoder with the casts (and autograd's add of the
    residual stream's two gradients), with activation checkpointing too (the layers pass the pair)."""
    from fastcse.models import attention as attn
    from tests.test_encoder import ragged_batch

    model = _tiny(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0).train()
    ids, mask = (t.to(DEVICE) for t in ragged_batch(model.config, batch=4, seqlen=17)[:2])
    weight = torch.randn(int(mask.sum()), model.config.hidden_size, device=DEVICE)
    calls = []
    real = attn._bert_output

    def spy(*args, **kwargs):
        out, low = real(*args, **kwargs)
        calls.append(low is not None and low.dtype == torch.bfloat16 and torch.equal(low, out.to(low.dtype)))
        return out, low

    def run(checkpoint=False):
        torch.manual_seed(5)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return _encode(model, ids, mask, weight, residual_norm="triton", checkpoint=checkpoint)

    monkeypatch.setattr(attn, "_bert_output", spy)
    (hidden, grads), (ckpt, ckpt_grads) = run(), run(checkpoint=True)
    layers = model.config.num_hidden_layers
    # every tail but the last layer's output wrote its copy, and the copy is the output's cast
    assert calls[:2 * layers] == [True] * (2 * layers - 1) + [False]
    monkeypatch.setattr(attn, "_bert_output", lambda *args: real(*args[:6], None))  # no copies: casts
    ref, ref_grads = run()
    assert hidden.dtype == torch.float32 and torch.equal(hidden, ref) and torch.equal(ckpt, ref)
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name
        assert torch.equal(ckpt_grads[name], ref_grads[name]), name


def test_half_precision_stream_gets_its_own_gemm_input(monkeypatch):
    """A bf16 model without autocast: the fused tails also hand the next GEMM a second bf16
    output, a tensor of its own equal to the stream, so the stream's two gradients are added in
    fp32 inside the tail's backward instead of by a bf16 add of autograd's. The forward is
    bitwise the same as without the copies; the gradients, against the fp32 model on the same
    dropout masks, are no further off (summed over every parameter)."""
    from fastcse.models import attention as attn
    from tests.test_encoder import ragged_batch

    model = _tiny(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0).train()
    ids, mask = (t.to(DEVICE) for t in ragged_batch(model.config, batch=4, seqlen=17)[:2])
    weight = torch.randn(int(mask.sum()), model.config.hidden_size, device=DEVICE)
    real = attn._bert_output
    separate = []

    def spy(*args, **kwargs):
        out, low = real(*args, **kwargs)
        separate.append(low is not None and low.dtype == out.dtype and torch.equal(low, out)
                        and low.data_ptr() != out.data_ptr())
        return out, low

    def run(m):
        torch.manual_seed(5)
        return _encode(m, ids, mask, weight.to(next(m.parameters()).dtype), residual_norm="triton")

    exact_hidden, exact = run(model)  # fp32 (no copies: nothing to cast)
    model = model.to(torch.bfloat16)
    monkeypatch.setattr(attn, "_bert_output", spy)
    hidden, grads = run(model)
    layers = model.config.num_hidden_layers
    assert separate[:2 * layers] == [True] * (2 * layers - 1) + [False]
    monkeypatch.setattr(attn, "_bert_output", lambda *args: real(*args[:6], None))  # no copies
    ref_hidden, ref = run(model)
    assert hidden.dtype == torch.bfloat16 and torch.equal(hidden, ref_hidden)

    def error(g):
        return sum((g[n].double() - exact[n].double()).norm() for n in exact).item()

    assert error(grads) <= 1.05 * error(ref), (error(grads), error(ref))


def test_fused_tails_in_training_replay_their_masks_under_checkpointing():
    """Training mode: the fused tails drop (the output differs from eval's), a torch seed
    reproduces a step, and activation checkpointing recomputes the same masks from the forward's
    seed, so its gradients equal the stored-activation run's."""
    from tests.test_encoder import ragged_batch

    model = _tiny(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0).train()
    ids, mask = (t.to(DEVICE) for t in ragged_batch(model.config, batch=4, seqlen=17)[:2])
    weight = torch.randn(int(mask.sum()), model.config.hidden_size, device=DEVICE)
    runs = []
    for checkpoint in (False, False, True):
        torch.manual_seed(123)
        runs.append(_encode(model, ids, mask, weight, residual_norm="triton", checkpoint=checkpoint))
    (first, first_grads), (again, again_grads), (ckpt, ckpt_grads) = runs
    assert torch.equal(first, again)
    assert_close(ckpt, first, rtol=1e-6, atol=1e-6, name="checkpointed hidden")
    for name in first_grads:
        assert torch.equal(first_grads[name], again_grads[name]), name
        assert_close(ckpt_grads[name], first_grads[name], rtol=1e-5, atol=1e-6, name=name)
    evaluated, _ = _encode(model.eval(), ids, mask, weight, residual_norm="triton")
    assert (first - evaluated).abs().max() > 1e-2


def test_modules_that_cannot_fuse_keep_their_forward():
    """A hook on a tail (or a replaced forward) keeps the HF modules under ``auto``; a forced
    ``triton`` says why it cannot; ``auto`` never fuses on the CPU."""
    from fastcse.models import attention as attn

    model = _tiny()
    layers = list(model.encoder.layer)
    tails = [m for layer in layers for m in (layer.attention.output, layer.output)]
    hidden = torch.empty(3, model.config.hidden_size, device=DEVICE)
    assert attn.residual_norm_backend("auto", tails, hidden) == ("triton" if hidden.is_cuda else "eager")
    assert attn.residual_norm_backend("triton", tails, hidden) == "triton"
    handle = layers[1].output.LayerNorm.register_forward_hook(lambda *args: None)
    assert attn.residual_norm_backend("triton", tails[:2], hidden) == "triton"
    with pytest.raises(ValueError, match="plain HF output modules"):
        attn.residual_norm_backend("triton", tails, hidden)
    handle.remove()
    layers[0].attention.output.forward = lambda h, r: h
    assert not attn._fusable_output(layers[0].attention.output)
    assert attn.residual_norm_backend("auto", tails, hidden.to("meta")) == "eager"  # meta is no CUDA

# --- GPU lowering, checked on CPU ----------------------------------------------------------------

_SM90_SCRIPT = r"""
import json, os
os.environ.pop("TRITON_INTERPRET", None)
import fastcse.kernels.dropout_add_norm as k
from tests.sm90 import resource_usage, signature

report = {}
# BERT-base (768: 4 rows of 1024 a program) and a 1.5B model's 2048 (2 rows, 8 warps) in bf16 with
# the fp32 residual stream of autocast, the partial-sum kernel, and the mask kernel
for dim in (768, 2048):
    for name, fn, pointers in (
        ("fwd", k._dropout_add_norm_fwd_kernel,
         dict(X="bf16", X_BIAS="fp32", RES="fp32", W="fp32", B="fp32", OUT="fp32", LOW="bf16", Z="fp32",
              STATS="fp32", SEED="i64")),
        ("bwd", k._dropout_add_norm_bwd_kernel,
         dict(G="fp32", G_LOW="bf16", Z="fp32", STATS="fp32", W="fp32", SEED="i64", DX="bf16", DRES="fp32",
              PARTIAL="fp32")),
        ("sum", k._sum_partials_kernel, dict(PARTIAL="fp32", DPARAMS="fp32")),
        ("mask", k._keep_rows_kernel, dict(MASK="i8", SEED="i64")),
    ):
        block_r, block_d, warps = k._blocks(4096, dim, backward=name == "bwd")
        consts = dict(HAS_X_BIAS=True, HAS_DROPOUT=True, STORE_Z=True, STORE_LOW=True, HAS_G_LOW=True, N_SUMS=3, BLOCK_R=block_r, BLOCK_D=block_d,
                      BLOCK_P=k._SUM_BLOCK_PARTIALS, BLOCK_C=k._SUM_BLOCK_COLS, INTERPRETED=False)
        consts = {n: v for n, v in consts.items() if n in fn.arg_names}
        sig = signature(fn, consts, {n: "*" + t for n, t in pointers.items()},
                        floats=("dropout_p", "drop_scale", "eps"))
        report[f"{name}_{dim}"] = resource_usage(fn, sig, consts, 4 if name in ("sum", "mask") else warps)
print(json.dumps(report))
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile for real")
def test_kernels_compile_for_sm90_without_spills():
    """Compile every kernel for an H100 / H200 (sm_90) without one (Triton ships ptxas): catches
    code the interpreter accepts and the compiler rejects, and register spills (stack bytes)."""
    from tests.sm90 import run_report

    report = run_report(_SM90_SCRIPT, timeout=300)
    assert len(report) == 8
    for name, usage in report.items():
        assert usage["stack"] == 0, (name, usage)
        # sm_90: 64 K registers per SM, allocated per warp in units of 256; the streaming kernels
        # need warps in flight to cover HBM latency
        per_warp = -(-usage["regs"] * 32 // 256) * 256
        resident = min(65536 // (per_warp * usage["warps"]), 32) * usage["warps"]
        if name.startswith(("fwd", "bwd")):
            assert resident >= 16, (name, usage, resident)
