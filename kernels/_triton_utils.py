"""Helpers shared by the Triton launchers and the engine's dispatch: availability, interpreter mode.

Triton-free on purpose (torch and os only): the engine asks :func:`triton_available` before it
picks a backend, and that question must not need Triton itself. It lives in the kernel layer
because the launchers read :func:`interpreted` and ``kernels/`` imports nothing of the engine.
"""

from __future__ import annotations

import os

import torch


_TRITON_IMPORTS: bool | None = None


def triton_available() -> bool:
    """True when Triton imports (it may still only run interpreted, see :func:`interpreted`).

    Cached in a module global rather than with functools.lru_cache, which torch.compile warns
    about when it traces through the loss.
    """
    global _TRITON_IMPORTS
    if _TRITON_IMPORTS is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_IMPORTS = True
        except Exception:
            _TRITON_IMPORTS = False
    return _TRITON_IMPORTS


def interpreted() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``).

    Read by launchers only (never inside kernels): the interpreter gets ``tl.dot`` of bf16
    operands wrong (triton-lang/triton#11584), so launchers pass a constexpr flag that makes the
    kernel upcast bf16 tiles to fp32 before the dot when, and only when, it runs interpreted.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """``(upcast, input_precision)`` of the attention kernels' ``tl.dot`` on ``dtype`` operands:
    bf16 tiles are upcast to fp32 when, and only when, running interpreted (its bf16 dots are
    wrong: triton-lang/triton#11584); fp32 dots are IEEE where the interpreter runs them or
    PyTorch's matmul setting forbids TF32, else TF32 (half operands ignore the precision)."""
    upcast = interpreted() and dtype == torch.bfloat16
    exact = interpreted() or not torch.backends.cuda.matmul.allow_tf32
    return upcast, "ieee" if dtype == torch.float32 and exact else "tf32"


def triton_can_run(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``tensor``'s device in this process."""
    if not triton_available():
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and interpreted()


def require_triton(tensor: torch.Tensor) -> None:
    """Raise the error of a ``backend='triton'`` request that cannot run on ``tensor``'s device."""
    if not triton_can_run(tensor):
        raise RuntimeError(
            f"backend='triton' cannot run on a {tensor.device.type} tensor here: it needs CUDA, or "
            "Triton's interpreter (TRITON_INTERPRET=1 set before fastcse.kernels is imported) "
            "for CPU tensors")


def resident_programs(x: torch.Tensor, interpreted_programs: int) -> int:
    """Programs a persistent-style kernel should launch to fill ``x``'s device: two per
    multiprocessor on CUDA (132 SMs when a meta tensor plays a CUDA one, as the performance model
    traces); ``interpreted_programs`` under the interpreter, few enough to stay fast and enough
    for its tests to cross the kernels' loops."""
    if x.is_meta:
        return 2 * 132
    if x.is_cuda:
        return 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return interpreted_programs


def draw_philox_seed(device: torch.device) -> torch.Tensor:
    """A fresh int64 (1,) Philox seed for fastcse's dropout kernels, from torch's generator of
    ``device`` (so torch.manual_seed reproduces it and checkpointing's RNG replay redraws it)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
