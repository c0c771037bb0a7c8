"""Exact peak tensor memory of Python code, without running it on the device it is meant for.

:class:`StorageCounter` is a ``TorchDispatchMode`` that counts the bytes of every tensor storage
an op creates, once per storage (views share it), and releases them when the storage dies (a
``weakref.finalize`` on the storage object, which PyTorch keeps alive exactly as long as the
storage). Its ``peak`` is what CUDA's ``max_memory_allocated`` reports for the same code, above
what was live when counting began, when

* the code runs on the ``meta`` device (shapes and dtypes, no data, no time), under
  :func:`meta_as_cuda` so that every ``x.is_cuda`` / ``x.device`` branch takes its CUDA side
  (bf16 matmul operands, fp32 outputs: the CUDA dtype behaviour), and
* ``round_to=512``: the caching allocator rounds each block up to 512 bytes. (It also leaves a
  block unsplit when less than 1 MiB of its segment would remain; that slack, under 1 MiB per
  large block, is not modelled.)

Two things a plain dispatch-mode counter misses, and how this one sees them:

* **custom ops** (``torch.library.custom_op``) are one call to the mode: their fake kernel makes
  the outputs, none of the temporaries inside. With ``inline_custom_ops`` (default) the mode runs
  the op's own Python body under itself instead, so every allocation inside is counted; on meta
  tensors the Triton launches inside must be stubbed, :func:`stub_kernel_launches`.
* **C++ composite kernels** that allocate temporaries through calls the mode cannot see (the mode
  is off while an op runs): ``logsumexp`` materialises ``x - max`` (its ``exp_`` is in place).
  :data:`HIDDEN_WORKSPACE` adds such transient bytes at the op; extend it when the comparison
  against a real allocator (tests/test_perf_model.py) says an op has more.

Not counted: memory outside tensor storage (cuBLAS workspaces, allocator fragmentation).

Example::

    with meta_as_cuda(), stub_kernel_launches():
        a = torch.randn(4096, 768, device="meta", dtype=torch.bfloat16, requires_grad=True)
        ...
        with StorageCounter(round_to=512) as counter:
            info_nce(a, p, h).backward()
    counter.peak  # bytes above the inputs
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = [
    "StorageCounter", "peak_bytes", "PeakMemory", "meta_run", "meta_as_cuda", "stub_kernel_launches", "Launch",
    "TensorInfo", "custom_op_body", "HIDDEN_WORKSPACE", "CUDA_BLOCK_BYTES",
]

CUDA_BLOCK_BYTES = 512  # c10::cuda::CUDACachingAllocator kMinBlockSize: every block is a multiple

aten = torch.ops.aten


def _logsumexp_workspace(args, kwargs) -> int:
    # at::native::logsumexp_out_impl: maxes = amax(self, dims, keepdim=True), then
    # sum_out(result, (self - maxes).exp_(), dims): one temporary the size of self, plus maxes.
    x, dims = args[0], args[1] if len(args) > 1 else kwargs.get("dim", ())
    dims = [dims] if isinstance(dims, int) else list(dims) or list(range(x.dim()))
    kept = x.numel() // max(1, math.prod(x.shape[d] for d in dims)) if x.numel() else 0
    return (x.numel() + kept) * x.element_size()


# Ops whose C++ kernel (the same on CPU and CUDA) allocates temporaries the mode cannot see:
# op -> bytes of those temporaries, live only while the op runs.
HIDDEN_WORKSPACE: dict = {
    aten.logsumexp.default: _logsumexp_workspace,
}


def custom_op_body(func) -> Optional[Callable]:
    """The Python function behind a ``torch.library.custom_op`` overload, or None (also for the
    ``fastcse_meta`` stand-ins of CUDA kernels, which are leaves: they have no body to run)."""
    try:
        from torch._library.custom_ops import _maybe_get_opdef
    except ImportError:  # pragma: no cover - older PyTorch
        return None
    if not isinstance(func, torch._ops.OpOverload) or func.namespace == META_STAND_INS:
        return None
    opdef = _maybe_get_opdef(func._name)
    return None if opdef is None else opdef._init_fn


def _has_composite_kernel(func) -> bool:
    return isinstance(func, torch._ops.OpOverload) and torch._C._dispatch_has_kernel_for_dispatch_key(
        func.name(), "CompositeImplicitAutograd")


class StorageCounter(TorchDispatchMode):
    """Live and peak bytes of the tensor storage created while the mode is active.

    Args:
        round_to: count each storage rounded up to this many bytes (512 mimics CUDA's caching
            allocator; 1 counts exact bytes, as PyTorch's CPU allocator hands them out).
        inline_custom_ops: run custom ops' Python bodies under the counter (see module doc).
        on_op: optional callback ``on_op(func, args, kwargs, out)`` after every op that ran
            its own kernel (not for custom ops or composites, whose parts are reported instead),
            e.g. to record a trace of launches.

    Attributes: ``current`` and ``peak`` bytes, ``peak_op`` (the op at which the peak was
    reached). A storage first seen as an input (allocated before counting began, or by code
    the mode cannot see) is never counted, nor are views of it.
    """

    def __init__(self, *, round_to: int = 1, inline_custom_ops: bool = True,
                 on_op: Optional[Callable] = None):
        super().__init__()
        self.round_to = max(1, int(round_to))
        self.inline_custom_ops = inline_custom_ops
        self.on_op = on_op
        self.current = 0
        self.peak = 0
        self.peak_op: Optional[str] = None
        self._counted: dict[int, int] = {}  # storage key -> bytes counted for it
        self._foreign: set[int] = set()  # storages that were there before (or came from outside)
        self._lock = threading.RLock()
        self._function_modes: list = []  # re-entrant: gc can free a storage mid-update

    def __enter__(self):
        from torch.overrides import _get_current_function_mode_stack

        self._function_modes = list(_get_current_function_mode_stack())
        return super().__enter__()

    # -- bookkeeping -------------------------------------------------------------------------

    def _rounded(self, n_bytes: int) -> int:
        return -(-n_bytes // self.round_to) * self.round_to if n_bytes else 0

    @staticmethod
    def _storages(tree) -> Iterator[torch.UntypedStorage]:
        for t in tree_flatten(tree)[0]:
            if isinstance(t, torch.Tensor):
                yield t.untyped_storage()

    def _on_death(self, key: int) -> None:
        with self._lock:
            n_bytes = self._counted.pop(key, None)
            if n_bytes is not None:
                self.current -= n_bytes
            self._foreign.discard(key)

    def _watch(self, storage: torch.UntypedStorage, key: int) -> None:
        weakref.finalize(storage, self._on_death, key)

    def _note_inputs(self, args, kwargs) -> None:
        for storage in self._storages((args, kwargs)):
            key = storage._cdata
            if key not in self._counted and key not in self._foreign:
                self._foreign.add(key)
                self._watch(storage, key)

    def _note_outputs(self, out, op_name: str, workspace: int = 0) -> None:
        with self._lock:
            for storage in self._storages(out):
                key = storage._cdata
                if key in self._foreign:
                    continue
                n_bytes = self._rounded(storage.nbytes())
                old = self._counted.get(key)
                if old is None:
                    self._counted[key] = n_bytes
                    self.current += n_bytes
                    self._watch(storage, key)
                elif old != n_bytes:  # resized in place (resize_, out= variants)
                    self._counted[key] = n_bytes
                    self.current += n_bytes - old
            if self.current + workspace > self.peak:
                self.peak = self.current + workspace
                self.peak_op = op_name

    # -- the mode ----------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._note_inputs(args, kwargs)
        body = custom_op_body(func) if self.inline_custom_ops else None
        if body is not None:
            with contextlib.ExitStack() as stack:
                # The body runs under the torch-function modes its caller had (meta_as_cuda's
                # is_cuda answers among them), which are off while the op is dispatched, and
                # under this mode, so its own ops come back here.
                for mode in self._function_modes:
                    stack.enter_context(mode)
                stack.enter_context(self)
                out = body(*args, **kwargs)
        elif _has_composite_kernel(func):
            # Below autograd (inside a custom op's body) composite ops such as matmul reach the
            # mode whole; run their decomposition here so the ops that allocate are seen.
            with self:
                out = func.decompose(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
            if self.on_op is not None:
                self.on_op(func, args, kwargs, out)
        workspace = HIDDEN_WORKSPACE[func](args, kwargs) if func in HIDDEN_WORKSPACE else 0
        self._note_outputs(out, str(func), self._rounded(workspace))
        return out


@dataclass
class PeakMemory:
    """Result of :func:`peak_bytes`: bytes above what was live before, and where the peak was."""

    peak: int
    end: int  # still live when fn returned (its outputs, gradients it left behind)
    peak_op: Optional[str]


def peak_bytes(fn: Callable, *args, round_to: int = 1, inline_custom_ops: bool = True,
               **kwargs) -> PeakMemory:
    """Run ``fn(*args, **kwargs)`` under a :class:`StorageCounter`; its peak above the inputs.

    The result of ``fn`` is dropped before returning, so ``end`` counts only what outlives it
    elsewhere (e.g. ``.grad`` fields).
    """
    counter = StorageCounter(round_to=round_to, inline_custom_ops=inline_custom_ops)
    with counter:
        out = fn(*args, **kwargs)
    del out
    return PeakMemory(peak=counter.peak, end=counter.current, peak_op=counter.peak_op)


# --------------------------------------------------------------------------------------------
# running CUDA code paths on the meta device
# --------------------------------------------------------------------------------------------

_IS_CUDA = torch.Tensor.is_cuda
_DEVICE = torch.Tensor.device
_TO_METHODS = (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.new_empty, torch.Tensor.new_zeros,
               torch.Tensor.new_ones, torch.Tensor.new_full, torch.Tensor.new_tensor)


def _is_cuda_device(x) -> bool:
    if isinstance(x, torch.device):
        return x.type == "cuda"
    return isinstance(x, str) and (x == "cuda" or x.startswith("cuda:"))


_SCALAR_READS = {torch.Tensor.__bool__: True, torch.Tensor.item: 1, torch.Tensor.__float__: 1.0,
                 torch.Tensor.__int__: 1, torch.Tensor.__index__: 1, torch.Tensor.tolist: 1}


def _cuda_dropout(input, p=0.5, training=True, inplace=False):
    """Dropout as ATen runs it on a CUDA tensor: one ``native_dropout`` (a bool mask saved for
    backward) when training with ``0 < p < 1`` on a non-empty input. ATen decides by the C++
    ``is_cuda``, which a meta tensor answers False, so without this a meta run takes the CPU
    composite (an ``empty_like`` mask of the input's dtype, ``bernoulli_``, ``div_``, ``mul``):
    four ops and twice the mask bytes of the bf16 run on a card. ``None`` when ATen would not
    fuse (or for ``inplace``, left to ATen)."""
    if not (isinstance(input, torch.Tensor) and input.is_meta and training and not inplace
            and 0.0 < float(p) < 1.0 and input.numel() > 0):
        return None
    return torch.native_dropout(input, float(p), True)[0]




# CUDA kernels whose ATen op has no meta kernel, only a CompositeImplicitAutograd decomposition
# for the backends without one (a meta run would trace the decomposition): stand-ins with their
# shapes (fake kernels) and CUDA's autograd formula, never inlined by StorageCounter.
META_STAND_INS = "fastcse_meta"


@torch.library.custom_op(f"{META_STAND_INS}::fused_rms_norm", mutates_args=())
def _fused_rms_norm(input: torch.Tensor, normalized_shape: list[int], weight: Optional[torch.Tensor],
                    eps: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("fastcse_meta::fused_rms_norm stands in for CUDA's aten::_fused_rms_norm in meta runs only")


@_fused_rms_norm.register_fake
def _(input, normalized_shape, weight, eps):
    rows = list(input.shape[:input.dim() - len(normalized_shape)])
    return torch.empty_like(input), input.new_empty(rows + [1] * len(normalized_shape), dtype=torch.float32)


@torch.library.custom_op(f"{META_STAND_INS}::fused_rms_norm_backward", mutates_args=())
def _fused_rms_norm_backward(grad: torch.Tensor, input: torch.Tensor, normalized_shape: list[int],
                             rstd: torch.Tensor, weight: Optional[torch.Tensor]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("fastcse_meta::fused_rms_norm_backward stands in for CUDA's kernel in meta runs only")


@_fused_rms_norm_backward.register_fake
def _(grad, input, normalized_shape, rstd, weight):
    return torch.empty_like(input), torch.empty_like(weight) if weight is not None else input.new_empty(0)


def _rms_norm_setup(ctx, inputs, output):
    # CUDA's formula (derivatives.yaml): the input, the weight and the fp32 rstd are kept
    input, normalized_shape, weight, _ = inputs
    ctx.save_for_backward(input, weight, output[1])
    ctx.normalized_shape = normalized_shape
    ctx.set_materialize_grads(False)  # rstd's gradient is never used: no zeros made for it


def _rms_norm_backward(ctx, grad, _grad_rstd):
    input, weight, rstd = ctx.saved_tensors
    dx, dw = _fused_rms_norm_backward(grad, input, ctx.normalized_shape, rstd, weight)
    return dx, None, dw if weight is not None else None, None


_fused_rms_norm.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def _cuda_rms_norm(input, normalized_shape, weight=None, eps=None):
    """``F.rms_norm`` as ATen runs it on a CUDA tensor: one ``_fused_rms_norm`` kernel forward and
    one backward (torch >= 2.9), unless the weight's dtype differs from the input's (then ATen
    decomposes, as here). A meta tensor would take the decomposition. ``None`` when ATen would."""
    if not (isinstance(input, torch.Tensor) and input.is_meta and input.is_floating_point()
            and (weight is None or weight.dtype == input.dtype)):
        return None
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    return _fused_rms_norm(input, shape, weight, eps)[0]


# what a meta run posing as CUDA runs instead: F.dropout (nn.Dropout's call) and torch.dropout
# (= _VF.dropout, what F.dropout lowers to); F.rms_norm and torch.rms_norm
_CUDA_STAND_INS = {torch.nn.functional.dropout: _cuda_dropout, torch.dropout: _cuda_dropout,
                   torch.nn.functional.rms_norm: _cuda_rms_norm, torch.rms_norm: _cuda_rms_norm}


class _MetaRun(TorchFunctionMode):
    def __init__(self, as_cuda: bool):
        super().__init__()
        self.as_cuda = as_cuda
        self.scalar_reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _SCALAR_READS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            self.scalar_reads += 1  # a host sync on a GPU; the value is made up (see meta_run)
            value = _SCALAR_READS[func]
            return value if func is not torch.Tensor.item or not args[0].dtype.is_floating_point else 1.0
        if not self.as_cuda:
            return func(*args, **kwargs)
        owner = getattr(func, "__self__", None)
        if owner is _IS_CUDA and args and args[0].is_meta:
            return True
        if owner is _DEVICE and args and args[0].is_meta:
            return torch.device("cuda", 0)
        if func is torch.Tensor.cuda:
            return args[0].to("meta")
        stand_in = _CUDA_STAND_INS.get(func)
        if stand_in is not None:
            fused = stand_in(*args, **kwargs)
            if fused is not None:
                return fused
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "meta"
        args = tree_map(lambda x: torch.device("meta") if isinstance(x, torch.device) and x.type == "cuda"
                        else x, args)
        if func in _TO_METHODS:
            args = tuple("meta" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_run(*, as_cuda: bool = False):
    """Run code on meta tensors as far as it goes without data.

    Host reads of a meta tensor's value (``bool(t)``, ``t.item()``, ``float(t)``) return True /
    1: input checks such as ``bool(torch.isfinite(x).all())`` pass, and ``temperature > 0``
    holds. Code whose control flow depends on real values is not modelled by this. The mode's
    ``scalar_reads`` counts them (each is a host-device sync on a GPU).

    ``as_cuda``: meta tensors also answer ``is_cuda`` True and ``device`` cuda:0, and tensors
    asked for on CUDA are made on meta, so code written for CUDA takes its CUDA branches (bf16
    matmul operands with fp32 outputs, GPU tile configs) while nothing is computed.
    ``torch.cuda.*`` calls are not faked.
    """
    mode = _MetaRun(as_cuda)
    with mode:
        yield mode


def meta_as_cuda():
    """:func:`meta_run` with ``as_cuda=True``."""
    return meta_run(as_cuda=True)


@dataclass(frozen=True)
class TensorInfo:
    """What a launch record keeps of a tensor argument: its metadata, never the tensor (a record
    that held tensors would keep every buffer it saw alive, and the counter would see them)."""

    shape: tuple
    strides: tuple
    dtype: torch.dtype
    device: str
    storage_key: int
    storage_nbytes: int

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorInfo":
        storage = t.untyped_storage()
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype, t.device.type, storage._cdata, storage.nbytes())

    def stride(self) -> tuple:
        return self.strides

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize

    def untyped_storage(self):  # the few Tensor-like calls cost formulas make
        return self

    def nbytes(self) -> int:
        return self.storage_nbytes


def _info(x):
    return TensorInfo.of(x) if isinstance(x, torch.Tensor) else x


@dataclass
class Launch:
    """One stubbed Triton launch: the kernel's name, its grid and its arguments, tensors recorded
    as :class:`TensorInfo` (constexprs and launch options are in ``kwargs``)."""

    name: str
    grid: tuple
    args: tuple
    kwargs: dict
    arguments: dict  # every argument by the kernel's parameter name, constexprs and options too


@contextlib.contextmanager
def stub_kernel_launches(on_launch: Optional[Callable[[Launch], None]] = None):
    """Replace every Triton kernel launch (``kernel[grid](...)``) with a no-op that reports it.

    The grid is evaluated as Triton would (a callable grid gets the launch's keyword args). The
    kernels write nothing: on meta tensors there is nothing to write, and memory and traces only
    need the shapes. Yields the list of :class:`Launch` records.
    """
    from triton.runtime.jit import JITFunction

    kernel_classes = [JITFunction]
    try:  # TRITON_INTERPRET=1 makes @triton.jit build these instead
        from triton.runtime.interpreter import InterpretedFunction

        kernel_classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    launches: list[Launch] = []
    originals = {cls: cls.__dict__["run"] for cls in kernel_classes}

    def fake_run(self, *args, grid, warmup=False, **kwargs):
        if warmup:
            return None
        meta = dict(kwargs)
        meta.update(zip(self.arg_names, args))
        g = tuple(grid(meta) if callable(grid) else grid)
        g = g + (1,) * (3 - len(g))
        launch = Launch(name=self.fn.__name__, grid=g, args=tuple(_info(a) for a in args),
                        kwargs={k: _info(v) for k, v in kwargs.items()},
                        arguments={k: _info(v) for k, v in meta.items()})
        launches.append(launch)
        if on_launch is not None:
            on_launch(launch)
        return None

    for cls in kernel_classes:
        cls.run = fake_run
    try:
        yield launches
    finally:
        for cls, run in originals.items():
            cls.run = run
