"""vLLM 0.32 request semantics over HTTP (the openai client): whole-vocabulary logprobs (-1)
under ``--max-logprobs -1``, ``logprob_token_ids``, one 400 for every bad ``logit_bias`` entry,
``kv_transfer_params``, ``--root-path``, and ``--skip-tokenizer-init`` with token-id prompts."""

from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.slow  # two server start-ups (~20 s each on a loaded 2-core machine)

KEY = "k-sem"
MSG = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    log = str(tmp_path_factory.mktemp("logs") / "semantics.log")
    s = ServerProcess([tiny_model_dir, "--served-model-name", "tiny", "--max-logprobs", "-1", "--root-path",
                       "/proxy", "--api-key", KEY, "--kv-cache-memory", "32MiB", "--dtype", "float32"], log)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def vocab(client) -> int:
    """The vocabulary size, as the number of whole-vocabulary entries (token_id:N keys are unique)."""
    c = client.completions.create(model="tiny", prompt="a", max_tokens=1, logprobs=-1,
                                  extra_body={"return_tokens_as_token_ids": True})
    return len(c.choices[0].logprobs.top_logprobs[0])


def test_chat_top_logprobs_whole_vocabulary(client, vocab):
    assert vocab > 256  # the tiny tokenizer's vocabulary, every id once
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=-1)
    for entry in r.choices[0].logprobs.content:
        tops = entry.top_logprobs
        assert len(tops) == vocab
        values = [t.logprob for t in tops]
        assert values == sorted(values, reverse=True)
        assert math.isclose(sum(math.exp(v) for v in values), 1.0, rel_tol=1e-3)
        assert entry.logprob in values
    top5 = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, temperature=0, logprobs=True,
                                          top_logprobs=5)
    for small, full in zip(top5.choices[0].logprobs.content, r.choices[0].logprobs.content):
        assert [t.token for t in small.top_logprobs] == [t.token for t in full.top_logprobs[:5]]
        assert [t.logprob for t in small.top_logprobs] == pytest.approx([t.logprob for t in full.top_logprobs[:5]],
                                                                         abs=1e-4)  # prefix-cache numerics


def test_completion_prompt_logprobs_whole_vocabulary(client, vocab):
    c = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=1, temperature=0,
                                  extra_body={"prompt_logprobs": -1})
    plps = c.choices[0].model_extra["prompt_logprobs"]
    assert plps[0] is None and all(len(p) == vocab for p in plps[1:])
    ranks = sorted(e["rank"] for e in plps[1].values())
    assert ranks[0] == 1


def test_logprob_token_ids(client):
    wanted = [40, 7, 300]
    c = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, logprobs=3,
                                  extra_body={"logprob_token_ids": wanted, "return_tokens_as_token_ids": True,
                                              "return_token_ids": True})
    full = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, logprobs=-1,
                                     extra_body={"return_tokens_as_token_ids": True})
    sampled = c.choices[0].model_extra["token_ids"]
    for tok, top, ref in zip(sampled, c.choices[0].logprobs.top_logprobs, full.choices[0].logprobs.top_logprobs):
        keys = list(top)
        assert keys[0] == f"token_id:{tok}"
        assert keys[1:] == [f"token_id:{t}" for t in wanted if t != tok]
        for k, v in top.items():
            assert v == pytest.approx(ref[k], abs=1e-5)
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2, temperature=0, logprobs=True,
                                       extra_body={"logprob_token_ids": wanted, "return_tokens_as_token_ids": True})
    for entry in r.choices[0].logprobs.content:
        names = [t.token for t in entry.top_logprobs]
        assert names[0] == entry.token and names[1:] == [f"token_id:{t}" for t in wanted
                                                          if f"token_id:{t}" != entry.token]


@pytest.mark.parametrize("body, param, words", [
    ({"logprob_token_ids": [1, 2]}, "logprob_token_ids", "`logprobs` must be set"),
    ({"logprobs": 1, "logprob_token_ids": [10**7]}, "logprob_token_ids", "out-of-vocab"),
    ({"logprobs": 1, "logprob_token_ids": list(range(129))}, "logprob_token_ids", "max allowed: 128"),
    ({"logprobs": -2}, "logprobs", "-1"),
    ({"logit_bias": {"abc": 1, "99999": 1, "5": 300, "6": 1, " x": 2}}, "logit_bias",
     "['abc', ' x']|[99999]|{'5': 300"),
])
def test_bad_requests(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body=body)
    err = e.value.body
    assert err["param"] == param
    for w in words.split("|"):
        assert w in err["message"], err["message"]


def test_chat_top_logprobs_rules(client):
    with pytest.raises(openai.BadRequestError, match="`logprobs` must be set to true"):
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=1, top_logprobs=-1)
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=1, top_logprobs=None, logprobs=True)
    assert r.choices[0].logprobs.content[0].top_logprobs == []  # null is 0, as vLLM


def test_kv_transfer_params_null_without_connector(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200 and "kv_transfer_params" in r.json() and r.json()["kv_transfer_params"] is None
    chat = {"model": "tiny", "messages": MSG, "max_tokens": 2, "kv_transfer_params": {"do_remote_prefill": True}}
    r = httpx.post(server.url + "/v1/chat/completions", json=chat, headers=headers, timeout=60)
    assert r.status_code == 200 and r.json()["kv_transfer_params"] is None


def test_root_path(server, client):
    """Behind a proxy that strips /proxy: routes answer at the stripped path, the docs point at
    /proxy/openapi.json, and the unauthenticated routes stay open."""
    assert client.models.list().data[0].id == "tiny"
    docs = httpx.get(server.url + "/docs", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert docs.status_code == 200 and "/proxy/openapi.json" in docs.text
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


# ---------------------------------------------------------------------- --skip-tokenizer-init
@pytest.fixture(scope="module")
def no_tok(tiny_model_dir, tmp_path_factory) -> Iterator[openai.OpenAI]:
    log = str(tmp_path_factory.mktemp("logs") / "skip-tokenizer.log")
    s = ServerProcess([tiny_model_dir, "--served-model-name", "tiny", "--skip-tokenizer-init",
                       "--kv-cache-memory", "32MiB", "--dtype", "float32"], log)
    try:
        s.wait_ready()
        with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
            yield c
    finally:
        s.stop()


def test_skip_tokenizer_init_token_ids(no_tok, client):
    prompt = [5, 6, 7, 8]
    c = no_tok.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    choice = c.choices[0]
    assert choice.text == "" and choice.model_extra["prompt_token_ids"] == prompt
    ids = choice.model_extra["token_ids"]
    ref = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert ids == ref.choices[0].model_extra["token_ids"]  # same model, same greedy tokens
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in ids]
    stream = no_tok.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, stream=True)
    assert [t for chunk in stream for t in chunk.choices[0].model_extra.get("token_ids") or []] == ids


@pytest.mark.parametrize("call, param", [
    (lambda c: c.completions.create(model="tiny", prompt="text", max_tokens=2), "prompt"),
    (lambda c: c.completions.create(model="tiny", prompt=[5, 6], max_tokens=2, stop=["x"]), "stop"),
    (lambda c: c.completions.create(model="tiny", prompt=[5, 6], max_tokens=2, echo=True), "echo"),
    (lambda c: c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2), "messages"),
])
def test_skip_tokenizer_init_refusals(no_tok, call, param):
    with pytest.raises(openai.BadRequestError) as e:
        call(no_tok)
    assert e.value.body["param"] == param and "--skip-tokenizer-init" in e.value.body["message"]
