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
- if the engine thread dies, or a worker rank of the executor dies, every pending and future
  request gets ``EngineDeadError`` (within ``_STUCK_STEP_GRACE_S`` even while a step waits on the
  dead rank), and the ``add_dead_callback`` callbacks run (the server exits);
- request ids: the caller's id is the caller's (outputs carry it back unchanged); the engine
  runs each request under its own unique id (``{caller id}-{sequence number}``), so two
  requests with the same caller id never collide, and an abort reaches only the request
  whose iterator was closed (``abort(id)`` reaches every live request with that caller id);
- ``call_in_engine(fn)`` runs ``fn(engine)`` on the engine thread between steps (dev routes:
  prefix-cache reset, sleep, wake-up); while ``sleeping`` no step runs: requests are accepted
  and wait until ``wake_up``;
- ``abort_all(error)`` ends every live request (each iterator raises ``error``) and refuses every
  later one with the same error (the server is shutting down).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from lmserve.engine.arg_utils import EngineArgs
from lmserve.engine.llm_engine import LLMEngine, PreparedRequest, PromptType
from lmserve.lora.request import LoRARequest
from lmserve.errors import EngineDeadError, OverloadedError
from lmserve.outputs import PoolingRequestOutput, RequestOutput
from lmserve.pooling_params import PoolingParams
from lmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
# After a worker rank dies: how long the engine thread has to fail its requests itself before the
# executor's failure timer does it (the thread may be waiting in a collective with the dead rank).
_STUCK_STEP_GRACE_S = 2.0


@dataclass
class _Pending:
    prepared: PreparedRequest  # its request_id is the engine's (unique) id
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    caller_id: str


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
        self._calls: deque[tuple[Any, asyncio.Future, asyncio.AbstractEventLoop]] = deque()
        self.sleeping = False  # set and cleared on the engine thread only (see sleep_mode)
        self.kv_released = False  # the KV cache tensors are freed (sleep level 1)
        self._streams: dict[str, _Pending] = {}  # engine-thread view of live requests
        self._num_live = 0  # requests accepted and not yet finished (guarded by _cond)
        self._by_caller: dict[str, set[str]] = {}  # caller id -> engine ids of live requests (event loop)
        self._seq = itertools.count()
        self._stopped = False
        self._abort_all_error: BaseException | None = None
        self._refusal: BaseException | None = None  # set by abort_all: every new request gets it
        self._dead: BaseException | None = None
        self._death_lock = threading.Lock()
        self._executor_error: BaseException | None = None  # a worker rank died (set by the executor's monitor)
        self._dead_callbacks: list[Any] = []
        self._thread = threading.Thread(target=self._run, name="lmserve-engine", daemon=True)
        self._thread.start()
        engine.core.executor.add_failure_callback(self._on_executor_failure)

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
                       add_special_tokens: bool = True,
                       lora_request: LoRARequest | None = None,
                       reasoning_parser_kwargs: dict[str, Any] | None = None) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutputs per ``sampling_params.output_kind`` until the request
        finishes. Raises ValueError (bad request), OverloadedError, EngineDeadError.
        ``lora_request``: the adapter to run with (read from disk in a worker thread if not cached);
        ``reasoning_parser_kwargs``: what the reasoning parser that gates structured outputs is
        built with (vLLM's argument: the request's ``chat_template_kwargs``)."""
        self._raise_if_dead()
        request_id = request_id or uuid.uuid4().hex
        grammar = None
        if sampling_params.structured_outputs is not None and not sampling_params.use_beam_search:
            grammar = await self.engine.compile_structured_outputs_async(sampling_params)
        if lora_request is not None:
            await asyncio.to_thread(self.engine.get_lora, lora_request)  # disk reads stay off the event loop
        prepared = self.engine.prepare_request(self._engine_id(request_id), prompt, sampling_params, priority,
                                               cache_salt, add_special_tokens=add_special_tokens,
                                               compiled_grammar=grammar, lora_request=lora_request,
                                               reasoning_parser_kwargs=reasoning_parser_kwargs)
        async for out in self._submit(prepared, request_id):
            yield out

    async def encode(self, prompt: PromptType, pooling_params: PoolingParams,
                     request_id: str | None = None, priority: int = 0,
                     add_special_tokens: bool = True) -> AsyncIterator[PoolingRequestOutput]:
        """Yields the one finished PoolingRequestOutput of a pooling model's request
        (``pooling_params.task`` says which task). Raises like ``generate``."""
        self._raise_if_dead()
        request_id = request_id or uuid.uuid4().hex
        prepared = self.engine.prepare_pooling_request(self._engine_id(request_id), prompt, pooling_params,
                                                       priority, add_special_tokens=add_special_tokens)
        async for out in self._submit(prepared, request_id):
            yield out

    def _engine_id(self, caller_id: str) -> str:
        return f"{caller_id}-{next(self._seq)}"

    async def _submit(self, prepared: PreparedRequest, caller_id: str) -> AsyncIterator[Any]:
        """Queues a prepared request for the engine thread and yields its outputs (under the
        caller's id) until it finishes; closing the iterator early aborts it."""
        request_id = prepared.request_id
        queue: asyncio.Queue = asyncio.Queue()
        pending = _Pending(prepared, queue, asyncio.get_running_loop(), caller_id)
        limit = self.engine_config.scheduler_config.max_waiting_requests
        with self._cond:
            if self._refusal is not None:
                raise copy.copy(self._refusal)
            if self._num_live - self.engine_config.scheduler_config.max_num_seqs >= limit:
                raise OverloadedError(f"The server is overloaded: {self._num_live} requests are in flight. "
                                      "Retry later.")
            self._num_live += 1
            self._adds.append(pending)
            self._cond.notify()
        self._by_caller.setdefault(caller_id, set()).add(request_id)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine thread has already dropped it
                    raise item
                if item.request_id != caller_id:
                    item = dataclasses.replace(item, request_id=caller_id)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            ids = self._by_caller.get(caller_id)
            if ids is not None:
                ids.discard(request_id)
                if not ids:
                    del self._by_caller[caller_id]
            if not finished:
                self._abort_engine_ids([request_id])

    async def abort(self, request_id: str) -> None:
        """Aborts every live request submitted under the caller id ``request_id``."""
        self._abort_engine_ids(list(self._by_caller.get(request_id, ())))

    def _abort_engine_ids(self, engine_ids: list[str]) -> None:
        if not engine_ids:
            return
        with self._cond:
            self._aborts.extend(engine_ids)
            self._cond.notify()

    def abort_all(self, error: BaseException) -> int:
        """Ends every live request (each caller's iterator raises ``error``) and refuses new ones
        with it. Returns how many requests were live. Safe from any thread."""
        with self._cond:
            self._abort_all_error = self._refusal = error
            self._cond.notify()
            return self._num_live

    def get_stats(self) -> dict[str, Any]:
        stats = self.engine.get_stats()
        with self._cond:
            stats["num_pending"] = len(self._adds)
        return stats

    async def check_health(self) -> None:
        self._raise_if_dead()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None and self._executor_error is None

    def shutdown(self) -> None:
        """Stops the engine thread, then the executor's worker ranks."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            # a dead engine's thread may still sit in a collective with a dead rank: do not wait for it
            self._thread.join(timeout=10 if self._dead is None and self._executor_error is None else 1)
        self.engine.shutdown()

    def add_dead_callback(self, callback: Any) -> None:
        """``callback()`` once the engine is dead (from the thread that saw it die); at once if it is."""
        with self._death_lock:
            dead = self._dead is not None
            if not dead:
                self._dead_callbacks.append(callback)
        if dead:
            callback()

    def _on_executor_failure(self, error: BaseException) -> None:
        """A worker rank died (executor monitor thread). The engine thread raises it at its next
        wake-up; if it is stuck in a collective with the dead rank, every request is failed from
        here after a short grace, so no caller waits on a step that cannot finish."""
        with self._cond:
            self._executor_error = error
            self._cond.notify()
        timer = threading.Timer(_STUCK_STEP_GRACE_S, self._die, args=(error,))
        timer.daemon = True
        timer.start()

    def _raise_if_dead(self) -> None:
        if self._dead is None and self._executor_error is not None:
            raise EngineDeadError(f"The engine died: {self._executor_error}")
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
            calls = list(self._calls)
            self._calls.clear()
            abort_all, self._abort_all_error = self._abort_all_error, None
        for p in adds:
            rid = p.prepared.request_id
            try:
                if rid in self._streams:
                    raise ValueError(f"request id {rid!r} is already in use")
                self.engine.add_prepared(p.prepared)
                self._streams[rid] = p
            except Exception as e:  # too long for the KV pool, ...
                self._finish_stream(rid, p, ValueError(str(e)))
        if abort_all is not None:
            aborts.extend(self._streams)
        for rid in aborts:
            p = self._streams.get(rid)
            if p is None:
                continue
            self.engine.abort_request(rid)
            self._finish_stream(rid, p, copy.copy(abort_all) if abort_all is not None else None)
        for fn, future, loop in calls:
            try:
                result, error = fn(self), None
            except Exception as e:  # noqa: BLE001 - handed to the caller
                result, error = None, e
            loop.call_soon_threadsafe(_settle, future, result, error)

    async def call_in_engine(self, fn: Any) -> Any:
        """``fn(self)`` on the engine thread, between two steps; its result or exception."""
        self._raise_if_dead()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            self._calls.append((fn, future, loop))
            self._cond.notify()
        return await future

    def abort_live(self, error: BaseException) -> None:
        """Engine thread only: ends every live request (each caller's iterator raises ``error``)."""
        for rid, p in list(self._streams.items()):
            self.engine.abort_request(rid)
            self._finish_stream(rid, p, copy.copy(error))

    def _finish_stream(self, rid: str, p: _Pending, item: Any) -> None:
        if self._streams.get(rid) is p:
            del self._streams[rid]
        if item is not None:
            self._deliver(p, item)
        with self._cond:
            self._num_live -= 1

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopped and not self._adds and not self._aborts and not self._calls \
                            and self._abort_all_error is None and self._executor_error is None \
                            and (self.sleeping or not self.engine.has_unfinished_requests()):
                        self._cond.wait()
                    if self._stopped:
                        break
                    if self._executor_error is not None:
                        raise self._executor_error
                self._drain_commands()
                if self.sleeping or not self.engine.has_unfinished_requests():
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
            self._die(e)

    def _die(self, e: BaseException) -> None:
        """Marks the engine dead and ends every pending request with ``EngineDeadError`` (once;
        from the engine thread, or from the failure timer while that thread is stuck)."""
        with self._death_lock:
            if self._dead is not None:
                return
            self._dead = e
            callbacks, self._dead_callbacks = self._dead_callbacks, []
        err = EngineDeadError(f"The engine died: {e}")
        for rid, p in list(self._streams.items()):
            self._finish_stream(rid, p, err)
        with self._cond:
            for p in self._adds:
                self._deliver(p, err)
            self._adds.clear()
            for _, future, loop in self._calls:
                loop.call_soon_threadsafe(_settle, future, None, err)
            self._calls.clear()
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001
                logger.exception("engine-dead callback raised")


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
