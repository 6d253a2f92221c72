"""``mp``: ranks 1..N-1 as worker processes on this machine (``python -m lmserve.executor.mp_worker``).

Each worker is a fresh interpreter (not a fork, and not ``multiprocessing``'s spawn, which would
re-run the user's ``__main__``); its ``WorkerSpec`` arrives pickled on its stdin. Two pipes tie
the lifetimes together without polling:

- the worker holds the write end of a *liveness* pipe whose read end the driver watches: the
  driver's monitor thread sees EOF the moment the worker exits, however it exits;
- the worker watches the read end of a *parent* pipe whose write end only the driver holds: when
  the driver's process ends, the worker sees EOF and exits (no orphan).
"""

from __future__ import annotations

import logging
import os
import pickle
import selectors
import subprocess
import sys
import threading
import weakref

from lmserve.config import EngineConfig
from lmserve.executor.distributed import DistributedExecutor, threads_per_rank, without_driver_only
from lmserve.executor.worker import WorkerSpec

logger = logging.getLogger(__name__)
_STOP_WAIT_S = 5.0


class _WorkerProcess:
    def __init__(self, rank: int, proc: subprocess.Popen, alive_fd: int, parent_fd: int) -> None:
        self.rank = rank
        self.proc = proc
        self.alive_fd = alive_fd  # read end: EOF when the worker is gone
        self.parent_fd = parent_fd  # write end: the worker sees EOF when it is closed

    def describe(self) -> str:
        code = self.proc.poll()
        how = "is unresponsive" if code is None else (
            f"was killed by signal {-code}" if code < 0 else f"exited with status {code}")
        return f"worker rank {self.rank} (pid {self.proc.pid}) {how}"


def _kill_all(workers: list[_WorkerProcess], wait_s: float) -> None:
    """Closes the parent pipes (workers exit on EOF), then waits, then kills what is left."""
    for w in workers:
        _close(w.parent_fd)
    for w in workers:
        try:
            w.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
    for w in workers:
        _close(w.alive_fd)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class MultiprocExecutor(DistributedExecutor):
    backend_name = "mp"

    def __init__(self, config: EngineConfig, logitsprocs_classes: list[type]) -> None:
        self._workers: list[_WorkerProcess] = []
        self._wake_r, self._wake_w = os.pipe()  # wakes the monitor at shutdown
        self._finalizer = weakref.finalize(self, _kill_all, self._workers, 0.5)
        super().__init__(config, logitsprocs_classes)

    def _start_workers(self, host: str, port: int) -> int:
        threads = threads_per_rank(self.world_size)
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(threads)
        config = without_driver_only(self.config)
        for rank in range(1, self.world_size):
            alive_r, alive_w = os.pipe()
            parent_r, parent_w = os.pipe()
            spec = WorkerSpec(config=config, rank=rank, host=host, port=port, num_threads=threads, local_rank=rank)
            proc = subprocess.Popen([sys.executable, "-m", "lmserve.executor.mp_worker", str(alive_w), str(parent_r)],
                                    stdin=subprocess.PIPE, pass_fds=(alive_w, parent_r), env=env)
            os.close(alive_w)
            os.close(parent_r)
            self._workers.append(_WorkerProcess(rank, proc, alive_r, parent_w))
            proc.stdin.write(pickle.dumps(spec))
            proc.stdin.close()
        return threads

    def _first_dead_worker(self) -> str | None:
        for w in self._workers:
            if w.proc.poll() is not None:
                return w.describe()
        return None

    def _start_monitor(self) -> None:
        threading.Thread(target=self._watch, name="lmserve-mp-monitor", daemon=True).start()

    def _watch(self) -> None:
        sel = selectors.DefaultSelector()
        for w in self._workers:
            sel.register(w.alive_fd, selectors.EVENT_READ, w)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while True:
                for key, _ in sel.select():
                    if key.data is None or self._closed:
                        return
                    w = key.data
                    try:
                        w.proc.wait(timeout=1.0)
                    except subprocess.TimeoutExpired:
                        pass
                    self._report_failure(f"{w.describe()}: the engine cannot continue")
                    return
        finally:
            sel.close()

    def _stop_workers(self, graceful: bool) -> None:
        os.write(self._wake_w, b"x")
        _kill_all(self._workers, _STOP_WAIT_S if graceful else 0.5)
        self._finalizer.detach()
        for fd in (self._wake_r, self._wake_w):
            _close(fd)

