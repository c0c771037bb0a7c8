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


# ---------------------------------------------------------------------------------------------
# the fused pieces one by one: tile kernel (split columns), row softmax, chunk loop in the CUDA
# dtypes, memory, host synchronisation
# ---------------------------------------------------------------------------------------------

from fastcse.kernels import infonce_chunks as chunks  # noqa: E402


def _reference_rows(x, parts, scale, hn_weight, hn_offset, target_offset):
    """float64 lse_i and target logits of raw rows (normalised here)."""
    a = F.normalize(x.double(), dim=-1)
    c = F.normalize(torch.cat(parts).double(), dim=-1)
    s = float(scale) * a @ c.T
    idx = torch.arange(x.shape[0], device=x.device)
    if hn_weight:
        s[idx, idx + hn_offset] += hn_weight
    return torch.logsumexp(s, dim=1), s[idx, idx + target_offset]


def _problem(x, parts, scale, hn_weight=0.0, hn_offset=0, target_offset=0, n_grad_parts=None, mm_dtype=None):
    scale_t = torch.tensor(scale, dtype=chunks.accumulation_dtype(x.dtype), device=x.device)
    return chunks.Problem(x, parts, scale_t, hn_weight, hn_offset, target_offset,
                          len(parts) if n_grad_parts is None else n_grad_parts,
                          mm_dtype or chunks.fused_matmul_dtype(x))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_tile_kernel_split_columns_combine_to_the_reference(dtype, tol):
    """The no-grad kernel's logic under the interpreter: each candidate part split across columns
    (one tile per split, several, one split), the partial log-sum-exps combined, the target logit
    stored by exactly the program whose columns hold it; ragged sizes, two parts, hard negative.
    (The interpreter upcasts tiles before tl.dot, so bf16 here checks loads and logic; the bf16
    dot itself is checked on a GPU.)"""
    from fastcse.kernels.infonce import _tile_config, tile_lse

    n, d = 45, 70
    x = torch.randn(n, d, device=DEVICE).to(dtype)
    parts = [torch.randn(n, d, device=DEVICE).to(dtype), (3 * torch.randn(n + 31, d, device=DEVICE)).to(dtype)]
    hn = dict(hn_weight=0.7, hn_offset=n + 5, target_offset=0)
    ref_lse, ref_tgt = _reference_rows(x, parts, 14.0, **hn)
    block_n = _tile_config(x)["BLOCK_N"]
    widths = [block_n, 2 * block_n, 1 << 20, None]  # None: the launcher's own choice
    for per in widths:
        lse, tgt = tile_lse(_problem(x, parts, 14.0, **hn), cols_per_split=per)
        assert lse.dtype == torch.float32 and lse.shape == (n,)
        assert rel_error(lse, ref_lse) <= tol, f"cols_per_split={per}: {describe_mismatch(lse, ref_lse)}"
        assert rel_error(tgt, ref_tgt) <= tol, f"cols_per_split={per}: {describe_mismatch(tgt, ref_tgt)}"


def test_tile_kernel_fills_the_card_from_n_1024():
    """At N = 1024 (8 row blocks of 128) the split across columns launches at least one program
    per multiprocessor of a 132-SM card (every 128 x 64 tile its own program: 256), two per
    multiprocessor from N = 4096; the old row-only grid launched 8 and 32."""
    from fastcse.kernels.infonce import tile_lse
    from fastcse.memory import meta_as_cuda, stub_kernel_launches

    for n in (1024, 4096):
        with meta_as_cuda(), stub_kernel_launches() as launches:
            x, p, h = (torch.empty(n, 768, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            tile_lse(_problem(x, [p, h], 20.0, mm_dtype=torch.bfloat16))
        programs = sum(launch.grid[0] * launch.grid[1] for launch in launches)
        assert [launch.name for launch in launches] == ["_lse_fwd_kernel"] * 2
        assert programs >= (132 if n == 1024 else 2 * 132), f"N={n}: {programs} programs"


def _softmax_reference(x, parts, scale, row0, rows, lse_given=None, grad_rows=None, **hn):
    """float64 pieces of the row softmax contract for anchors row0..row0+rows."""
    lse, tgt = _reference_rows(x, parts, scale, **hn)
    a = F.normalize(x.double(), dim=-1)
    c = F.normalize(torch.cat(parts).double(), dim=-1)
    y = torch.cat(parts).double()
    q = 1 / y.norm(dim=1)
    s = scale * a @ c.T
    idx = torch.arange(x.shape[0], device=x.device)
    if hn.get("hn_weight"):
        s[idx, idx + hn["hn_offset"]] += hn["hn_weight"]
    use = lse if lse_given is None else lse_given.double()
    p = torch.exp(s - use[:, None])
    sl = slice(row0, row0 + rows)
    g = torch.ones(x.shape[0], dtype=torch.float64, device=x.device) if grad_rows is None else grad_rows.double()
    x_tilde = (g / x.double().norm(dim=1))[:, None] * x.double()
    dots = x.double() @ y.T
    t = idx + hn.get("target_offset", 0)
    radial = (p * q[None, :] * dots).sum(1) - q[t] * dots[idx, t]
    return dict(lse=lse[sl], tgt=tgt[sl], weights=(p * q[None, :])[sl], x_tilde=x_tilde[sl], radial=radial[sl])


@pytest.mark.parametrize("softmax", ["triton", "torch"])
@pytest.mark.parametrize("dots_dtype, weights_dtype, tol", [
    (torch.float32, torch.float32, 1e-5),    # CPU / fp32: in place
    (torch.bfloat16, torch.bfloat16, 2e-2),  # bf16 on CUDA: bf16 dots, weights written over them
    (torch.float32, torch.float16, 2e-3),    # fp16 on CUDA: fp32 dots, fp16 weights with headroom
])
def test_row_softmax_contract(softmax, dots_dtype, weights_dtype, tol):
    """Both row softmaxes against float64, on a chunk in the middle of the rows (row0 > 0), with a
    hard negative, in the forward (lse computed) and backward (lse read, per-row g) modes."""
    from fastcse.kernels.infonce import rows_softmax_

    fn = rows_softmax_ if softmax == "triton" else chunks.torch_rows_softmax_
    n, d, row0, rows = 21, 40, 6, 9
    x = torch.randn(n, d, device=DEVICE) * (1 + torch.rand(n, 1, device=DEVICE))
    parts = [torch.randn(n, d, device=DEVICE), 2 * torch.randn(n + 13, d, device=DEVICE)]
    hn = dict(hn_weight=0.4, hn_offset=n + 3, target_offset=0)
    prob = _problem(x, parts, 12.0, mm_dtype=weights_dtype, **hn)
    y = torch.cat(parts)
    for compute_lse in (True, False):
        grad_rows = None if compute_lse else torch.randn(n, device=DEVICE)
        lse_in = None if compute_lse else _reference_rows(x, parts, 12.0, **hn)[0].float()
        ref = _softmax_reference(x, parts, 12.0, row0, rows, lse_given=lse_in, grad_rows=grad_rows, **hn)
        dots = (x[row0:row0 + rows] @ y.T).to(dots_dtype)
        nan = dict(fill_value=float("nan"), device=DEVICE)
        weights = dots if weights_dtype == dots_dtype else torch.full(dots.shape, dtype=weights_dtype, **nan)
        lse = torch.full((n,), **nan) if compute_lse else lse_in.clone()
        tgt = torch.full((n,), **nan)
        x_tilde = torch.full((rows, d), dtype=weights_dtype, **nan)
        radial = torch.full((rows,), **nan)
        wrote = fn(prob, dots, weights, row0, lse, tgt, grad_rows, x_tilde, compute_lse, radial=radial)
        scale_w = float(prob.col_scale) if prob.col_scale is not None else 1.0
        assert rel_error(weights.double() / scale_w, ref["weights"]) <= tol, describe_mismatch(weights, ref["weights"])
        assert rel_error(x_tilde, ref["x_tilde"]) <= tol
        if compute_lse:
            assert rel_error(lse[row0:row0 + rows], ref["lse"]) <= tol
            assert rel_error(tgt[row0:row0 + rows], ref["tgt"]) <= tol
            assert torch.isnan(lse[:row0]).all() and torch.isnan(lse[row0 + rows:]).all()  # other rows untouched
        assert wrote == (softmax == "triton")
        if wrote:
            assert rel_error(radial, ref["radial"]) <= 10 * tol, describe_mismatch(radial, ref["radial"])


@pytest.mark.parametrize("finish", ["triton", "torch"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_finish_rows_contract(finish, out_dtype):
    """Both row finishes against float64: the target rows subtracted over a window of rows
    (z_lo > 0), the radial dot given or computed (and written), kappa, a per-row or 0-d factor,
    out in place (fp32) or in the inputs' dtype."""
    from fastcse.kernels.infonce import finish_rows_

    fn = finish_rows_ if finish == "triton" else chunks.torch_finish_rows_
    rows, d, z_lo, z_rows = 23, 37, 5, 11
    dev = dict(device=DEVICE)
    w = torch.randn(rows, d, **dev).to(out_dtype)
    z = torch.randn(z_rows, d, **dev).to(out_dtype)
    b, c, kappa = torch.randn(z_rows, **dev), torch.rand(rows, **dev), torch.tensor(3.0, **dev)
    for radial_known, a in ((True, torch.randn(rows, **dev)), (False, torch.tensor(-1.7, **dev))):
        u0 = torch.randn(rows, d, **dev)
        u1 = u0.double() / 3.0
        u1[z_lo:z_lo + z_rows] -= b.double()[:, None] * z.double()
        given = torch.randn(rows, **dev)
        rho = given.double() if radial_known else (u1 * w.double()).sum(1)
        ref = (a.double()[:, None] if a.dim() else a.double()) * (u1 - (c.double() * rho)[:, None] * w.double())
        u = u0.clone()
        out = u if out_dtype == torch.float32 else torch.full((rows, d), float("nan"), dtype=out_dtype, **dev)
        radial = given.clone() if radial_known else torch.full((rows,), float("nan"), **dev)
        fn(u, w, out, a, c, radial, radial_known, kappa, z=z, b=b, z_lo=z_lo)
        tol = 1e-5 if out_dtype == torch.float32 else 1e-2
        assert out.dtype == out_dtype
        assert rel_error(out, ref) <= tol, describe_mismatch(out, ref)
        assert rel_error(radial, rho) <= 1e-5


@pytest.mark.parametrize("ops", ["triton", "torch"])
@pytest.mark.parametrize("mm_dtype", [torch.bfloat16, torch.float16])
def test_chunk_loop_in_the_cuda_dtypes(ops, mm_dtype):
    """The training path as it runs on CUDA (half-precision matmul operands, bf16 dots written
    over by the weights / fp32 dots and fp16 weights), here on CPU: loss and every gradient
    within twice PyTorch eager's own error in that dtype, gradients in the inputs' dtype."""
    from fastcse.kernels.infonce import TRITON_OPS

    ops = TRITON_OPS if ops == "triton" else chunks.TORCH_OPS
    n, d = 37, 48
    x32, p32, h32 = (torch.randn(n, d, device=DEVICE) * (1 + torch.rand(n, 1, device=DEVICE)) for _ in range(3))
    x, p, h = (t.to(mm_dtype) for t in (x32, p32, h32))
    kw = dict(hard_negative_weight=0.5, reduction="sum")
    t = torch.tensor(0.05, device=DEVICE)
    upstream = torch.ones((), dtype=torch.float64)
    ref_loss, ref_grads = _loss_and_grads(reference_loss, x.double(), p.double(), h.double(), None, t, upstream, **kw)
    eager_loss, eager_grads = _loss_and_grads(info_nce, x, p, h, None, t, upstream, backend="eager", **kw)
    prob = _problem(x, [p, h], 20.0, hn_weight=0.5, hn_offset=n, mm_dtype=mm_dtype)
    lse, tgt, dx, (dp, dh), dscale = chunks.forward_with_grads(prob, 16, ops)
    loss = (lse - tgt).sum()
    assert rel_error(loss, ref_loss) <= 2 * rel_error(eager_loss, ref_loss) + 1e-6
    for name, g, ge, r in zip(("anchors", "positives", "hard_negatives"), (dx, dp, dh), eager_grads, ref_grads):
        assert g.dtype == mm_dtype, name
        assert rel_error(g, r) <= 2 * rel_error(ge, r), f"{name}: {rel_error(g, r):.2e} vs eager {rel_error(ge, r):.2e}"
    # d loss / d temperature = -scale^2 d loss / d scale
    assert rel_error(-400.0 * dscale, ref_grads[3]) <= 2 * rel_error(eager_grads[3], ref_grads[3]) + 1e-5


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gradients_come_back_in_the_input_dtype(backend, dtype):
    anchors, positives, hard_negatives, queue = _inputs(10, 24, True, 4, dtype=dtype)
    leaves = [x.clone().requires_grad_() for x in (anchors, positives, hard_negatives)]
    t = torch.tensor(0.07, device=DEVICE, requires_grad=True)
    for reduction in ("mean", "none"):
        loss = info_nce(*leaves, queue=queue, temperature=t, backend=backend, reduction=reduction)
        grads = torch.autograd.grad(loss.sum(), leaves + [t])
        assert [g.dtype for g in grads] == [dtype] * 3 + [torch.float32]


def _meta_peak(provider, n, d=768, dtype=torch.bfloat16, **kw):
    """Peak bytes above the inputs of a fwd + bwd on the meta device with CUDA's dtype behaviour
    (fastcse.memory), the Triton launches stubbed; .grad of the three inputs included."""
    from fastcse.memory import StorageCounter, meta_as_cuda, stub_kernel_launches

    with meta_as_cuda(), stub_kernel_launches():
        a, p, h = (torch.empty(n, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        with StorageCounter(round_to=512) as counter:
            info_nce(a, p, h, hard_negative_weight=0.5, backend=provider, **kw).backward()
    return counter.peak


def test_chunk_rows_keep_the_full_matrix_out_and_beat_eager_memory():
    """On CUDA the training path takes 1024-row chunks. The peak (gradients included) is at most
    dx, the fp32 candidate accumulator and ONE chunk's buffers: a second chunk buffer alive, or a
    chunk of all N rows, would break that bound. So from N = 2048 on no N x M matrix is ever held,
    from N = 4096 the whole peak is below one bf16 N x M matrix, and at every N >= 1024 it is below
    eager's."""
    assert chunks.default_chunk_rows(32768, 65536, on_gpu=True) == 1024
    assert chunks.default_chunk_rows(700, 1400, on_gpu=True) == 700
    for n in (1024, 2048, 4096, 8192):
        m, d = 2 * n, 768
        fused, eager = _meta_peak("triton", n), _meta_peak("eager", n)
        assert fused < eager, f"N={n}: fused {fused / 2**20:.1f} MiB >= eager {eager / 2**20:.1f} MiB"
        rows = min(n, 1024)
        # dx (bf16) + candidate accumulator (fp32) + chunk: dots (bf16, R x M) + x~ (bf16) + W y (fp32)
        bound = 2 * n * d + 4 * m * d + 2 * rows * m + 2 * rows * d + 4 * rows * d
        assert fused <= 1.02 * bound + 2**20, f"N={n}: {fused / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"
        if n >= 4096:
            assert fused < 2 * n * m, f"N={n}: the peak reaches a full N x M bf16 matrix"
    assert _meta_peak("triton", 4096, chunk_rows=4096) > _meta_peak("triton", 4096) + 2 * 3072 * 8192  # the bound can fail


class _HostDeviceTraffic(torch.overrides.TorchFunctionMode):
    """Counts host-to-device copies a CUDA run would make under ``meta_as_cuda``: tensors made
    from host data on the device (``torch.tensor(..., device=cuda)``) and ``.to(cuda)`` / copies
    of CPU tensors into device tensors."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None and "cuda" in str(device):
            self.copies.append(name)
        elif func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_) and args and isinstance(args[0], torch.Tensor):
            src = args[1] if func is torch.Tensor.copy_ else args[0]
            dst_cuda = args[0].is_meta if func is torch.Tensor.copy_ else ("cuda" in str(args[1:]) or "cuda" in str(kwargs)
                                                                          or func is torch.Tensor.cuda)
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and src.numel() and dst_cuda:
                self.copies.append(name)
        return func(*args, **kwargs)


def _count_host_syncs(fn):
    """(host reads of device values, host-to-device copies) of ``fn`` run on meta tensors that
    play CUDA ones: every branch a CUDA run takes, nothing computed."""
    from fastcse.memory import meta_as_cuda, stub_kernel_launches

    with meta_as_cuda() as mode, stub_kernel_launches():
        traffic = _HostDeviceTraffic()
        with traffic:
            fn()
    return mode.scalar_reads, traffic.copies


@pytest.mark.parametrize("backend", ["triton", "chunked", "eager"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_synchronisation_on_the_cuda_hot_path(backend, reduction):
    """A CUDA training step of the loss (every feature on: hard negatives + weight, queue,
    symmetric, learnable temperature) reads no device value on the host and copies nothing from
    it: forward, backward, the input checks, the deferred value check."""

    def step():
        a, p, h = (torch.empty(300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        q = torch.empty(50, 64, device="cuda", dtype=torch.bfloat16)
        log_t = torch.full((), -3.0, device="cuda", requires_grad=True)
        loss = info_nce(a, p, h, queue=q, temperature=log_t.exp(), hard_negative_weight=0.3, symmetric=True,
                        reduction=reduction, backend=backend)
        loss.sum().backward()
        with torch.no_grad():
            info_nce(a, p, h, temperature=0.05, backend=backend)

    reads, copies = _count_host_syncs(step)
    assert reads == 0 and copies == [], f"{reads} host reads, copies {copies}"


def test_the_host_sync_counter_sees_what_the_old_checks_did():
    """The counter above can fail: the value checks as they ran on every call before (they run
    now for CPU tensors only) read device values, and a temperature made with torch.tensor on the
    device is a host-to-device copy."""
    from fastcse.infonce import check_values

    def old_checks():
        a = torch.empty(8, 16, device="cuda")
        check_values([("anchors", a), ("positives", a)], torch.empty((), device="cuda"))
        torch.tensor(1 / 0.05, device="cuda")

    reads, copies = _count_host_syncs(old_checks)
    assert reads >= 3 and copies == ["tensor"]


def test_deferred_value_flag():
    """The flag a CUDA call copies back (its logic runs on any device): set by a non-finite loss or
    a temperature tensor <= 0, clear otherwise."""
    from fastcse.infonce import _value_flag

    assert not bool(_value_flag(torch.tensor(1.5), 0.05))
    assert not bool(_value_flag(torch.tensor([1.0, 2.0]), torch.tensor(0.1)))
    assert bool(_value_flag(torch.tensor([1.0, float("nan")]), 0.05))
    assert bool(_value_flag(torch.tensor(float("inf")), 0.05))
    assert bool(_value_flag(torch.tensor(float("-inf")), 0.05))
    assert bool(_value_flag(torch.tensor(1.0), torch.tensor(-0.1)))
    assert bool(_value_flag(torch.tensor(1.0), torch.tensor(0.0)))


@pytest.mark.parametrize("name", ["anchors", "positives", "hard_negatives", "queue"])
def test_non_finite_inputs_reach_the_loss(name):
    """What the deferred CUDA check relies on: a NaN or inf anywhere in the inputs makes the fused
    loss non-finite (both fused backends, mean and none)."""
    for backend in ("chunked", "triton"):
        for value in (float("nan"), float("inf")):
            anchors, positives, hard_negatives, queue = _inputs(9, 12, True, 5)
            bad = dict(anchors=anchors, positives=positives, hard_negatives=hard_negatives, queue=queue)[name]
            bad[3, 4] = value
            from fastcse.infonce import _direction_loss, _value_flag

            for reduction in ("mean", "none"):
                parts = [positives, hard_negatives, queue]
                loss = _direction_loss(backend, anchors, parts, torch.tensor(20.0, device=DEVICE), hn_weight=0.0, hn_offset=0,
                                       target_offset=0, n_grad_parts=2, reduction=reduction, chunk_rows=4)
                assert bool(_value_flag(loss, 0.05)), f"{backend} {name}={value} {reduction}: {loss}"


@pytest.mark.cuda
def test_cuda_bad_values_raise_at_the_next_call():
    from fastcse.infonce import raise_deferred_input_errors

    a, p = torch.randn(64, 32, device="cuda"), torch.randn(64, 32, device="cuda")
    bad = a.clone()
    bad[5, 1] = float("nan")
    info_nce(bad, p)  # no host synchronisation: nothing raised yet
    with pytest.raises(ValueError, match="non-finite"):
        raise_deferred_input_errors()
    info_nce(a, p, temperature=torch.tensor(-0.1, device="cuda"))
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="temperature"):
        info_nce(a, p)
    info_nce(a, p)
    raise_deferred_input_errors()  # a good call leaves nothing behind


@pytest.mark.cuda
def test_cuda_fp32_accumulation_inside_the_gemm():
    """On this PyTorch, addmm accumulates fp32 out of bf16 operands in place (else the loop falls
    back to a product and an add, correct but slower: reported here)."""
    acc = torch.randn(256, 128, device="cuda")
    a, b = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16), torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    want = acc + a.float() @ b.float()
    chunks.addmm_into_(acc, a, b)
    assert rel_error(acc, want) <= 1e-3
    assert chunks._ADDMM_FP32_INTO_SELF is True, "torch.addmm(out_dtype=fp32, out=acc) refused: fallback path"
