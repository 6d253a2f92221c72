"""``AsyncLLM``: the asyncio front of the engine.

The engine runs in one dedicated thread (model forwards release the GIL, so the event
loop stays responsive while a step runs). Callers talk to it through a command queue;
outputs come back to per-request ``asyncio.Queue``s via ``call_soon_threadsafe``.

Invariants:
- tokenization and validation run in the caller (``prepare_request`` touches no engine
  state), so a bad request raises before anything is queued;
- only the engine thread touches the scheduler, KV cache and output processor;
- a consumer that stops iterating (client disconnect, cancellation) aborts its request,
  which frees its KV blocks within one step;
- if the engine thread dies, every pending and future request gets ``EngineDeadError``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from lmserve.engine.arg_utils import EngineArgs
from lmserve.engine.llm_engine import LLMEngine, PreparedRequest, PromptType
from lmserve.errors import EngineDeadError, OverloadedError
from lmserve.outputs import PoolingRequestOutput, RequestOutput
from lmserve.pooling_params import PoolingParams
from lmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    prepared: PreparedRequest
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class AsyncLLM:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.engine_config = engine.config
        self.model_config = engine.model_config
        self.tokenizer = engine.tokenizer
        self.metrics: Any = None  # set by the server: lmserve.metrics.EngineMetrics
        self._cond = threading.Condition()
        self._adds: deque[_Pending] = deque()
        self._aborts: deque[str] = deque()
        self._streams: dict[str, _Pending] = {}  # engine-thread view of live requests
        self._num_live = 0  # requests accepted and not yet finished (guarded by _cond)
        self._stopped = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lmserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "AsyncLLM":
        return cls(LLMEngine.from_engine_args(engine_args))

    def default_sampling_params(self) -> dict[str, Any]:
        return self.engine.default_sampling_params()

    @property
    def max_seq_len(self) -> int:
        """The longest sequence (prompt + output) the engine can hold: max_model_len,
        or less when the KV cache is smaller."""
        return self.engine.core.max_seq_len

    # ------------------------------------------------------------------ public API
    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str | None = None, priority: int = 0,
                       cache_salt: str | None = None,
                       add_special_tokens: bool = True) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutputs per ``sampling_params.output_kind`` until the request
        finishes. Raises ValueError (bad request), OverloadedError, EngineDeadError."""
        self._raise_if_dead()
        request_id = request_id or uuid.uuid4().hex
        prepared = self.engine.prepare_request(request_id, prompt, sampling_params, priority, cache_salt,
                                               add_special_tokens=add_special_tokens)
        async for out in self._submit(prepared):
            yield out

    async def encode(self, prompt: PromptType, pooling_params: PoolingParams,
                     request_id: str | None = None, priority: int = 0,
                     add_special_tokens: bool = True) -> AsyncIterator[PoolingRequestOutput]:
        """Yields the one finished PoolingRequestOutput of a pooling model's request
        (``pooling_params.task`` says which task). Raises like ``generate``."""
        self._raise_if_dead()
        request_id = request_id or uuid.uuid4().hex
        prepared = self.engine.prepare_pooling_request(request_id, prompt, pooling_params, priority,
                                                       add_special_tokens=add_special_tokens)
        async for out in self._submit(prepared):
            yield out

    async def _submit(self, prepared: PreparedRequest) -> AsyncIterator[Any]:
        """Queues a prepared request for the engine thread and yields its outputs until it
        finishes; closing the iterator early aborts it."""
        request_id = prepared.request_id
        queue: asyncio.Queue = asyncio.Queue()
        pending = _Pending(prepared, queue, asyncio.get_running_loop())
        limit = self.engine_config.scheduler_config.max_waiting_requests
        with self._cond:
            if self._num_live - self.engine_config.scheduler_config.max_num_seqs >= limit:
                raise OverloadedError(f"The server is overloaded: {self._num_live} requests are in flight. "
                                      "Retry later.")
            self._num_live += 1
            self._adds.append(pending)
            self._cond.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def get_stats(self) -> dict[str, Any]:
        stats = self.engine.get_stats()
        with self._cond:
            stats["num_pending"] = len(self._adds)
        return stats

    async def check_health(self) -> None:
        self._raise_if_dead()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def shutdown(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"The engine died: {self._dead!r}")
        if self._stopped:
            raise EngineDeadError("The engine is shut down")

    # ------------------------------------------------------------------ engine thread
    @staticmethod
    def _deliver(p: _Pending, item: Any) -> None:
        try:
            p.loop.call_soon_threadsafe(p.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed
            pass

    def _drain_commands(self) -> None:
        with self._cond:
            adds = list(self._adds)
            self._adds.clear()
            aborts = list(self._aborts)
            self._aborts.clear()
        for p in adds:
            rid = p.prepared.request_id
            try:
                self.engine.add_prepared(p.prepared)
                self._streams[rid] = p
            except Exception as e:  # duplicate id, too long for the KV pool, ...
                self._finish_stream(rid, p, ValueError(str(e)))
        for rid in aborts:
            p = self._streams.get(rid)
            if p is None:
                continue
            self.engine.abort_request(rid)
            self._finish_stream(rid, p, None)

    def _finish_stream(self, rid: str, p: _Pending, item: Any) -> None:
        self._streams.pop(rid, None)
        if item is not None:
            self._deliver(p, item)
        with self._cond:
            self._num_live -= 1

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopped and not self._adds and not self._aborts \
                            and not self.engine.has_unfinished_requests():
                        self._cond.wait()
                    if self._stopped:
                        break
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    continue
                for out in self.engine.step():
                    p = self._streams.get(out.request_id)
                    if p is None:
                        continue
                    if out.finished:
                        self._finish_stream(out.request_id, p, out)
                    else:
                        self._deliver(p, out)
        except BaseException as e:  # noqa: BLE001 - report every failure to every caller
            logger.exception("The engine thread died")
            self._dead = e
            err = EngineDeadError(f"The engine died: {e!r}")
            for rid, p in list(self._streams.items()):
                self._finish_stream(rid, p, err)
            with self._cond:
                for p in self._adds:
                    self._deliver(p, err)
                self._adds.clear()
