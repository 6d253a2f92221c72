"""The collectives of tensor parallelism, over a ``ParallelContext``'s TP group.

torch.distributed does the work: gloo on CPU, NCCL on CUDA (whichever backend the group was
created with; ``lmserve/executor`` creates the groups), except all-reduces that fit the group's
shared-memory segment when its ranks share a host (``ParallelContext.tp_shm``, a
``shm_allreduce.ShmAllReduce``: microseconds instead of gloo's loopback TCP). Whether a call fits
depends only on its size, which every rank shares, so all ranks take the same path. Every function
is a no-op returning its input when ``tp_size == 1``, so a single-rank model never touches
torch.distributed.

Contract (as every collective): all ranks of the group call the same functions, in the same
order, with tensors of the same shape and dtype.
"""

from __future__ import annotations

import torch

from lmserve.distributed.parallel_state import ParallelContext


def all_reduce(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """The sum of ``x`` over the TP group, written into ``x`` (made contiguous first if needed)
    and returned."""
    if ctx.tp_size == 1:
        return x
    if not x.is_contiguous():
        x = x.contiguous()
    shm = ctx.tp_shm
    if shm is not None and shm.fits(x):
        return shm.all_reduce(x)
    import torch.distributed as dist

    dist.all_reduce(x, group=ctx.tp_group)
    return x


def all_gather(x: torch.Tensor, ctx: ParallelContext, dim: int = -1) -> torch.Tensor:
    """The TP ranks' ``x`` concatenated along ``dim`` in rank order (a new tensor whose ``dim``
    is ``tp_size`` times larger)."""
    if ctx.tp_size == 1:
        return x
    import torch.distributed as dist

    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, x, group=ctx.tp_group)
    return torch.cat(parts, dim=dim)
