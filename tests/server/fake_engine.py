"""A stand-in for ``AsyncLLM`` with the same interface, for tests of the HTTP layer that
need engine behaviour a real model cannot be made to show on demand (overload, death,
failure mid-stream, a server that is still loading)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from lmserve.errors import EngineDeadError, OverloadedError
from lmserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from lmserve.sampling_params import SamplingParams


@dataclass
class FakeAsyncLLM:
    """Generates token ``(prev + 1) % vocab`` forever (one output per token, DELTA).

    ``mode``: "ok", "overloaded" (refuses before the first output), "die-mid-stream"
    (fails after two outputs), "dead" (check_health raises)."""

    tokenizer: Any
    mode: str = "ok"
    max_model_len: int = 256
    aborted: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        vocab = len(self.tokenizer)
        self.model_config = SimpleNamespace(served_model_name="fake", max_model_len=self.max_model_len,
                                            max_logprobs=20, vocab_size=vocab, model="/fake/model")
        self.engine_config = SimpleNamespace(scheduler_config=SimpleNamespace(policy="fcfs"))
        self.metrics = None

    def default_sampling_params(self) -> dict:
        return {}

    async def generate(self, prompt: dict, sampling_params: SamplingParams, request_id: str,
                       priority: int = 0, cache_salt: str | None = None, lora_request: Any = None,
                       reasoning_parser_kwargs: Any = None):
        if self.mode == "overloaded":
            raise OverloadedError("The server is overloaded: retry later.")
        ids = list(prompt["prompt_token_ids"])
        self.running.add(request_id)
        finished = False
        try:
            last = ids[-1]
            vocab = self.model_config.vocab_size
            for step in range(sampling_params.max_tokens):
                await asyncio.sleep(0.001)
                if self.mode == "die-mid-stream" and step == 2:
                    raise EngineDeadError("The engine died: boom")
                last = (last + 1) % vocab
                done = step == sampling_params.max_tokens - 1
                outs = [CompletionOutput(i, self.tokenizer.decode([last]), [last], None, None,
                                         "length" if done else None) for i in range(sampling_params.n)]
                yield RequestOutput(request_id, prompt.get("prompt"), ids, None, outs, done,
                                    metrics=RequestMetrics(arrival_time=0.0))
            finished = True
        finally:
            self.running.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def get_stats(self) -> dict:
        return {"num_running": len(self.running), "num_waiting": 0, "kv_cache_usage": 0.0}

    async def check_health(self) -> None:
        if self.mode == "dead":
            raise EngineDeadError("The engine died: boom")

    def shutdown(self) -> None:
        pass
