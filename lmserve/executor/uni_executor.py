"""``uni``: one rank, the ``ModelRunner`` in the engine's process (no worker, nothing to fail)."""

from __future__ import annotations

from lmserve.config import EngineConfig
from lmserve.engine.sched_output import SchedulerOutput
from lmserve.executor.base import Executor
from lmserve.worker.model_runner import ModelRunner, RunnerOutput


class UniExecutor(Executor):
    def __init__(self, config: EngineConfig, logitsprocs_classes: list[type]) -> None:
        super().__init__()
        self.driver_runner = ModelRunner(config, logitsprocs_classes)

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.driver_runner.execute(sched)
