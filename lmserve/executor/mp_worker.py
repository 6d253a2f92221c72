"""Entry point of an ``mp`` worker process: ``python -m lmserve.executor.mp_worker ALIVE_FD PARENT_FD``
with its pickled ``WorkerSpec`` on stdin (see ``mp_executor``). It exits when the driver's process
ends (EOF on PARENT_FD), and its exit closes ALIVE_FD, which the driver watches."""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading


def _exit_when_parent_ends(parent_fd: int) -> None:
    try:
        while os.read(parent_fd, 1):
            pass
    except OSError:
        pass
    os._exit(0)  # the driver is gone (or closed the pipe to stop us): no orphan, no cleanup to wait for


def main() -> None:
    alive_fd, parent_fd = int(sys.argv[1]), int(sys.argv[2])
    del alive_fd  # held open until this process ends: its EOF tells the driver
    threading.Thread(target=_exit_when_parent_ends, args=(parent_fd,), daemon=True).start()
    spec = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=os.environ.get("LMSERVE_WORKER_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s worker{spec.rank} %(levelname)s %(name)s: %(message)s")
    from lmserve.executor.worker import run_worker

    run_worker(spec)


if __name__ == "__main__":
    main()
