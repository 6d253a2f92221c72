"""The engine core's one interface to the model ranks, whatever their number and placement.

``EngineCore`` calls ``execute(sched)`` once per step and reads ``num_blocks`` (the KV blocks every
rank allocated, so block ids mean the same everywhere) and ``model`` (the driver's part of the
model). Three implementations (``create_executor`` picks one from ``ParallelConfig``):

- ``uni``: one rank, the ``ModelRunner`` in the engine's process (``uni_executor``);
- ``mp``: rank 0 (the driver) in the engine's process, ranks 1..N-1 as processes on this machine
  (``mp_executor``);
- ``ray``: rank 0 in the engine's process, ranks 1..N-1 as Ray actors in a placement group, on
  this machine or across a Ray cluster (``ray_executor``).

Failure contract: once a worker rank is gone, ``check_health`` raises ``WorkerDiedError`` and so
does every later ``execute``; the callbacks registered with ``add_failure_callback`` are called
once, from the executor's monitor thread, as soon as the death is seen (the engine may be idle).
``shutdown`` is idempotent and leaves no worker process behind.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

from lmserve.config import EngineConfig

if TYPE_CHECKING:
    from torch import nn

    from lmserve.engine.sched_output import SchedulerOutput
    from lmserve.worker.model_runner import ModelRunner, RunnerOutput

logger = logging.getLogger(__name__)


class WorkerDiedError(RuntimeError):
    """A model rank (worker process or Ray actor) is gone: the engine cannot run another step."""


class Executor(ABC):
    driver_runner: ModelRunner  # rank 0's runner (it alone samples)

    def __init__(self) -> None:
        self._failure: WorkerDiedError | None = None
        self._failure_lock = threading.Lock()
        self._failure_callbacks: list[Callable[[WorkerDiedError], None]] = []

    @property
    def num_blocks(self) -> int:
        return self.driver_runner.num_blocks

    @property
    def model(self) -> nn.Module:
        """The driver's model (with pipeline stages: the first stage only)."""
        return self.driver_runner.model

    @abstractmethod
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Runs one scheduled step on every rank; the driver's sampled tokens and logprobs."""

    def check_health(self) -> None:
        """Raises ``WorkerDiedError`` once a rank is gone."""
        if self._failure is not None:
            raise self._failure

    def shutdown(self) -> None:
        """Stops every worker rank (idempotent)."""

    def add_failure_callback(self, callback: Callable[[WorkerDiedError], None]) -> None:
        """``callback(error)`` once a rank dies (at once if one already has), from another thread."""
        with self._failure_lock:
            self._failure_callbacks.append(callback)
            failure = self._failure
        if failure is not None:
            callback(failure)

    def _report_failure(self, message: str) -> None:
        """Records the first failure and tells the callbacks (any thread)."""
        with self._failure_lock:
            if self._failure is not None:
                return
            self._failure = WorkerDiedError(message)
            callbacks = list(self._failure_callbacks)
        logger.error("%s", message)
        for callback in callbacks:
            try:
                callback(self._failure)
            except Exception:  # noqa: BLE001 - one bad callback must not hide the failure from the others
                logger.exception("executor failure callback raised")
