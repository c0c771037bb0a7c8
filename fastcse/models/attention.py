"""Attention backends of :class:`~fastcse.models.SentenceEncoder`: selection and the varlen path.

Backends (``attn_backend=``):

``eager``
    The Hugging Face model's own attention (``attn_implementation="eager"``): the reference.
    Dropout: HF's ``nn.functional.dropout`` on the attention probabilities and its hidden dropouts.
``sdpa``
    HF's padded ``scaled_dot_product_attention`` path (models whose HF class supports it).
    Dropout: SDPA's ``dropout_p`` on the probabilities, HF's hidden dropouts.
``varlen``
    BERT family (BERT, RoBERTa, XLM-R) and ModernBERT: the batch is unpadded once to
    ``(total_tokens, hidden)``; embeddings, layer norms, MLPs and attention all run on packed
    tokens (see :func:`bert_varlen_forward`, :func:`modernbert_varlen_forward`). Attention kernel
    (:func:`varlen_attention`; ``auto`` takes the first that can run, :func:`pick_varlen_kernel`):
    0. ``short``: fastcse's tiles of whole sequences (``fastcse.kernels.short_attention``; fp16/bf16
       CUDA, no window, sequences of at most its ``SHORT_MAX_SEQLEN`` (48) tokens, for callers
       holding the fused q/k/v projection: :func:`varlen_attention_qkv`, which the BERT layers
       use). Each 64-row tile owns the sequences that start in its chunk of rows, so its softmax
       rows are whole: one forward kernel, one backward kernel writing the fused projection's
       gradient (no delta kernel, atomics, zero-filled dQ or concatenated q/k/v gradients).
       In-kernel Philox dropout, one seed a forward, a stream per layer and head;
    1. ``flash_attn``: the ``flash-attn`` package's ``flash_attn_varlen_func`` when installed
       (fp16/bf16 CUDA);
    2. ``triton``: fastcse's flash kernel (``fastcse.kernels.biased_attention``, no bias table) on
       the packed rows as one sequence, a score kept only within a sequence and each tile visiting
       only the tiles its sequences reach (fp16/bf16 CUDA, no window; ``auto`` from
       :data:`TRITON_VARLEN_MIN_SEQUENCES` sequences of at most :data:`TRITON_VARLEN_MAX_SEQLEN`
       tokens): FlashAttention gives each sequence its own 128-row tiles, mostly empty for
       SimCSE's ~20-token sentences. In-kernel Philox dropout, regenerated in the backward;
    3. ``aten_flash``: PyTorch's own FlashAttention-2 varlen kernels (``aten._flash_attention_forward``
       / ``_backward`` as the custom op ``fastcse::flash_varlen_fwd``, ``fastcse.kernels.flash_varlen``;
       fp16/bf16 CUDA on sm80+, head_dim <= 256): attention dropout inside the kernel, the backward
       replays its mask from the saved Philox state; windows too. ``bench/perf_model.py`` costs it
       as flash over the real tokens: faster than padded SDPA (padded tokens, plus the scatter and
       gather) and than nested tensors (the same kernels plus ~20 dispatched ops of host time);
    4. ``padded_sdpa``: everywhere else (CPU, fp32, old GPUs): the packed q/k/v are scattered into a
       padded ``(batch, heads, max_seqlen, head_dim)`` block, attended with SDPA and a key-padding
       mask, and gathered back (the CPU twin, exact against HF eager).
    By name only: ``torch_varlen`` (``torch.nn.attention.varlen.varlen_attn``: no dropout, no
    scale in torch 2.11) and ``nested`` (SDPA on jagged nested tensors: Python dispatch per op).
    Dropout: the model's own ``nn.Dropout`` modules on packed tokens; attention-probability dropout
    inside the kernel (``dropout_p``).
``biased``
    T5 and DeBERTa-v2: the fused relative-bias Triton attention of ``fastcse.models.biased``
    patched into the HF modules (dropout inside the kernel, see that module).
``rotary``
    RoFormer and ModernBERT: the HF attention (sdpa where supported, else eager) with the rotary
    embedding swapped for the fused kernel of ``fastcse.models.rope_patch`` (``patch_rotary``; on
    CPU tensors the patched modules call the model's own rotary code). Dropout: HF's.
``auto``
    Resolved when the encoder is built, for the model and the machine. BERT family: ``varlen``
    everywhere (CPU, 1 thread, a 4-layer hidden-256 BERT, fwd+bwd of 64 wiki1m sentences with 32%
    padding: varlen 0.56 s vs sdpa 0.82 s / eager 0.82 s; 8 x 128 tokens without padding: varlen
    0.31 s vs sdpa 0.29 s, 7% slower). T5 / DeBERTa-v2: ``biased``; RoFormer / ModernBERT:
    ``rotary``; both only when CUDA is available and the fused module is present, since Triton
    runs only interpreted on CPU. Otherwise ``sdpa`` where HF supports it, else ``eager``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F

from fastcse import dropout_add_norm as norm_op  # (autocast_dtype read through it: the perf model answers it)
from fastcse.dropout_add_norm import dropout_add_layer_norm
from fastcse.dropout_add_norm import resolve_backend as resolve_norm_backend

from fastcse.kernels._triton_utils import draw_philox_seed

from .recompute import recompute_saved
from .unpad import PackedBatch, pack, unpad_input

logger = logging.getLogger(__name__)

ATTN_BACKENDS = ("auto", "eager", "sdpa", "varlen", "biased", "rotary")
VarlenKernel = Literal["auto", "flash_attn", "short", "triton", "aten_flash", "torch_varlen", "nested", "padded_sdpa"]
VARLEN_KERNELS = ("auto", "flash_attn", "short", "triton", "aten_flash", "torch_varlen", "nested", "padded_sdpa")
# ``auto`` takes the ``triton`` kernel (packed tiles across sequences) on CUDA for calls of at least
# this many sequences of at most TRITON_VARLEN_MAX_SEQLEN tokens: bench/perf_model.py on an H200
# has it ahead from 128 SimCSE sentences a call (a BERT-base step: 9.21 -> 8.58 ms at 64 pairs,
# 42.4 -> 32.9 ms at 512 triplets) and behind at 64 (the encoder alone, 3.70 -> 4.13 ms: its
# launches' host work hides the device time it saves); FlashAttention's tile is 128 rows
TRITON_VARLEN_MIN_SEQUENCES = 128
TRITON_VARLEN_MAX_SEQLEN = 128
# ``auto`` takes the ``short`` kernel (tiles of whole sequences, fastcse.kernels.short_attention)
# for BERT-family layers whose sequences it takes (its SHORT_MAX_SEQLEN, 48 tokens):
# bench/perf_model.py on an H200, BERT-base, 64 wiki sentences (<= 32 tokens), forward +
# backward: 3.45 ms with aten_flash, 3.99 with triton, 3.06 with short

# model_type -> the fast backend that exists for it (besides eager / sdpa)
BERT_VARLEN_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta"})
VARLEN_MODEL_TYPES = BERT_VARLEN_MODEL_TYPES | {"modernbert"}
BIASED_MODEL_TYPES = frozenset({"t5", "mt5", "umt5", "deberta-v2"})
ROTARY_MODEL_TYPES = frozenset({"roformer", "modernbert"})

# fused modules of the other parts of fastcse: (module, function that patches a model in place)
_PATCHES = {
    "biased": ("fastcse.models.biased", "patch_biased_attention"),
    "rotary": ("fastcse.models.rope_patch", "patch_rotary"),
}


def valid_backends(model_type: str, supports_sdpa: bool) -> tuple[str, ...]:
    """The ``attn_backend`` names that can run a model of this HF ``model_type``."""
    names = ["auto", "eager"]
    if supports_sdpa:
        names.append("sdpa")
    if model_type in VARLEN_MODEL_TYPES:
        names.append("varlen")
    if model_type in BIASED_MODEL_TYPES:
        names.append("biased")
    if model_type in ROTARY_MODEL_TYPES:
        names.append("rotary")
    return tuple(names)


def patch_available(backend: str) -> bool:
    """Whether the fused module behind ``biased`` / ``rotary`` is installed in this checkout."""
    module, fn = _PATCHES[backend]
    try:
        return hasattr(importlib.import_module(module), fn)
    except ImportError:
        return False


def resolve_backend(name: str, model_type: str, supports_sdpa: bool, *, cuda: bool | None = None) -> str:
    """Check ``name`` against the model and turn ``auto`` into a concrete backend.

    Raises ValueError naming the valid backends for an unknown or unsupported name.
    """
    if name not in ATTN_BACKENDS:
        raise ValueError(f"unknown attn_backend {name!r}; valid backends: {', '.join(ATTN_BACKENDS)}")
    valid = valid_backends(model_type, supports_sdpa)
    if name not in valid:
        raise ValueError(
            f"attn_backend {name!r} cannot run model type {model_type!r}; "
            f"valid backends for it: {', '.join(valid)}"
        )
    if name != "auto":
        return name
    if model_type in BERT_VARLEN_MODEL_TYPES:
        return "varlen"
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        # ModernBERT's varlen path follows one transformers layout (5.x): auto keeps it on rotary
        for fused, types in (("biased", BIASED_MODEL_TYPES), ("rotary", ROTARY_MODEL_TYPES)):
            if model_type in types and patch_available(fused):
                return fused
    return "sdpa" if supports_sdpa else "eager"


def hf_attn_implementation(backend: str, supports_sdpa: bool) -> str:
    """The ``attn_implementation`` to build the HF backbone with for a resolved backend."""
    if backend == "eager" or backend == "biased":
        # the biased patch replaces HF's eager attention modules; build those
        return "eager"
    return "sdpa" if supports_sdpa else "eager"


def apply_patch(backbone: torch.nn.Module, backend: str) -> int:
    """Swap the fused ``biased`` / ``rotary`` modules into ``backbone``; returns how many changed."""
    module_name, fn_name = _PATCHES[backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeError(
            f"attn_backend={backend!r} needs {module_name} ({fn_name}), which is not available in this "
            f"installation ({exc}); use attn_backend='eager' or 'sdpa' instead"
        ) from exc
    patch = getattr(module, fn_name, None)
    if patch is None:
        raise RuntimeError(f"attn_backend={backend!r}: {module_name} has no {fn_name}(); cannot patch the model")
    count = patch(backbone)
    if not count:
        raise RuntimeError(f"attn_backend={backend!r}: {module_name}.{fn_name} found nothing to patch in "
                           f"{type(backbone).__name__}")
    return int(count)


# ----------------------------------------------------------------------------------------------
# varlen attention


@functools.lru_cache(maxsize=None)
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # not installed, or built for another torch: both mean "not usable"
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _aten_flash_module():
    try:
        from fastcse.kernels import flash_varlen
    except ImportError:  # a checkout without the kernels package
        return None
    return flash_varlen


def pick_varlen_kernel(device: torch.device, dtype: torch.dtype, dropout_p: float, head_dim: int = 64,
                       sequences: int = 0, max_seqlen: int = 0, window: int | None = None,
                       fused_qkv: bool = False) -> str:
    """The varlen attention kernel ``auto`` uses for these inputs: the first of ``short`` (a caller
    holding the fused q/k/v projection, ``fused_qkv``, with sequences of at most
    ``fastcse.kernels.short_attention.SHORT_MAX_SEQLEN`` tokens, no window), ``flash_attn``, ``triton`` (at least
    :data:`TRITON_VARLEN_MIN_SEQUENCES` sequences of at most :data:`TRITON_VARLEN_MAX_SEQLEN`
    tokens, no window), ``aten_flash``, ``padded_sdpa`` that can run them (the order of the module
    docstring, the performance model's: tiles of whole short sequences beat FlashAttention's tile
    per sequence, flash over real tokens beats SDPA over padded ones, and many short sequences fill
    fastcse's packed tiles better than FlashAttention's). Never a CUDA kernel for CPU tensors."""
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half:
        short = _short_module() if fused_qkv and window is None and head_dim <= 128 else None
        if short is not None and 0 < max_seqlen <= short.SHORT_MAX_SEQLEN:
            return "short"
        if _flash_attn_varlen() is not None:
            return "flash_attn"
        if (window is None and sequences >= TRITON_VARLEN_MIN_SEQUENCES and 0 < max_seqlen <= TRITON_VARLEN_MAX_SEQLEN
                and head_dim <= 128 and _packed_triton_module() is not None):
            return "triton"
        module = _aten_flash_module()
        if module is not None and module.flash_varlen_unsupported_reason(device, dtype, head_dim) is None:
            return "aten_flash"
    return "padded_sdpa"


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedBatch, *,
                     dropout_p: float = 0.0, scale: float | None = None, window: int | None = None,
                     kernel: VarlenKernel = "auto") -> torch.Tensor:
    """Bidirectional attention over packed sequences.

    Args:
        q, k, v: ``(total_tokens, nheads, head_dim)``; sequence ``b`` owns rows
            ``packed.cu_seqlens[b]:packed.cu_seqlens[b+1]`` and attends only to them.
        packed: the batch's :class:`PackedBatch` (``cu_seqlens``, ``max_seqlen``).
        dropout_p: dropout on the attention probabilities (pass 0 in evaluation mode).
        scale: softmax scale, default ``head_dim ** -0.5``.
        window: bidirectional sliding window (ModernBERT's local layers): token ``i`` attends to
            ``j`` only when ``|i - j| <= window``; None attends to the whole sequence.
        kernel: ``auto`` (:func:`pick_varlen_kernel`) or a kernel name from :data:`VARLEN_KERNELS`.

    Returns ``(total_tokens, nheads, head_dim)``.
    """
    head_dim = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if kernel == "auto":
        kernel = pick_varlen_kernel(q.device, q.dtype, dropout_p, head_dim, packed.batch, packed.max_seqlen, window)
        if window is not None and kernel == "aten_flash" and not _aten_flash_module().flash_varlen_has_window():
            kernel = "padded_sdpa"  # a torch whose flash ops take no window
    if window is not None and kernel in ("torch_varlen", "nested"):
        raise ValueError(f"varlen kernel {kernel!r} has no sliding window; use 'flash_attn' or 'padded_sdpa'")
    if kernel == "flash_attn":
        fn = _flash_attn_varlen()
        if fn is None:
            raise RuntimeError("varlen kernel 'flash_attn' needs the flash-attn package (pip install fastcse[flash-attn])")
        return fn(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen,
                  dropout_p=dropout_p, softmax_scale=scale, causal=False,
                  window_size=(-1, -1) if window is None else (window, window))
    if kernel == "aten_flash":
        module = _aten_flash_module()
        if module is None:
            raise RuntimeError("varlen kernel 'aten_flash' needs fastcse.kernels.flash_varlen (not installed)")
        reason = module.flash_varlen_unsupported_reason(q.device, q.dtype, head_dim)
        if reason is not None:
            raise ValueError(f"varlen kernel 'aten_flash' {reason}; use 'padded_sdpa' (or kernel='auto')")
        return module.flash_varlen_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen, dropout_p=dropout_p,
                                             scale=scale, window=window)
    if kernel == "torch_varlen":
        fn = _torch_varlen_attn()
        if fn is None:
            raise RuntimeError("varlen kernel 'torch_varlen' needs torch.nn.attention.varlen (torch >= 2.9)")
        if dropout_p:
            raise ValueError("torch's varlen_attn has no dropout; use kernel 'flash_attn', 'nested' or 'padded_sdpa'")
        if not math.isclose(scale, 1.0 / math.sqrt(head_dim)):
            raise ValueError("torch's varlen_attn is called with its default scale only (torch 2.11 has no scale argument)")
        # positional call: the keyword set differs between torch 2.11 and 2.13
        return fn(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen)
    if kernel == "nested":
        try:
            return _nested_sdpa(q, k, v, packed, dropout_p, scale)
        except (RuntimeError, NotImplementedError) as exc:
            # nested tensors are a prototype API whose coverage moves between torch releases: a
            # torch that cannot run this call still gets correct attention, padded, with a warning
            _warn_once(f"SDPA on nested tensors failed ({type(exc).__name__}: {exc}); the varlen backend "
                       f"uses padded SDPA for attention instead")
            return _padded_sdpa(q, k, v, packed, dropout_p, scale)
    if kernel == "padded_sdpa":
        return _padded_sdpa(q, k, v, packed, dropout_p, scale, window)
    if kernel == "short":  # (q, k, v given apart: one copy into the fused layout the kernel reads)
        total, heads, head_dim = q.shape
        qkv = torch.cat([x.reshape(total, heads * head_dim) for x in (q, k, v)], dim=-1)
        out = varlen_attention_qkv(qkv, packed, heads=heads, dropout_p=dropout_p, scale=scale, window=window,
                                   kernel="short")
        return out.view(total, heads, head_dim)
    if kernel == "triton":
        if window is not None:
            raise ValueError("varlen kernel 'triton' has no sliding window; use 'flash_attn' or 'padded_sdpa'")
        module = _packed_triton_module(q)
        if module is None:
            raise RuntimeError("varlen kernel 'triton' needs Triton and fastcse.kernels, on CUDA (or on CPU under "
                               "TRITON_INTERPRET=1)")
        return module.packed_attention_triton(q, k, v, packed.seq_ids, packed.cu_seqlens, scale=scale,
                                              dropout_p=dropout_p)
    raise ValueError(f"unknown varlen kernel {kernel!r}; valid kernels: {', '.join(VARLEN_KERNELS)}")


def _short_module(x: torch.Tensor | None = None):
    """fastcse.kernels.short_attention when its kernels can run (on ``x`` here, given ``x``), else None."""
    if _packed_triton_module(x) is None:
        return None
    from fastcse.kernels import short_attention

    return short_attention


def varlen_attention_qkv(qkv: torch.Tensor, packed: PackedBatch, *, heads: int, dropout_p: float = 0.0,
                         scale: float | None = None, window: int | None = None, kernel: VarlenKernel = "auto",
                         seed: torch.Tensor | None = None, stream: int = 0) -> torch.Tensor:
    """:func:`varlen_attention` from the fused projection ``qkv`` ``(total_tokens, 3 * heads *
    head_dim)`` (q, then k, then v): returns ``(total_tokens, heads * head_dim)``.

    The ``short`` kernel reads the three from ``qkv`` and writes their gradient into one buffer of
    its shape (no split, no concatenation in autograd); it draws its dropout mask from ``seed``
    (int64 (1,), drawn here when None) in Philox stream ``stream + head``: a caller running
    several layers on one seed gives each its own stream, ``heads`` apart. Every other kernel
    gets ``qkv``'s three views (``seed`` unused).
    """
    total, width = qkv.shape
    if width % (3 * heads):
        raise ValueError(f"qkv has {width} columns, not 3 * heads * head_dim for heads={heads}")
    head_dim = width // (3 * heads)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if kernel == "auto":
        kernel = pick_varlen_kernel(qkv.device, qkv.dtype, dropout_p, head_dim, packed.batch, packed.max_seqlen,
                                    window, fused_qkv=True)
    if kernel != "short":
        q, k, v = (x.view(total, heads, head_dim) for x in qkv.split(heads * head_dim, dim=-1))
        out = varlen_attention(q, k, v, packed, dropout_p=dropout_p, scale=scale, window=window, kernel=kernel)
        return out.reshape(total, heads * head_dim)
    module = _short_module(qkv)
    if module is None:
        raise RuntimeError("varlen kernel 'short' needs Triton and fastcse.kernels, on CUDA (or on CPU under "
                           "TRITON_INTERPRET=1)")
    if window is not None:
        raise ValueError("varlen kernel 'short' has no sliding window; use 'flash_attn', 'aten_flash' or 'padded_sdpa'")
    if packed.max_seqlen > module.SHORT_MAX_SEQLEN:
        raise ValueError(f"varlen kernel 'short' takes sequences of at most {module.SHORT_MAX_SEQLEN} tokens, "
                         f"this batch's longest has {packed.max_seqlen}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if dropout_p > 0.0 and seed is None:
        seed = draw_philox_seed(qkv.device)
    return module.short_attention_qkv(qkv, packed.seq_ids, packed.cu_seqlens, heads=heads,
                                      max_seqlen=packed.max_seqlen, scale=scale, dropout_p=dropout_p, seed=seed,
                                      stream=stream)


def _packed_triton_module(q: torch.Tensor | None = None):
    """fastcse.kernels.biased_attention when Triton imports (and, given ``q``, its kernels can run
    on ``q`` here: CUDA, or CPU under Triton's interpreter), else None."""
    try:
        from fastcse.kernels._triton_utils import triton_available, triton_can_run
    except ImportError:  # a checkout without the kernels package
        return None
    if not triton_available() or (q is not None and not triton_can_run(q)):
        return None
    from fastcse.kernels import biased_attention

    return biased_attention


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def _nested_sdpa(q, k, v, packed: PackedBatch, dropout_p: float, scale: float) -> torch.Tensor:
    """SDPA on jagged nested tensors: PyTorch dispatches to its flash / efficient varlen kernels."""
    offsets = packed.cu_seqlens.long()

    def jagged(x):  # (total, H, D) -> nested (B, H, j, D)
        return torch.nested.nested_tensor_from_jagged(x, offsets, max_seqlen=packed.max_seqlen).transpose(1, 2)

    out = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v), dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).values()


def _padded_sdpa(q, k, v, packed: PackedBatch, dropout_p: float, scale: float,
                 window: int | None = None) -> torch.Tensor:
    """The CPU twin: scatter into ``(batch, H, max_seqlen, D)``, masked SDPA, gather back.

    Only attention sees padding (to ``max_seqlen``, not the batch's padded length); every other op
    of the varlen path stays packed. Padded query rows attend to real keys of their sequence (never
    NaN) and are dropped by the gather.
    """
    batch, max_len = packed.batch, packed.max_seqlen
    nheads, head_dim = q.shape[1], q.shape[2]
    flat = packed.seq_ids * max_len + packed.positions

    def scatter(x):
        out = x.new_zeros(batch * max_len, nheads, head_dim).index_copy(0, flat, x)
        return out.view(batch, max_len, nheads, head_dim).transpose(1, 2)

    steps = torch.arange(max_len, device=q.device)
    key_ok = steps[None, :] < packed.lengths.long()[:, None]
    mask = key_ok[:, None, None, :]  # (batch, 1, 1, max_len) boolean: True = attend
    if window is not None:
        mask = mask & ((steps[:, None] - steps[None, :]).abs() <= window)[None, None]
    out = F.scaled_dot_product_attention(scatter(q), scatter(k), scatter(v), attn_mask=mask,
                                         dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).reshape(batch * max_len, nheads, head_dim).index_select(0, flat)


# ----------------------------------------------------------------------------------------------
# the packed BERT-family encoder


def bert_position_ids(backbone: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """HF's position ids of a padded ``(batch, seqlen)`` batch, for BERT and RoBERTa embeddings."""
    embeddings = backbone.embeddings
    if hasattr(embeddings, "create_position_ids_from_input_ids"):
        # RoBERTa / XLM-R: positions count real (non-pad) tokens from padding_idx + 1
        return embeddings.create_position_ids_from_input_ids(input_ids, embeddings.padding_idx)
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


def _plain(module: torch.nn.Module, cls: type) -> bool:
    """Whether ``module`` is exactly a ``cls`` whose parameters fastcse may use directly instead
    of calling it: no ZeRO-3 partition (``ds_id``: DeepSpeed gathers those in the modules' hooks),
    no hooks, no replaced ``forward``."""
    return (type(module) is cls and "forward" not in vars(module)
            and not (module._forward_hooks or module._forward_pre_hooks)
            and not any(hasattr(p, "ds_id") for p in module.parameters(recurse=False)))


def _bert_qkv(self_attn: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """BertSelfAttention's query, key and value projections of packed ``hidden``, ``(total, hidden)``
    each, as one GEMM against the three weights stacked: under autocast ``hidden`` is cast once
    (three calls each cast it and keep their own bf16 copy for backward), and one product three
    times as wide fills more of the GPU than three (64 wiki sentences are ~1,400 tokens: a
    ``(1400, 768) x (768, 768)`` product is a third of a wave of 128 x 256 tiles on 132 SMs).
    The input gradient is one GEMM summing the three in fp32 as well.

    Called as modules instead: ZeRO-3 partitions (``ds_id``: DeepSpeed gathers them in the
    modules' hooks), modules with hooks or a replaced ``forward``, adapters that are not plain
    ``nn.Linear``, mixed biases."""
    mods = (self_attn.query, self_attn.key, self_attn.value)
    fused = _bert_qkv_fused(self_attn, hidden)
    if fused is None:
        return tuple(m(hidden) for m in mods)
    return fused.split(mods[0].out_features, dim=-1)


def _bert_qkv_fused_possible(self_attn: torch.nn.Module) -> bool:
    """Whether :func:`_bert_qkv_fused` runs the three projections as one GEMM."""
    mods = (self_attn.query, self_attn.key, self_attn.value)
    biases = [m.bias for m in mods]
    return (all(_plain(m, torch.nn.Linear) for m in mods)
            and (all(b is None for b in biases) or not any(b is None for b in biases))
            and len({m.out_features for m in mods}) == 1)


def _bert_qkv_fused(self_attn: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """The one GEMM of :func:`_bert_qkv`, ``(total, 3 * hidden)`` unsplit (q, k, v), or None
    where the projections must be called as modules."""
    if not _bert_qkv_fused_possible(self_attn):
        return None
    mods = (self_attn.query, self_attn.key, self_attn.value)
    biases = [m.bias for m in mods]
    weight = torch.cat([m.weight for m in mods])
    bias = None if biases[0] is None else torch.cat(biases)
    return F.linear(hidden, weight, bias)


def bert_varlen_forward(backbone: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        token_type_ids: torch.Tensor | None = None, *, kernel: VarlenKernel = "auto",
                        checkpoint: bool = False, recompute_activation: bool = True,
                        residual_norm: str = "auto") -> tuple[torch.Tensor, PackedBatch]:
    """Run a HF BERT / RoBERTa / XLM-R encoder on packed tokens.

    Args:
        backbone: ``BertModel`` / ``RobertaModel`` / ``XLMRobertaModel`` (its weights and modules
            are used as they are; nothing is copied or patched).
        input_ids, attention_mask, token_type_ids: padded ``(batch, seqlen)``.
        kernel: the varlen attention kernel (:func:`varlen_attention`).
        checkpoint: recompute each layer in backward (activation checkpointing) instead of storing
            its activations.
        recompute_activation: recompute the MLP activation's output in backward from its input
            (which the activation keeps anyway) instead of keeping both
            (:func:`fastcse.models.recompute.recompute_saved`; bitwise the same gradients).
        residual_norm: each sublayer's tail (dense bias, dropout, residual add, LayerNorm):
            ``triton`` fuses it after a bias-free GEMM (:func:`fastcse.dropout_add_norm.dropout_add_layer_norm`,
            dropout masks of one Philox seed a forward instead of torch's generator), ``eager``
            calls the HF modules, ``auto`` fuses on CUDA when every tail is a plain HF module.

    Returns ``(hidden, packed)``: the last hidden states of the real tokens ``(total_tokens, hidden)``
    and the :class:`PackedBatch` describing them.

    Dropout: the model's own ``nn.Dropout`` modules (embeddings, attention output, MLP output) run on
    the packed tokens in training mode, at their own rates; with the fused tails the attention- and
    MLP-output dropouts are the kernel's Philox masks at those rates. Attention-probability dropout
    is the kernel's ``dropout_p`` (``config.attention_probs_dropout_prob`` in training mode, 0 in
    evaluation).
    """
    packed = unpad_input(attention_mask)
    if packed.total_tokens == 0 or packed.min_seqlen == 0:
        raise ValueError("every sequence needs at least one token in attention_mask for the varlen backend")
    ids = pack(input_ids, packed)
    positions = pack(bert_position_ids(backbone, input_ids), packed)
    types = pack(token_type_ids, packed) if token_type_ids is not None else torch.zeros_like(ids)
    # HF embeddings take (batch, seqlen): the packed tokens are one "sequence" of total_tokens
    hidden = backbone.embeddings(input_ids=ids[None], token_type_ids=types[None], position_ids=positions[None])[0]

    def run_layer(layer, hidden, hidden_low, index):
        # hidden: the residual stream; hidden_low: None, or the same in autocast's dtype (the fused
        # tails write it beside their fp32 output, so no GEMM input is cast)
        self_attn = layer.attention.self
        nheads, head_dim = self_attn.num_attention_heads, self_attn.attention_head_size
        dropout_p = self_attn.dropout.p if self_attn.training else 0.0
        scale = getattr(self_attn, "scaling", head_dim ** -0.5)
        x = _or(hidden_low, hidden)
        qkv = _bert_qkv_fused(self_attn, x)
        if qkv is not None:  # (the short kernel reads it whole, so autograd concatenates no gradients)
            context = varlen_attention_qkv(qkv, packed, heads=nheads, dropout_p=dropout_p, scale=scale,
                                           kernel=attn_kernel, seed=attn_seed, stream=index * nheads)
        else:
            q, k, v = (t.view(-1, nheads, head_dim) for t in _bert_qkv(self_attn, x))
            context = varlen_attention(q, k, v, packed, dropout_p=dropout_p, scale=scale,
                                       kernel=attn_kernel).reshape(-1, nheads * head_dim)
        attn_out, attn_low = _bert_output(layer.attention.output, context, hidden,
                                          norm_backend, seed, 2 * index, low_dtype)
        # the last layer's output feeds no GEMM here (pooling reads the fp32 stream)
        out_low_dtype = low_dtype if index < len(layers) - 1 else None
        if checkpoint or not recompute_activation:  # a checkpointed layer recomputes all of it
            return _bert_output(layer.output, layer.intermediate(_or(attn_low, attn_out)), attn_out, norm_backend,
                                seed, 2 * index + 1, out_low_dtype)
        # BertIntermediate's two steps, so that the activation's output is not kept for backward
        inter = layer.intermediate
        pre = inter.dense(_or(attn_low, attn_out))
        act = inter.intermediate_act_fn(pre)
        with recompute_saved(act, inter.intermediate_act_fn, pre):
            return _bert_output(layer.output, act, attn_out, norm_backend, seed, 2 * index + 1, out_low_dtype)

    layers = list(backbone.encoder.layer)
    tails = [m for layer in layers for m in (layer.attention.output, layer.output)]
    norm_backend = residual_norm_backend(residual_norm, tails, hidden)
    # one Philox seed a forward for the fused sublayer tails, a mask stream per sublayer (a
    # checkpointed layer's recomputation reuses the seed, so it redraws the same masks)
    seed = None
    if norm_backend == "triton" and any(m.training and m.dropout.p > 0.0 for m in tails):
        seed = draw_philox_seed(hidden.device)
    # under autocast the fused tails also write their fp32 output in the autocast dtype for the
    # next GEMM: eager's cast kernels (forward and backward) and the add of the residual stream's
    # two gradients happen inside the tail kernels instead
    # Without autocast, a half-precision stream gets the same second output (the GEMM's input, a
    # tensor of its own): the stream's two gradients (residual and GEMM input) then reach the tail
    # kernel's backward apart and are added there, not by an add kernel of autograd's
    low_dtype = None
    if norm_backend == "triton":
        low_dtype = norm_op.autocast_dtype(hidden.device) or (
            hidden.dtype if hidden.dtype in (torch.float16, torch.bfloat16) else None)
    # the attention kernel, picked once for every layer (in the GEMMs' dtype: autocast's when on);
    # the short kernel's dropout masks: one seed a forward, Philox streams index * heads + head
    # (a checkpointed layer's recomputation reuses it, so it redraws the same masks)
    first = layers[0].attention.self if layers else None
    attn_kernel, attn_seed = kernel, None
    if first is not None:
        head_dim = first.attention_head_size
        attn_p = first.dropout.p if first.training else 0.0
        if kernel == "auto":
            compute_dtype = norm_op.autocast_dtype(hidden.device) or first.query.weight.dtype
            attn_kernel = pick_varlen_kernel(hidden.device, compute_dtype, attn_p, head_dim, packed.batch,
                                             packed.max_seqlen,
                                             fused_qkv=_bert_qkv_fused_possible(first))
        if attn_kernel == "short" and any(layer.attention.self.training and layer.attention.self.dropout.p > 0.0
                                          for layer in layers):
            attn_seed = draw_philox_seed(hidden.device)
    hidden_low = None
    for index, layer in enumerate(layers):
        hidden, hidden_low = _maybe_checkpoint(functools.partial(run_layer, index=index), layer,
                                               (hidden, hidden_low), checkpoint)
    return hidden, packed


def _or(preferred: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return fallback if preferred is None else preferred


# the HF classes whose forward is dense -> dropout -> LayerNorm(x + residual) (BERT's, and the
# copies RoBERTa and XLM-R make of it)
_BERT_OUTPUT_CLASSES = frozenset({"BertSelfOutput", "BertOutput", "RobertaSelfOutput", "RobertaOutput",
                                  "XLMRobertaSelfOutput", "XLMRobertaOutput"})


def _fusable_output(module: torch.nn.Module) -> bool:
    """Whether a sublayer tail can run as a bias-free GEMM and :func:`dropout_add_layer_norm`."""
    if type(module).__name__ not in _BERT_OUTPUT_CLASSES or "forward" in vars(module) \
            or module._forward_hooks or module._forward_pre_hooks:
        return False
    dense, dropout, norm = (getattr(module, name, None) for name in ("dense", "dropout", "LayerNorm"))
    return (_plain(dense, torch.nn.Linear) and _plain(norm, torch.nn.LayerNorm)
            and type(dropout) is torch.nn.Dropout and norm.weight is not None and norm.bias is not None
            and tuple(norm.normalized_shape) == (dense.out_features,))


def residual_norm_backend(name: str, tails: list, hidden: torch.Tensor) -> str:
    """The backend of a call's sublayer tails (each layer's ``attention.output`` and ``output``):
    ``eager`` (the HF modules) unless every tail can fuse and :func:`fastcse.dropout_add_norm.resolve_backend` picks the kernel (``auto``:
    on CUDA). A forced ``triton`` on modules that cannot fuse is an error."""
    resolved = resolve_norm_backend(name, hidden)
    if resolved == "eager":
        return "eager"
    if all(_fusable_output(m) for m in tails):
        return "triton"
    if name == "triton":
        raise ValueError("residual_norm='triton' needs plain HF output modules (nn.Linear, nn.Dropout, "
                         "nn.LayerNorm with bias; no hooks, no ZeRO-3 partitions)")
    return "eager"


def _bert_output(module: torch.nn.Module, hidden_in: torch.Tensor, residual: torch.Tensor, backend: str,
                 seed: torch.Tensor | None, stream: int, low_dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(module(hidden_in, residual), None)`` of a BERT sublayer tail; with the ``triton`` backend
    the dense GEMM runs without its bias and :func:`dropout_add_layer_norm` adds it, drops, adds the
    residual and normalises in one kernel (one backward kernel for all of their gradients), and
    with ``low_dtype`` the second element is the output in that dtype, from the same kernel."""
    if backend != "triton":
        return module(hidden_in, residual), None
    dense, norm = module.dense, module.LayerNorm
    out = dropout_add_layer_norm(F.linear(hidden_in, dense.weight), residual, norm.weight, norm.bias,
                                 x_bias=dense.bias, dropout_p=module.dropout.p, training=module.training,
                                 eps=norm.eps, seed=seed, stream=stream, low_dtype=low_dtype, backend="triton")
    return out if low_dtype is not None else (out, None)


def _maybe_checkpoint(fn, layer, hidden, checkpoint: bool):
    """``fn(layer, hidden)`` (``fn(layer, *hidden)`` for a tuple), recomputed in backward when
    ``checkpoint`` and gradients are on.

    torch's checkpoint restores the RNG state for the recomputation, so dropout masks (the model's
    and the attention kernel's, all drawn from torch's generator) are the same in both passes.
    """
    inputs = hidden if isinstance(hidden, tuple) else (hidden,)
    if checkpoint and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint as run_checkpointed

        return run_checkpointed(fn, layer, *inputs, use_reentrant=False)
    return fn(layer, *inputs)


def modernbert_varlen_forward(backbone: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              *, kernel: VarlenKernel = "auto", checkpoint: bool = False,
                              rotary_backend: str = "auto") -> tuple[torch.Tensor, PackedBatch]:
    """Run a HF ``ModernBertModel`` (transformers 5 layout) on packed tokens.

    Shapes as :func:`bert_varlen_forward`. Rotary: fastcse's ``apply_rotary`` on the packed q and k
    with ``cu_seqlens`` (``rotary_backend``: ``auto`` = the fused Triton kernel on CUDA, the eager
    reference on CPU; ``triton``; ``eager``), with HF's own cos/sin tables (cast to the activation
    dtype, as HF does); ``rotary_backend="hf"`` uses HF's ``apply_rotary_pos_emb`` instead. Local layers attend within ``config.sliding_window``
    tokens on each side (``|i - j| <= window``, HF's mask). Dropout: the model's ``nn.Dropout``
    modules (embeddings, attention output, MLP) on packed tokens; attention-probability dropout
    (``config.attention_dropout``) in the kernel, in training mode only.
    """
    import sys

    layers = getattr(backbone, "layers", None)
    if layers is None or not hasattr(backbone, "rotary_emb") or not hasattr(layers[0], "attention_type"):
        raise RuntimeError(
            "the varlen backend knows ModernBERT in the transformers 5 layout (layers with attention_type, a shared "
            "rotary_emb); this transformers differs: use attn_backend='sdpa' or 'rotary'")
    packed = unpad_input(attention_mask)
    if packed.total_tokens == 0 or packed.min_seqlen == 0:
        raise ValueError("every sequence needs at least one token in attention_mask for the varlen backend")
    ids = pack(input_ids, packed)
    hidden = backbone.embeddings(input_ids=ids[None])[0]
    total = packed.total_tokens
    if rotary_backend == "hf":
        # HF numbers the positions of right-padded rows 0..len-1: per packed token cos/sin rows
        rotary = {kind: backbone.rotary_emb(hidden[None], packed.positions[None], kind)
                  for kind in set(backbone.config.layer_types)}
    else:
        from fastcse.rotary import apply_rotary

        # one (max_seqlen, head_dim / 2) table per layer type; the kernel indexes it by position
        steps = torch.arange(packed.max_seqlen, device=ids.device)[None]
        rotary = {}
        for kind in set(backbone.config.layer_types):
            cos, sin = backbone.rotary_emb(hidden[None], steps, kind)
            half = cos.shape[-1] // 2
            rotary[kind] = (cos[0, :, :half], sin[0, :, :half])

    def run_layer(layer, hidden):
        attn_module = layer.attn
        apply_rope = sys.modules[type(attn_module).__module__].apply_rotary_pos_emb
        nheads, head_dim = backbone.config.num_attention_heads, attn_module.head_dim
        qkv = attn_module.Wqkv(layer.attn_norm(hidden)).view(total, 3, nheads, head_dim)
        q, k, v = qkv.unbind(dim=1)
        cos, sin = rotary[layer.attention_type]
        if rotary_backend == "hf":
            # HF's rotary takes (batch, heads, seqlen, head_dim): the packed tokens are one row
            q, k = apply_rope(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin, unsqueeze_dim=1)
            q, k = q[0].transpose(0, 1), k[0].transpose(0, 1)
        else:
            q, k = apply_rotary(q, k, cos, sin, layout="half", cu_seqlens=packed.cu_seqlens, backend=rotary_backend,
                                validate=False)
        window = None if attn_module.sliding_window is None else backbone.config.sliding_window
        dropout_p = attn_module.attention_dropout if attn_module.training else 0.0
        context = varlen_attention(q, k, v, packed, dropout_p=dropout_p, scale=head_dim ** -0.5, window=window,
                                   kernel=kernel)
        hidden = hidden + attn_module.out_drop(attn_module.Wo(context.reshape(total, nheads * head_dim)))
        return hidden + layer.mlp(layer.mlp_norm(hidden))

    for layer in layers:
        hidden = _maybe_checkpoint(run_layer, layer, hidden, checkpoint)
    return backbone.final_norm(hidden), packed
