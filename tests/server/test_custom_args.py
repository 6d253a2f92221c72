"""Seed 000's custom arguments end to end: ``vllm_xargs`` in a raw JSON body (the curl
example) and through the OpenAI SDK's ``extra_body`` reach ``SamplingParams.extra_args``
of a ``--logits-processors`` processor; its ``validate_params`` makes bad values a 400."""

from __future__ import annotations

import pytest


def _target(http) -> int:
    return http.post("/tokenize", json={"prompt": " six"}).json()["tokens"][0]


def test_raw_json_like_curl(http):
    t = _target(http)
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 5,
                                           "return_token_ids": True, "vllm_xargs": {"target_token": t}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == [t] * 5


@pytest.mark.anyio
async def test_extra_body_async(async_client, http):
    t = _target(http)
    batch = await async_client.completions.create(model="tiny", prompt=["Hello", "Paris"], max_tokens=4,
                                                  extra_body={"vllm_xargs": {"target_token": t},
                                                              "return_token_ids": True})
    assert [c.model_extra["token_ids"] for c in batch.choices] == [[t] * 4] * 2
    chat = await async_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                      max_tokens=3, stream=True,
                                                      extra_body={"vllm_xargs": {"target_token": t},
                                                                  "return_token_ids": True})
    ids = [i async for ch in chat if ch.choices for i in (ch.choices[0].model_extra or {}).get("token_ids", [])]
    assert ids == [t] * 3


def test_requests_without_the_argument_are_untouched(client):
    plain = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                      extra_body={"return_token_ids": True})
    assert len(set(plain.choices[0].model_extra["token_ids"])) > 1


@pytest.mark.parametrize("stream", [False, True])
def test_validate_params_makes_a_400(http, stream):
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 5, "stream": stream,
                                           "vllm_xargs": {"target_token": "not-an-int"}})
    assert r.status_code == 400, r.text
    assert "target_token value 'not-an-int' is not int" in r.json()["error"]["message"]
