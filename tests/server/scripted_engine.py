"""A fake engine that "generates" a given text: for HTTP-layer tests of outputs a random model
cannot be made to produce on demand (tool calls, stop sequences)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from lmserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from lmserve.sampling_params import SamplingParams
from tests.server.fake_engine import FakeAsyncLLM


@dataclass
class ScriptedAsyncLLM(FakeAsyncLLM):
    """Each request outputs ``script`` (ASCII), one token per output, then finishes with
    ``finish_reason``/``stop_reason`` (or "length" when max_tokens cuts it). ``prompts``
    records every prompt text received, ``params`` every request's SamplingParams."""

    script: str = ""
    finish_reason: str = "stop"
    stop_reason: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompts: list[str] = []
        self.params: list[SamplingParams] = []

    async def generate(self, prompt: dict, sampling_params: SamplingParams, request_id: str,
                       priority: int = 0, cache_salt: str | None = None, **_: Any):
        self.prompts.append(prompt.get("prompt") or "")
        self.params.append(sampling_params)
        ids = list(self.tokenizer.encode(self.script, add_special_tokens=False))[:sampling_params.max_tokens]
        cut = len(ids) < len(self.tokenizer.encode(self.script, add_special_tokens=False))
        self.running.add(request_id)
        try:
            for i, tid in enumerate(ids):
                await asyncio.sleep(0)
                text = self.tokenizer.decode(ids[:i + 1]) [len(self.tokenizer.decode(ids[:i])):]
                done = i == len(ids) - 1
                finish = ("length" if cut else self.finish_reason) if done else None
                out = CompletionOutput(0, text, [tid], None, None, finish, self.stop_reason if done and not cut
                                       else None)
                yield RequestOutput(request_id, prompt.get("prompt"), list(prompt["prompt_token_ids"]), None, [out],
                                    done, metrics=RequestMetrics(arrival_time=0.0))
        finally:
            self.running.discard(request_id)
