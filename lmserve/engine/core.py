"""``EngineCore.step()``: schedule -> execute -> update. Owns the Scheduler and the executor
(``lmserve/executor``: one rank in this process, or several ranks of which this process is the driver).

A step returns one ``CoreOutput`` per request that produced something (a token, prompt
logprobs) or finished. Stop strings are not seen here (they need text): the caller
finishes such requests through ``finish_requests`` before the next step, so no token is
generated past a stop string.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from lmserve.config import EngineConfig
from lmserve.engine.kv_cache import KVCacheManager
from lmserve.engine.request import Request, RequestStatus
from lmserve.engine.sched_output import SchedulerStats
from lmserve.engine.scheduler import Scheduler
from lmserve.model.layers.attention import cache_sliding_window
from lmserve.executor.factory import create_executor
from lmserve.worker.model_runner import LogprobsRow


@dataclass
class CoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[LogprobsRow] | None = None
    prompt_logprobs: tuple[int, list[LogprobsRow]] | None = None  # (first prompt position, rows)
    status: RequestStatus = RequestStatus.RUNNING
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    pooled: Any = None  # torch.Tensor: the result of a finished pooling request

    @property
    def finished(self) -> bool:
        return self.status.finished


def detect_repetition(tokens: list[int], min_size: int, max_size: int, min_count: int) -> bool:
    """True when the output ends with a pattern of min_size..max_size tokens repeated
    at least min_count times back to back."""
    for size in range(max(1, min_size), max_size + 1):
        span = size * min_count
        if len(tokens) < span:
            break
        tail = tokens[-size:]
        if all(tokens[-(k + 1) * size:len(tokens) - k * size] == tail for k in range(1, min_count)):
            return True
    return False


class EngineCore:
    def __init__(self, config: EngineConfig, logitsprocs_classes: list[type]) -> None:
        self.config = config
        self.executor = create_executor(config, logitsprocs_classes)
        self.runner = self.executor.driver_runner  # the driver's ModelRunner (rank 0)
        cc = config.cache_config
        self.kv_manager = KVCacheManager(self.executor.num_blocks, cc.block_size, cc.enable_prefix_caching,
                                         sliding_window=self._sliding_window(config))
        lora = config.lora_config
        self.scheduler = Scheduler(config.scheduler_config, self.kv_manager,
                                   max_loras=lora.max_loras if lora is not None else None)
        # The longest sequence the KV pool can hold at all (alone). With a sliding window on every
        # layer a sequence holds at most the window plus one step's tokens (older blocks are freed).
        pool_tokens = self.executor.num_blocks * cc.block_size
        window = self.kv_manager.sliding_window
        if window is not None and pool_tokens >= window + config.scheduler_config.max_num_batched_tokens + \
                2 * cc.block_size:
            pool_tokens = config.scheduler_config.max_model_len
        self.max_seq_len = min(config.scheduler_config.max_model_len, pool_tokens)
        self.step_count = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, request: Request) -> None:
        if request.lora_request is not None and (self.config.lora_config is None or request.lora is None):
            raise ValueError("LoRA adapters are not enabled: start the engine with enable_lora=True "
                             "(--enable-lora)")
        if request.is_pooling != self.config.model_config.is_pooling:
            raise ValueError("This model does not support pooling requests" if request.is_pooling
                             else "This model is a pooling model: it does not generate text")
        if request.is_pooling:
            if request.num_prompt_tokens > self.max_seq_len:
                raise ValueError(f"The prompt ({request.num_prompt_tokens} tokens) is longer than the "
                                 f"model's maximum context length ({self.max_seq_len} tokens).")
        elif request.num_prompt_tokens >= self.max_seq_len:
            raise ValueError(
                f"The prompt ({request.num_prompt_tokens} tokens) leaves no room to generate: the context "
                f"holds {self.max_seq_len} tokens (max_model_len {self.config.scheduler_config.max_model_len}, "
                f"KV cache {self.executor.num_blocks * self.config.cache_config.block_size} tokens).")
        self.scheduler.add_request(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus,
                        stop_reason: int | str | None = None) -> list[Request]:
        done = []
        for rid in request_ids:
            req = self.scheduler.finish_request(rid, status)
            if req is not None:
                if stop_reason is not None:
                    req.stop_reason = stop_reason
                done.append(req)
        return done

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _sliding_window(self, config: EngineConfig) -> int | None:
        """The window past which KV blocks may be freed. The driver holds only the first pipeline
        stage's layers, so with several stages none is (a later stage may have a global layer)."""
        if config.parallel_config.pipeline_parallel_size > 1:
            return None
        return cache_sliding_window(self.executor.model)

    def shutdown(self) -> None:
        """Stops the executor's worker ranks (idempotent)."""
        self.executor.shutdown()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    # ------------------------------------------------------------------ step
    def step(self) -> list[CoreOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        result = self.executor.execute(sched)
        self.scheduler.update_after_step(sched.scheduled)
        self.step_count += 1
        now = time.time()
        outputs: list[CoreOutput] = []
        finished: list[Request] = []
        for s in sched.scheduled:
            req = s.request
            rid = req.request_id
            if req.is_pooling:
                req.status = RequestStatus.FINISHED_STOPPED
                finished.append(req)
                outputs.append(CoreOutput(rid, [], status=req.status, pooled=result.pooled[rid],
                                          first_scheduled_time=req.first_scheduled_time))
                continue
            out = CoreOutput(rid, [], num_cached_tokens=max(req.num_cached_tokens, 0),
                             prompt_logprobs=result.prompt_logprobs.get(rid),
                             first_scheduled_time=req.first_scheduled_time)
            token = result.sampled.get(rid)
            if token is not None:
                req.append_output_token(token)
                if req.first_token_time is None:
                    req.first_token_time = now
                out.new_token_ids.append(token)
                if rid in result.logprobs:
                    out.new_logprobs = [result.logprobs[rid]]
                status = self._check_stop(req, token)
                if req.grammar is not None:
                    status = self._advance_grammar(req, token, status)
                if status is not None:
                    req.status = status
                    finished.append(req)
            if token is not None or out.prompt_logprobs is not None:
                out.status = req.status
                out.stop_reason = req.stop_reason
                outputs.append(out)
        for req in finished:
            self.scheduler.finish_request(req.request_id, req.status)
        return outputs

    @staticmethod
    def _advance_grammar(req: Request, token: int, status: RequestStatus | None) -> RequestStatus | None:
        """Advance the sequence's grammar state past ``token`` (the last output token; inside the
        reasoning it only looks for the reasoning's end). Once the grammar has accepted its stop
        token, or if the token left the grammar (every allowed token was banned by another
        constraint), the sequence stops: nothing after it could be valid."""
        ok = req.grammar.sync(req.output_token_ids)
        if status is not None:
            return status
        if not ok or req.grammar.is_terminated:
            return RequestStatus.FINISHED_STOPPED
        return None

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        n_out = req.num_output_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token == req.eos_token_id:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:  # type: ignore[operator]
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if n_out >= req.max_tokens or req.num_tokens >= self.max_seq_len:
            return RequestStatus.FINISHED_LENGTH
        rd = params.repetition_detection
        if rd is not None and rd.max_pattern_size > 0 and detect_repetition(
                req.output_token_ids, rd.min_pattern_size, rd.max_pattern_size, rd.min_count):
            return RequestStatus.FINISHED_REPETITION
        return None
