"""The driver side shared by the ``mp`` and ``ray`` executors.

Rank 0 (the driver) runs in the engine's process: it creates the rendezvous store, has the
subclass start ranks 1..N-1 (``_start_workers``), joins the process groups with them, builds its
own part of the model and agrees the KV block count. Each step it sends the ``StepInputs`` to every
worker (one ``broadcast_object_list`` over the world group), runs ``run_model`` like every rank,
and samples from the logits (``ModelRunner.finish``).

A monitor thread (``_watch_workers``, the subclass's) reports a worker's death at once through
``Executor._report_failure``; ``execute`` then raises ``WorkerDiedError``. A collective that was
waiting on the dead rank fails by itself (gloo sees the closed connection, else its timeout).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from abc import abstractmethod

import torch
import torch.distributed as dist

from lmserve.config import EngineConfig
from lmserve.engine.sched_output import SchedulerOutput
from lmserve.executor.base import Executor, WorkerDiedError
from lmserve.executor.worker import (STEP, STOP, agree_num_blocks, init_rank, rank_device, rendezvous_timeout,
                                     send_message)
from lmserve.worker.model_runner import ModelRunner, RunnerOutput

logger = logging.getLogger(__name__)


def local_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(ranks_on_machine: int) -> int:
    return max(1, local_cpu_count() // max(1, ranks_on_machine))


def without_driver_only(config: EngineConfig) -> EngineConfig:
    """The config a worker rank gets: no logits processors (the driver alone samples, and a class
    defined in the user's ``__main__`` could not be unpickled in a worker)."""
    return dataclasses.replace(config, logits_processors=())


class DistributedExecutor(Executor):
    """Rank 0 of ``world_size`` ranks; subclasses start and watch ranks 1..N-1."""

    backend_name = "distributed"

    def __init__(self, config: EngineConfig, logitsprocs_classes: list[type]) -> None:
        super().__init__()
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group (another engine with "
                               "tensor/pipeline parallelism runs here): one such engine per process")
        self.config = config
        self.world_size = config.parallel_config.world_size
        self._closed = False
        self._started = False
        self.broadcast_seconds = 0.0  # total time spent sending steps to the workers
        self.broadcast_count = 0
        self._saved_threads = torch.get_num_threads()
        try:
            host = self._driver_host()
            store = dist.TCPStore(host, 0, self.world_size, is_master=True, wait_for_workers=False,
                                  timeout=rendezvous_timeout(config))
            driver_threads = self._start_workers(host, store.port)
            torch.set_num_threads(driver_threads)
            parallel = self._join(lambda: init_rank(config, 0, store, host))
            self._started = True
            self._start_monitor()
            logger.info("%s executor: %d ranks (tp %d x pp %d), driver pid %d, %d threads per rank on this machine",
                        self.backend_name, self.world_size, parallel.tp_size, parallel.pp_size, os.getpid(),
                        driver_threads)
            self.driver_runner = ModelRunner(config, logitsprocs_classes, parallel=parallel,
                                             device=rank_device(config, 0), agree_num_blocks=agree_num_blocks)
        except BaseException as e:
            failure = self._failure
            self.shutdown()
            if failure is not None and failure is not e:  # the worker's death, not the collective it broke
                raise failure from e
            raise

    # ------------------------------------------------------------------ subclass hooks
    def _driver_host(self) -> str:
        return "127.0.0.1"

    @abstractmethod
    def _start_workers(self, host: str, port: int) -> int:
        """Starts ranks 1..N-1 (they connect to the store at host:port); returns the driver's thread count."""

    @abstractmethod
    def _first_dead_worker(self) -> str | None:
        """A description of a worker that is gone (start-up checks), or None."""

    @abstractmethod
    def _start_monitor(self) -> None:
        """Starts the thread that calls ``_report_failure`` when a worker dies."""

    @abstractmethod
    def _stop_workers(self, graceful: bool) -> None:
        """Ends every worker (after STOP when ``graceful``), waiting a few seconds at most."""

    # ------------------------------------------------------------------ start-up
    def _join(self, fn):
        """``fn()`` (a blocking rendezvous) in a helper thread, so that a worker that dies during
        start-up ends the wait at once with its reason instead of the rendezvous timeout."""
        box: dict = {}

        def work() -> None:
            try:
                box["result"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                box["error"] = e

        thread = threading.Thread(target=work, name="lmserve-rendezvous", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
            dead = self._first_dead_worker()
            if dead is not None and thread.is_alive():
                raise WorkerDiedError(f"a worker failed during start-up: {dead}")
        if "error" in box:
            raise box["error"]
        return box["result"]

    # ------------------------------------------------------------------ steps
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self.check_health()
        runner = self.driver_runner
        if sched.is_empty:
            return RunnerOutput()
        step, kept = runner.prepare(sched)
        try:
            t0 = time.perf_counter()
            send_message(STEP, step)
            self.broadcast_seconds += time.perf_counter() - t0
            self.broadcast_count += 1
            logits = runner.run_model(step)
        except Exception as e:
            # A collective failed: most likely a worker died; give the monitor a moment to say which.
            deadline = time.monotonic() + 2.0
            while self._failure is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._failure is not None:
                raise self._failure from e
            raise
        return runner.finish(kept, logits)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        graceful = self._started and self._failure is None
        if graceful:
            try:
                send_message(STOP)
            except Exception:  # noqa: BLE001 - the workers are ended below either way
                graceful = False
        self._stop_workers(graceful)
        if dist.is_initialized():
            # in a thread: after a failure the engine thread may still hold a collective of these groups
            thread = threading.Thread(target=_destroy_groups, name="lmserve-destroy-groups", daemon=True)
            thread.start()
            thread.join(5.0)
        torch.set_num_threads(self._saved_threads)


def _destroy_groups() -> None:
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        logger.debug("destroy_process_group failed", exc_info=True)
