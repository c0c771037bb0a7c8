"""The ``aten_flash`` varlen kernel (fastcse.kernels.flash_varlen): PyTorch's FlashAttention-2 on
packed tokens with attention dropout, as a custom op with an autograd formula.

CPU: the dispatch (``auto`` never picks a CUDA kernel for CPU tensors, clear errors), the op's
graph (one forward and one backward node, the backward fed the forward's RNG state) traced with
fake tensors. CUDA (``bench/gpu_check.sh``): values against padded SDPA, dropout replay, the
backward's consistency with the forward under dropout, torch.compile, the BERT encoder on it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from fastcse.kernels import flash_varlen
from fastcse.models import attention as attn
from fastcse.models.unpad import unpad_input
from tests.helpers import rel_error


def _packed(lengths, device):
    lengths = torch.as_tensor(lengths)
    mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()
    return unpad_input(mask.to(device))


# --------------------------------------------------------------------------------------------
# CPU: dispatch and errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_auto_never_picks_flash_on_cpu(dtype, dropout_p):
    assert attn.pick_varlen_kernel(torch.device("cpu"), dtype, dropout_p) == "padded_sdpa"


def test_auto_picks_aten_flash_on_cuda_half(monkeypatch):
    """Without the flash-attn package, half-precision CUDA inputs go to aten_flash (dropout or not);
    fp32, a pre-sm80 card and an unsupported head size go to padded SDPA."""
    monkeypatch.setattr(attn, "_flash_attn_varlen", lambda: None)
    cuda = torch.device("cuda", 0)
    for p in (0.0, 0.1):
        assert attn.pick_varlen_kernel(cuda, torch.bfloat16, p) == "aten_flash"
        assert attn.pick_varlen_kernel(cuda, torch.float16, p, head_dim=128) == "aten_flash"
    assert attn.pick_varlen_kernel(cuda, torch.float32, 0.1) == "padded_sdpa"
    assert attn.pick_varlen_kernel(cuda, torch.bfloat16, 0.1, head_dim=260) == "padded_sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert attn.pick_varlen_kernel(cuda, torch.float16, 0.1) == "padded_sdpa"


def test_flash_attn_package_stays_first(monkeypatch):
    monkeypatch.setattr(attn, "_flash_attn_varlen", lambda: object())
    assert attn.pick_varlen_kernel(torch.device("cuda", 0), torch.bfloat16, 0.1) == "flash_attn"


def test_aten_flash_errors_are_clear():
    packed = _packed([3, 5], "cpu")
    q = torch.randn(packed.total_tokens, 2, 8)
    with pytest.raises(ValueError, match="aten_flash.*needs CUDA"):
        attn.varlen_attention(q, q, q, packed, kernel="aten_flash")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        flash_varlen.flash_varlen_attention(q, q, q, packed.cu_seqlens, packed.max_seqlen)
    assert "fp16 or bf16" in flash_varlen.flash_varlen_unsupported_reason(torch.device("cuda"), torch.float32, 64)
    assert "head_dim" in flash_varlen.flash_varlen_unsupported_reason(torch.device("cuda"), torch.bfloat16, 36)
    # a torch whose schema has no window: a window is refused by name, no window passes nothing
    with pytest.raises(RuntimeError, match="window"):
        flash_varlen._window_kwargs(frozenset({"scale"}), 4, 4)
    assert flash_varlen._window_kwargs(frozenset({"scale"}), -1, -1) == {}


def test_cpu_auto_stays_exact():
    """On CPU, kernel='auto' is the padded SDPA twin: equal to per-sequence SDPA."""
    lengths = [4, 1, 7]
    packed = _packed(lengths, "cpu")
    q, k, v = (torch.randn(packed.total_tokens, 2, 8, dtype=torch.float64) for _ in range(3))
    out = attn.varlen_attention(q, k, v, packed)
    ref, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        ref.append(F.scaled_dot_product_attention(q[s].transpose(0, 1), k[s].transpose(0, 1),
                                                  v[s].transpose(0, 1)).transpose(0, 1))
        start += n
    assert rel_error(out, torch.cat(ref)) < 1e-12


def test_op_graph_replays_rng_state():
    """Traced with fake tensors: one forward node, one backward node, and the backward's RNG
    arguments are the forward's RNG outputs (so the backward kernel replays the forward's mask).
    No zero-filled gradient is made for the lse / RNG outputs that nothing differentiates."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(q, k, v, cu, g):
        out = flash_varlen.flash_varlen_attention(q, k, v, cu, 16, dropout_p=0.2)
        return torch.autograd.grad(out, (q, k, v), g)

    def make(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, dtype=dtype, device="meta")

    q, k, v = (make(40, 2, 16).requires_grad_() for _ in range(3))
    cu = torch.zeros(4, dtype=torch.int32, device="meta")
    graph = make_fx(step, tracing_mode="fake")(q, k, v, cu, make(40, 2, 16))
    nodes = list(graph.graph.nodes)
    fwd = [n for n in nodes if "flash_varlen_fwd" in str(n.target)]
    bwd = [n for n in nodes if "flash_varlen_bwd" in str(n.target)]
    assert len(fwd) == 1 and len(bwd) == 1
    getitems = {n.args[1]: n for n in nodes if n.op == "call_function" and n.args and n.args[0] is fwd[0]}
    rng_a, rng_b = bwd[0].args[10], bwd[0].args[11]
    assert rng_a is getitems[2] and rng_b is getitems[3]
    assert bwd[0].args[8] == 0.2  # the same dropout_p
    fills = [n for n in nodes if n.op == "call_function" and "zeros" in str(n.target)]
    assert not fills, fills


# --------------------------------------------------------------------------------------------
# CUDA


def _cuda_inputs(lengths, nheads=4, head_dim=64, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    packed = _packed(lengths, "cuda")
    base = [torch.randn(packed.total_tokens, nheads, head_dim, device="cuda", generator=gen) for _ in range(4)]
    return packed, base[:3], base[3]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_aten_flash_matches_padded_sdpa(dtype):
    """Dropout 0: output and gradients within twice padded SDPA's own error in the same dtype
    (both against padded SDPA in fp32)."""
    lengths = torch.randint(1, 200, (9,))
    lengths[0] = 257
    packed, base, g = _cuda_inputs(lengths.tolist())

    def run(kernel, dt):
        q, k, v = (x.to(dt).requires_grad_() for x in base)
        out = attn.varlen_attention(q, k, v, packed, kernel=kernel)
        return [out.float()] + [x.float() for x in torch.autograd.grad(out, (q, k, v), g.to(dt))]

    exact, low, ours = run("padded_sdpa", torch.float32), run("padded_sdpa", dtype), run("aten_flash", dtype)
    for name, a, b, c in zip(["out", "dq", "dk", "dv"], ours, low, exact):
        assert rel_error(a, c) <= 2 * rel_error(b, c) + 1e-4, f"{name}: {rel_error(a, c):.2e} vs {rel_error(b, c):.2e}"


@pytest.mark.cuda
@pytest.mark.skipif(not flash_varlen.flash_varlen_has_window(), reason="this torch's flash ops take no window")
def test_aten_flash_window_matches_padded_sdpa():
    packed, base, g = _cuda_inputs([50, 9, 33])
    q, k, v = (x.half() for x in base)
    ref = attn.varlen_attention(q.float(), k.float(), v.float(), packed, window=4, kernel="padded_sdpa")
    ours = attn.varlen_attention(q, k, v, packed, window=4, kernel="aten_flash")
    low = attn.varlen_attention(q, k, v, packed, window=4, kernel="padded_sdpa")
    assert rel_error(ours, ref) <= 2 * rel_error(low, ref) + 1e-4


@pytest.mark.cuda
def test_aten_flash_dropout_replays():
    """Same seed -> the same output and gradients; another seed -> another mask; eval is exact."""
    packed, base, g = _cuda_inputs([31, 7, 64, 1])
    q0, k0, v0 = (x.to(torch.bfloat16) for x in base)

    def run(seed, p=0.2):
        torch.manual_seed(seed)
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        out = attn.varlen_attention(q, k, v, packed, dropout_p=p, kernel="aten_flash")
        return [out.float()] + [x.float() for x in torch.autograd.grad(out, (q, k, v), g.bfloat16())]

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a[0], b[0])
    for x, y in zip(a[1:], b[1:]):  # the backward's dq accumulates with atomics: not bitwise
        assert rel_error(x, y) < 1e-2
    assert rel_error(a[0], c[0]) > 0.05
    no_drop = run(3, p=0.0)
    assert torch.equal(no_drop[0], run(4, p=0.0)[0])


@pytest.mark.cuda
def test_aten_flash_backward_uses_the_forward_mask():
    """Under dropout the output is linear in v with the mask's matrix A (out = A v), and dv = A^T g,
    so <dv, v> = <g, out> exactly when the backward replays the forward's mask; a different mask
    (another seed) misses by far more. dq is checked against central differences of <g, out> at
    the same seed (fp16, small sizes)."""
    packed, base, g = _cuda_inputs([24, 9, 17], nheads=2, head_dim=32, seed=5)
    q0, k0, v0 = (x.half() for x in base)
    g16 = g.half()

    def loss(q, k, v, seed):
        torch.manual_seed(seed)
        out = attn.varlen_attention(q, k, v, packed, dropout_p=0.5, kernel="aten_flash")
        return (out.double() * g16.double()).sum(), out

    q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
    value, out = loss(q, k, v, 7)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g16)
    inner = (dv.double() * v0.double()).sum()
    assert abs(inner - value) <= 2e-2 * value.abs().clamp_min(1.0), (float(inner), float(value))
    other, _ = loss(q0, k0, v0, 8)
    assert abs(inner - other) > 10 * 2e-2 * value.abs().clamp_min(1.0)

    direction = torch.randn_like(q0.float())
    eps = 0.1
    plus, minus = (q0.float() + eps * direction).half(), (q0.float() - eps * direction).half()
    step = plus.double() - minus.double()  # the perturbation fp16 could represent
    finite = loss(plus, k0, v0, 7)[0] - loss(minus, k0, v0, 7)[0]
    predicted = (dq.double() * step).sum()
    qq = q0.clone().requires_grad_()  # dq from another mask: the control
    torch.manual_seed(8)
    dq_other = torch.autograd.grad(attn.varlen_attention(qq, k0, v0, packed, dropout_p=0.5, kernel="aten_flash"),
                                   qq, g16)[0]
    predicted_other = (dq_other.double() * step).sum()
    err = abs(finite - predicted) / finite.abs().clamp_min(1e-6)
    err_other = abs(finite - predicted_other) / finite.abs().clamp_min(1e-6)
    assert err < 0.05 and err_other > 2 * err, (float(err), float(err_other))


@pytest.mark.cuda
def test_aten_flash_compiles_once_across_batches():
    import torch._dynamo

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter, dynamic=True, fullgraph=True)
    def f(q, k, v, cu, max_seqlen):
        return flash_varlen.flash_varlen_attention(q, k, v, cu, max_seqlen, dropout_p=0.1) * 2

    for lengths in ([5, 9], [3, 4, 20], [11, 2, 8, 30]):
        packed, (q, k, v), g = _cuda_inputs(lengths)
        q, k, v = (x.bfloat16().requires_grad_() for x in (q, k, v))
        f(q, k, v, packed.cu_seqlens, packed.max_seqlen).backward(g.bfloat16())
        assert q.grad is not None and torch.isfinite(q.grad).all()
    assert counter.frame_count <= 2


@pytest.mark.cuda
def test_bert_encoder_on_aten_flash():
    """A small BERT in bf16: eval mode equals padded SDPA within bf16 error; training mode (dropout)
    runs forward + backward on aten_flash and its gradients are finite."""
    config = transformers.BertConfig(vocab_size=99, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=256, max_position_embeddings=64)
    model = transformers.BertModel(config, add_pooling_layer=False).cuda()
    lengths = torch.tensor([5, 32, 17, 1, 29])
    mask = (torch.arange(32)[None] < lengths[:, None]).long().cuda()
    ids = torch.randint(4, 99, (5, 32), device="cuda") * mask
    with torch.no_grad():
        exact, _ = attn.bert_varlen_forward(model.eval(), ids, mask, kernel="padded_sdpa")
        model.bfloat16()
        low, _ = attn.bert_varlen_forward(model, ids, mask, kernel="padded_sdpa")
        ours, _ = attn.bert_varlen_forward(model, ids, mask, kernel="aten_flash")
    assert rel_error(ours, exact) <= 2 * rel_error(low, exact) + 1e-3
    assert attn.pick_varlen_kernel(torch.device("cuda"), torch.bfloat16, 0.1) in ("flash_attn", "aten_flash")
    hidden, _ = attn.bert_varlen_forward(model.train(), ids, mask, kernel="auto")
    hidden.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
