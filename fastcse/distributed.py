"""The one home of "are we distributed?" and the collectives fastcse uses.

Everything works without a process group (one process): the checks return (0, 1) / False and the
reductions return their input. Training, checkpoints, methods and the loss all ask here.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def world_info() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join(*, deepspeed_launch: bool, device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the launcher's process group and pick this process's device; returns (rank, world, device).

    ``deepspeed_launch``: started by ``deepspeed`` (``--ds``): DeepSpeed sets the group up (NCCL on
    GPUs, gloo on CPUs). ``device``: forced (``--device``); else GPU ``LOCAL_RANK`` when CUDA is
    there (the launcher's one GPU per process), else the CPU.
    """
    if deepspeed_launch:
        import deepspeed

        deepspeed.init_distributed()
        rank, world = world_info()
        local = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world, local = 0, 1, 0
    if device:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return rank, world, dev


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank; a no-op in one process."""
    if is_distributed():
        dist.barrier()


def comm_device() -> torch.device:
    """Where a tensor must live for a collective: NCCL reduces CUDA tensors only, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_finite(value: Tensor) -> bool:
    """True when ``value`` is finite on every rank (all ranks must agree to skip a step together)."""
    ok = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if is_distributed():
        ok = ok.to(comm_device())
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def mean_over_ranks(value: float) -> float:
    """The mean of a Python number over all ranks (summed in float64: the reduction adds no rounding of its own)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands every rank the summed gradient of its slice.

    Each rank's loss depends on every rank's rows, so the gradient of rank r's rows is the sum over
    all ranks' losses: an all-reduce of the full gradient, then rank r keeps its own slice (gloo
    has no reduce-scatter, and this keeps one code path for gloo and NCCL).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = world_info()
        ctx.rank, ctx.rows = rank, x.shape[0]
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_to_main(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` on rank 0, None on the others; ``[obj]`` in one process
    (any picklable object: e.g. each rank's own method state for rank 0's checkpoint file)."""
    if not is_distributed():
        return [obj]
    rank, world = world_info()
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_with_grad(x: Tensor) -> Tensor:
    """``(n, ...)`` on each of W ranks -> ``(W * n, ...)`` in rank order, differentiable.

    Every rank must pass the same shape: a ragged last batch would silently misalign targets, so
    it is checked (one small all-gather of the row counts).
    """
    rank, world = world_info()
    if world == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    counts = [int(s) for s in sizes]
    if len(set(counts)) != 1:
        raise ValueError(
            f"gather_across_ranks needs the same batch size on every rank, got {counts}; "
            "drop the ragged last batch (drop_last=True)"
        )
    return _AllGatherWithGrad.apply(x)
