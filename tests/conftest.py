"""Shared test set-up.

Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton decides between compiled
and interpreted kernels when a ``@triton.jit`` function is *defined*, so the variable must be set
before any ``fastcse.kernels`` module is imported: here, at the top of the conftest.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from a fixed seed but draws fresh inputs (never zeros or constants)."""
    torch.manual_seed(1234)
    yield


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


