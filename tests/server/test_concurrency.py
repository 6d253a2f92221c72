"""Disconnects free their requests; 32 concurrent streams agree with non-streaming output
and with the offline API."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.server.conftest import metric_value

PROMPTS = [f"{w} {i}" for i, w in enumerate(["Hello", "Paris is", "one two", "The quick", "def main",
                                             "Berlin", "Les élèves", "seven eight"] * 4)]


def _wait_idle(http, aborts_before: float, want_aborts: int, timeout: float = 20.0) -> str:
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline:
        text = http.get("/metrics").text
        aborted = _aborts(text) - aborts_before
        if metric_value(text, "vllm:num_requests_running") == 0 and \
                metric_value(text, "vllm:num_requests_waiting") == 0 and aborted >= want_aborts:
            return text
        time.sleep(0.1)
    raise AssertionError(f"requests still running after the disconnect:\n{text}")


def _aborts(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("vllm:request_success_total") and 'finished_reason="abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_stream_disconnect_frees_the_request(http, tiny_server):
    before = _aborts(http.get("/metrics").text)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 480, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=tiny_server.url, headers=http.headers, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert got[0].startswith("data: ")
        # leaving the block closes the connection mid-stream
    text = _wait_idle(http, before, 1)
    assert metric_value(text, "vllm:kv_cache_usage_perc") < 0.05
    assert http.get("/load").json()["server_load"] == 0


def test_non_streaming_disconnect_frees_the_request(http, tiny_server):
    before = _aborts(http.get("/metrics").text)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 480, "ignore_eos": True, "n": 4,
            "temperature": 1.0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server.url + "/v1/completions", json=body, headers=http.headers, timeout=0.3)
    _wait_idle(http, before, 1)


@pytest.mark.anyio
async def test_32_concurrent_streams_equal_non_streaming(async_client, client):
    kw = dict(model="tiny", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    expected = [client.completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS]

    async def stream_one(p: str) -> str:
        s = await async_client.completions.create(prompt=p, stream=True, **kw)
        return "".join([ch.choices[0].text async for ch in s if ch.choices])

    got = await asyncio.gather(*[stream_one(p) for p in PROMPTS])
    assert len(PROMPTS) == 32
    assert list(got) == expected

    async def chat_one(p: str) -> str:
        s = await async_client.chat.completions.create(messages=[{"role": "user", "content": p}], stream=True,
                                                       **kw)
        return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

    chats = await asyncio.gather(*[chat_one(p) for p in PROMPTS])
    singles = [client.chat.completions.create(messages=[{"role": "user", "content": p}], **kw)
               .choices[0].message.content for p in PROMPTS[:4]]
    assert list(chats[:4]) == singles


def test_server_equals_offline_api(client, tiny_model_dir):
    from lmserve.entrypoints.llm import LLM
    from lmserve.sampling_params import BeamSearchParams, SamplingParams

    llm = LLM(tiny_model_dir, dtype="float32", kv_cache_memory="8MiB")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    offline = [o.outputs[0].text for o in llm.generate(PROMPTS[:8], params)]
    online = client.completions.create(model="tiny", prompt=PROMPTS[:8], temperature=0, max_tokens=12,
                                       extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(online.choices, key=lambda c: c.index)] == offline
    chat_off = llm.chat([{"role": "user", "content": "Hello!"}], SamplingParams(temperature=0, max_tokens=8))
    chat_on = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello!"}],
                                             temperature=0, max_tokens=8)
    assert chat_on.choices[0].message.content == chat_off[0].outputs[0].text
    beams_off = llm.beam_search(["Hello"], BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True))
    beams_on = client.completions.create(model="tiny", prompt="Hello", n=2, max_tokens=4,
                                         extra_body={"use_beam_search": True, "ignore_eos": True})
    assert [c.text for c in beams_on.choices] == [s.text for s in beams_off[0].sequences]
