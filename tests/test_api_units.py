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


def test_responses_request_refusals():
    for kw, param in ((dict(input=[]), "input"), (dict(input="x", conversation="conv_1"), "conversation"),
                      (dict(input="x", background=True, store=False), "background"),
                      (dict(input="x", text={"format": {"type": "grammar"}}), "text.format.type"),
                      (dict(input="x", truncation="auto"), "truncation")):
        with pytest.raises(InvalidRequestError) as e:
            ResponsesRequest(**kw).check_supported()
        assert e.value.param == param
    fmt = ResponsesRequest(input="x", text={"format": {"type": "json_schema", "name": "n", "schema": {}}})
    assert fmt.response_format() == {"type": "json_schema", "json_schema": {"name": "n", "schema": {}}}


def test_configured_parser_results_are_adapted():
    from types import SimpleNamespace as NS

    from lmserve.entrypoints.tool_call_extraction import tool_call_extractor

    tools = [{"type": "function", "function": {"name": "add"}},
             {"type": "function", "function": {"name": "get_weather"}}]
    info = NS(tools_called=True, content="pre", tool_calls=[
        NS(id="call_x", function=NS(name="add", arguments='{"a": 1}')),
        NS(id=None, function=NS(name="get_weather", arguments="{}"))])
    parser = NS(tools=tools, extract_tool_calls=lambda text, request: info)
    chat = NS(auto_tool_parser=lambda offered: parser)
    req = NS(tools=tools, tool_choice="auto", parallel_tool_calls=None)
    out = tool_call_extractor(chat, req)("raw")
    assert out.content == "pre" and [c.call_id for c in out.calls][0] == "call_x"
    assert out.calls[1].call_id.startswith("call_") and out.calls[1].arguments == "{}"
    # parallel_tool_calls=false keeps the first call
    assert [c.name for c in tool_call_extractor(chat, NS(**{**vars(req), "parallel_tool_calls": False}))("raw")
            .calls] == ["add"]
    info.tools_called = False
    assert tool_call_extractor(chat, req)("raw").content == "raw"
    # a call to a tool that was not offered: all of it stays text
    info.tools_called, info.tool_calls[1].function.name = True, "rm_rf"
    assert tool_call_extractor(chat, req)("raw").calls == ()
    # no --tool-call-parser: the Hermes/JSON fallback over the request's tools
    chat = NS(auto_tool_parser=lambda offered: None)
    assert tool_call_extractor(chat, req)('{"name": "add", "arguments": {}}').calls[0].name == "add"
    # tool_choice "none": never a call
    assert tool_call_extractor(chat, NS(**{**vars(req), "tool_choice": "none"}))(
        '{"name": "add", "arguments": {}}').calls == ()


def test_forced_tool_choice_readers():
    """tool_choice "required" reads vLLM's [{"name", "parameters"}] array, a named function its
    arguments object (the chat completions readers), whatever --tool-call-parser is configured."""
    from types import SimpleNamespace as NS

    from lmserve.entrypoints.tool_call_extraction import forced_tool_call, tool_call_extractor

    tools = [{"type": "function", "function": {"name": "add"}},
             {"type": "function", "function": {"name": "get_weather"}}]
    chat = NS(auto_tool_parser=lambda offered: pytest.fail("no auto parser for a forced call"))
    required = NS(tools=tools, tool_choice="required", parallel_tool_calls=None)
    out = tool_call_extractor(chat, required)('[{"name": "add", "parameters": {"a": 1}}, '
                                              '{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [("add", {"a": 1}),
                                                                       ("get_weather", {"city": "Oslo"})]
    assert out.content == "" and forced_tool_call(required)
    assert tool_call_extractor(chat, required)("not json").calls == ()
    named = NS(tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
               parallel_tool_calls=None)
    out = tool_call_extractor(chat, named)('{"city": "Oslo"}')
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [("get_weather", {"city": "Oslo"})]
    assert forced_tool_call(named) and not forced_tool_call(NS(tool_choice="auto"))


def test_anthropic_options_reach_the_chat_request():
    tools = [{"name": "add", "input_schema": {}}]
    hi = [{"role": "user", "content": "hi"}]
    chat = AnthropicMessagesRequest(model="m", max_tokens=5, messages=hi, tools=tools,
                                    tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                    thinking={"type": "enabled", "budget_tokens": 2048},
                                    output_config={"effort": "high"}).to_chat_request("msg_1", None)
    assert (chat.tool_choice, chat.parallel_tool_calls, chat.thinking_token_budget) == ("required", False, 2048)
    assert chat.reasoning_effort == "high" and chat.chat_template_kwargs == {"enable_thinking": True,
                                                                             "reasoning_effort": "high"}
    chat = AnthropicMessagesRequest(model="m", max_tokens=5, messages=hi, tools=tools,
                                    tool_choice={"type": "tool", "name": "add"}).to_chat_request("msg_1", None)
    assert chat.tool_choice == {"type": "function", "function": {"name": "add"}} and chat.parallel_tool_calls
    # disabled thinking: its effort wins over output_config.effort (vLLM); adaptive pins nothing
    chat = AnthropicMessagesRequest(model="m", max_tokens=5, messages=hi, thinking={"type": "disabled"},
                                    output_config={"effort": "high"}).to_chat_request("msg_1", "none")
    assert chat.reasoning_effort is None and chat.chat_template_kwargs == {"reasoning_effort": "none"}
    chat = AnthropicMessagesRequest(model="m", max_tokens=5, messages=hi,
                                    thinking={"type": "adaptive"}).to_chat_request("msg_1", None)
    assert chat.thinking_token_budget is None and chat.reasoning_effort is None
    for kw, param in ((dict(thinking={"type": "enabled", "budget_tokens": 10}), "thinking.budget_tokens"),
                      (dict(thinking={"type": "sometimes"}), "thinking.type"),
                      (dict(output_config={"effort": "extreme"}), "output_config.effort"),
                      (dict(tools=tools, tool_choice={"type": "tool"}), "tool_choice.name"),
                      (dict(tools=tools, tool_choice={"type": "tool", "name": "rm_rf"}), "tool_choice.name"),
                      (dict(thinking={"type": "adaptive", "display": "omitted"}), "thinking.display")):
        with pytest.raises(InvalidRequestError) as e:
            AnthropicMessagesRequest(model="m", max_tokens=5, messages=hi, **kw).to_chat_request("msg_1", None)
        assert e.value.param == param


def test_responses_options_reach_the_chat_request():
    tools = [{"type": "function", "name": "add"}]
    fn = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    msgs = [{"role": "user", "content": "x"}]
    req = ResponsesRequest(input="x", tools=tools, tool_choice={"type": "function", "name": "add"},
                           parallel_tool_calls=False, reasoning={"effort": "low"})
    req.check_supported()
    chat = req.to_chat_request(msgs, fn)
    assert chat.tool_choice == {"type": "function", "function": {"name": "add"}} and chat.parallel_tool_calls is False
    assert chat.reasoning_effort == "low" and chat.chat_template_kwargs["enable_thinking"] is True
    # the request's own enable_thinking wins (vLLM's build_chat_params)
    req = ResponsesRequest(input="x", reasoning={"effort": "high"}, chat_template_kwargs={"enable_thinking": False})
    assert req.to_chat_request(msgs, []).chat_template_kwargs == {"enable_thinking": False, "reasoning_effort": "high"}
    assert ResponsesRequest(input="x", tools=tools, tool_choice="required").to_chat_request(msgs, fn).tool_choice \
        == "required"
    for kw, param in ((dict(tools=tools, tool_choice={"type": "function", "name": "rm_rf"}), "tool_choice"),
                      (dict(tool_choice="required"), "tool_choice"),
                      (dict(tools=tools, tool_choice={"type": "allowed_tools", "tools": []}), "tool_choice"),
                      (dict(reasoning={"effort": "huge"}), "reasoning.effort"),
                      (dict(reasoning={"summary": "auto"}), "reasoning.summary")):
        with pytest.raises(InvalidRequestError) as e:
            ResponsesRequest(input="x", **kw).check_supported()
        assert e.value.param == param
        if kw.get("tool_choice", {}) == {"type": "function", "name": "rm_rf"}:
            assert "rm_rf" in e.value.message


def test_event_logs_bounded():
    import asyncio

    from lmserve.entrypoints.openai.responses.event_log import EventLogs

    async def main():
        logs = EventLogs(max_logs=2, max_bytes=100)
        a = logs.new("a")
        a.append("x" * 80)
        a.close()
        b = logs.new("b")  # running: never dropped
        b.append("y" * 80)
        logs.new("c")  # over both bounds: the finished "a" goes
        assert logs.get("a") is None and logs.get("b") is b
        b.append("z")
        b.close()
        assert [e async for e in b.follow(0)] == ["z"]

    asyncio.run(main())


def test_anthropic_thinking_blocks_are_the_assistant_reasoning():
    req = AnthropicMessagesRequest(model="m", max_tokens=5, messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "plan", "signature": "s"},
                                          {"type": "redacted_thinking", "data": "xx"},
                                          {"type": "text", "text": "Hello"}]},
        {"role": "user", "content": "more"}])
    msgs = req.to_chat_request("msg_1", None).template_messages()
    assert msgs[1]["role"] == "assistant" and msgs[1]["content"] == "Hello" and msgs[1]["reasoning"] == "plan"
