"""Where one rank sits in the tensor- and pipeline-parallel layout, passed explicitly.

There is no global parallel state (vLLM keeps one in ``vllm.distributed.parallel_state``): a model is
built with a ``ParallelContext`` and every layer that shards keeps the one it was built with, so two
models with different layouts can live in one process (tests do) and nothing depends on import order.

Rank numbering (as vLLM): ``rank = pp_rank * tp_size + tp_rank``; rank 0 is the driver, the rank that
runs in the engine process, schedules, samples and returns results. The ranks of one pipeline stage
form its TP group; the ranks with one ``tp_rank`` form a PP group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParallelContext:
    """One rank's coordinates and its process groups (``torch.distributed.ProcessGroup``; None
    when that dimension has size 1). Invariants: ``0 <= tp_rank < tp_size``,
    ``0 <= pp_rank < pp_size``; a group is set exactly when its size is above 1."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = None
    pp_group: Any = None
    # The TP group's ``shm_allreduce.ShmAllReduce`` when its ranks share a host (x86-64), else None:
    # all-reduces that fit it skip gloo's loopback TCP.
    tp_shm: Any = None

    def __post_init__(self) -> None:
        if not (0 <= self.tp_rank < self.tp_size and 0 <= self.pp_rank < self.pp_size):
            raise ValueError(f"rank out of range: tp {self.tp_rank}/{self.tp_size}, pp {self.pp_rank}/{self.pp_size}")

    @classmethod
    def single(cls) -> "ParallelContext":
        """The layout of an unsharded model on one rank."""
        return cls()

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_driver(self) -> bool:
        return self.rank == 0
