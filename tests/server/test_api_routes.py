"""The extra routes against a real ``lmserve serve`` of the tiny random model (garbage text,
real protocol): /v1/responses through the official openai client, /v1/messages through the
official anthropic client, batch chat, /tokenizer_info, the dev routes and sleep/wake."""

from __future__ import annotations

import json
import threading
import time

import httpx
import jsonschema
import pytest

from tests.server.conftest import API_KEY, API_STORE_ENTRIES

M = "tiny"


@pytest.fixture(scope="module")
def oai(api_server):
    from openai import OpenAI

    with OpenAI(base_url=api_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def claude(api_server):
    from anthropic import Anthropic

    with Anthropic(base_url=api_server.url, auth_token=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(api_server):
    with httpx.Client(base_url=api_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


# ---------------------------------------------------------------------- responses
def test_responses_create_and_retrieve(oai):
    r = oai.responses.create(model=M, input="Hello!", instructions="Be brief.", max_output_tokens=6,
                             temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "response" and r.id.startswith("resp_") and r.model == M
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 6 and r.usage.total_tokens == r.usage.input_tokens + 6
    assert r.instructions == "Be brief." and r.max_output_tokens == 6 and r.temperature == 0
    assert [o.type for o in r.output] == ["message"] and isinstance(r.output_text, str)
    got = oai.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    # greedy: the same request gives the same text
    again = oai.responses.create(model=M, input="Hello!", instructions="Be brief.", max_output_tokens=6,
                                 temperature=0, extra_body={"ignore_eos": True})
    assert again.output_text == r.output_text and again.id != r.id


def test_responses_stream_matches_non_stream(oai):
    kw = dict(model=M, input="Tell me", max_output_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    full = oai.responses.create(**kw)
    events = list(oai.responses.create(stream=True, **kw))
    types = [e.type for e in events]
    n_delta = types.count("response.output_text.delta")
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * n_delta,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"] and n_delta >= 1
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == full.output_text == events[-1].response.output_text
    with oai.responses.stream(**{k: v for k, v in kw.items()}) as s:
        for _ in s:
            pass
        assert s.get_final_response().output_text == full.output_text


def test_previous_response_id_chain(oai):
    first = oai.responses.create(model=M, input="One", max_output_tokens=3, temperature=0)
    second = oai.responses.create(model=M, input="Two", previous_response_id=first.id, max_output_tokens=3,
                                  temperature=0)
    third = oai.responses.create(model=M, input="Three", previous_response_id=second.id, max_output_tokens=3,
                                 temperature=0)
    assert third.previous_response_id == second.id
    assert first.usage.input_tokens < second.usage.input_tokens < third.usage.input_tokens
    unstored = oai.responses.create(model=M, input="x", max_output_tokens=2, store=False)
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        oai.responses.retrieve(unstored.id)
    with pytest.raises(NotFoundError):
        oai.responses.create(model=M, input="x", previous_response_id="resp_missing")


def test_store_evicts_least_recently_used(oai):
    from openai import NotFoundError

    ids = [oai.responses.create(model=M, input=f"n{i}", max_output_tokens=1).id for i in range(API_STORE_ENTRIES)]
    oai.responses.retrieve(ids[0])  # now the most recently used
    oai.responses.create(model=M, input="one more", max_output_tokens=1)
    oai.responses.retrieve(ids[0])
    with pytest.raises(NotFoundError):
        oai.responses.retrieve(ids[1])


def test_background_cancel(oai):
    r = oai.responses.create(model=M, input="long", background=True, max_output_tokens=400,
                             extra_body={"ignore_eos": True})
    assert r.status == "queued" and r.background is True
    cancelled = oai.responses.cancel(r.id)
    assert cancelled.status == "cancelled" and oai.responses.retrieve(r.id).status == "cancelled"
    from openai import BadRequestError

    done = oai.responses.create(model=M, input="short", max_output_tokens=1)
    with pytest.raises(BadRequestError, match="synchronous"):
        oai.responses.cancel(done.id)
    b = oai.responses.create(model=M, input="bg", background=True, max_output_tokens=3)
    for _ in range(200):
        got = oai.responses.retrieve(b.id)
        if got.status == "completed" or got.status == "incomplete":
            break
        time.sleep(0.05)
    assert got.status in ("completed", "incomplete") and got.usage.output_tokens >= 1


def test_responses_refusals(oai):
    from openai import BadRequestError

    for kw, param in ((dict(text={"format": {"type": "json_schema", "name": "x"}}), "text.format.schema"),
                      (dict(text={"format": {"type": "json_object"}},
                            extra_body={"structured_outputs": {"regex": "a"}}), "structured_outputs"),
                      (dict(tools=[{"type": "web_search_preview"}]), "tools.0"),
                      (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
                       "input.0.content.0"),
                      (dict(tool_choice="required", tools=[{"type": "function", "name": "f"}]), "tool_choice"),
                      (dict(reasoning={"summary": "auto"}), "reasoning.summary")):
        with pytest.raises(BadRequestError) as e:
            oai.responses.create(**{"model": M, "input": "x", "max_output_tokens": 2, **kw})
        assert e.value.body["param"] == param, e.value.body


SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "n": {"enum": [1, 2, 3]}},
          "required": ["kind", "n"], "additionalProperties": False}


def test_responses_json_schema(oai):
    """A random model at temperature 1 obeys only if text.format is enforced."""
    fmt = {"type": "json_schema", "name": "pet", "schema": SCHEMA, "strict": True}
    for seed in range(3):
        r = oai.responses.create(model=M, input="A pet?", text={"format": fmt}, temperature=1.0,
                                 max_output_tokens=40, extra_body={"seed": seed})
        assert r.status == "completed" and r.text.format.type == "json_schema"
        jsonschema.validate(json.loads(r.output_text), SCHEMA)


# ---------------------------------------------------------------------- anthropic
def test_messages_create_and_stream(claude):
    msgs = [{"role": "user", "content": "Hello"}]
    m = claude.messages.create(model=M, max_tokens=5, system="Be brief.", messages=msgs,
                               extra_body={"temperature": 0})
    assert m.type == "message" and m.role == "assistant" and m.model == M
    assert m.stop_reason in ("max_tokens", "end_turn") and m.content[0].type == "text"
    assert m.usage.output_tokens <= 5 and m.usage.input_tokens > 0
    with claude.messages.stream(model=M, max_tokens=5, system="Be brief.", messages=msgs,
                               extra_body={"temperature": 0}) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert final.content[0].text == m.content[0].text and final.stop_reason == m.stop_reason
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    count = claude.messages.count_tokens(model=M, system="Be brief.", messages=msgs)
    assert count.input_tokens == m.usage.input_tokens


def test_messages_output_format(claude):
    m = claude.messages.create(model=M, max_tokens=40, messages=[{"role": "user", "content": "A pet?"}],
                               output_config={"format": {"type": "json_schema", "schema": SCHEMA}},
                               extra_body={"temperature": 1.0})
    assert m.stop_reason == "end_turn"
    jsonschema.validate(json.loads(m.content[0].text), SCHEMA)


# ---------------------------------------------------------------------- batch, tokenizer info
def test_batch_chat(http, oai):
    convs = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "bb"}]]
    r = http.post("/v1/chat/completions/batch", json={"model": M, "messages": convs, "max_tokens": 4,
                                                      "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and [c["index"] for c in body["choices"]] == [0, 1]
    for i, conv in enumerate(convs):
        one = oai.chat.completions.create(model=M, messages=conv, max_tokens=4, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert body["choices"][i]["message"]["content"] == one.choices[0].message.content
    assert body["usage"]["completion_tokens"] == 8
    for bad, param in (({"stream": True}, "stream"), ({"n": 2}, "n"), ({"messages": []}, "messages")):
        r = http.post("/v1/chat/completions/batch", json={"model": M, "messages": convs, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_tokenizer_info(http, tiny_model_dir):
    from transformers import AutoTokenizer

    info = http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == type(AutoTokenizer.from_pretrained(tiny_model_dir)).__name__
    assert info["eos_token"] == "<|im_end|>" and info["bos_token"] == "<|im_start|>"
    assert not any(k in info for k in ("vocab_file", "merges_file", "tokenizer_file"))


# ---------------------------------------------------------------------- dev routes
def test_dev_routes_and_sleep(http):
    assert http.post("/reset_prefix_cache").json() == {"success": True}
    assert http.post("/reset_mm_cache").status_code == 200 and http.post("/reset_encoder_cache").status_code == 200
    assert http.post("/collective_rpc", json={"method": "x"}).status_code == 400
    info = http.get("/server_info").json()
    as_json = http.get("/server_info", params={"config_format": "json"}).json()["vllm_config"]
    assert as_json["scheduler_config"]["max_num_seqs"] == 16 and isinstance(info["vllm_config"], str)
    assert set(info) == {"vllm_config", "vllm_env", "system_env"} and "VLLM_SERVER_DEV_MODE" in info["vllm_env"]
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}
    assert http.post("/sleep", params={"level": 2}).status_code == 400
    # a running request is aborted by sleep (streamed, so it is surely running when sleep comes)
    body = {"model": M, "prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert http.post("/sleep", params={"level": 1}).json() == {"status": "sleeping", "level": 1}
        rest = [line for line in lines if line.startswith("data: ")]
    assert any("put to sleep" in line for line in rest) and rest[-1] == "data: [DONE]"
    assert http.get("/is_sleeping").json() == {"is_sleeping": True}
    # a request sent while asleep waits, and runs after wake_up
    done: dict = {}
    t = threading.Thread(target=lambda: done.setdefault("r", http.post(
        "/v1/completions", json={"model": M, "prompt": "hi", "max_tokens": 3})))
    t.start()
    time.sleep(0.5)
    assert "r" not in done
    assert http.post("/wake_up", params={"tags": "weights"}).json() == {"status": "sleeping", "tags": ["weights"]}
    assert http.post("/wake_up").json() == {"status": "awake", "tags": None}
    t.join(60)
    assert done["r"].status_code == 200 and done["r"].json()["usage"]["completion_tokens"] >= 1
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}
