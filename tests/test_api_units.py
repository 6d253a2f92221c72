"""Units of the extra APIs: the bounded response store, the tool-call extraction seam, the
Responses input and Anthropic message translations, and the dev-mode gate."""

from __future__ import annotations

import json

import pytest

from lmserve.entrypoints.anthropic.protocol import AnthropicMessagesRequest
from lmserve.entrypoints.api_routes import dev_mode_enabled
from lmserve.entrypoints.openai.responses.protocol import ResponsesRequest
from lmserve.entrypoints.openai.responses.store import ResponseStore
from lmserve.entrypoints.tool_call_extraction import extract_tool_calls
from lmserve.errors import InvalidRequestError

NAMES = frozenset({"get_weather", "add"})


# ---------------------------------------------------------------------- store
def test_store_lru_by_entries():
    store = ResponseStore(max_entries=2, max_bytes=10**6)
    store.put("a", {"id": "a"}, [])
    store.put("b", {"id": "b"}, [])
    assert store.get("a") is not None  # a is now the most recent
    store.put("c", {"id": "c"}, [])
    assert "b" not in store and "a" in store and "c" in store and len(store) == 2


def test_store_lru_by_bytes():
    blob = "x" * 400
    store = ResponseStore(max_entries=100, max_bytes=1000)
    for rid in ("a", "b", "c"):
        assert store.put(rid, {"t": blob}, [])
    assert "a" not in store and "b" in store and "c" in store
    assert store.bytes_used <= 1000
    assert store.bytes_used == sum(store.get(r).size for r in ("b", "c"))
    assert not store.put("huge", {"t": "y" * 2000}, []) and "huge" not in store
    store.put("b", {"t": ""}, [])  # replacing an entry re-counts it
    assert store.bytes_used == store.get("b").size + store.get("c").size


def test_store_disabled():
    store = ResponseStore(max_entries=0)
    assert not store.enabled and not store.put("a", {}, []) and store.get("a") is None
    with pytest.raises(ValueError):
        ResponseStore(max_entries=-1)


# ---------------------------------------------------------------------- tool calls
def test_hermes_and_json_calls():
    text = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' \
           '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
    out = extract_tool_calls(text, NAMES)
    assert out.content == "Sure." and [c.name for c in out.calls] == ["get_weather", "add"]
    assert json.loads(out.calls[1].arguments) == {"a": 1} and out.calls[0].call_id != out.calls[1].call_id
    out = extract_tool_calls(' {"name": "add", "parameters": {"a": 2}} ', NAMES)
    assert out.content == "" and json.loads(out.calls[0].arguments) == {"a": 2}
    out = extract_tool_calls('[{"name": "add", "arguments": {}}, {"name": "get_weather", "arguments": {}}]', NAMES)
    assert len(out.calls) == 2


@pytest.mark.parametrize("text", ['{"name": "unknown", "arguments": {}}', '{"answer": 42}', "plain text",
                                  "<tool_call>{not json}</tool_call>", '{"name": "add", "arguments": [1]}'])
def test_not_calls_stay_text(text):
    out = extract_tool_calls(text, NAMES)
    assert out.calls == () and out.content == text
    assert extract_tool_calls('{"name": "add", "arguments": {}}', frozenset()).calls == ()


# ---------------------------------------------------------------------- responses input
def test_responses_input_items():
    r = ResponsesRequest(input=[
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]},
        {"type": "function_call", "call_id": "c1", "name": "add", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "add", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "1"}])
    msgs = r.input_messages()
    assert msgs[0] == {"role": "system", "content": "rules"} and msgs[1] == {"role": "user", "content": "q"}
    assert [c["id"] for c in msgs[2]["tool_calls"]] == ["c1", "c2"]  # consecutive calls: one assistant turn
    assert msgs[3] == {"role": "tool", "tool_call_id": "c1", "content": "1"}
    assert ResponsesRequest(input="hi").input_messages() == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("item,param", [({"type": "reasoning", "summary": []}, "input.0.type"),
                                        ({"type": "function_call", "name": "f", "arguments": "{}"},
                                         "input.0.call_id"),
                                        ({"role": "tool", "content": "x"}, "input.0.role")])
def test_responses_bad_items(item, param):
    with pytest.raises(InvalidRequestError) as e:
        ResponsesRequest(input=[item]).input_messages()
    assert e.value.param == param


def test_responses_sampling_fields_reach_chat():
    chat = ResponsesRequest(input="x", max_output_tokens=7, temperature=0.5, top_p=0.9,
                            stop=["END"]).to_chat_request([{"role": "user", "content": "x"}], [])
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.stop) == (7, 0.5, 0.9, ["END"])


# ---------------------------------------------------------------------- anthropic
def test_anthropic_translation():
    req = AnthropicMessagesRequest(model="m", max_tokens=5, system=[{"type": "text", "text": "S"}],
                                   stop_sequences=["X"], tools=[{"name": "add", "input_schema": {}}],
                                   messages=[{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": [
                                                 {"type": "text", "text": "calling"},
                                                 {"type": "tool_use", "id": "t1", "name": "add", "input": {"a": 1}}]},
                                             {"role": "user", "content": [
                                                 {"type": "tool_result", "tool_use_id": "t1", "content": "2"}]}])
    chat = req.to_chat_request("msg_1", None)
    msgs = chat.template_messages()
    assert msgs[0] == {"role": "system", "content": "S"} and msgs[2]["content"] == "calling"
    assert json.loads(msgs[2]["tool_calls"][0]["function"]["arguments"]) == {"a": 1}
    assert msgs[3] == {"role": "tool", "tool_call_id": "t1", "content": "2"} and len(msgs) == 4
    assert chat.stop == ["X"] and chat.max_tokens == 5
    assert chat.tools[0]["function"]["parameters"] == {"type": "object"}


def test_dev_mode_gate():
    assert dev_mode_enabled({"VLLM_SERVER_DEV_MODE": "1"}) and not dev_mode_enabled({})
    assert not dev_mode_enabled({"VLLM_SERVER_DEV_MODE": "0"})
