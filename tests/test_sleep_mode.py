"""Sleep mode in the engine (AsyncLLM + engine/sleep_mode.py, tiny random Llama): sleep aborts
live requests and frees the KV cache tensors, requests submitted while asleep wait, and after
wake_up greedy outputs are what they were before."""

from __future__ import annotations

import asyncio

import pytest

from lmserve.engine import sleep_mode
from lmserve.engine.arg_utils import EngineArgs
from lmserve.engine.async_engine import AsyncLLM
from lmserve.engine.llm_engine import LLMEngine
from lmserve.errors import InvalidRequestError
from lmserve.sampling_params import RequestOutputKind, SamplingParams

PROMPT = {"prompt_token_ids": [5, 17, 42, 99, 3, 7]}


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)


async def tokens(llm: AsyncLLM, n: int) -> list[int]:
    outs = [o async for o in llm.generate(PROMPT, greedy(n))]
    return list(outs[-1].outputs[0].token_ids)


def test_sleep_frees_kv_and_wake_restores(tiny_models):
    llm = AsyncLLM(LLMEngine.from_engine_args(EngineArgs(model=tiny_models["llama"], skip_tokenizer_init=True,
                                                         dtype="float32", block_size=4)))
    runner = llm.engine.core.runner

    async def main():
        before = await tokens(llm, 8)
        params = greedy(200)
        params.output_kind = RequestOutputKind.DELTA
        running = llm.generate(PROMPT, params)
        await running.__anext__()  # surely running now
        await llm.call_in_engine(lambda e: sleep_mode.sleep(e, 1))
        with pytest.raises(sleep_mode.SleepingAbortError):
            async for _ in running:
                pass
        assert runner.kv_caches == [] and sleep_mode.is_sleeping(llm)
        waiting = asyncio.ensure_future(tokens(llm, 8))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        with pytest.raises(InvalidRequestError):
            await llm.call_in_engine(lambda e: sleep_mode.sleep(e, 2))
        assert not await llm.call_in_engine(lambda e: sleep_mode.wake_up(e, ["weights"]))
        assert await llm.call_in_engine(lambda e: sleep_mode.wake_up(e, None))
        assert len(runner.kv_caches) > 0 and not sleep_mode.is_sleeping(llm)
        assert await waiting == before
        assert await llm.call_in_engine(sleep_mode.reset_prefix_cache)
        # release_kv_cache_memory: only once paused; then wake_up brings the cache back
        with pytest.raises(InvalidRequestError):
            await llm.call_in_engine(sleep_mode.release_kv_cache_memory)
        await llm.call_in_engine(lambda e: sleep_mode.sleep(e, 0))
        assert len(runner.kv_caches) > 0
        await llm.call_in_engine(sleep_mode.release_kv_cache_memory)
        assert runner.kv_caches == []
        assert await llm.call_in_engine(lambda e: sleep_mode.wake_up(e, ["kv_cache"]))
        assert await tokens(llm, 8) == before

    try:
        asyncio.run(main())
    finally:
        llm.shutdown()
