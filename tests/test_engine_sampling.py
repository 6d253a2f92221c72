"""Every request parameter through the whole engine (``LLM``), on a tiny random Llama
with SmolLM2's real tokenizer: each test fails if its parameter were ignored."""

from __future__ import annotations

import pytest

from lmserve import LLM, BeamSearchParams, SamplingParams

PROMPT = "The history of the city begins"
EOS = 2  # <|im_end|> in SmolLM2's vocabulary


@pytest.fixture(scope="module")
def llm(tiny_text_model):
    return LLM(tiny_text_model, dtype="float32", block_size=4, kv_cache_memory=16 * 2**20,
               max_model_len=256, logits_processors=["tests.logitsprocs_examples:DummyLogitsProcessor"])


def gen(llm, prompt=PROMPT, **kw):
    kw.setdefault("temperature", 0)
    return llm.generate([prompt], SamplingParams(**kw))[0]


def test_max_tokens_and_finish_reason(llm):
    out = gen(llm, max_tokens=7, ignore_eos=True)
    assert len(out.outputs[0].token_ids) == 7 and out.outputs[0].finish_reason == "length"


def test_stop_string_truncates_and_include_flag(llm):
    full = gen(llm, max_tokens=24, ignore_eos=True).outputs[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    out = gen(llm, max_tokens=24, ignore_eos=True, stop=[stop]).outputs[0]
    assert out.text == full[:full.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    out = gen(llm, max_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True).outputs[0]
    assert out.text == full[:full.index(stop) + len(stop)]


def test_stop_token_ids(llm):
    ids = gen(llm, max_tokens=12, ignore_eos=True).outputs[0].token_ids
    target = ids[4]
    out = gen(llm, max_tokens=12, ignore_eos=True, stop_token_ids=[target]).outputs[0]
    assert out.token_ids == ids[:ids.index(target) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_eos_ignore_eos_and_min_tokens(llm):
    bias = {EOS: 100.0}  # make EOS the argmax everywhere
    assert gen(llm, max_tokens=10, logit_bias=bias).outputs[0].token_ids == [EOS]
    assert len(gen(llm, max_tokens=10, logit_bias=bias, ignore_eos=True).outputs[0].token_ids) == 10
    out = gen(llm, max_tokens=10, logit_bias=bias, min_tokens=4).outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == EOS and EOS not in out.token_ids[:4]


def test_n_seed_and_repeatability(llm):
    p = SamplingParams(n=3, temperature=1.0, seed=123, max_tokens=8, ignore_eos=True)
    a = llm.generate([PROMPT], p)[0]
    b = llm.generate([PROMPT, "Another prompt in the same batch"], [p, SamplingParams(temperature=1.0)])[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]  # batch-independent
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3  # children differ
    c = llm.generate([PROMPT], SamplingParams(n=3, temperature=1.0, seed=124, max_tokens=8, ignore_eos=True))[0]
    assert [o.token_ids for o in c.outputs] != [o.token_ids for o in a.outputs]


def test_truncate_prompt_tokens(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=1, truncate_prompt_tokens=3))[0]
    full = llm.get_tokenizer().encode(PROMPT)
    assert out.prompt_token_ids == full[-3:]


def test_skip_special_tokens(llm):
    special = 1  # <|im_start|>
    kept = gen(llm, max_tokens=3, logit_bias={special: 100.0}, skip_special_tokens=False).outputs[0]
    skipped = gen(llm, max_tokens=3, logit_bias={special: 100.0}).outputs[0]
    assert kept.token_ids == [special] * 3
    assert kept.text == "<|im_start|>" * 3 and skipped.text == ""


def test_allowed_token_ids_and_bad_words(llm):
    allowed = [500, 600, 700]
    out = gen(llm, max_tokens=6, temperature=1.0, seed=0, allowed_token_ids=allowed, ignore_eos=True).outputs[0]
    assert set(out.token_ids) <= set(allowed)
    greedy = gen(llm, max_tokens=6, ignore_eos=True).outputs[0]
    first_word = llm.get_tokenizer().decode(greedy.token_ids[:1]).strip()
    banned = gen(llm, max_tokens=6, ignore_eos=True, bad_words=[first_word]).outputs[0]
    assert banned.token_ids[0] != greedy.token_ids[0]


def test_penalties_change_greedy_output(llm):
    # A +30 bias makes token 500 win every step; penalties on output tokens must break that.
    biased = dict(max_tokens=16, ignore_eos=True, logit_bias={500: 30.0})
    assert gen(llm, **biased).outputs[0].token_ids == [500] * 16
    for kw in ({"repetition_penalty": 100.0}, {"frequency_penalty": 2.0}):
        out = gen(llm, **biased, **kw).outputs[0].token_ids
        assert out[0] == 500 and out != [500] * 16, kw
    # presence_penalty < 0 rewards tokens already generated: the output starts repeating.
    base = gen(llm, max_tokens=16, ignore_eos=True).outputs[0].token_ids
    rep = gen(llm, max_tokens=16, ignore_eos=True, presence_penalty=-2.0).outputs[0].token_ids
    assert rep != base and len(set(rep)) < len(set(base))


def test_logprobs_counts(llm):
    out = gen(llm, max_tokens=3, logprobs=4, prompt_logprobs=2, ignore_eos=True)
    assert all(len(d) in (4, 5) for d in out.outputs[0].logprobs) and len(out.outputs[0].logprobs) == 3
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    with pytest.raises(ValueError, match="max allowed"):
        gen(llm, max_tokens=1, logprobs=21)


def test_seed_example_custom_logits_processor(llm):
    """000_a659a1ee7bfb35cd.txt: a processor reading extra_args["target_token"] forces it for
    the requests that pass it and leaves the others in the same batch untouched."""
    plain = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    forced = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, extra_args={"target_token": 67})
    reference = llm.generate(["a b c", "x y z"], plain)
    outs = llm.generate(["a b c", "x y z"], [forced, plain])
    assert outs[0].outputs[0].token_ids == [67] * 5
    assert outs[1].outputs[0].token_ids == reference[1].outputs[0].token_ids
    with pytest.raises(ValueError, match="target_token"):
        llm.generate(["a"], SamplingParams(extra_args={"target_token": "not-an-int"}))
    # Nothing was queued by the rejected request.
    assert not llm.llm_engine.has_unfinished_requests()


def test_bad_requests_raise_before_queueing(llm):
    with pytest.raises(ValueError, match="priority"):
        llm.generate([PROMPT], SamplingParams(max_tokens=1), priority=[1])
    with pytest.raises(ValueError, match="context length|no room"):
        llm.generate([{"prompt_token_ids": [5] * 300}], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="out of vocab"):
        llm.generate([{"prompt_token_ids": [10**9]}], SamplingParams(max_tokens=1))
    assert not llm.llm_engine.has_unfinished_requests()


def test_chat_continue_final_message(llm):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=2, temperature=0), add_generation_prompt=False,
                   continue_final_message=True)[0]
    text = llm.get_tokenizer().decode(out.prompt_token_ids)
    assert text.endswith("Hello, I am")


def _reference_beam_search(llm, prompt_ids, width, steps):
    """Exhaustive-width reference with the same rules, from the engine's own logprobs."""
    beams = [(list(prompt_ids), 0.0)]
    for _ in range(steps):
        cands = []
        for toks, score in beams:
            out = llm.generate([{"prompt_token_ids": toks}],
                               SamplingParams(max_tokens=1, temperature=0, logprobs=2 * width, ignore_eos=True))[0]
            for t, lp in out.outputs[0].logprobs[0].items():
                cands.append((toks + [t], score + lp.logprob))
        cands.sort(key=lambda c: c[1], reverse=True)
        beams = cands[:width]
    return beams


def test_beam_search(llm):
    ids = llm.get_tokenizer().encode(PROMPT)
    res = llm.beam_search([{"prompt_token_ids": ids}], BeamSearchParams(beam_width=3, max_tokens=4,
                                                                      ignore_eos=True, length_penalty=0.0))[0]
    ref = _reference_beam_search(llm, ids, 3, 4)
    assert [s.tokens for s in res.sequences] == [t for t, _ in ref]
    greedy = gen(llm, max_tokens=4, ignore_eos=True, logprobs=0).outputs[0]
    assert res.sequences[0].cum_logprob >= greedy.cumulative_logprob - 1e-6
    outs = llm.generate([PROMPT], SamplingParams(use_beam_search=True, n=2, max_tokens=4, temperature=0,
                                                 ignore_eos=True))[0]
    assert len(outs.outputs) == 2 and outs.outputs[0].text
