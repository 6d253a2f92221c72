"""/v1/chat/completions through the official openai client: each standard and extra field."""

from __future__ import annotations

import pytest

M = "tiny"
HI = [{"role": "user", "content": "Hello!"}]


def chat(client, messages=HI, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=M, messages=messages, **kw)


def test_basic_shape(client):
    c = chat(client, max_tokens=5)
    assert c.object == "chat.completion" and c.id.startswith("chatcmpl-")
    msg = c.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert c.usage.prompt_tokens_details.cached_tokens >= 0


def test_stream_chunks_order(client):
    full = chat(client, max_completion_tokens=8, extra_body={"ignore_eos": True})
    chunks = list(chat(client, max_completion_tokens=8, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [ch.choices[0].finish_reason for ch in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_stream_usage(client):
    chunks = list(chat(client, max_tokens=3, stream=True, stream_options={"include_usage": True},
                       extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    cont = list(chat(client, max_tokens=3, stream=True, extra_body={"ignore_eos": True},
                     stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(ch.usage is not None for ch in cont)


@pytest.mark.anyio
async def test_async_chat(async_client):
    c = await async_client.chat.completions.create(model=M, messages=HI, max_tokens=5, temperature=0)
    stream = await async_client.chat.completions.create(model=M, messages=HI, max_tokens=5, temperature=0,
                                                        stream=True)
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == c.choices[0].message.content


def test_n_choices(client):
    c = chat(client, n=3, max_tokens=4, temperature=1.0, seed=7)
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    chunks = list(chat(client, n=2, max_tokens=4, stream=True, temperature=1.0, seed=7))
    assert {ch.choices[0].index for ch in chunks} == {0, 1}
    finished = [ch.choices[0].index for ch in chunks if ch.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_logprobs(client):
    c = chat(client, max_tokens=4, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
    none = chat(client, max_tokens=2, logprobs=True)
    assert all(item.top_logprobs == [] for item in none.choices[0].logprobs.content)
    assert chat(client, max_tokens=2).choices[0].logprobs is None
    chunks = list(chat(client, max_tokens=3, logprobs=True, top_logprobs=1, stream=True,
                       extra_body={"ignore_eos": True}))
    streamed = [lp for ch in chunks if ch.choices[0].logprobs for lp in ch.choices[0].logprobs.content]
    assert len(streamed) == 3


def test_echo_and_response_role(client):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
    cont = chat(client, msgs, max_tokens=3, extra_body={"echo": True, "add_generation_prompt": False,
                                                         "continue_final_message": True})
    plain = chat(client, msgs, max_tokens=3, extra_body={"add_generation_prompt": False,
                                                          "continue_final_message": True})
    assert cont.choices[0].message.content == "Hello, I am" + plain.choices[0].message.content
    assert cont.choices[0].message.role == "assistant"
    stream = list(chat(client, msgs, max_tokens=3, stream=True,
                       extra_body={"echo": True, "add_generation_prompt": False, "continue_final_message": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == cont.choices[0].message.content


def test_prompt_text_and_token_ids(client, http):
    c = chat(client, max_tokens=3, extra_body={"return_prompt_text": True, "return_token_ids": True})
    extra = c.model_extra
    assert extra["prompt_text"] == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    ids = http.post("/tokenize", json={"messages": HI}).json()["tokens"]
    assert extra["prompt_token_ids"] == ids
    assert len(c.choices[0].model_extra["token_ids"]) == c.usage.completion_tokens
    chunks = list(chat(client, max_tokens=3, stream=True,
                       extra_body={"return_prompt_text": True, "return_token_ids": True}))
    assert chunks[0].model_extra["prompt_token_ids"] == ids and "prompt_text" in chunks[0].model_extra
    assert all("prompt_token_ids" not in (ch.model_extra or {}) for ch in chunks[1:])


def test_content_parts_equal_string(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}]
    assert chat(client, parts, max_tokens=4).choices[0].message.content == \
        chat(client, max_tokens=4).choices[0].message.content


def test_template_fields(client, http):
    tmpl = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ suffix }}"
    c = chat(client, max_tokens=2, extra_body={"chat_template": tmpl, "chat_template_kwargs": {"suffix": "!>"},
                                               "return_prompt_text": True})
    assert c.model_extra["prompt_text"] == "[user]Hello!!>"
    docs = chat(client, max_tokens=2, extra_body={"documents": [{"title": "t", "text": "x"}],
                                                  "return_prompt_text": True})
    assert docs.choices[0].finish_reason in ("stop", "length")
    sys_msg = [{"role": "system", "content": "Be brief."}, *HI]
    assert chat(client, sys_msg, max_tokens=2, extra_body={"add_special_tokens": True}).usage.prompt_tokens > 0


def test_tools_passed_to_template_with_tool_choice_none(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    c = chat(client, max_tokens=2, tools=tools, tool_choice="none", parallel_tool_calls=False)
    assert c.choices[0].message.tool_calls in (None, [])


def test_stop_and_seed(client):
    kw = dict(max_tokens=6, temperature=1.0, seed=99, stop=["\n\n"])
    assert chat(client, **kw).choices[0].message.content == chat(client, **kw).choices[0].message.content


def test_prompt_logprobs(client):
    c = chat(client, max_tokens=1, extra_body={"prompt_logprobs": 1})
    plp = c.model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == c.usage.prompt_tokens
