"""vLLM 0.32's logprobs semantics through the engine (``LLM``) on the tiny ChatML Llama:
-1 is the whole vocabulary (bounded by ``max_logprobs``, whose -1 means no bound), and
``logprob_token_ids`` returns exactly the asked-for ids plus the sampled one."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmserve import LLM, SamplingParams
from lmserve.outputs import VocabLogprobs

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    from tests.server.tiny_model import write_tiny_llama
    return write_tiny_llama(str(tmp_path_factory.mktemp("tiny-lp")))


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(tiny_dir, dtype="float32", kv_cache_memory=16 * 2**20, max_model_len=128, max_logprobs=-1)


def gen(llm, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 4)
    kw.setdefault("ignore_eos", True)
    return llm.generate([PROMPT], SamplingParams(**kw))[0]


def test_whole_vocabulary_logprobs(llm):
    vocab = llm.llm_engine.model_config.vocab_size
    full = gen(llm, logprobs=-1).outputs[0]
    top = gen(llm, logprobs=5).outputs[0]
    assert full.token_ids == top.token_ids
    for tid, d, small in zip(full.token_ids, full.logprobs, top.logprobs):
        assert isinstance(d, VocabLogprobs) and len(d) == vocab
        items = d.ranked_items()
        values = [e.logprob for _, e in items]
        assert values == sorted(values, reverse=True)
        assert math.isclose(float(np.exp(np.asarray(values, dtype=np.float64)).sum()), 1.0, rel_tol=1e-4)
        assert d[tid].rank == small[tid].rank and d[tid].logprob == pytest.approx(small[tid].logprob, abs=1e-5)
        for t, e in small.items():  # the top-5 are the first five of the whole vocabulary
            assert d[t].logprob == pytest.approx(e.logprob, abs=1e-5)
        assert {t for t, _ in items[:5]} == {t for t, e in small.items() if e.rank <= 5}
        assert items[0][1].decoded_token is not None
    assert full.cumulative_logprob == pytest.approx(top.cumulative_logprob, abs=1e-4)


def test_whole_vocabulary_prompt_logprobs(llm):
    vocab = llm.llm_engine.model_config.vocab_size
    out = gen(llm, prompt_logprobs=-1, max_tokens=1)
    small = gen(llm, prompt_logprobs=2, max_tokens=1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for tid, d, s in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], small.prompt_logprobs[1:]):
        assert len(d) == vocab
        assert d[tid].logprob == pytest.approx(s[tid].logprob, abs=1e-5) and d[tid].rank == s[tid].rank


def test_logprob_token_ids(llm):
    wanted = [7, 3, 300]
    out = gen(llm, logprob_token_ids=wanted).outputs[0]
    full = gen(llm, logprobs=-1).outputs[0]
    assert out.token_ids == full.token_ids
    for tid, d, f in zip(out.token_ids, out.logprobs, full.logprobs):
        keys = list(d)
        assert keys[0] == tid and [k for k in keys[1:]] == [t for t in wanted if t != tid]
        for t in wanted + [tid]:
            assert d[t].logprob == pytest.approx(f[t].logprob, abs=1e-5)
        assert d[tid].rank == f[tid].rank


def test_limits(tiny_dir, llm):
    with pytest.raises(ValueError, match="logprob_token_ids"):
        gen(llm, logprob_token_ids=[10**6])
    with pytest.raises(ValueError, match="logprobs must equal"):
        SamplingParams(logprobs=2, logprob_token_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="greater than max allowed: 128"):
        SamplingParams(logprob_token_ids=list(range(129)))
    bounded = LLM(tiny_dir, dtype="float32", kv_cache_memory=8 * 2**20, max_model_len=64, max_logprobs=3)
    with pytest.raises(ValueError, match="max allowed: 3"):
        gen(bounded, logprobs=-1)
    with pytest.raises(ValueError, match="max allowed: 3"):
        gen(bounded, prompt_logprobs=4)
    assert len(gen(bounded, logprobs=3).outputs[0].logprobs[0]) >= 3
