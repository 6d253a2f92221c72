"""What every rank runs: process-group creation and (ranks 1..N-1) the step loop.

Process groups (``init_rank``): the world group (gloo) carries the driver's per-step message; its
timeout is effectively unbounded because an idle server sends nothing for as long as it is idle
(a dead peer still ends a wait at once: gloo sees the closed connection). The TP groups (the
ranks of one stage) and the PP groups (the ranks of one TP rank) carry the model's collectives
and the pipeline's hidden states, with ``op_timeout`` (gloo on CPU, NCCL on CUDA). Every rank
creates every group in the same order, as ``torch.distributed.new_group`` requires.

The loop (``run_worker``): receive the driver's message (``broadcast_object_list`` from rank 0),
``ModelRunner.run_model`` for a step, leave on ``STOP``. A worker never samples and never sends
anything back except what ``run_model`` sends (the last stage's logits).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmserve.config import EngineConfig
from lmserve.distributed.parallel_state import ParallelContext

logger = logging.getLogger(__name__)

STEP, STOP = "step", "stop"
# The world group's timeout: a worker waits for the next step as long as the server is idle.
IDLE_TIMEOUT = datetime.timedelta(days=365)
DEFAULT_OP_TIMEOUT_S = 300.0  # a TP/PP collective or transfer (one stage's forward at most)
RENDEZVOUS_TIMEOUT_S = 300.0  # every rank joining (workers import torch and build nothing before)


@dataclass
class WorkerSpec:
    """Everything a worker rank needs, picklable (sent to a process's stdin or to a Ray actor)."""

    config: EngineConfig
    rank: int
    host: str  # the driver's TCPStore
    port: int
    num_threads: int
    local_rank: int = 0  # this rank's index among the ranks on its machine (its CUDA device)
    node: str = "127.0.0.1"  # this rank's node address (ranks on one node share memory)


def rank_device(config: EngineConfig, local_rank: int) -> torch.device:
    device = config.device_config.torch_device
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


def _own_group(rank: int, partition: list[list[int]], **kwargs) -> Any:
    """Creates one process group per list of ``partition`` (every rank must call this with the same
    partition, in the same order: ``new_group`` is collective) and returns the one holding ``rank``."""
    own = None
    for ranks in partition:
        group = dist.new_group(ranks, **kwargs)
        if rank in ranks:
            own = group
    return own


def init_rank(config: EngineConfig, rank: int, store: dist.Store, host: str = "127.0.0.1") -> ParallelContext:
    """Joins the world group through ``store`` and creates the TP and PP groups, and the TP group's
    shared-memory all-reduce when its ranks share a host (``host``: this rank's node address);
    this rank's ``ParallelContext``."""
    pc = config.parallel_config
    tp, pp = pc.tensor_parallel_size, pc.pipeline_parallel_size
    world = tp * pp
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=IDLE_TIMEOUT)
    backend = "nccl" if config.device_config.torch_device.type == "cuda" else "gloo"
    seconds = pc.distributed_timeout_seconds if backend == "nccl" else pc.cpu_distributed_timeout_seconds
    op_timeout = datetime.timedelta(seconds=seconds or DEFAULT_OP_TIMEOUT_S)
    tp_group = _own_group(rank, [[stage * tp + t for t in range(tp)] for stage in range(pp)],
                          timeout=op_timeout, backend=backend) if tp > 1 else None
    pp_group = _own_group(rank, [[stage * tp + t for stage in range(pp)] for t in range(tp)],
                          timeout=op_timeout, backend=backend) if pp > 1 else None
    tp_shm = _tp_shared_memory(config, rank, host) if tp > 1 else None
    return ParallelContext(tp_rank=rank % tp, tp_size=tp, pp_rank=rank // tp, pp_size=pp,
                           tp_group=tp_group, pp_group=pp_group, tp_shm=tp_shm)


def _tp_shared_memory(config: EngineConfig, rank: int, host: str):
    """This rank's TP group's ``ShmAllReduce`` when every rank of the group runs on one x86-64 host
    (on CPU), else None. Collective over the world group: the group's first rank makes the segment,
    the others open it, and it is unlinked once all have (no file outlives the processes)."""
    from lmserve.distributed import shm_allreduce

    pc = config.parallel_config
    tp, world = pc.tensor_parallel_size, pc.world_size
    hosts: list = [None] * world
    dist.all_gather_object(hosts, host)
    leader = rank - rank % tp
    same_host = len(set(hosts[leader:leader + tp])) == 1
    usable = same_host and shm_allreduce.supported() and config.device_config.torch_device.type == "cpu"
    hidden = int(getattr(config.model_config.hf_config, "hidden_size", 0) or 0)
    max_bytes = max(1, config.scheduler_config.max_num_batched_tokens) * max(1, hidden) * 4  # fp32 activations
    name = shm_allreduce.new_segment_name() if usable and rank == leader else None
    shm = shm_allreduce.ShmAllReduce(name, 0, tp, max_bytes=max_bytes, create=True) if name else None
    names: list = [None] * world
    dist.all_gather_object(names, name)
    if usable and rank != leader:
        shm = shm_allreduce.ShmAllReduce(names[leader], rank % tp, tp, max_bytes=max_bytes)
    dist.barrier()
    if shm is not None and rank == leader:
        shm.unlink()
    return shm


def rendezvous_timeout(config: EngineConfig) -> datetime.timedelta:
    return datetime.timedelta(seconds=config.parallel_config.distributed_timeout_seconds or RENDEZVOUS_TIMEOUT_S)


def agree_num_blocks(proposed: int) -> int:
    """The KV block count every rank allocates: the smallest any rank's budget allows (each rank
    sizes its own shard; one number keeps block ids valid on every rank). A collective: every rank
    calls it once, after building its model."""
    t = torch.tensor([proposed], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def receive_message() -> tuple[str, object]:
    """The driver's next message (blocks while the server is idle)."""
    box: list = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def send_message(kind: str, payload: object = None) -> None:
    """Driver only: ``(kind, payload)`` to every other rank."""
    dist.broadcast_object_list([(kind, payload)], src=0)


def run_worker(spec: WorkerSpec) -> None:
    """A worker rank's whole life: threads, groups, model, KV cache, then steps until STOP."""
    from lmserve.worker.model_runner import ModelRunner

    torch.set_num_threads(spec.num_threads)
    config = spec.config
    store = dist.TCPStore(spec.host, spec.port, config.parallel_config.world_size, is_master=False,
                          timeout=rendezvous_timeout(config))
    parallel = init_rank(config, spec.rank, store, spec.node)
    logger.info("worker rank %d (tp %d/%d, pp %d/%d) pid %d, %d threads", spec.rank, parallel.tp_rank,
                parallel.tp_size, parallel.pp_rank, parallel.pp_size, os.getpid(), spec.num_threads)
    runner = ModelRunner(config, [], parallel=parallel, device=rank_device(config, spec.local_rank),
                         agree_num_blocks=agree_num_blocks)
    while True:
        kind, payload = receive_message()
        if kind == STOP:
            break
        runner.run_model(payload)
    dist.destroy_process_group()
