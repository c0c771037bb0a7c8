"""The ``triton`` varlen kernel: fastcse's flash kernel on packed sequences (tiles across
sequence boundaries, scores kept within a sequence). CPU runs use Triton's interpreter
(conftest), with 16 x 16 tiles, so the lengths below cross tile boundaries every way."""

from __future__ import annotations

import pytest
import torch

from fastcse.kernels.biased_attention import dropout_keep_mask
from fastcse.models import attention as attn
from fastcse.models.unpad import unpad_input
from tests.helpers import assert_close

LENGTHS = [1, 16, 17, 33, 5, 40, 2]  # a one-token sequence, exact tiles, one past, several tiles
HEADS, DIM = 2, 16


def _packed(lengths=LENGTHS):
    lengths = torch.tensor(lengths)
    mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
    return unpad_input(mask)


def _reference(q, k, v, packed, scale, keep=None, p=0.0):
    """Per-sequence float64 softmax attention; ``keep``: the kernel's (1, heads, T, T) mask."""
    outs = []
    cu = packed.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # (heads, n, dim)
        probs = torch.softmax(qs @ ks.transpose(-1, -2) * scale, dim=-1)
        if keep is not None:
            probs = probs * keep[0, :, a:b, a:b] / (1.0 - p)
        outs.append((probs @ vs).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_packed_attention_matches_float64_per_sequence(dropout_p):
    """fp32 output and q / k / v gradients within 1e-5 of per-sequence float64 attention; with
    dropout, given the kernel's own mask (Philox of (head, i, j) in packed coordinates), so the
    backward is shown to replay the forward's mask."""
    torch.manual_seed(0)
    packed = _packed()
    total, scale = packed.total_tokens, 0.37
    q, k, v, grad = (torch.randn(total, HEADS, DIM) for _ in range(4))
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    from fastcse.kernels.biased_attention import packed_attention_triton

    out = packed_attention_triton(*leaves, packed.seq_ids, packed.cu_seqlens, scale=scale, dropout_p=dropout_p,
                                  seed=seed)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    keep = dropout_keep_mask(seed, 1, HEADS, total, dropout_p) if dropout_p else None
    ref = _reference(*ref_leaves, packed, scale, keep, dropout_p)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    assert_close(out, ref, rtol=1e-5, atol=1e-5, name="out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, rtol=1e-5, atol=2e-5, name=name)


def test_varlen_triton_kernel_matches_padded_sdpa_in_a_bert_encoder():
    """A BERT encoder on the triton varlen kernel equals its padded-SDPA twin (fp32, eval), and
    its gradients too; a window is refused."""
    import transformers

    from tests.test_encoder import SMALL, ragged_batch

    torch.manual_seed(1)
    model = transformers.BertModel(transformers.BertConfig(**SMALL, max_position_embeddings=64),
                                   add_pooling_layer=False).eval()
    ids, mask, _ = ragged_batch(model.config, batch=6, seqlen=21)
    results = []
    weight = torch.randn(int(mask.sum()), model.config.hidden_size)  # a random projection of the states
    for kernel in ("padded_sdpa", "triton"):
        model.zero_grad(set_to_none=True)
        hidden, _ = attn.bert_varlen_forward(model, ids, mask, kernel=kernel)
        (hidden * weight).sum().backward()
        results.append((hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_grads), (ours, grads) = results
    assert_close(ours, ref, rtol=1e-5, atol=1e-5, name="hidden")
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5 * scale, name=name)
    q = torch.randn(_packed().total_tokens, HEADS, DIM)
    with pytest.raises(ValueError, match="no sliding window"):
        attn.varlen_attention(q, q, q, _packed(), window=4, kernel="triton")


def test_auto_takes_packed_tiles_for_many_short_sequences(monkeypatch):
    """On CUDA (half precision, no flash-attn package): the triton kernel from
    TRITON_VARLEN_MIN_SEQUENCES sequences of at most TRITON_VARLEN_MAX_SEQLEN tokens, without a
    window; FlashAttention otherwise; never on CPU."""
    monkeypatch.setattr(attn, "_flash_attn_varlen", lambda: None)
    cuda, many, short = torch.device("cuda", 0), attn.TRITON_VARLEN_MIN_SEQUENCES, attn.TRITON_VARLEN_MAX_SEQLEN
    assert attn.pick_varlen_kernel(cuda, torch.bfloat16, 0.1, 64, many, 32) == "triton"
    assert attn.pick_varlen_kernel(cuda, torch.float16, 0.0, 64, 4 * many, short) == "triton"
    assert attn.pick_varlen_kernel(cuda, torch.bfloat16, 0.1, 64, many - 1, 32) == "aten_flash"
    assert attn.pick_varlen_kernel(cuda, torch.bfloat16, 0.1, 64, many, short + 1) == "aten_flash"
    assert attn.pick_varlen_kernel(cuda, torch.bfloat16, 0.1, 64, many, 32, window=8) == "aten_flash"
    assert attn.pick_varlen_kernel(torch.device("cpu"), torch.bfloat16, 0.1, 64, many, 32) == "padded_sdpa"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_attention_on_a_card_within_twice_flash_error(dtype):
    """On a GPU at SimCSE's sizes (256 sentences of 4..32 tokens, 12 heads x 64): output and
    gradients against float64 within twice the error of PyTorch's FlashAttention varlen kernel
    in the same dtype (plus a small floor), dropout off."""
    torch.manual_seed(0)
    lengths = torch.randint(4, 33, (256,))
    mask = (torch.arange(32)[None, :] < lengths[:, None]).long().cuda()
    packed = unpad_input(mask)
    q, k, v, grad = (torch.randn(packed.total_tokens, 12, 64, device="cuda") for _ in range(4))
    scale = 64 ** -0.5
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = _reference(*ref_leaves, packed, scale)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())

    def errors(kernel):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = attn.varlen_attention(*leaves, packed, scale=scale, kernel=kernel)
        grads = torch.autograd.grad(out, leaves, grad.to(dtype))
        return [((a.double() - b).norm() / b.norm()).item() for a, b in zip((out, *grads), (ref, *ref_grads))]

    ours, flash = errors("triton"), errors("aten_flash")
    for name, e, f in zip(("out", "dq", "dk", "dv"), ours, flash):
        assert e <= 2 * f + 1e-3, f"{name}: packed {e:.2e} vs flash {f:.2e}"
