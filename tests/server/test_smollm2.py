"""The real default model (SmolLM2-135M-Instruct, GGUF) behind ``lmserve serve`` with no
MODEL argument: a chat-tuned model gives checkable answers."""

from __future__ import annotations

import pytest

from tests.server.conftest import ServerProcess

NAME = "SmolLM2-135M-Instruct"
Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    server = ServerProcess(["--kv-cache-memory", "64MiB", "--disable-log-requests"],
                           str(tmp_path_factory.mktemp("logs") / "smollm2.log"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def smol_client(smol):
    from openai import OpenAI

    with OpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_default_model_name(smol_client):
    assert [m.id for m in smol_client.models.list().data] == [NAME]


def test_chat_answers_and_stream_agrees(smol_client):
    c = smol_client.chat.completions.create(model=NAME, messages=Q, max_tokens=24, temperature=0)
    assert "Paris" in c.choices[0].message.content and c.choices[0].finish_reason == "stop"
    chunks = list(smol_client.chat.completions.create(model=NAME, messages=Q, max_tokens=24, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == c.usage.completion_tokens


def test_stop_string_and_logprobs(smol_client):
    c = smol_client.chat.completions.create(model=NAME, messages=Q, max_tokens=24, temperature=0, stop=["Paris"],
                                            logprobs=True, top_logprobs=2)
    assert "Paris" not in c.choices[0].message.content and c.choices[0].stop_reason == "Paris"
    assert all(len(t.top_logprobs) == 2 for t in c.choices[0].logprobs.content)


def test_completion_echo_logprobs(smol_client):
    c = smol_client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=3, temperature=0,
                                       echo=True, logprobs=1)
    assert c.choices[0].text.startswith("The capital of France is")
    lp = c.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == c.usage.prompt_tokens + c.usage.completion_tokens


def test_unicode_stream(smol_client):
    msgs = [{"role": "user", "content": "Write the word 'café' and a smiley emoji."}]
    full = smol_client.chat.completions.create(model=NAME, messages=msgs, max_tokens=20, temperature=0)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in smol_client.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=20, temperature=0, stream=True) if ch.choices)
    assert streamed == full.choices[0].message.content and "\ufffd" not in streamed


def test_tokenize_matches_usage(smol, smol_client):
    import httpx

    count = httpx.post(smol.url + "/tokenize", json={"messages": Q}).json()["count"]
    c = smol_client.chat.completions.create(model=NAME, messages=Q, max_tokens=1)
    assert c.usage.prompt_tokens == count
