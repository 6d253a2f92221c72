"""Sleep mode (``--enable-sleep-mode``; POST /sleep, /wake_up, GET /is_sleeping) and the
prefix-cache reset, as functions that run on the engine thread through
``AsyncLLM.call_in_engine`` (so they never race a step).

``sleep(level)``, as vLLM's default ``mode=abort``: every live request is aborted (its caller
gets a 503 error), scheduling pauses, and at level 1 the KV cache tensors are freed (the
prefix cache is forgotten with them). Level 0 only pauses. Level 2 (discard the weights too)
is refused: lmserve's weights are memory-mapped from the checkpoint and not worth
re-reading. While asleep, new requests are accepted and wait; ``wake_up`` re-creates the
KV cache (zeroed, same number of blocks) and resumes scheduling, after which they run.

Invariant: ``runner.kv_caches`` is empty exactly while ``kv_released`` is set on the
AsyncLLM, and no step runs while ``sleeping`` is set.
"""

from __future__ import annotations

from typing import Any

from lmserve.errors import InvalidRequestError, LMServeError

SLEEP_LEVELS = (0, 1)
WAKE_TAGS = ("weights", "kv_cache")


class SleepingAbortError(LMServeError):
    status_code = 503
    err_type = "ServiceUnavailableError"


def _runner(llm: Any) -> Any:
    return llm.engine.core.runner


def reset_prefix_cache(llm: Any) -> bool:
    """Forgets the prefix cache; False while a request holds blocks (as vLLM)."""
    return bool(llm.engine.core.kv_manager.reset_prefix_cache())


def sleep(llm: Any, level: int) -> None:
    if level not in SLEEP_LEVELS:
        raise InvalidRequestError(f"sleep level {level} is not supported: level 0 pauses scheduling and level 1 "
                                  "also frees the KV cache; the weights stay loaded (level 2 is refused).",
                                  "level")
    if level >= 1 and llm.engine_config.parallel_config.world_size > 1:
        raise InvalidRequestError("sleep level 1 (free the KV cache) is not supported with tensor/pipeline "
                                  "parallelism (the worker ranks hold their own KV caches): use level 0", "level")
    llm.abort_live(SleepingAbortError("The request was aborted: the server was put to sleep (POST /sleep)."))
    llm.sleeping = True
    if level >= 1:
        _free_kv_cache(llm)


def _free_kv_cache(llm: Any) -> None:
    runner = _runner(llm)
    if llm.kv_released or runner.kv_spec is None:
        return
    llm.engine.core.kv_manager.reset_prefix_cache()  # cached blocks lose their contents
    runner.kv_caches = []
    decode_step = getattr(runner.model, "decode_step", None)  # the native decode step holds them too
    if decode_step is not None:
        decode_step.unbind()
    llm.kv_released = True


def release_kv_cache_memory(llm: Any) -> None:
    """POST /release_kv_cache_memory, as vLLM: frees the KV cache of a paused engine
    (``/sleep?level=0`` first) that holds no request; ``/wake_up`` re-creates it."""
    if not llm.sleeping or llm.engine.has_unfinished_requests():
        raise InvalidRequestError("release_kv_cache_memory requires a completed pause first (POST /sleep?level=0) "
                                  "and no queued request.")
    _free_kv_cache(llm)


def wake_up(llm: Any, tags: list[str] | None) -> bool:
    """Restores what ``tags`` name (None: everything); returns whether fully awake."""
    for tag in tags or ():
        if tag not in WAKE_TAGS:
            raise InvalidRequestError(f"wake_up tag {tag!r} is unknown; the tags are {', '.join(WAKE_TAGS)}.",
                                      "tags")
    if tags is None or "kv_cache" in tags:
        if llm.kv_released:
            runner = _runner(llm)
            runner.kv_caches = runner.kv_spec.allocate(runner.num_blocks, runner.block_size, runner.device)
            llm.kv_released = False
    awake = not llm.kv_released
    if awake:
        llm.sleeping = False
    return awake


def is_sleeping(llm: Any) -> bool:
    return bool(getattr(llm, "sleeping", False))  # an engine without sleep support never sleeps
