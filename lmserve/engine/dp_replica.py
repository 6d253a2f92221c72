"""One data-parallel engine replica: a process running its own ``AsyncLLM`` (engine core, KV cache,
scheduler, output processing) and serving the front (``lmserve.engine.data_parallel``) over a pipe.

Wire protocol (pickled; the front sends one message per ``send_bytes``, the replica sends lists):
front -> replica
  ("add", engine_id, "generate" | "encode", kwargs)   run a request (kwargs of AsyncLLM.generate/encode)
  ("abort", [engine_id, ...])                         end those requests (no reply)
  ("call", call_id, fn)                               fn(AsyncLLM) on the engine thread (dev routes)
  ("remove_lora", lora_int_id)
  ("shutdown",)
replica -> front
  ("ready", {"max_seq_len": int}) | ("failed", message)   once, after the engine loaded (or did not)
  ("out", engine_id, RequestOutput | PoolingRequestOutput)
  ("err", engine_id, exception)                       the request ended with this error
  ("call_result", call_id, result, exception | None, sleeping)
  ("stats", dict)                                     AsyncLLM.get_stats(), when it changed
  ("dead", message)                                   the engine thread died; the process exits next

Invariants: the replica exits when the front goes away (end of file on the pipe, or its parent process
changed), so no replica outlives the server (Linux's parent-death signal does not fit: it fires when
the *thread* that spawned the replica ends, and the server starts them from its loading thread);
a request's outputs come back in order and end with a finished output or one "err"; an aborted
request sends nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import queue
import signal
import threading
from typing import Any

from lmserve.engine.arg_utils import EngineArgs

logger = logging.getLogger(__name__)
STATS_INTERVAL_S = 0.1


def picklable_error(e: BaseException) -> BaseException:
    """``e`` if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(e).__name__}: {e}")


class _Replica:
    def __init__(self, index: int, llm: Any, conn: Any, parent_pid: int) -> None:
        self.index = index
        self.parent_pid = parent_pid
        self.llm = llm
        self.conn = conn
        self.tasks: dict[str, asyncio.Task] = {}
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.stop = asyncio.Event()

    # ------------------------------------------------------------------ pipe threads
    def _reader(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                msg = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):  # the front is gone: nobody wants our outputs
                os._exit(0)
            loop.call_soon_threadsafe(self._dispatch, msg)

    def _writer(self) -> None:
        while True:
            batch = [self.outbox.get()]
            while True:
                try:
                    batch.append(self.outbox.get_nowait())
                except queue.Empty:
                    break
            try:
                self.conn.send_bytes(pickle.dumps(batch))
            except (EOFError, OSError, BrokenPipeError):
                os._exit(0)

    def send(self, msg: tuple) -> None:
        self.outbox.put(msg)

    # ------------------------------------------------------------------ commands
    def _dispatch(self, msg: tuple) -> None:
        op = msg[0]
        if op == "add":
            _, eid, kind, kwargs = msg
            self.tasks[eid] = asyncio.ensure_future(self._run_request(eid, kind, kwargs))
        elif op == "abort":
            for eid in msg[1]:
                task = self.tasks.pop(eid, None)
                if task is not None:
                    task.cancel()  # closing the request's iterator aborts it in the engine
        elif op == "call":
            asyncio.ensure_future(self._run_call(msg[1], msg[2]))
        elif op == "remove_lora":
            self.llm.engine.remove_lora(msg[1])
        elif op == "shutdown":
            self.stop.set()

    async def _run_request(self, eid: str, kind: str, kwargs: dict[str, Any]) -> None:
        try:
            stream = self.llm.generate(**kwargs) if kind == "generate" else self.llm.encode(**kwargs)
            async for out in stream:
                self.send(("out", eid, out))
        except asyncio.CancelledError:
            pass
        except Exception as e:  # noqa: BLE001 - every failure goes back to the request's caller
            self.send(("err", eid, picklable_error(e)))
        finally:
            if self.tasks.get(eid) is asyncio.current_task():
                del self.tasks[eid]

    async def _run_call(self, call_id: int, fn: Any) -> None:
        try:
            result, error = await self.llm.call_in_engine(fn), None
        except Exception as e:  # noqa: BLE001 - handed to the caller
            result, error = None, picklable_error(e)
        self.send(("call_result", call_id, result, error, bool(self.llm.sleeping)))

    async def _report_stats(self, parent_pid: int) -> None:
        last: dict[str, Any] | None = None
        while not self.stop.is_set():
            if os.getppid() != parent_pid:  # the front died (re-parented): nobody wants our outputs
                os._exit(0)
            if not self.llm.is_running:
                self.send(("dead", f"data-parallel replica {self.index}: the engine thread died"))
                await asyncio.sleep(0.5)  # let the writer flush
                os._exit(1)
            stats = self.llm.get_stats()
            if stats != last:
                self.send(("stats", stats))
                last = stats
            await asyncio.sleep(STATS_INTERVAL_S)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._reader, args=(loop,), name="lmserve-dp-reader", daemon=True).start()
        threading.Thread(target=self._writer, name="lmserve-dp-writer", daemon=True).start()
        self.send(("ready", {"max_seq_len": self.llm.max_seq_len}))
        await self._report_stats(self.parent_pid)
        for task in list(self.tasks.values()):
            task.cancel()
        self.llm.shutdown()


def replica_main(index: int, engine_args: EngineArgs, conn: Any, num_threads: int) -> None:
    """The replica process's entry point (spawned by the front)."""
    parent_pid = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the front decides
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [dp{index}] %(name)s: %(message)s")
    import torch
    torch.set_num_threads(num_threads)
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())  # its default multiprocessing lock would leak a named semaphore
    try:
        from lmserve.engine.async_engine import AsyncLLM
        llm = AsyncLLM.from_engine_args(engine_args)
    except BaseException as e:  # noqa: BLE001 - reported to the front, which fails the start-up
        conn.send_bytes(pickle.dumps([("failed", f"{type(e).__name__}: {e}")]))
        return
    logger.info("Data-parallel replica %d ready (%d torch threads)", index, num_threads)
    asyncio.run(_Replica(index, llm, conn, parent_pid).run())
