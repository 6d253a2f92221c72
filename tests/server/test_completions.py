"""/v1/completions through the official openai client: each standard and extra field."""

from __future__ import annotations

import asyncio

import pytest

M = "tiny"


def greedy(client, prompt, **kw):
    return client.completions.create(model=M, prompt=prompt, temperature=0, **kw)


def test_basic_shape_and_usage(client):
    c = greedy(client, "Hello", max_tokens=5)
    assert c.object == "text_completion" and c.id.startswith("cmpl-")
    assert len(c.choices) == 1 and c.choices[0].index == 0
    assert c.choices[0].finish_reason in ("length", "stop")
    u = c.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens <= 5
    assert u.prompt_tokens_details.cached_tokens >= 0  # --enable-prompt-tokens-details


def test_default_max_tokens_is_16(client):
    c = greedy(client, "Hello", extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 16


def test_streaming_equals_non_streaming(client):
    full = greedy(client, "The quick brown", max_tokens=12, extra_body={"ignore_eos": True})
    chunks = list(greedy(client, "The quick brown", max_tokens=12, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.usage is None for ch in chunks)


def test_stream_usage_options(client):
    chunks = list(greedy(client, "Hi", max_tokens=4, stream=True, stream_options={"include_usage": True},
                         extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(ch.usage is None for ch in chunks[:-1])
    chunks = list(greedy(client, "Hi", max_tokens=4, stream=True, extra_body={"ignore_eos": True},
                         stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(ch.usage is not None for ch in chunks)
    assert [ch.usage.completion_tokens for ch in chunks[:-1]] == sorted(ch.usage.completion_tokens for ch in chunks[:-1])


@pytest.mark.anyio
async def test_async_client(async_client):
    c = await async_client.completions.create(model=M, prompt="Hello", max_tokens=4, temperature=0)
    stream = await async_client.completions.create(model=M, prompt="Hello", max_tokens=4, temperature=0,
                                                   stream=True)
    text = "".join([ch.choices[0].text async for ch in stream if ch.choices])
    assert text == c.choices[0].text


def test_batched_prompts_and_n(client):
    prompts = ["Hello", "Paris is"]
    c = client.completions.create(model=M, prompt=prompts, n=2, max_tokens=3, temperature=0.8, seed=1)
    assert sorted(ch.index for ch in c.choices) == [0, 1, 2, 3]
    singles = [greedy(client, p, max_tokens=3).choices[0].text for p in prompts]
    greedy_batch = greedy(client, prompts, max_tokens=3)
    assert [ch.text for ch in sorted(greedy_batch.choices, key=lambda x: x.index)] == singles
    assert c.usage.prompt_tokens == greedy_batch.usage.prompt_tokens


def test_token_id_prompts(client, http):
    ids = http.post("/tokenize", json={"prompt": "Hello"}).json()["tokens"]
    by_text = greedy(client, "Hello", max_tokens=4)
    by_ids = greedy(client, ids, max_tokens=4)
    batch = greedy(client, [ids, ids], max_tokens=4)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert [ch.text for ch in batch.choices] == [by_text.choices[0].text] * 2


def test_echo(client):
    c = greedy(client, "Hello there", max_tokens=3, echo=True)
    plain = greedy(client, "Hello there", max_tokens=3)
    assert c.choices[0].text == "Hello there" + plain.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in greedy(client, "Hello there", max_tokens=3, echo=True,
                                                             stream=True) if ch.choices)
    assert streamed == c.choices[0].text


def test_logprobs_shape(client):
    c = greedy(client, "Hello", max_tokens=4, logprobs=3, extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == c.choices[0].text or len("".join(lp.tokens)) >= len(c.choices[0].text)
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(val)  # greedy: the chosen token is the best
    assert lp.text_offset == sorted(lp.text_offset)
    echo = greedy(client, "Hello", max_tokens=2, logprobs=1, echo=True)
    elp = echo.choices[0].logprobs
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert len(elp.tokens) == echo.usage.prompt_tokens + echo.usage.completion_tokens


def test_prompt_logprobs_and_token_ids(client):
    c = greedy(client, "Hello world", max_tokens=2,
               extra_body={"prompt_logprobs": 2, "return_token_ids": True})
    ch = c.choices[0].model_extra
    assert len(ch["prompt_token_ids"]) == c.usage.prompt_tokens
    assert len(ch["token_ids"]) == c.usage.completion_tokens
    plp = ch["prompt_logprobs"]
    assert plp[0] is None and len(plp) == c.usage.prompt_tokens
    assert all(str(t) in d for t, d in zip(ch["prompt_token_ids"][1:], plp[1:]))
    chunks = list(greedy(client, "Hello world", max_tokens=3, stream=True, extra_body={"return_token_ids": True}))
    assert chunks[0].choices[0].model_extra["prompt_token_ids"] == ch["prompt_token_ids"]
    assert all("prompt_token_ids" not in (x.choices[0].model_extra or {}) for x in chunks[1:])


def test_return_tokens_as_token_ids(client):
    c = greedy(client, "Hi", max_tokens=3, logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    assert all(t.startswith("token_id:") for t in c.choices[0].logprobs.tokens)


def test_stop_strings_and_stop_token_ids(client):
    base = greedy(client, "one two", max_tokens=12, extra_body={"ignore_eos": True, "return_token_ids": True})
    text = base.choices[0].text
    ids = base.choices[0].model_extra["token_ids"]
    letters = [ch for ch in text[1:] if ch.isascii() and ch.isalpha()]
    assert letters, text
    stop = letters[0]
    c = greedy(client, "one two", max_tokens=12, stop=[stop], extra_body={"ignore_eos": True})
    assert c.choices[0].text == text[: text.index(stop)] and c.choices[0].finish_reason == "stop"
    assert c.choices[0].stop_reason == stop
    inc = greedy(client, "one two", max_tokens=12, stop=stop,
                 extra_body={"include_stop_str_in_output": True, "ignore_eos": True})
    assert inc.choices[0].text == text[: text.index(stop) + 1]
    streamed = "".join(ch.choices[0].text for ch in greedy(client, "one two", max_tokens=12, stop=[stop],
                                                             stream=True, extra_body={"ignore_eos": True}))
    assert streamed == c.choices[0].text
    c = greedy(client, "one two", max_tokens=12, extra_body={"stop_token_ids": [ids[3]], "ignore_eos": True})
    assert c.choices[0].finish_reason == "stop" and c.choices[0].stop_reason == ids[3]
    assert c.usage.completion_tokens == ids.index(ids[3]) + 1


def test_seed_is_reproducible(client):
    kw = dict(model=M, prompt="Hello", max_tokens=8, temperature=1.0, seed=1234)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text


def test_sampling_extras_accepted_and_effective(client, http):
    vocab = http.post("/tokenize", json={"prompt": " six"}).json()["tokens"]
    c = client.completions.create(model=M, prompt="Hello", max_tokens=6, temperature=0.7, top_p=0.9,
                                  presence_penalty=0.5, frequency_penalty=0.5, user="u1",
                                  extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2,
                                              "min_tokens": 6, "ignore_eos": True, "allowed_token_ids": vocab,
                                              "return_token_ids": True, "cache_salt": "s3cr3t",
                                              "vllm_xargs": {"foo": "bar", "n": 2}, "priority": 0,
                                              "skip_special_tokens": False, "spaces_between_special_tokens": True,
                                              "bad_words": ["zzz"], "length_penalty": 1.0,
                                              "kv_transfer_params": None,
                                              "repetition_detection": {"max_pattern_size": 0}})
    assert c.usage.completion_tokens == 6
    assert set(c.choices[0].model_extra["token_ids"]) <= set(vocab)


def test_logit_bias_and_truncation(client, http):
    target = http.post("/tokenize", json={"prompt": " six"}).json()["tokens"][0]
    c = greedy(client, "Hello", max_tokens=4, logit_bias={str(target): 100}, extra_body={"return_token_ids": True})
    assert c.choices[0].model_extra["token_ids"] == [target] * 4
    long = "one two three four five six seven eight nine ten"
    t = greedy(client, long, max_tokens=1, extra_body={"truncate_prompt_tokens": 3})
    assert t.usage.prompt_tokens == 3


def test_generation_uses_max_context(client):
    # No max_tokens and ignore_eos: the completion fills the context (prompt + completion == 512).
    c = client.chat.completions.create(model=M, messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                       extra_body={"ignore_eos": True})
    assert c.usage.total_tokens == 512 and c.choices[0].finish_reason == "length"


@pytest.mark.anyio
async def test_many_async_requests_do_not_mix(async_client):
    prompts = [f"{w} is" for w in ("Paris", "Berlin", "one", "two", "Hello", "The")]
    singles = [(await async_client.completions.create(model=M, prompt=p, max_tokens=6, temperature=0))
               .choices[0].text for p in prompts]
    together = await asyncio.gather(*[async_client.completions.create(model=M, prompt=p, max_tokens=6,
                                                                      temperature=0) for p in prompts])
    assert [c.choices[0].text for c in together] == singles


def test_beam_search(client, tiny_model_dir):
    c = client.completions.create(model=M, prompt="Hello", n=2, max_tokens=4,
                                  extra_body={"use_beam_search": True, "ignore_eos": True})
    assert [ch.index for ch in c.choices] == [0, 1] and c.choices[0].text != c.choices[1].text
    stream = list(client.completions.create(model=M, prompt="Hello", n=2, max_tokens=4, stream=True,
                                            extra_body={"use_beam_search": True, "ignore_eos": True}))
    by_index = {}
    for ch in stream:
        for choice in ch.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + choice.text
    assert [by_index[0], by_index[1]] == [ch.text for ch in c.choices]
    chat = client.chat.completions.create(model=M, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=3,
                                          extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2
