"""Shared test set-up.

Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton decides between compiled
and interpreted kernels when a ``@triton.jit`` function is *defined*, so the variable must be set
before any ``fastcse.kernels`` module is imported: here, at the top of the conftest.
"""

from __future__ import annotations

import logging
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


SHM = Path("/dev/shm")


@pytest.fixture(scope="session", autouse=True)
def deepspeed_shm_buffers_removed():
    """DeepSpeed's CPU all-reduce leaves two ~69 MB ``deepspeed_allreduce_buffer_*`` files in
    /dev/shm per 2-rank launch (they outlive the ranks): the ones this session's launches made are
    removed at its end, or each test run would keep ~1 GB of shared memory."""
    pattern = "deepspeed_allreduce_buffer_*"
    before = set(SHM.glob(pattern)) if SHM.is_dir() else set()
    yield
    if SHM.is_dir():
        for path in set(SHM.glob(pattern)) - before:
            path.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from a fixed seed but draws fresh inputs (never zeros or constants)."""
    torch.manual_seed(1234)
    yield


@pytest.fixture(autouse=True)
def fastcse_logger_restored():
    """The ``fastcse`` logger as it was before the test: a training run in one test configures it
    (a stdout handler at INFO), which would otherwise print the model builder's messages into the
    captured stdout of every later test (``perf_model --json`` then stops being JSON)."""
    logger = logging.getLogger("fastcse")
    saved = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.fixture
def shared_data() -> Path:
    # part of the checkout's setting (CI links it beside the clone): missing, the tests that read
    # it fail instead of checking nothing
    assert SHARED_DATA.is_dir(), f"shared data folder not found at {SHARED_DATA}"
    return SHARED_DATA


