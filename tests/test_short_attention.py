"""The ``short`` varlen kernel: tiles that each own whole short sequences (kernels/short_attention.py).
CPU runs use Triton's interpreter (conftest), with 16- to 64-row tiles, so the lengths below put
sequences across chunk edges, leave chunks where no sequence starts, and fill tiles exactly."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastcse.kernels.short_attention import (SHORT_MAX_SEQLEN, short_attention_keep_mask, short_attention_qkv,
                                             short_attention_tiles)
from fastcse.models import attention as attn
from fastcse.models.unpad import unpad_input
from tests.helpers import assert_close
from tests.test_packed_attention import _packed
from tests.test_packed_attention import _reference as packed_reference

HEADS = 2


def _reference(qkv, packed, heads, scale, keep=None, p=0.0):
    """Per-sequence float64 softmax attention of the fused ``qkv`` (test_packed_attention's, on
    its three views); ``keep`` the kernel's (heads, T, T) mask."""
    total = qkv.shape[0]
    q, k, v = (x.reshape(total, heads, -1) for x in qkv.split(qkv.shape[1] // 3, dim=1))
    return packed_reference(q, k, v, packed, scale, None if keep is None else keep[None], p).reshape(total, -1)


# ragged batches: one-token sequences, a sequence as long as allowed for its tile, neighbours
# that straddle chunk edges, and (with the long ones) chunks where no sequence starts
CASES = [
    ([1, 7, 12, 3, 20, 5, 9, 2, 14, 1, 1, 6], 16),   # 32-row tiles (interpreted), head_dim 16
    ([8, 8, 8, 1, 8, 3, 8], 24),                      # 16-row tiles, head_dim 24 (masked columns)
    ([40, 2, 33, 17, 1, 40, 9], 16),                  # 64-row tiles
]


@pytest.mark.parametrize("lengths,dim", CASES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_short_attention_matches_float64_per_sequence(lengths, dim, dropout_p):
    """fp32 output and qkv gradient within 1e-5 of per-sequence float64 attention; with dropout,
    given the kernel's own mask (drawn by a separate kernel from the same tiles), so the backward
    is shown to replay the forward's mask."""
    packed = _packed(lengths)
    total, scale, stream = packed.total_tokens, 0.37, 2 * HEADS
    qkv = torch.randn(total, 3 * HEADS * dim)
    grad = torch.randn(total, HEADS * dim)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    leaf = qkv.clone().requires_grad_()
    out = short_attention_qkv(leaf, packed.seq_ids, packed.cu_seqlens, heads=HEADS, max_seqlen=packed.max_seqlen,
                              scale=scale, dropout_p=dropout_p, seed=seed, stream=stream)
    (dqkv,) = torch.autograd.grad(out, leaf, grad)
    keep = (short_attention_keep_mask(seed, packed.seq_ids, packed.cu_seqlens, HEADS, packed.max_seqlen, dropout_p,
                                      stream) if dropout_p else None)
    ref_leaf = qkv.double().requires_grad_()
    ref = _reference(ref_leaf, packed, HEADS, scale, keep, dropout_p)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, grad.double())
    assert out.shape == (total, HEADS * dim) and dqkv.shape == qkv.shape
    assert_close(out, ref, rtol=1e-5, atol=1e-5, name="out")
    assert_close(dqkv, ref_grad, rtol=1e-5, atol=2e-5, name="dqkv")


def test_short_attention_dropout_rate_and_streams():
    """The keep-mask drops dropout_p of each sequence's pairs (within 3 standard deviations),
    and another stream or seed draws another mask; the forward without dropout is deterministic."""
    packed = _packed([20, 17, 3, 20, 11, 9, 20, 1] * 4)
    p = 0.25
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)

    def keep(stream, s=seed):
        return short_attention_keep_mask(s, packed.seq_ids, packed.cu_seqlens, HEADS, packed.max_seqlen, p, stream)

    same = packed.seq_ids[:, None] == packed.seq_ids[None, :]
    pairs = int(same.sum()) * HEADS
    kept = keep(0)
    rate = 1.0 - kept[:, same].float().mean().item()
    assert abs(rate - p) < 3 * (p * (1 - p) / pairs) ** 0.5, rate
    assert not kept[:, ~same].any()  # nothing across sequences
    assert (kept[:, same] != keep(HEADS)[:, same]).float().mean() > 0.2
    other = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    assert (kept[:, same] != keep(0, other)[:, same]).float().mean() > 0.2
    assert torch.equal(kept, keep(0))
    qkv = torch.randn(packed.total_tokens, 3 * HEADS * 16)
    a, b = (short_attention_qkv(qkv, packed.seq_ids, packed.cu_seqlens, heads=HEADS, max_seqlen=packed.max_seqlen,
                                scale=0.25) for _ in range(2))
    assert torch.equal(a, b)


def test_short_attention_gradient_is_one_buffer():
    """Through varlen_attention_qkv the backward writes the fused projection's gradient whole:
    no concatenation (nor copy) of q / k / v gradients runs."""
    packed = _packed([5, 9, 1, 12])
    qkv = torch.randn(packed.total_tokens, 3 * HEADS * 16, requires_grad=True)
    out = attn.varlen_attention_qkv(qkv, packed, heads=HEADS, dropout_p=0.2, kernel="short")

    class Ops(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as mode:
        out.backward(torch.randn_like(out))
    assert not [op for op in mode.seen if "cat" in op or "copy" in op], mode.seen
    assert qkv.grad is not None and qkv.grad.shape == qkv.shape


def test_short_kernel_in_a_bert_encoder_equals_padded_sdpa():
    """A BERT encoder on the short kernel equals its padded-SDPA twin (fp32, eval) in hidden
    states (1e-5) and every parameter gradient (1e-4); in training, checkpointed layers replay
    the kernel's dropout masks (same gradients as without checkpointing)."""
    import transformers

    from tests.test_encoder import SMALL, ragged_batch

    model = transformers.BertModel(transformers.BertConfig(**SMALL, max_position_embeddings=64),
                                   add_pooling_layer=False).eval()
    ids, mask, _ = ragged_batch(model.config, batch=7, seqlen=19)
    weight = torch.randn(int(mask.sum()), model.config.hidden_size)

    def run(kernel, checkpoint=False):
        model.zero_grad(set_to_none=True)
        hidden, _ = attn.bert_varlen_forward(model, ids, mask, kernel=kernel, checkpoint=checkpoint)
        (hidden * weight).sum().backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (h_ref, g_ref), (h, g) = run("padded_sdpa"), run("short")
    assert_close(h, h_ref, rtol=1e-5, atol=1e-5, name="hidden")
    for name in g_ref:
        assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-4, name=name)
    model.train()
    torch.manual_seed(5)
    h_plain, g_plain = run("short")
    torch.manual_seed(5)
    h_ckpt, g_ckpt = run("short", checkpoint=True)
    assert torch.equal(h_plain, h_ckpt)
    for name in g_plain:
        assert_close(g_ckpt[name], g_plain[name], rtol=1e-6, atol=1e-6, name=name)
    torch.manual_seed(6)
    assert not torch.equal(run("short")[0], h_plain)  # another seed, other attention masks


def test_auto_takes_the_short_kernel_for_short_sequences_with_a_fused_projection():
    cuda = torch.device("cuda")
    short = SHORT_MAX_SEQLEN
    assert attn.pick_varlen_kernel(cuda, torch.bfloat16, 0.1, 64, 64, 32, fused_qkv=True) == "short"
    assert attn.pick_varlen_kernel(cuda, torch.float16, 0.0, 64, 4, short, fused_qkv=True) == "short"
    assert attn.pick_varlen_kernel(cuda, torch.bfloat16, 0.1, 64, 64, short + 1, fused_qkv=True) != "short"
    assert attn.pick_varlen_kernel(cuda, torch.bfloat16, 0.1, 64, 64, 32, window=8, fused_qkv=True) != "short"
    assert attn.pick_varlen_kernel(cuda, torch.bfloat16, 0.1, 64, 64, 32) != "short"  # q, k, v apart
    assert attn.pick_varlen_kernel(cuda, torch.float32, 0.1, 64, 64, 32, fused_qkv=True) == "padded_sdpa"
    assert attn.pick_varlen_kernel(torch.device("cpu"), torch.bfloat16, 0.1, 64, 64, 32,
                                   fused_qkv=True) == "padded_sdpa"


def test_short_kernel_refuses_what_it_cannot_run():
    packed = _packed([3, 5])
    qkv = torch.randn(packed.total_tokens, 3 * HEADS * 16)
    with pytest.raises(ValueError, match="sliding window"):
        attn.varlen_attention_qkv(qkv, packed, heads=HEADS, window=2, kernel="short")
    with pytest.raises(ValueError, match="not 3 \\* heads"):
        attn.varlen_attention_qkv(qkv[:, :-1], packed, heads=HEADS, kernel="short")
    long = _packed([SHORT_MAX_SEQLEN + 1, 2])
    with pytest.raises(ValueError, match="at most"):
        attn.varlen_attention_qkv(torch.randn(long.total_tokens, 3 * HEADS * 16), long, heads=HEADS, kernel="short")
    with pytest.raises(ValueError, match="needs a seed"):
        short_attention_qkv(qkv, packed.seq_ids, packed.cu_seqlens, heads=HEADS, max_seqlen=5, scale=1.0,
                            dropout_p=0.1)
    with pytest.raises(ValueError, match="1..48"):
        short_attention_tiles(0)


def test_short_attention_separate_qkv_through_varlen_attention():
    """varlen_attention(q, k, v, kernel='short') (views of no fused projection) gives the same
    output and gradients as the per-sequence reference."""
    packed = _packed([4, 11, 1, 7])
    total, dim = packed.total_tokens, 16
    q, k, v = (torch.randn(total, HEADS, dim, dtype=torch.float64).float().requires_grad_() for _ in range(3))
    out = attn.varlen_attention(q, k, v, packed, scale=0.3, kernel="short")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = _reference(torch.cat([x.reshape(total, -1) for x in leaves], 1), packed, HEADS, 0.3).view(total, HEADS, dim)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())
    assert_close(out, ref, rtol=1e-5, atol=1e-5, name="out")
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close(a, b, rtol=1e-5, atol=2e-5, name=f"d{name}")


def test_short_attention_ops_pass_opcheck():
    from fastcse.kernels import short_attention as sa

    packed = _packed([3, 6, 1])
    qkv = torch.randn(packed.total_tokens, 3 * HEADS * 16, requires_grad=True)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    args = (qkv, packed.seq_ids, packed.cu_seqlens, seed, HEADS, packed.max_seqlen, 0.25, 0.2, 0)
    torch.library.opcheck(sa._short_fwd_op, args, test_utils=("test_schema", "test_autograd_registration",
                                                                 "test_faketensor", "test_aot_dispatch_dynamic"))


def test_short_attention_compiles_into_one_graph():
    """torch.compile(fullgraph=True) through varlen_attention_qkv with the short kernel: no graph
    break, the eager output and gradient (dropout from the same seed), one frame for two batches
    of the same sizes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from fastcse.kernels._triton_utils import triton_available

    triton_available()  # (its first call in a process fills a cache, which a trace would guard on)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    packed = _packed([5, 9, 1, 12, 3])
    seed = torch.tensor([7])

    def block(qkv):
        out = attn.varlen_attention_qkv(qkv, packed, heads=HEADS, dropout_p=0.2, kernel="short", seed=seed)
        return out * 2

    compiled = torch.compile(block, backend=counter, fullgraph=True)
    for _ in range(2):
        qkv = torch.randn(packed.total_tokens, 3 * HEADS * 16, requires_grad=True)
        got, want = compiled(qkv), block(qkv)
        assert torch.equal(got, want)
        (g,), (w,) = torch.autograd.grad(got.sum(), qkv), torch.autograd.grad(want.sum(), qkv)
        assert torch.equal(g, w)
    assert counter.frame_count == 1


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_short_attention_on_a_card_within_twice_flash_error(dtype):
    """On a GPU at SimCSE's sizes (256 sentences of 4..32 tokens, 12 heads x 64; then up to 48
    tokens, 17-row chunks): output and gradients against float64 within twice the error of
    PyTorch's FlashAttention varlen kernel in the same dtype (plus a small floor), dropout off."""
    for longest in (32, 48):
        lengths = torch.randint(4, longest + 1, (256,))
        packed = unpad_input((torch.arange(longest)[None, :] < lengths[:, None]).long().cuda())
        total, heads, dim = packed.total_tokens, 12, 64
        qkv, grad = torch.randn(total, 3 * heads * dim, device="cuda"), torch.randn(total, heads * dim, device="cuda")
        ref_leaf = qkv.double().requires_grad_()
        ref = _reference(ref_leaf, packed, heads, dim ** -0.5)
        (ref_grad,) = torch.autograd.grad(ref, ref_leaf, grad.double())

        def errors(kernel):
            leaf = qkv.to(dtype).requires_grad_()
            out = attn.varlen_attention_qkv(leaf, packed, heads=heads, kernel=kernel)
            (g,) = torch.autograd.grad(out, leaf, grad.to(dtype))
            return [((a.double() - b).norm() / b.norm()).item() for a, b in ((out, ref), (g, ref_grad))]

        ours, flash = errors("short"), errors("aten_flash")
        for name, e, f in zip(("out", "dqkv"), ours, flash):
            assert e <= 2 * f + 1e-3, f"{longest} {name}: short {e:.2e} vs flash {f:.2e}"


_SM90_SCRIPT = r"""
import json, os
os.environ.pop("TRITON_INTERPRET", None)
import fastcse.kernels.short_attention as k
from tests.sm90 import resource_usage, signature

report = {}
# BERT-base heads (64) with the tiles the launcher picks on a GPU, bf16 with dropout on
block, chunk, warps = k.short_attention_tiles(32)
for name, fn in (("fwd", k._short_attn_fwd_kernel), ("bwd", k._short_attn_bwd_kernel)):
    consts = dict(HEADS=12, HEAD_DIM=64, BLOCK=block, BLOCK_D=64, HAS_DROPOUT=True, UPCAST_DOT=False,
                  DOT_PRECISION="tf32")
    sig = signature(fn, consts, dict(SEG="*i64", SEED="*i64", CU="*i32"), default_pointer="bf16")
    report[f"{name}_{block}"] = resource_usage(fn, sig, consts, warps)
print(json.dumps(report))
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile for real")
def test_short_kernels_compile_for_sm90_without_spills_at_two_blocks_per_sm():
    """Compile the forward and backward for an H100 / H200 (sm_90) without one, with the tiles
    the launcher picks there: no register spills, and at least 2 resident blocks per SM."""
    from tests.sm90 import run_report

    report = run_report(_SM90_SCRIPT, timeout=300)
    assert sorted(report) == ["bwd_64", "fwd_64"], report
    for name, usage in report.items():
        assert usage["stack"] == 0, (name, usage)
        assert usage["blocks_per_sm"] >= 2, (name, usage)
