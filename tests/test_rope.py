"""Fused rotary embedding: kernel and eager backends against a float64 complex-number rotation.

The Triton backend runs in Triton's CPU interpreter here (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU), so shapes stay tiny; the CUDA-marked tests rerun the checks at a
realistic shape on a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from fastcse.rotary import RotaryEmbedding, apply_rotary, apply_rotary_eager, resolve_backend
from tests.helpers import assert_close, max_error

LAYOUTS = ["half", "interleaved"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --- float64 reference, written independently of fastcse.rotary --------------------------------


def angle_table(seqlen_ro: int, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    return torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv_freq[None, :]


def cos_sin(seqlen_ro, rotary_dim, dtype=torch.float32, device=DEVICE):
    # A random phase per entry keeps the test off the special values of position 0 (cos 1, sin 0).
    angles = angle_table(seqlen_ro, rotary_dim) + torch.rand(seqlen_ro, rotary_dim // 2, dtype=torch.float64)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def reference_rotary(x, positions, cos, sin, layout, conjugate=False):
    """x: (..., tokens, heads, headdim); positions: x.shape[:-2] ints. Complex multiplication."""
    x = x.double()
    positions = positions.to(cos.device)
    rotary_dim = 2 * cos.shape[-1]
    c = cos.double()[positions].unsqueeze(-2)
    s = sin.double()[positions].unsqueeze(-2)
    if conjugate:
        s = -s
    if layout == "half":
        pairs = torch.complex(x[..., : rotary_dim // 2], x[..., rotary_dim // 2: rotary_dim])
    else:
        pairs = torch.complex(x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2])
    rotated = pairs * torch.complex(c, s)
    out = x.clone()
    if layout == "half":
        out[..., : rotary_dim // 2] = rotated.real
        out[..., rotary_dim // 2: rotary_dim] = rotated.imag
    else:
        out[..., 0:rotary_dim:2] = rotated.real
        out[..., 1:rotary_dim:2] = rotated.imag
    return out


def dense_positions(batch, seqlen, offsets):
    return torch.tensor([[offsets[b] + t for t in range(seqlen)] for b in range(batch)])


def packed_positions(lengths, offsets):
    return torch.tensor([offsets[b] + t for b, n in enumerate(lengths) for t in range(n)], dtype=torch.long)


def tolerance_check(name, actual, eager, reference, dtype):
    """fp32: close to float64. fp16/bf16: at most twice PyTorch's own eager error in that dtype."""
    if dtype == torch.float32:
        assert_close(actual, reference, rtol=1e-5, atol=1e-5, name=name)
        return
    kernel_err, eager_err = max_error(actual, reference), max_error(eager, reference)
    assert eager_err > 0, f"{name}: eager has no {dtype} error; the comparison says nothing"
    assert kernel_err <= 2 * eager_err, (
        f"{name}: max error {kernel_err:.3e} > 2 x eager {dtype} error {eager_err:.3e}")


def run_both(q, k, cos, sin, backend, grads, **kw):
    """Forward and backward through apply_rotary; returns outputs and input gradients."""
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    q_out, k_out = apply_rotary(q, k, cos, sin, backend=backend, **kw)
    (q_out.float() * grads[0]).sum().add((k_out.float() * grads[1]).sum()).backward()
    return q_out, k_out, q.grad, k.grad


BACKENDS = ["triton", "eager"]


# --- dense (batch, seqlen, heads, headdim) -----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rotary_dim", [16, 10])
def test_dense_forward_backward(layout, dtype, backend, rotary_dim):
    batch, seqlen, heads_q, heads_k, head_dim = 2, 7, 3, 2, 16
    q = torch.randn(batch, seqlen, heads_q, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, seqlen, heads_k, head_dim, device=DEVICE, dtype=dtype)
    cos, sin = cos_sin(seqlen + 4, rotary_dim, dtype=dtype)
    offsets = [3, 1]
    kw = dict(layout=layout, seqlen_offsets=torch.tensor(offsets, device=DEVICE))
    grads = (torch.randn(q.shape, device=DEVICE), torch.randn(k.shape, device=DEVICE))

    q_out, k_out, dq, dk = run_both(q, k, cos, sin, backend, grads, **kw)
    eq, ek, edq, edk = run_both(q, k, cos, sin, "eager", grads, **kw)
    positions = dense_positions(batch, seqlen, offsets)
    assert q_out.dtype == dtype and k_out.dtype == dtype
    tolerance_check("q", q_out, eq, reference_rotary(q, positions, cos, sin, layout), dtype)
    tolerance_check("k", k_out, ek, reference_rotary(k, positions, cos, sin, layout), dtype)
    # d(sum(out * g))/dx is g rotated by minus theta.
    tolerance_check("dq", dq, edq, reference_rotary(grads[0], positions, cos, sin, layout, True), dtype)
    tolerance_check("dk", dk, edk, reference_rotary(grads[1], positions, cos, sin, layout, True), dtype)
    if rotary_dim < head_dim:  # the pass-through features are copied bit for bit
        assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])
        assert torch.equal(dk[..., rotary_dim:], grads[1][..., rotary_dim:].to(dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dense_position_ids_and_int_offset(layout):
    batch, seqlen, heads, head_dim = 3, 5, 2, 8
    q = torch.randn(batch, seqlen, heads, head_dim, device=DEVICE)
    k = torch.randn(batch, seqlen, 1, head_dim, device=DEVICE)
    cos, sin = cos_sin(20, head_dim)
    position_ids = torch.randint(0, 20, (batch, seqlen), device=DEVICE)
    q_out, k_out = apply_rotary(q, k, cos, sin, layout=layout, position_ids=position_ids, backend="triton")
    assert_close(q_out, reference_rotary(q, position_ids.cpu(), cos, sin, layout), rtol=1e-5, atol=1e-5, name="q")
    assert_close(k_out, reference_rotary(k, position_ids.cpu(), cos, sin, layout), rtol=1e-5, atol=1e-5, name="k")
    # One row of position ids shared by the batch, and a plain int offset.
    shared = torch.randint(0, 20, (seqlen,), device=DEVICE)
    q_out, _ = apply_rotary(q, None, cos, sin, layout=layout, position_ids=shared, backend="triton")
    assert_close(q_out, reference_rotary(q, shared.cpu().expand(batch, seqlen), cos, sin, layout),
                 rtol=1e-5, atol=1e-5, name="q shared ids")
    q_out, none = apply_rotary(q, None, cos, sin, layout=layout, seqlen_offsets=15, backend="triton")
    assert none is None
    assert_close(q_out, reference_rotary(q, dense_positions(batch, seqlen, [15] * batch), cos, sin, layout),
                 rtol=1e-5, atol=1e-5, name="q int offset")


def test_strided_inputs():
    """q/k as views of a fused qkv projection and of a (batch, heads, seq, dim) transpose."""
    batch, seqlen, heads, head_dim = 2, 6, 2, 8
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, device=DEVICE)
    q, k, _ = qkv.unbind(dim=2)
    cos, sin = cos_sin(seqlen, head_dim)
    positions = dense_positions(batch, seqlen, [0, 0])
    q_out, k_out = apply_rotary(q, k, cos, sin, backend="triton")
    assert_close(q_out, reference_rotary(q, positions, cos, sin, "half"), rtol=1e-5, atol=1e-5, name="q")
    assert_close(k_out, reference_rotary(k, positions, cos, sin, "half"), rtol=1e-5, atol=1e-5, name="k")
    q_bhsd = torch.randn(batch, heads, seqlen, head_dim, device=DEVICE)
    out, _ = apply_rotary(q_bhsd.transpose(1, 2), None, cos, sin, layout="interleaved", backend="triton")
    assert_close(out, reference_rotary(q_bhsd.transpose(1, 2), positions, cos, sin, "interleaved"),
                 rtol=1e-5, atol=1e-5, name="transposed q")


def test_one_launch_for_q_and_k(monkeypatch):
    """q and k (different head counts) rotate in one kernel launch forward and one backward."""
    import fastcse.kernels.rope as rope_kernels

    calls = []
    original = rope_kernels.rotary_launch
    monkeypatch.setattr(rope_kernels, "rotary_launch",
                        lambda *a, **kw: calls.append(kw["conjugate"]) or original(*a, **kw))
    q = torch.randn(2, 5, 4, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 5, 1, 8, device=DEVICE, requires_grad=True)
    cos, sin = cos_sin(5, 8)
    q_out, k_out = apply_rotary(q, k, cos, sin, backend="triton")
    assert calls == [False]
    (q_out.sum() + k_out.sum()).backward()
    assert calls == [False, True]


# --- packed varlen -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("positions_from", ["offsets_tensor", "int_offset", "position_ids"])
def test_varlen(layout, dtype, positions_from):
    lengths = [3, 0, 6, 1, 5]  # ragged, with an empty sequence
    total, heads_q, heads_k, head_dim, rotary_dim = sum(lengths), 4, 1, 12, 8
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(total, heads_q, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(total, heads_k, head_dim, device=DEVICE, dtype=dtype)
    cos, sin = cos_sin(16, rotary_dim)
    kw = dict(layout=layout, cu_seqlens=cu_seqlens)
    if positions_from == "offsets_tensor":
        offsets = [2, 9, 0, 15, 4]
        kw["seqlen_offsets"] = torch.tensor(offsets, device=DEVICE)
        positions = packed_positions(lengths, offsets)
    elif positions_from == "int_offset":
        kw["seqlen_offsets"] = 5
        positions = packed_positions(lengths, [5] * len(lengths))
    else:
        positions = torch.randint(0, 16, (total,))
        kw["position_ids"] = positions.to(DEVICE)
    grads = (torch.randn(q.shape, device=DEVICE), torch.randn(k.shape, device=DEVICE))
    q_out, k_out, dq, dk = run_both(q, k, cos, sin, "triton", grads, **kw)
    eq, ek, edq, edk = run_both(q, k, cos, sin, "eager", grads, **kw)
    tolerance_check("q", q_out, eq, reference_rotary(q, positions, cos, sin, layout), dtype)
    tolerance_check("k", k_out, ek, reference_rotary(k, positions, cos, sin, layout), dtype)
    tolerance_check("dq", dq, edq, reference_rotary(grads[0], positions, cos, sin, layout, True), dtype)
    tolerance_check("dk", dk, edk, reference_rotary(grads[1], positions, cos, sin, layout, True), dtype)


# --- in place ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_inplace_matches_out_of_place(layout, backend):
    batch, seqlen, head_dim, rotary_dim = 2, 5, 12, 8
    q0 = torch.randn(batch, seqlen, 3, head_dim, device=DEVICE, requires_grad=True)
    k0 = torch.randn(batch, seqlen, 1, head_dim, device=DEVICE, requires_grad=True)
    cos, sin = cos_sin(seqlen, rotary_dim)
    expected_q, expected_k = apply_rotary(q0, k0, cos, sin, layout=layout, backend=backend)
    grads = (torch.randn_like(q0), torch.randn_like(k0))
    expected_dq, expected_dk = torch.autograd.grad(
        (expected_q * grads[0]).sum() + (expected_k * grads[1]).sum(), (q0, k0))

    q, k = q0 * 1.0, k0 * 1.0  # non-leaf tensors: autograd allows rotating them in place
    q_ptr, k_ptr = q.data_ptr(), k.data_ptr()
    q_out, k_out = apply_rotary(q, k, cos, sin, layout=layout, inplace=True, backend=backend)
    assert q_out.data_ptr() == q_ptr and k_out.data_ptr() == k_ptr
    assert_close(q_out, expected_q, rtol=1e-6, atol=1e-6, name="q in place")
    assert_close(k_out, expected_k, rtol=1e-6, atol=1e-6, name="k in place")
    assert torch.equal(q[..., rotary_dim:], q0[..., rotary_dim:])
    dq, dk = torch.autograd.grad((q_out * grads[0]).sum() + (k_out * grads[1]).sum(), (q0, k0))
    assert_close(dq, expected_dq, rtol=1e-6, atol=1e-6, name="dq in place")
    assert_close(dk, expected_dk, rtol=1e-6, atol=1e-6, name="dk in place")


# --- bad input ---------------------------------------------------------------------------------


def _bad_cases():
    q = torch.randn(2, 4, 2, 8)
    k = torch.randn(2, 4, 1, 8)
    cos, sin = cos_sin(8, 8, device="cpu")
    packed = torch.randn(6, 2, 8)
    return [
        ("odd head_dim", (torch.randn(2, 4, 2, 7), None, *cos_sin(8, 6, device="cpu")), {}, "head_dim must be even"),
        ("rotary_dim > head_dim", (q, k, *cos_sin(8, 10, device="cpu")), {}, "rotary_dim"),
        ("cos shorter than seqlen+offset", (q, k, cos, sin), {"seqlen_offsets": 5}, "cos/sin cover 8 positions"),
        ("offsets tensor too large", (q, k, cos, sin), {"seqlen_offsets": torch.tensor([0, 6])}, "cos/sin cover 8"),
        ("position_ids past cos", (q, k, cos, sin), {"position_ids": torch.tensor([[0, 1, 2, 8]] * 2)}, "position_ids span"),
        ("negative position_ids", (q, k, cos, sin), {"position_ids": torch.tensor([[0, -1, 2, 3]] * 2)}, "position_ids span"),
        ("cu_seqlens decreasing", (packed, None, cos, sin), {"cu_seqlens": torch.tensor([0, 4, 2, 6])}, "non-decreasing"),
        ("cu_seqlens total mismatch", (packed, None, cos, sin), {"cu_seqlens": torch.tensor([0, 2, 5])}, "does not match total_tokens"),
        ("varlen longer than cos", (torch.randn(10, 2, 8), None, cos, sin), {"cu_seqlens": torch.tensor([0, 1, 10])}, "longest sequence"),
        ("cu_seqlens float", (packed, None, cos, sin), {"cu_seqlens": torch.tensor([0.0, 6.0])}, "int32 or int64"),
        ("q/k dtype mismatch", (q, k.half(), cos, sin), {}, "share a dtype"),
        ("cos/sin dtype mismatch", (q, k, cos, sin.double()), {}, "share a floating dtype"),
        ("cos/sin shape mismatch", (q, k, cos, sin[:, :2]), {}, "cos and sin must both be"),
        ("k heads ok, k seqlen wrong", (q, torch.randn(2, 3, 1, 8), cos, sin), {}, "k must match"),
        ("3-D q without cu_seqlens", (packed, None, cos, sin), {}, "(batch, seqlen, nheads, headdim)"),
        ("bad layout", (q, k, cos, sin), {"layout": "neox"}, "layout must be"),
        ("ids and offsets", (q, k, cos, sin), {"position_ids": torch.zeros(2, 4, dtype=torch.long), "seqlen_offsets": 1}, "not both"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises(case, backend):
    _, args, kw, message = case
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        apply_rotary(*args, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_mismatch_raises(backend):
    """The meta device stands in for a second device: the checks run before any data is read."""
    q = torch.randn(1, 4, 2, 8)
    cos, sin = cos_sin(4, 8, device="cpu")
    with pytest.raises(ValueError, match="cos/sin on meta"):
        apply_rotary(q, None, cos.to("meta"), sin.to("meta"), backend=backend)
    with pytest.raises(ValueError, match="q and k must be on one device"):
        apply_rotary(q, q.to("meta"), cos, sin, backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens on meta"):
        apply_rotary(q[0], None, cos, sin, cu_seqlens=torch.tensor([0, 4], device="meta"), backend=backend)
    with pytest.raises(ValueError, match="position_ids on meta"):
        apply_rotary(q, None, cos, sin, position_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"),
                     backend=backend)


def test_backend_resolution(monkeypatch):
    q = torch.randn(1, 2, 1, 4)
    assert resolve_backend("auto", q) == ("triton" if q.is_cuda else "eager")
    with pytest.raises(ValueError, match="backend must be"):
        resolve_backend("chunked", q)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", q)


# --- RotaryEmbedding ---------------------------------------------------------------------------


def test_rotary_embedding_cache_and_output():
    rope = RotaryEmbedding(8, base=500.0, layout="interleaved", backend="triton")
    cos, sin = rope.cos_sin(5, DEVICE)
    assert cos.shape == (8, 4) and cos.dtype == torch.float32  # grown to a power of two
    angles = angle_table(8, 8, base=500.0)
    assert_close(cos, angles.cos(), rtol=0, atol=1e-7, name="cos")
    assert_close(sin, angles.sin(), rtol=0, atol=1e-7, name="sin")
    assert rope.cos_sin(8, DEVICE)[0] is cos  # cached, not rebuilt
    q = torch.randn(2, 11, 2, 12, device=DEVICE)
    q_out, _ = rope(q)  # longer than the cache: grows it
    assert rope.cos_sin(11, DEVICE)[0].shape[0] == 16
    table = angle_table(16, 8, 500.0)
    assert_close(q_out, reference_rotary(q, dense_positions(2, 11, [0, 0]), table.cos(), table.sin(),
                                         "interleaved"), rtol=1e-5, atol=1e-5, name="q")
    lengths = [4, 9]
    cu = torch.tensor([0, 4, 13], device=DEVICE)
    packed = torch.randn(13, 2, 8, device=DEVICE)
    out, _ = rope(packed, cu_seqlens=cu, seqlen_offsets=torch.tensor([20, 1], device=DEVICE))
    table = angle_table(32, 8, 500.0)
    assert_close(out, reference_rotary(packed, packed_positions(lengths, [20, 1]), table.cos(), table.sin(),
                                       "interleaved"), rtol=1e-5, atol=1e-5, name="packed")


# --- torch.compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_no_recompile_across_sizes(inplace):
    """One graph, no breaks; changing batch and seqlen costs at most the one dynamic recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(q, k, cos, sin):
        q, k = q * 1.0, k * 1.0  # non-leaf, so the in-place variant is legal under autograd
        q_out, k_out = apply_rotary(q, k, cos, sin, layout="half", backend="triton", inplace=inplace)
        return (q_out * q_out).sum() + k_out.sum()

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    cos, sin = cos_sin(32, 8)
    frames = []
    # (sizes 0 and 1 are always specialised by dynamo, so the sweep stays above them)
    for batch, seqlen in [(2, 5), (3, 7), (4, 9), (5, 12), (2, 30)]:
        q = torch.randn(batch, seqlen, 2, 8, device=DEVICE, requires_grad=True)
        k = torch.randn(batch, seqlen, 1, 8, device=DEVICE, requires_grad=True)
        loss = compiled(q, k, cos, sin)
        loss.backward()
        q_ref, k_ref = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        expected = step(q_ref, k_ref, cos, sin)
        expected.backward()
        assert_close(loss, expected, rtol=1e-5, atol=1e-5, name="compiled loss")
        assert_close(q.grad, q_ref.grad, rtol=1e-6, atol=1e-6, name="compiled dq")
        frames.append(counter.frame_count)
    assert frames[0] == 1
    assert frames[-1] <= 2 and frames[-1] == frames[1], f"recompiled per shape: {frames}"


# --- GPU ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_realistic_shape(layout, dtype):
    batch, seqlen, heads_q, heads_k, head_dim = 2, 1024, 16, 4, 128
    q = torch.randn(batch, seqlen, heads_q, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, seqlen, heads_k, head_dim, device="cuda", dtype=dtype)
    cos, sin = cos_sin(seqlen, head_dim, dtype=dtype, device="cuda")
    grads = (torch.randn(q.shape, device="cuda"), torch.randn(k.shape, device="cuda"))
    q_out, k_out, dq, dk = run_both(q, k, cos, sin, "triton", grads, layout=layout)
    eq, ek, edq, edk = run_both(q, k, cos, sin, "eager", grads, layout=layout)
    positions = dense_positions(batch, seqlen, [0, 0]).cuda()
    tolerance_check("q", q_out, eq, reference_rotary(q, positions, cos, sin, layout), dtype)
    tolerance_check("k", k_out, ek, reference_rotary(k, positions, cos, sin, layout), dtype)
    tolerance_check("dq", dq, edq, reference_rotary(grads[0], positions, cos, sin, layout, True), dtype)
    tolerance_check("dk", dk, edk, reference_rotary(grads[1], positions, cos, sin, layout, True), dtype)


# --- benchmark smoke ---------------------------------------------------------------------------


def test_bench_rope_runs_and_plots(tmp_path, monkeypatch):
    import bench._common
    import bench.bench_rope as bench_rope

    monkeypatch.setattr(bench._common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench_rope, "RESULTS_DIR", tmp_path)
    rows = bench_rope.main(["--device", DEVICE, "--providers", "eager", "triton", "--modes", "fwd", "full",
                            "--sweep", "seqlen", "--seqlens", "4", "8", "--batch", "1", "--heads", "2",
                            "--head-dim", "8", "--dtype", "fp32", "--reps", "1", "--csv", "rope.csv"])
    measured = [r for r in rows if r["provider"] != "copy"]  # CUDA adds the copy roofline row
    assert len(measured) == 2 * 2 * 2 * 3  # seqlens x providers x modes x metrics
    bandwidth = [r for r in rows if r["metric"] == "bandwidth" and r["x_value"] == 8 and r["mode"] == "fwd"]
    expected_bytes = 2 * 2 * (1 * 8 * 2 * 8) * 4 + 2 * 8 * 4 * 4  # q,k in+out; cos,sin once
    assert all(json.loads(r["extra_config"])["bytes"] == expected_bytes for r in bandwidth)
    assert len(bench._common.read_rows("rope.csv")) == len(rows)
    pngs = bench_rope.main(["--plot", "--csv", "rope.csv"])
    assert pngs == [] and len(list(tmp_path.glob("rope_seqlen_*.png"))) == 3


# --- GPU lowering, checked on CPU ----------------------------------------------------------------

_LOWERING_SCRIPT = r"""
import os, re
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastcse.kernels.rope import _rotary_kernel as kernel

names = kernel.arg_names
constexpr_names = {n for n, p in zip(names, kernel.params) if p.is_constexpr}
pointer_types = {"Q": "bf16", "K": "bf16", "OUT_Q": "bf16", "OUT_K": "bf16", "COS": "fp32",
                 "SIN": "fp32", "CU_SEQLENS": "i32", "POSITION_IDS": "i64", "SEQLEN_OFFSETS": "i32"}
for interleaved, varlen in [(False, False), (True, True)]:
    # What Triton's JIT specialisation sees for contiguous tensors with head_dim 128: unit dim
    # strides; pointers, strides, head_dim and rotary_half divisible by 16.
    constexprs = dict(IS_VARLEN=varlen, HAS_POSITION_IDS=False, HAS_OFFSET_TENSOR=varlen,
                      INTERLEAVED=interleaved, CONJUGATE=varlen, COPY_TAIL=varlen, BLOCK_T=4,
                      BLOCK_H=16, BLOCK_HALF=64, BLOCK_TAIL=32)
    signature, attrs = {}, {}
    for i, n in enumerate(names):
        if n in constexpr_names:
            signature[n] = "constexpr"
        elif n.startswith("stride") and n.endswith("_dim"):
            signature[n], constexprs[n] = "constexpr", 1
        elif n in pointer_types:
            signature[n] = "*" + pointer_types[n]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[n] = "i32"
            if n.startswith("stride") or n in ("head_dim", "rotary_half"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(n),): v for n, v in constexprs.items()}, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    ops = set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx))
    print(interleaved, varlen, sorted(ops))
    assert "ld.global.v4.b32" in ops and "st.global.v4.b32" in ops, ops
print("LOWERED")
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile for real")
def test_kernel_lowers_to_sm90_with_vector_loads():
    """Compile the kernel for an H100 (sm_90) without one: Triton ships ptxas. Catches kernels
    the interpreter accepts but the compiler rejects, and checks q/k move in 16-byte accesses."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    result = subprocess.run([sys.executable, "-c", _LOWERING_SCRIPT], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "LOWERED" in result.stdout, result.stdout + result.stderr[-3000:]
