"""The fused InfoNCE loss: every backend against a float64 reference written out in full here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcse
from fastcse.infonce import info_nce
from tests.helpers import describe_mismatch, rel_error

BACKENDS = ["eager", "chunked", "triton"]
# The kernel tests run on CUDA when there is a GPU (compiled Triton), else on CPU tensors with
# Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before anything imports Triton).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_loss(anchors, positives, hard_negatives=None, *, temperature, hard_negative_weight=0.0,
                   queue=None, symmetric=False, reduction="mean"):
    """float64, materialised, written independently of fastcse: the ground truth."""
    a = F.normalize(anchors.double(), dim=-1)
    p = F.normalize(positives.double(), dim=-1)
    cands = [p]
    if hard_negatives is not None:
        cands.append(F.normalize(hard_negatives.double(), dim=-1))
    if queue is not None:
        cands.append(F.normalize(queue.double(), dim=-1).detach())
    c = torch.cat(cands)
    t = temperature.double() if isinstance(temperature, torch.Tensor) else temperature
    n = a.shape[0]
    logits = a @ c.T / t
    if hard_negatives is not None and hard_negative_weight:
        bonus = torch.zeros_like(logits)
        for i in range(n):
            bonus[i, n + i] = hard_negative_weight
        logits = logits + bonus
    per_row = -torch.log_softmax(logits, dim=1)[torch.arange(n), torch.arange(n)]
    if symmetric:
        back = p @ a.T / t
        per_row = (per_row - torch.log_softmax(back, dim=1)[torch.arange(n), torch.arange(n)]) / 2
    return {"mean": per_row.mean(), "sum": per_row.sum(), "none": per_row}[reduction]


# (N, D, hard negatives, hard-negative weight, queue rows, symmetric, reduction)
CASES = [
    (1, 7, False, 0.0, 3, False, "mean"),
    (1, 33, True, 0.5, 0, False, "sum"),
    (7, 3, True, 0.0, 0, False, "mean"),
    (7, 33, True, 1.0, 5, False, "none"),
    (7, 130, False, 0.0, 0, True, "mean"),
    (33, 33, True, 0.3, 0, True, "none"),
    (33, 130, True, 0.0, 0, False, "sum"),
    (3, 33, False, 0.0, 130, False, "mean"),  # M much larger than N (queue)
    (130, 7, True, 2.0, 7, False, "mean"),
]


def _inputs(n, d, hard, k, dtype=torch.float32, device=DEVICE):
    make = lambda rows: torch.randn(rows, d, dtype=dtype, device=device) * (1 + torch.rand(rows, 1, dtype=dtype, device=device))
    anchors, positives = make(n), make(n)
    hard_negatives = make(n) if hard else None
    queue = make(k) if k else None
    return anchors, positives, hard_negatives, queue


def _loss_and_grads(fn, anchors, positives, hard_negatives, queue, temperature, upstream, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (anchors, positives)]
    hn = hard_negatives.detach().clone().requires_grad_() if hard_negatives is not None else None
    t = temperature.detach().clone().requires_grad_()
    loss = fn(leaves[0], leaves[1], hn, temperature=t, queue=queue, **kw)
    weights = upstream if loss.dim() else torch.ones((), dtype=torch.float64)
    inputs = leaves + ([hn] if hn is not None else []) + [t]
    grads = torch.autograd.grad((loss.double() * weights.to(loss.device)).sum(), inputs)
    return loss, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-D{}-hn{}-w{}-q{}-sym{}-{}".format(*c))
def test_fp32_matches_float64_reference(backend, case):
    n, d, hard, weight, k, symmetric, reduction = case
    anchors, positives, hard_negatives, queue = _inputs(n, d, hard, k)
    temperature = torch.tensor(0.05 + 0.1 * torch.rand(()).item(), device=DEVICE)
    upstream = torch.randn(n, dtype=torch.float64)  # non-uniform, for reduction="none"
    kw = dict(hard_negative_weight=weight, symmetric=symmetric, reduction=reduction)
    ref_loss, ref_grads = _loss_and_grads(reference_loss, anchors, positives, hard_negatives, queue,
                                          temperature, upstream, **kw)
    loss, grads = _loss_and_grads(info_nce, anchors, positives, hard_negatives, queue, temperature,
                                  upstream, backend=backend, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert rel_error(loss, ref_loss) <= 1e-5, describe_mismatch(loss, ref_loss)
    names = ["anchors", "positives"] + (["hard_negatives"] if hard else []) + ["temperature"]
    for name, g, ref in zip(names, grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert rel_error(g, ref) <= 1e-5, f"{backend} grad {name}: {describe_mismatch(g, ref)}"


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_pytorch_eager(backend, dtype):
    n, d = 33, 64
    anchors, positives, hard_negatives, queue = _inputs(n, d, True, 9, dtype=torch.float32)
    temperature = torch.tensor(0.05, device=DEVICE)
    upstream = torch.randn(n, dtype=torch.float64)
    kw = dict(hard_negative_weight=0.5, reduction="mean")
    low = [x.to(dtype) for x in (anchors, positives, hard_negatives, queue)]
    # The float64 reference sees exactly the rounded inputs the low-precision runs see.
    ref_loss, ref_grads = _loss_and_grads(reference_loss, *[x.double() for x in low], temperature,
                                          upstream, **kw)
    eager_loss, eager_grads = _loss_and_grads(info_nce, *low, temperature, upstream, backend="eager", **kw)
    loss, grads = _loss_and_grads(info_nce, *low, temperature, upstream, backend=backend, **kw)
    assert rel_error(loss, ref_loss) <= 2 * rel_error(eager_loss, ref_loss), (
        f"loss: fused {rel_error(loss, ref_loss):.2e} vs eager {rel_error(eager_loss, ref_loss):.2e}")
    for name, g, ge, ref in zip(["anchors", "positives", "hard_negatives", "temperature"], grads,
                                eager_grads, ref_grads):
        assert g.dtype == (dtype if name != "temperature" else torch.float32)
        fused_err, eager_err = rel_error(g, ref), rel_error(ge, ref)
        assert fused_err <= 2 * eager_err, f"{name}: fused {fused_err:.2e} vs eager {eager_err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_candidate_gives_zero_loss_and_gradient(backend):
    """N = 1, no other candidate: softmax over one logit is 1, the loss and gradients vanish.
    (Relative error is meaningless against an exact zero, so this case is checked absolutely.)"""
    anchors, positives, _, _ = _inputs(1, 9, False, 0)
    anchors.requires_grad_()
    loss = info_nce(anchors, positives, backend=backend)
    loss.backward()
    assert abs(loss.item()) <= 1e-6
    assert anchors.grad.abs().max().item() <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_dimension_one(backend):
    """D = 1: every normalised row is +-1, so the loss is a function of signs alone and the
    normalisation's Jacobian (hence every input gradient) is exactly zero."""
    anchors, positives, hard_negatives, _ = _inputs(7, 1, True, 0)
    anchors.requires_grad_()
    loss = info_nce(anchors, positives, hard_negatives, hard_negative_weight=0.5, backend=backend)
    ref = reference_loss(anchors, positives, hard_negatives, temperature=0.05, hard_negative_weight=0.5)
    assert rel_error(loss, ref) <= 1e-5
    loss.backward()
    # Exactly zero in exact arithmetic; in fp32 the rounding noise is relative to the natural unit
    # of this gradient, d logit / d anchor = (1 / temperature) / ||anchor||: hold it to the same
    # 1e-5 relative bound as every other fp32 check.
    unit = (1 / 0.05) / anchors.detach().norm(dim=1).min().item()
    assert anchors.grad.abs().max().item() <= 1e-5 * unit


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunk_and_tile_boundaries(backend, reduction):
    """Row counts around the chunk / tile sizes (16-row chunks, 32-row tiles): no row is lost or
    counted twice, in the loss or its gradients, on both the precomputed (mean) and the
    recomputed (none) gradient paths."""
    for n in (15, 16, 17, 31, 32, 33, 65):
        anchors, positives, hard_negatives, _ = _inputs(n, 20, True, 0)
        t = torch.tensor(0.1, device=DEVICE)
        upstream = torch.randn(n, dtype=torch.float64)
        kw = dict(hard_negative_weight=0.25, reduction=reduction)
        out, grads = _loss_and_grads(info_nce, anchors, positives, hard_negatives, None, t, upstream,
                                     backend=backend, chunk_rows=16, **kw)
        ref, ref_grads = _loss_and_grads(reference_loss, anchors, positives, hard_negatives, None, t,
                                         upstream, **kw)
        assert rel_error(out, ref) <= 1e-5, f"N={n}: {describe_mismatch(out, ref)}"
        for g, r in zip(grads, ref_grads):
            assert rel_error(g, r) <= 1e-5, f"N={n}: {describe_mismatch(g, r)}"


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_forward_without_grad_matches(backend):
    """Evaluation-time call (no_grad): the triton backend takes its fully fused tile kernel."""
    anchors, positives, hard_negatives, queue = _inputs(45, 70, True, 11)
    with torch.no_grad():
        out = info_nce(anchors, positives, hard_negatives, queue=queue, hard_negative_weight=0.4,
                       backend=backend, reduction="none")
    ref = reference_loss(anchors, positives, hard_negatives, queue=queue, temperature=0.05,
                         hard_negative_weight=0.4, reduction="none")
    assert rel_error(out, ref) <= 1e-5, describe_mismatch(out, ref)


def test_chunked_is_default_on_cpu_and_float_temperature_works():
    anchors, positives, _, _ = _inputs(9, 16, False, 0)
    loss = fastcse.info_nce(anchors, positives, temperature=0.07)
    ref = reference_loss(anchors, positives, temperature=0.07)
    assert rel_error(loss, ref) <= 1e-5
    from fastcse.infonce import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "chunked"


def test_float64_inputs_stay_float64():
    anchors, positives, _, _ = _inputs(5, 8, False, 0, dtype=torch.float64)
    for backend in ("eager", "chunked"):
        loss = info_nce(anchors, positives, backend=backend)
        assert loss.dtype == torch.float64
        assert rel_error(loss, reference_loss(anchors, positives, temperature=0.05)) < 1e-12


def test_several_hard_negative_columns():
    anchors, positives, h1, _ = _inputs(6, 12, True, 0)
    h2 = torch.randn(6, 12, device=DEVICE)
    loss = info_nce(anchors, positives, [h1, h2], backend="chunked")
    # both columns join the candidates, in order, after the positives
    a, c = F.normalize(anchors.double(), dim=-1), F.normalize(torch.cat([positives, h1, h2]).double(), dim=-1)
    ref = F.cross_entropy(a @ c.T / 0.05, torch.arange(6, device=DEVICE))
    assert rel_error(loss, ref) <= 1e-5


def test_learnable_temperature_module_trains():
    loss_fn = fastcse.InfoNCELoss(temperature=0.1, learnable_temperature=True)
    anchors, positives, _, _ = _inputs(8, 16, False, 0)
    loss = loss_fn(anchors, positives)
    loss.backward()
    g = loss_fn.log_temperature.grad
    t = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    ref = reference_loss(anchors, positives, temperature=t)
    (ref_g,) = torch.autograd.grad(ref, t)
    # d loss / d log t = t * d loss / d t
    assert abs(g.item() - 0.1 * ref_g.item()) <= 1e-5 * max(1.0, abs(0.1 * ref_g.item()))


def test_queue_gets_no_gradient_and_is_used():
    anchors, positives, _, queue = _inputs(4, 8, False, 6)
    anchors.requires_grad_()
    queue.requires_grad_()
    with_queue = info_nce(anchors, positives, queue=queue, backend="chunked")
    without = info_nce(anchors, positives, backend="chunked")
    assert with_queue > without  # more negatives can only raise every row's log-sum-exp
    with_queue.backward()
    assert queue.grad is None and anchors.grad is not None


# ---------------------------------------------------------------------------------------------
# bad input: a clear TypeError / ValueError, never a kernel crash or a silent NaN
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: (torch.randn(4, 8), torch.randn(5, 8)), ValueError, "one row per anchor"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 9)), ValueError, "embedding dimension"),
        (lambda: (torch.randn(8), torch.randn(8)), ValueError, "2-D"),
        (lambda: (torch.randn(2, 4, 8), torch.randn(2, 4, 8)), ValueError, "2-D"),
        (lambda: (torch.randn(0, 8), torch.randn(0, 8)), ValueError, "empty"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64)), TypeError, "dtype"),
        (lambda: (torch.randint(0, 3, (4, 8)), torch.randint(0, 3, (4, 8))), TypeError, "floating"),
        (lambda: (torch.randn(4, 8), [[1.0] * 8] * 4), TypeError, "torch.Tensor"),
    ],
)
def test_bad_shapes_and_types(make, error, message):
    anchors, positives = make()
    with pytest.raises(error, match=message):
        info_nce(anchors, positives)


def test_bad_values_are_named():
    a, p = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="temperature must be"):
        info_nce(a, p, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be"):
        info_nce(a, p, temperature=torch.tensor(-0.1))
    with pytest.raises(ValueError, match="hard_negatives must have one row per anchor"):
        info_nce(a, p, torch.randn(3, 8))
    with pytest.raises(ValueError, match="no hard_negatives"):
        info_nce(a, p, hard_negative_weight=1.0)
    with pytest.raises(ValueError, match="queue has embedding dimension"):
        info_nce(a, p, queue=torch.randn(5, 7))
    with pytest.raises(ValueError, match="reduction"):
        info_nce(a, p, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        info_nce(a, p, backend="cuda")
    bad = a.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="anchors contains non-finite values .* 1 row"):
        info_nce(bad, p)
    bad_p = p.clone()
    bad_p[0, 0] = float("inf")
    with pytest.raises(ValueError, match="positives contains non-finite"):
        info_nce(a, bad_p)


def test_triton_refuses_fp64_and_cpu_without_interpreter(monkeypatch):
    from fastcse.infonce import resolve_backend

    with pytest.raises(TypeError, match="fp64"):
        resolve_backend("triton", torch.device("cpu"), torch.float64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_backend("triton", torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------------------------------------
# torch.compile: the Triton op keeps the step in one graph and is not recompiled per batch size
# ---------------------------------------------------------------------------------------------


def test_compiled_step_one_graph_no_recompile_per_batch_size():
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(a, p, h):
        return info_nce(a, p, h, temperature=0.05, hard_negative_weight=0.5, backend="triton")

    compiled = torch.compile(step, backend=counting_backend, fullgraph=True)
    for n in (8, 12, 16, 20, 24):
        a, p, h = (torch.randn(n, 32, device=DEVICE, requires_grad=True) for _ in range(3))
        loss = compiled(a, p, h)
        loss.backward()
        ref = reference_loss(a, p, h, temperature=0.05, hard_negative_weight=0.5)
        assert rel_error(loss, ref) <= 1e-5
        assert a.grad is not None and torch.isfinite(a.grad).all()
    # one static graph for the first size, one dynamic graph for all later sizes
    assert len(graphs) <= 2, f"{len(graphs)} compilations for 5 batch sizes"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda_large_ragged(dtype):
    n, d = 1000, 768
    anchors, positives, hard_negatives, queue = _inputs(n, d, True, 333, dtype=torch.float32, device="cuda")
    low = [x.to(dtype) for x in (anchors, positives, hard_negatives, queue)]
    t = torch.tensor(0.05, device="cuda")
    upstream = torch.randn(n, dtype=torch.float64, device="cuda")
    kw = dict(hard_negative_weight=0.5)
    ref_loss, ref_grads = _loss_and_grads(reference_loss, *[x.double() for x in low], t, upstream, **kw)
    eager_loss, eager_grads = _loss_and_grads(info_nce, *low, t, upstream, backend="eager", **kw)
    loss, grads = _loss_and_grads(info_nce, *low, t, upstream, backend="triton", **kw)
    if dtype == torch.float32:
        assert rel_error(loss, ref_loss) <= 1e-5
        for g, r in zip(grads, ref_grads):
            assert rel_error(g, r) <= 1e-5
    else:
        assert rel_error(loss, ref_loss) <= 2 * rel_error(eager_loss, ref_loss)
        for g, ge, r in zip(grads, eager_grads, ref_grads):
            assert rel_error(g, r) <= 2 * rel_error(ge, r)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_second_backward_through_precomputed_gradients_is_refused(backend):
    """mean/sum hand out gradients formed in the forward pass once (scaled in place); a second
    backward with retain_graph must fail loudly rather than return wrong gradients."""
    anchors, positives, _, _ = _inputs(6, 16, False, 0)
    anchors.requires_grad_()
    loss = info_nce(anchors, positives, backend=backend)
    loss.backward(retain_graph=True)
    first = anchors.grad.clone()
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    ref = reference_loss(anchors, positives, temperature=0.05)
    (ref_grad,) = torch.autograd.grad(ref, anchors)
    assert rel_error(first, ref_grad) <= 1e-5
