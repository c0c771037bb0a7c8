"""fastcse.memory: the storage-counting mode counts known allocation patterns exactly."""

import gc
import warnings

import pytest
import torch

from fastcse.memory import (StorageCounter, meta_as_cuda, meta_run, peak_bytes, stub_kernel_launches)

F32 = 4


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_known_pattern_exact(device):
    with StorageCounter() as c:
        a = torch.empty(1000, device=device)  # 4000
        b = torch.empty(250, device=device)  # 1000
        assert c.current == 5000
        s = a + 1  # 4000 more
        assert (c.current, c.peak) == (9000, 9000)
        del a, s
        assert c.current == 1000
        d = torch.empty(100, dtype=torch.float64, device=device)  # 800
        assert (c.current, c.peak) == (1800, 9000)
        del b, d
    assert c.current == 0 and c.peak == 9000


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_views_share_storage_and_keep_it_alive(device):
    with StorageCounter() as c:
        a = torch.empty(64, 32, device=device)
        views = [a[3:], a.T, a.view(-1), a[:, 1], a.reshape(32, 64)]
        assert c.current == 64 * 32 * F32  # one storage, however many views
        del a
        assert c.current == 64 * 32 * F32  # the views keep the base's storage alive
        del views
        assert c.current == 0


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_in_place_ops_allocate_nothing(device):
    x = torch.randn(1000, device=device)
    with StorageCounter() as c:
        x.mul_(2).add_(1).exp_()
        x[10:20].zero_()
        y = x.clone()
        y.sub_(x)
    assert c.peak == 1000 * F32 and c.current == 1000 * F32  # only the clone
    del y
    assert c.current == 0


def test_inputs_and_their_views_are_not_counted():
    x = torch.randn(500, 8)
    with StorageCounter() as c:
        v = x.view(8, 500).T
        w = v.contiguous()  # a copy: counted
    assert c.current == 500 * 8 * F32
    del v, w
    assert c.current == 0


def test_resize_is_followed():
    with StorageCounter() as c:
        a = torch.empty(10)
        a.resize_(1000)
        assert c.current == 1000 * F32
    assert c.peak == 1000 * F32


def test_round_to_cuda_blocks():
    with StorageCounter(round_to=512) as c:
        a = torch.empty(1, device="meta")  # 4 bytes -> one 512-byte block
        b = torch.empty(129, device="meta")  # 516 bytes -> 1024
        assert c.current == 512 + 1024
        del a, b


def test_autograd_backward_is_counted_and_freed():
    # y = (x * w).sum(). Forward: x * w (n floats) and the sum (1); x * w dies with the forward,
    # since sum's backward needs only its shape. Backward: the seed gradient (1, expanded as a
    # view) and w.grad = seed * x (n). So the peak is n + 2 floats, at backward's mul.
    n = 4096
    x = torch.randn(n, device="meta")
    w = torch.randn(n, device="meta", requires_grad=True)
    with meta_run():
        result = peak_bytes(lambda: (x * w).sum().backward())
    assert result.end == n * F32  # w.grad
    assert result.peak == (n + 2) * F32


def test_peak_bytes_matches_meta_and_cpu():
    def fn(a):
        b = a @ a.T  # 256 x 256
        c = b.softmax(dim=1)
        return (c @ a).sum()

    cpu = peak_bytes(fn, torch.randn(256, 64))
    meta = peak_bytes(fn, torch.randn(256, 64, device="meta"))
    # b and c (256 x 256 each) are both alive at c @ a (256 x 64), then the sum (one float)
    assert cpu.peak == meta.peak == (2 * 256 * 256 + 256 * 64 + 1) * F32
    assert cpu.end == meta.end == 0
    gc.collect()


def test_hidden_workspace_of_logsumexp():
    x = torch.randn(128, 1000, device="meta")
    with StorageCounter() as c:
        y = torch.logsumexp(x, dim=1)
    # result (128) + the kernel's own x - max (128 x 1000) and max (128), live during the op
    assert c.peak == (128 + 128 * 1000 + 128) * F32
    assert c.current == 128 * F32
    del y


# a tiny custom op whose body allocates a temporary its fake kernel does not show
@torch.library.custom_op("fastcse_test::double_plus_tmp", mutates_args=())
def _double_plus_tmp(x: torch.Tensor) -> torch.Tensor:
    tmp = torch.empty(x.shape[0], 4 * x.shape[1], dtype=x.dtype, device=x.device)
    tmp.zero_()
    return x * 2


@_double_plus_tmp.register_fake
def _(x):
    return torch.empty_like(x)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_custom_op_body_is_seen(device):
    x = torch.randn(100, 10, device=device)
    with StorageCounter() as inside:
        y = _double_plus_tmp(x)
    with StorageCounter(inline_custom_ops=False) as outside:
        z = _double_plus_tmp(x)
    assert inside.peak == (4 + 1) * 100 * 10 * F32
    assert outside.peak == 100 * 10 * F32  # the plain mode sees only the output
    del y, z


def test_meta_as_cuda_takes_cuda_branches():
    with meta_as_cuda():
        x = torch.empty(4, 8, device="meta", dtype=torch.bfloat16)
        assert x.is_cuda and x.device.type == "cuda"
        y = torch.empty(3, device=x.device)
        z = x.to(x.device)
        assert y.is_meta and z.is_meta
        assert bool(torch.isfinite(x).all())  # a made-up host read: passes input checks
    assert not x.is_cuda


@pytest.mark.parametrize("call", ["functional", "module", "torch"])
def test_meta_as_cuda_dropout_is_cudas_native_dropout(call):
    """On a card dropout is one native_dropout with a bool mask; a plain meta run takes the CPU
    composite (a mask of the input's dtype). Both counted exactly; eval mode and p = 0 allocate nothing."""
    n, bf16 = 1000 * 768, 2
    drop = {"functional": lambda x: torch.nn.functional.dropout(x, 0.1, True),
            "module": torch.nn.Dropout(0.1), "torch": lambda x: torch.dropout(x, 0.1, True)}[call]
    for as_cuda, mask_bytes in ((True, 1), (False, bf16)):
        with meta_run(as_cuda=as_cuda):
            x = torch.empty(1000, 768, device="meta", dtype=torch.bfloat16, requires_grad=True)
            with StorageCounter() as c:
                y = drop(x)
            assert c.current == n * (bf16 + mask_bytes), (as_cuda, c.current)
            assert (type(y.grad_fn).__name__ == "NativeDropoutBackward0") == as_cuda
            y.sum().backward()
            assert x.grad.shape == x.shape
            with StorageCounter() as c:
                same = (torch.nn.functional.dropout(x, 0.1, training=False), torch.nn.functional.dropout(x, 0.0))
            assert c.peak == 0 and all(t is x for t in same)


def test_meta_as_cuda_rms_norm_is_cudas_fused_kernel():
    """On a card F.rms_norm is one _fused_rms_norm kernel each way, keeping the input and an fp32
    rstd per row; a plain meta run (and a mixed-dtype call anywhere) traces the decomposition."""
    rows, d, bf16 = 1000, 768, 2
    for as_cuda in (True, False):
        with meta_run(as_cuda=as_cuda):
            x = torch.empty(rows, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
            w = torch.empty(d, device="meta", dtype=torch.bfloat16, requires_grad=True)
            ops = []
            with StorageCounter(on_op=lambda func, *rest: ops.append(str(func))) as c:
                y = torch.nn.functional.rms_norm(x, (d,), w, 1e-6)
                kept = c.current
                y.sum().backward()
            kernels = [op for op in ops if "rms_norm" in op]
            if as_cuda:
                assert kernels == ["fastcse_meta.fused_rms_norm.default",
                                   "fastcse_meta.fused_rms_norm_backward.default"]
                assert kept == rows * d * bf16 + rows * 4  # the output and rstd (x and w were inputs)
            else:
                assert kernels == [] and len(ops) > 6
            assert x.grad.shape == x.shape and w.grad.shape == w.shape
        with meta_run(as_cuda=True):
            ops.clear()
            with StorageCounter(on_op=lambda func, *rest: ops.append(str(func))), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ATen's "Mismatch dtype ... Can not dispatch to fused"
                torch.rms_norm(x, (d,), w.float(), 1e-6)
            assert not any("fused_rms_norm" in op for op in ops)


def test_stub_kernel_launches_records_and_skips():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _poison(ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(ptr + offs, -1.0, mask=offs < n)

    x = torch.zeros(1000)
    with stub_kernel_launches() as launches:
        _poison[(triton.cdiv(1000, 128),)](x, 1000, BLOCK=128)
        _poison[lambda meta: (triton.cdiv(1000, meta["BLOCK"]),)](x, 1000, BLOCK=256)
    assert [(l.name, l.grid) for l in launches] == [("_poison", (8, 1, 1)), ("_poison", (4, 1, 1))]
    assert launches[0].kwargs["BLOCK"] == 128 and launches[0].arguments["n"] == 1000
    ptr = launches[0].arguments["ptr"]  # tensors are kept as metadata, never alive
    assert (ptr.shape, ptr.dtype, ptr.storage_key) == ((1000,), torch.float32, x.untyped_storage()._cdata)
    assert bool((x == 0).all())  # nothing ran


@torch.library.custom_op("fastcse_test::tmp_if_cuda", mutates_args=())
def _tmp_if_cuda(x: torch.Tensor) -> torch.Tensor:
    # a CUDA-only temporary: the body must see meta_as_cuda's answers to take this branch
    if x.is_cuda:
        torch.empty(x.shape[0], 8 * x.shape[1], dtype=x.dtype, device=x.device).zero_()
    return x + 1


@_tmp_if_cuda.register_fake
def _(x):
    return torch.empty_like(x)


def test_custom_op_body_takes_cuda_branches_under_meta_as_cuda():
    x = torch.randn(16, 4, device="meta")
    with meta_run(), StorageCounter() as plain:
        _tmp_if_cuda(x)
    with meta_as_cuda(), StorageCounter() as as_cuda:
        _tmp_if_cuda(x)
    assert plain.peak == 16 * 4 * F32
    assert as_cuda.peak == 8 * 16 * 4 * F32  # the temporary dies before x + 1 is made


def test_on_op_reports_leaf_ops_of_composites_and_custom_ops():
    seen = []
    x = torch.randn(8, 4, device="meta")
    with StorageCounter(on_op=lambda func, args, kwargs, out: seen.append(func.name())):
        _double_plus_tmp(x)
    assert "fastcse_test::double_plus_tmp" not in seen
    assert {"aten::empty.memory_format", "aten::zero_", "aten::mul.Tensor"} <= set(seen)


def test_stubbed_launch_records_keep_no_tensor_alive():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _touch(ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(ptr + offs, 1.0, mask=offs < n)

    with stub_kernel_launches() as launches, StorageCounter() as c:
        tmp = torch.empty(4096, device="meta")
        _touch[(1,)](tmp, 4096, BLOCK=128)
        del tmp
    assert len(launches) == 1 and c.peak == 4096 * F32 and c.current == 0
