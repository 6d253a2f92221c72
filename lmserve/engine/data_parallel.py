"""Data parallelism on one machine (``--data-parallel-size N``, vLLM's DP with its internal load
balancer): N engine replicas, each in its own process with its own engine core, KV cache and
scheduler, behind the one API server. ``DPAsyncLLM`` has ``AsyncLLM``'s interface, so the server
does not know how many replicas there are.

- The front (this process) validates and tokenizes with a core-less ``LLMEngine``
  (``FrontEngine``: tokenizer, sampling defaults, structured-output compiler, LoRA checks), so a bad
  request is a ValueError (HTTP 400) before anything is queued. What crosses to a replica is the
  token ids, the prompt text and the caller's params, which must pickle: a request whose params
  cannot (a logits processor that is a local function, ...) is refused with a ValueError naming it.
- Each replica (``lmserve.engine.dp_replica``) runs the same ``EngineArgs`` in a spawned process,
  with ``max(1, cpu_count // (N * tensor_parallel_size))`` torch threads (cpu_count: the
  OMP_NUM_THREADS in force, else the CPUs this process may use).
- Routing: ``DPRouter`` (load score as vLLM's, plus prefix-cache affinity).
- Each replica has one reader thread (its outputs -> the callers' asyncio queues through
  ``call_soon_threadsafe``) and one writer thread (the event loop only enqueues): nothing blocks
  the event loop.
- Failure: a replica that dies (end of file on its pipe, or its engine thread's death) makes the
  whole client dead: every in-flight request and every later one gets ``EngineDeadError``,
  ``check_health`` raises (``/health`` answers 503) and ``is_running`` turns False (the server's
  watchdog then exits). ``shutdown`` stops every replica; replicas also exit on their own when this
  process dies (end of file, parent-death signal).
- Metrics: ``get_stats`` sums the replicas' last reports and lists them under ``"engines"``
  (the Prometheus series carry ``engine="<index>"``).
- Dev routes: ``call_in_engine(fn)`` runs ``fn`` on every replica (``fn`` must pickle: a module-level
  function or a ``functools.partial`` of one); booleans combine with ``all``.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import dataclasses
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from lmserve.config import EngineConfig
from lmserve.engine.arg_utils import EngineArgs
from lmserve.engine.dp_routing import DPRouter, prefix_keys
from lmserve.engine.llm_engine import LLMEngine, PromptType
from lmserve.errors import EngineDeadError
from lmserve.lora.request import LoRARequest
from lmserve.outputs import PoolingRequestOutput, RequestOutput
from lmserve.pooling_params import PoolingParams
from lmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 600.0
_STOP_GRACE_S = 5.0


def build_async_engine(engine_args: EngineArgs) -> Any:
    """The server's engine client: ``AsyncLLM`` for one replica, ``DPAsyncLLM`` for several."""
    size = int(getattr(engine_args, "data_parallel_size", 1) or 1)
    if size > 1:
        return DPAsyncLLM(engine_args, size)
    from lmserve.engine.async_engine import AsyncLLM
    return AsyncLLM.from_engine_args(engine_args)


def threads_per_replica(num_replicas: int, tensor_parallel_size: int = 1) -> int:
    env = os.environ.get("OMP_NUM_THREADS", "")
    cpus = int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0))
    return max(1, cpus // (num_replicas * max(1, tensor_parallel_size)))


@dataclass
class _FrontCore:
    """What request validation reads of the engine core, without a model or KV cache."""

    max_seq_len: int


class FrontEngine(LLMEngine):
    """An ``LLMEngine`` that validates and tokenizes but runs nothing (no model, no KV cache).
    ``max_seq_len`` is the smallest of the replicas' (set once they are up); ``remove_lora`` also
    drops the adapter from every replica."""

    def __init__(self, config: EngineConfig, on_remove_lora: Any = None) -> None:
        self._on_remove_lora = on_remove_lora
        super().__init__(config)

    def _build_core(self, config: EngineConfig) -> Any:
        return _FrontCore(config.scheduler_config.max_model_len)

    def remove_lora(self, lora_id: int) -> bool:
        removed = super().remove_lora(lora_id)
        if self._on_remove_lora is not None:
            self._on_remove_lora(lora_id)
        return removed


@dataclass
class _Pending:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    replica: int
    num_seqs: int


@dataclass
class _Replica:
    index: int
    process: Any
    conn: Any
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    max_seq_len: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    sleeping: bool = False
    stopping: bool = False  # set by _stop_replicas: its end of the pipe closing is expected


class DPAsyncLLM:
    """``AsyncLLM``'s interface over N replica processes (see the module docstring)."""

    def __init__(self, engine_args: EngineArgs, num_replicas: int) -> None:
        if num_replicas < 2:
            raise ValueError("DPAsyncLLM needs at least 2 replicas; use AsyncLLM for one")
        config = engine_args.create_engine_config()  # a bad model or flag fails here, before any spawn
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}  # engine id -> live request (reader threads read it)
        self._calls: dict[int, tuple[asyncio.Future, asyncio.AbstractEventLoop]] = {}  # call id -> its future
        self._by_caller: dict[str, set[str]] = {}  # caller id -> engine ids (event loop only)
        self._seq = itertools.count()
        self._call_ids = itertools.count()
        self._dead: str | None = None
        self._stopped = False
        self._refusal: BaseException | None = None
        self.engine = FrontEngine(config, self._broadcast_remove_lora)
        self.engine_config = config
        self.model_config = config.model_config
        self.tokenizer = self.engine.tokenizer
        self.metrics: Any = None
        self.kv_released = False
        self.router = DPRouter(num_replicas)
        self._block_size = config.cache_config.block_size
        threads = threads_per_replica(num_replicas, int(getattr(engine_args, "tensor_parallel_size", 1) or 1))
        self.replicas = self._start(engine_args, num_replicas, threads)
        self._finalizer = weakref.finalize(self, _stop_replicas, list(self.replicas))
        # before multiprocessing's own exit hook, which would wait for the (non-daemon) replicas forever
        atexit.register(self._finalizer)
        self.engine.core.max_seq_len = min(r.max_seq_len for r in self.replicas)
        for r in self.replicas:
            threading.Thread(target=self._reader, args=(r,), name=f"lmserve-dp{r.index}-reader", daemon=True).start()
            threading.Thread(target=self._writer, args=(r,), name=f"lmserve-dp{r.index}-writer", daemon=True).start()
        logger.info("Data parallelism: %d engine replicas, %d torch threads each", num_replicas, threads)

    # ------------------------------------------------------------------ start-up
    @staticmethod
    def _start(engine_args: EngineArgs, n: int, threads: int) -> list[_Replica]:
        from lmserve.engine.dp_replica import replica_main
        ctx = multiprocessing.get_context("spawn")  # a forked copy of a threaded torch process is unsafe
        replicas: list[_Replica] = []
        try:
            for i in range(n):
                parent, child = ctx.Pipe()
                # not a daemon: a replica may start worker processes of its own (tensor parallelism)
                proc = ctx.Process(target=replica_main, args=(i, engine_args, child, threads),
                                   name=f"lmserve-dp{i}", daemon=False)
                proc.start()
                child.close()
                replicas.append(_Replica(i, proc, parent))
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            for r in replicas:
                while not r.conn.poll(0.2):
                    if not r.process.is_alive():
                        raise RuntimeError(f"data-parallel replica {r.index} exited during start-up "
                                           f"(exit code {r.process.exitcode})")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"data-parallel replica {r.index} did not start within "
                                           f"{STARTUP_TIMEOUT_S:g} s")
                first, *rest = pickle.loads(r.conn.recv_bytes())
                if first[0] != "ready":
                    raise RuntimeError(f"data-parallel replica {r.index} failed to start: {first[1]}")
                r.max_seq_len = first[1]["max_seq_len"]
                for msg in rest:  # its first stats report may share the batch
                    if msg[0] == "stats":
                        r.stats = msg[1]
        except BaseException:
            _stop_replicas(replicas)
            raise
        return replicas

    # ------------------------------------------------------------------ AsyncLLM's interface
    def default_sampling_params(self) -> dict[str, Any]:
        return self.engine.default_sampling_params()

    @property
    def max_seq_len(self) -> int:
        return self.engine.core.max_seq_len

    @property
    def sleeping(self) -> bool:
        """Whether any replica is asleep (as its last answer to a dev-route call said)."""
        return any(r.sleeping for r in self.replicas)

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str | None = None, priority: int = 0,
                       cache_salt: str | None = None,
                       add_special_tokens: bool = True,
                       lora_request: LoRARequest | None = None,
                       reasoning_parser_kwargs: dict[str, Any] | None = None) -> AsyncIterator[RequestOutput]:
        """As ``AsyncLLM.generate``: validated here, run on one replica."""
        self._raise_if_dead()
        request_id = request_id or uuid.uuid4().hex
        grammar = None
        if sampling_params.structured_outputs is not None and not sampling_params.use_beam_search:
            grammar = await self.engine.compile_structured_outputs_async(sampling_params)  # a bad one: 400 here
        if lora_request is not None:
            await asyncio.to_thread(self.engine.get_lora, lora_request)
        prepared = self.engine.prepare_request(request_id, prompt, sampling_params, priority, cache_salt,
                                               add_special_tokens=add_special_tokens, compiled_grammar=grammar,
                                               lora_request=lora_request,
                                               reasoning_parser_kwargs=reasoning_parser_kwargs)
        kwargs = dict(prompt=_wire_prompt(prepared.prompt, prepared.prompt_token_ids), sampling_params=sampling_params,
                      priority=priority, cache_salt=cache_salt, lora_request=lora_request,
                      reasoning_parser_kwargs=reasoning_parser_kwargs)
        salt = (cache_salt, lora_request.lora_int_id if lora_request is not None else None)
        async for out in self._submit("generate", kwargs, request_id, prepared.prompt_token_ids, salt,
                                      max(1, sampling_params.n)):
            yield out

    async def encode(self, prompt: PromptType, pooling_params: PoolingParams,
                     request_id: str | None = None, priority: int = 0,
                     add_special_tokens: bool = True) -> AsyncIterator[PoolingRequestOutput]:
        """As ``AsyncLLM.encode``: validated here, run on one replica."""
        self._raise_if_dead()
        request_id = request_id or uuid.uuid4().hex
        prepared = self.engine.prepare_pooling_request(request_id, prompt, pooling_params, priority,
                                                       add_special_tokens=add_special_tokens)
        wire = _wire_prompt(prepared.prompt, prepared.prompt_token_ids)
        if prepared.requests[0].token_type_ids is not None:
            wire["token_type_ids"] = list(prepared.requests[0].token_type_ids)
        kwargs = dict(prompt=wire, pooling_params=pooling_params, priority=priority)
        async for out in self._submit("encode", kwargs, request_id, prepared.prompt_token_ids, None, 1):
            yield out

    async def _submit(self, kind: str, kwargs: dict[str, Any], caller_id: str, token_ids: list[int],
                      salt: Any, num_seqs: int) -> AsyncIterator[Any]:
        eid = f"{caller_id}-{next(self._seq)}"
        kwargs["request_id"] = eid
        try:
            payload = pickle.dumps(("add", eid, kind, kwargs))
        except Exception as e:  # noqa: BLE001 - a lambda logits processor, an open file, ...
            raise ValueError(f"This request cannot be sent to a data-parallel engine replica: its parameters do "
                             f"not pickle ({type(e).__name__}: {e}). Use importable (module-level) logits "
                             "processors, or run with --data-parallel-size 1.") from None
        for r in self.replicas:
            self.router.report(r.index, r.stats.get("num_waiting", 0) + r.stats.get("num_pending", 0),
                               r.stats.get("num_running", 0), r.stats.get("kv_cache_usage", 0.0))
        idx = self.router.choose(prefix_keys(token_ids, self._block_size, salt) if kind == "generate" else (),
                                 num_seqs)
        pending = _Pending(asyncio.Queue(), asyncio.get_running_loop(), idx, num_seqs)
        with self._lock:
            refusal = self._refusal if self._refusal is not None else (
                EngineDeadError(f"The engine died: {self._dead}") if self._dead is not None else None)
            if refusal is None:
                self._pending[eid] = pending
        if refusal is not None:
            self.router.finished(idx, num_seqs)
            raise copy.copy(refusal)
        self._by_caller.setdefault(caller_id, set()).add(eid)
        self.replicas[idx].outbox.put(payload)
        finished = False
        try:
            while True:
                item = await pending.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.request_id != caller_id:
                    item = dataclasses.replace(item, request_id=caller_id)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._pending.pop(eid, None)
            self.router.finished(idx, num_seqs)
            ids = self._by_caller.get(caller_id)
            if ids is not None:
                ids.discard(eid)
                if not ids:
                    del self._by_caller[caller_id]
            if not finished:
                self._send(idx, ("abort", [eid]))

    async def abort(self, request_id: str) -> None:
        """Aborts every live request submitted under the caller id ``request_id``; their iterators
        raise ``asyncio.CancelledError``."""
        eids = list(self._by_caller.get(request_id, ()))
        with self._lock:
            targets = [(eid, self._pending.pop(eid, None)) for eid in eids]
        for eid, p in targets:
            if p is not None:
                self._send(p.replica, ("abort", [eid]))
                p.loop.call_soon_threadsafe(p.queue.put_nowait, asyncio.CancelledError())

    def abort_all(self, error: BaseException) -> int:
        """Ends every live request with ``error`` and refuses later ones with it (the server stops)."""
        with self._lock:
            self._refusal = error
            live = list(self._pending.items())
            self._pending.clear()
        by_replica: dict[int, list[str]] = {}
        for eid, p in live:
            by_replica.setdefault(p.replica, []).append(eid)
            _deliver(p, copy.copy(error))
        for idx, eids in by_replica.items():
            self._send(idx, ("abort", eids))
        return len(live)

    async def call_in_engine(self, fn: Any) -> Any:
        """``fn(replica's AsyncLLM)`` on every replica's engine thread; the results combined (all
        booleans: their ``and``; all equal: that value; otherwise the list). The first error raises."""
        self._raise_if_dead()
        try:
            pickle.dumps(fn)
        except Exception as e:  # noqa: BLE001
            raise TypeError(f"call_in_engine with data parallelism needs a picklable function, got {fn!r}: "
                            f"{e}") from None
        loop = asyncio.get_running_loop()
        futures = []
        for r in self.replicas:
            future = loop.create_future()
            cid = next(self._call_ids)
            with self._lock:
                self._calls[cid] = (future, loop)
            futures.append(future)
            r.outbox.put(pickle.dumps(("call", cid, fn)))
        results = await asyncio.gather(*futures)
        if all(isinstance(x, bool) for x in results):
            return all(results)
        return results[0] if all(x == results[0] for x in results) else results

    def get_stats(self) -> dict[str, Any]:
        """The replicas' last reports summed (``kv_cache_usage``: their mean), each under ``engines``."""
        engines = [dict(r.stats) for r in self.replicas]
        total: dict[str, Any] = {}
        for key in ("num_running", "num_waiting", "num_pending", "num_preemptions", "prefix_cache_queries",
                    "prefix_cache_hits", "num_kv_blocks"):
            total[key] = sum(s.get(key, 0) for s in engines)
        total["kv_cache_usage"] = sum(s.get("kv_cache_usage", 0.0) for s in engines) / len(engines)
        total["engines"] = engines
        return total

    async def check_health(self) -> None:
        self._raise_if_dead()

    @property
    def is_running(self) -> bool:
        return self._dead is None and not self._stopped

    def shutdown(self) -> None:
        self._stopped = True
        self._finalizer()

    # ------------------------------------------------------------------ internals
    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"The engine died: {self._dead}")
        if self._stopped:
            raise EngineDeadError("The engine is shut down")

    def _send(self, idx: int, msg: tuple) -> None:
        self.replicas[idx].outbox.put(pickle.dumps(msg))

    def _broadcast_remove_lora(self, lora_id: int) -> None:
        for r in self.replicas:
            self._send(r.index, ("remove_lora", lora_id))

    def _writer(self, r: _Replica) -> None:
        while True:
            payload = r.outbox.get()
            if payload is None:
                return
            try:
                r.conn.send_bytes(payload)
            except (OSError, EOFError, ValueError):
                return  # the reader sees the replica's end and reports the death

    def _reader(self, r: _Replica) -> None:
        reason = None
        while reason is None:
            try:
                batch = pickle.loads(r.conn.recv_bytes())
            except (EOFError, OSError, ValueError):
                if self._stopped or r.stopping:
                    return
                r.process.join(timeout=1.0)
                reason = f"data-parallel replica {r.index} exited (exit code {r.process.exitcode})"
                break
            for msg in batch:
                op = msg[0]
                if op in ("out", "err"):
                    with self._lock:
                        p = self._pending.get(msg[1])
                        if p is not None and (op == "err" or msg[2].finished):
                            del self._pending[msg[1]]
                    if p is not None:
                        _deliver(p, msg[2])
                elif op == "stats":
                    r.stats = msg[1]
                elif op == "call_result":
                    _, cid, result, error, sleeping = msg
                    r.sleeping = sleeping
                    with self._lock:
                        call = self._calls.pop(cid, None)
                    if call is not None:
                        future, loop = call
                        loop.call_soon_threadsafe(_settle, future, result, error)
                elif op == "dead":
                    reason = msg[1]
        self._on_replica_death(reason)

    def _on_replica_death(self, reason: str) -> None:
        logger.error("%s: failing every request; the server stops", reason)
        with self._lock:
            if self._dead is None:
                self._dead = reason
            live = list(self._pending.values())
            self._pending.clear()
            calls = list(self._calls.values())
            self._calls.clear()
        for p in live:
            _deliver(p, EngineDeadError(f"The engine died: {reason}"))
        for future, loop in calls:
            loop.call_soon_threadsafe(_settle, future, None, EngineDeadError(f"The engine died: {reason}"))


def _wire_prompt(text: str | None, token_ids: list[int]) -> dict[str, Any]:
    wire: dict[str, Any] = {"prompt_token_ids": list(token_ids)}
    if text is not None:
        wire["prompt"] = text
    return wire


def _deliver(p: _Pending, item: Any) -> None:
    try:
        p.loop.call_soon_threadsafe(p.queue.put_nowait, item)
    except RuntimeError:  # the caller's event loop is closed
        pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _stop_replicas(replicas: list[_Replica]) -> None:
    """Asks every replica to stop, then terminates (and at last kills) those still running."""
    for r in replicas:
        r.stopping = True
    for r in replicas:
        try:
            r.outbox.put(None)
            r.conn.send_bytes(pickle.dumps(("shutdown",)))
        except (OSError, EOFError, ValueError):
            pass
    deadline = time.monotonic() + _STOP_GRACE_S
    for r in replicas:
        r.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if r.process.is_alive():
            r.process.terminate()
            r.process.join(timeout=2.0)
        if r.process.is_alive():
            r.process.kill()
            r.process.join()
        try:
            r.conn.close()
        except OSError:
            pass
