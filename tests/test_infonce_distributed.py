"""gather_across_ranks: two gloo processes give the loss and gradients of one process over the
concatenated batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from fastcse.infonce import info_nce
from tests.helpers import describe_mismatch, free_port, gloo_group, rel_error

WORLD = 2
N_PER_RANK, DIM, QUEUE = 5, 24, 3


def _global_batch():
    g = torch.Generator().manual_seed(7)
    make = lambda rows: torch.randn(rows, DIM, generator=g, dtype=torch.float64)
    n = WORLD * N_PER_RANK
    return make(n), make(n), make(n), make(QUEUE)


def _worker(rank, port, backend, kwargs, out_dir):
    with gloo_group(rank, port, WORLD):
        anchors, positives, hard, queue = _global_batch()
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        local = [x[rows].clone().requires_grad_() for x in (anchors, positives, hard)]
        loss = info_nce(*local, queue=queue, gather_across_ranks=True, backend=backend, **kwargs)
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": [x.grad for x in local]},
                   os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("backend", ["chunked", "eager"])
@pytest.mark.parametrize("kwargs", [dict(hard_negative_weight=0.7), dict(symmetric=True)],
                         ids=["hard-negative-weight", "symmetric"])
def test_two_ranks_equal_one_process_over_the_global_batch(tmp_path, backend, kwargs):
    mp.start_processes(_worker, args=(free_port(), backend, kwargs, str(tmp_path)), nprocs=WORLD,
                       start_method="spawn")
    anchors, positives, hard, queue = _global_batch()
    full = [x.clone().requires_grad_() for x in (anchors, positives, hard)]
    loss = info_nce(*full, queue=queue, backend=backend, **kwargs)
    loss.backward()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # Each rank averages over its own anchors; the mean over ranks is the global mean.
    mean_loss = sum(r["loss"] for r in results) / WORLD
    assert rel_error(mean_loss, loss) <= 1e-12, describe_mismatch(mean_loss, loss)
    # Rank r's gradient is d(sum_s loss_s)/dx_r; data parallelism then divides by WORLD, so the
    # single-process gradient is the rank's gradient / WORLD.
    for r, res in enumerate(results):
        rows = slice(r * N_PER_RANK, (r + 1) * N_PER_RANK)
        for name, g_rank, x in zip(("anchors", "positives", "hard_negatives"), res["grads"], full):
            assert rel_error(g_rank / WORLD, x.grad[rows]) <= 1e-10, (
                f"rank {r} {name}: {describe_mismatch(g_rank / WORLD, x.grad[rows])}")


def test_single_process_gather_is_a_no_op():
    anchors, positives, hard, _ = _global_batch()
    a = info_nce(anchors, positives, hard, gather_across_ranks=True, backend="chunked")
    b = info_nce(anchors, positives, hard, backend="chunked")
    assert torch.equal(a, b)
