"""Pooling requests through the engine itself (scheduler, runner, LLMEngine, AsyncLLM):
a tiny random Llama used as an embedding model (last-token pooling) against HF
transformers' hidden states, scheduling rules (never chunked, batched, budget-bound),
aborts, and the errors for mixing pooling and generation."""

from __future__ import annotations

import asyncio

import pytest
import torch

from lmserve.engine.arg_utils import EngineArgs
from lmserve.engine.async_engine import AsyncLLM
from lmserve.engine.llm_engine import LLMEngine
from lmserve.outputs import PoolingRequestOutput
from lmserve.pooling_params import PoolingParams
from lmserve.sampling_params import SamplingParams

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11], list(range(20, 57)), [300 + i for i in range(13)]]


def make_engine(path: str, **kw) -> LLMEngine:
    args = dict(model=path, skip_tokenizer_init=True, dtype="float32", block_size=4, runner="pooling")
    args.update(kw)
    return LLMEngine.from_engine_args(EngineArgs(**args))


def run_all(engine: LLMEngine, prompts, params: PoolingParams) -> tuple[list[PoolingRequestOutput], list[int]]:
    """Outputs in prompt order, and the number of requests run by each step."""
    for i, p in enumerate(prompts):
        engine.add_pooling_request(str(i), {"prompt_token_ids": p}, params)
    done: dict[str, PoolingRequestOutput] = {}
    per_step = []
    while engine.has_unfinished_requests():
        outs = engine.step()
        per_step.append(len(outs))
        for o in outs:
            assert isinstance(o, PoolingRequestOutput) and o.finished
            done[o.request_id] = o
        engine.core.kv_manager.check_invariants()
    return [done[str(i)] for i in range(len(prompts))], per_step


@pytest.fixture(scope="module")
def hf_last_hidden(tiny_models):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    with torch.no_grad():
        return [model(torch.tensor([p])).last_hidden_state[0] for p in PROMPTS]


def test_decoder_embeddings_equal_hf_last_token(tiny_models, hf_last_hidden):
    engine = make_engine(tiny_models["llama"])
    assert engine.model_config.supported_pooling_tasks == ("embed", "token_embed")
    outs, per_step = run_all(engine, PROMPTS, PoolingParams(task="embed"))
    assert per_step == [len(PROMPTS)]  # one batch
    for out, ref, prompt in zip(outs, hf_last_hidden, PROMPTS):
        assert out.prompt_token_ids == prompt
        expected = torch.nn.functional.normalize(ref[-1], dim=-1)
        torch.testing.assert_close(out.outputs.data, expected, atol=1e-5, rtol=1e-4)
    raw, _ = run_all(engine, PROMPTS[:1], PoolingParams(task="embed", normalize=False))
    torch.testing.assert_close(raw[0].outputs.data, hf_last_hidden[0][-1], atol=1e-5, rtol=1e-4)


def test_token_embed_returns_every_position(tiny_models, hf_last_hidden):
    engine = make_engine(tiny_models["llama"])
    outs, _ = run_all(engine, PROMPTS, PoolingParams(task="token_embed", normalize=False))
    for out, ref in zip(outs, hf_last_hidden):
        torch.testing.assert_close(out.outputs.data, ref, atol=1e-5, rtol=1e-4)


def test_pooling_requests_are_never_chunked_and_respect_the_budget(tiny_models, hf_last_hidden):
    # A budget of 40 tokens: the 37-token prompt runs alone, whole; nothing is ever split.
    engine = make_engine(tiny_models["llama"], max_model_len=40, max_num_batched_tokens=40)
    outs, per_step = run_all(engine, PROMPTS, PoolingParams(task="embed"))
    assert sum(per_step) == len(PROMPTS) and len(per_step) > 1
    for out, ref in zip(outs, hf_last_hidden):
        expected = torch.nn.functional.normalize(ref[-1], dim=-1)
        torch.testing.assert_close(out.outputs.data, expected, atol=1e-5, rtol=1e-4)
    assert engine.core.kv_manager.usage == 0.0


def test_budget_smaller_than_max_model_len_is_refused(tiny_models):
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_engine(tiny_models["llama"], max_model_len=64, max_num_batched_tokens=32)


def test_too_long_prompt_and_truncation(tiny_models):
    engine = make_engine(tiny_models["llama"], max_model_len=16)
    with pytest.raises(ValueError, match="maximum context length is 16"):
        engine.prepare_pooling_request("x", {"prompt_token_ids": list(range(1, 30))}, PoolingParams(task="embed"))
    prepared = engine.prepare_pooling_request("x", {"prompt_token_ids": list(range(1, 30))},
                                              PoolingParams(task="embed", truncate_prompt_tokens=-1))
    assert prepared.prompt_token_ids == list(range(14, 30))  # token ids keep the last max_model_len


def test_unsupported_task_and_fields_are_value_errors(tiny_models):
    engine = make_engine(tiny_models["llama"])
    with pytest.raises(ValueError, match="does not support the 'classify'"):
        engine.prepare_pooling_request("x", {"prompt_token_ids": [1, 2]}, PoolingParams(task="classify"))
    with pytest.raises(ValueError, match="matryoshka"):
        engine.prepare_pooling_request("x", {"prompt_token_ids": [1, 2]}, PoolingParams(task="embed", dimensions=8))
    with pytest.raises(ValueError, match="out of vocabulary"):
        engine.prepare_pooling_request("x", {"prompt_token_ids": [1, 10**6]}, PoolingParams(task="embed"))
    with pytest.raises(ValueError, match="does not generate"):
        engine.add_request("g", {"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=2))


def test_pooling_request_on_a_generative_model_is_refused(tiny_models):
    engine = make_engine(tiny_models["llama"], runner="generate", kv_cache_memory=2**20)
    with pytest.raises(ValueError, match="does not support pooling"):
        engine.prepare_pooling_request("x", {"prompt_token_ids": [1, 2]}, PoolingParams(task="embed"))


def test_matryoshka_dimensions_when_the_model_declares_them(tiny_models, hf_last_hidden):
    engine = make_engine(tiny_models["llama"], hf_overrides={"is_matryoshka": True})
    outs, _ = run_all(engine, PROMPTS[:1], PoolingParams(task="embed", dimensions=8))
    expected = torch.nn.functional.normalize(hf_last_hidden[0][-1][:8], dim=-1)
    torch.testing.assert_close(outs[0].outputs.data, expected, atol=1e-5, rtol=1e-4)


def test_abort_of_a_waiting_pooling_request(tiny_models):
    engine = make_engine(tiny_models["llama"], max_model_len=40, max_num_batched_tokens=40)
    for i, p in enumerate(PROMPTS):
        engine.add_pooling_request(str(i), {"prompt_token_ids": p}, PoolingParams(task="embed"))
    engine.abort_request("3")
    seen = set()
    while engine.has_unfinished_requests():
        seen.update(o.request_id for o in engine.step())
    assert seen == {"0", "1", "2"}
    assert engine.core.kv_manager.usage == 0.0


def test_async_encode_batches_concurrent_requests(tiny_models, hf_last_hidden):
    llm = AsyncLLM(make_engine(tiny_models["llama"]))

    async def one(i: int):
        outs = [o async for o in llm.encode({"prompt_token_ids": PROMPTS[i]}, PoolingParams(task="embed"))]
        assert len(outs) == 1 and outs[0].finished
        return outs[0].outputs.data

    async def main():
        return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))

    try:
        results = asyncio.run(main())
    finally:
        llm.shutdown()
    for data, ref in zip(results, hf_last_hidden):
        torch.testing.assert_close(data, torch.nn.functional.normalize(ref[-1], dim=-1), atol=1e-5, rtol=1e-4)
