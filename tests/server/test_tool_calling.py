"""Tool calling and reasoning over HTTP with the official openai client, in-process: a scripted
engine writes a chosen output token by token through the real Qwen3 tokenizer and its chat
template (the ``qwen3`` fixture, tests/data/qwen3); the server's parsers (hermes, qwen3) turn it
into typed tool calls and reasoning, streamed and whole alike."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageToolCall
from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCall

from lmserve.entrypoints.cli import make_parser
from lmserve.entrypoints.cli_args import parse_serve_args
from lmserve.entrypoints.openai.app import build_app
from lmserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tests.server.fake_engine import FakeAsyncLLM

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}},
                                               "required": ["city"]}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
USER = [{"role": "user", "content": "Weather in Paris?"}]
SERVE = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"]


class ScriptedLLM(FakeAsyncLLM):
    """Writes ``script`` (its tokens one at a time, decoded incrementally), then stops."""

    script: str = ""
    prompts: list = []
    params: list = []

    async def generate(self, prompt, sampling_params, request_id, priority=0, cache_salt=None, **_):
        self.prompts.append(prompt.get("prompt"))
        self.params.append(sampling_params)
        ids = self.tokenizer.encode(self.script, add_special_tokens=False)
        for k, tid in enumerate(ids):
            await asyncio.sleep(0)
            text = self.tokenizer.decode(ids[:k + 1]) [len(self.tokenizer.decode(ids[:k])):]
            done = k == len(ids) - 1
            out = CompletionOutput(0, text, [tid], None, None, "stop" if done else None)
            yield RequestOutput(request_id, prompt.get("prompt"), list(prompt["prompt_token_ids"]), None, [out],
                                done, metrics=RequestMetrics(arrival_time=0.0))


@pytest.fixture(scope="module")
def tokenizer(qwen3):
    return qwen3


def make_client(tokenizer, argv, script=""):
    _, serve = make_parser()
    engine = ScriptedLLM(tokenizer, max_model_len=4096)
    engine.script, engine.prompts, engine.params = script, [], []
    app = build_app(parse_serve_args(list(argv), serve), engine)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/v1")
    return openai.AsyncOpenAI(api_key="x", base_url="http://t/v1", http_client=http, max_retries=0), engine


async def _stream(client, **kw):
    chunks = [c async for c in await client.chat.completions.create(model="fake", stream=True, **kw)]
    if kw.get("stream_options"):
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens > 0
    reasoning = content = ""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            d = choice.delta
            reasoning += (d.model_extra or {}).get("reasoning") or ""
            content += d.content or ""
            for tc in d.tool_calls or []:
                assert isinstance(tc, ChoiceDeltaToolCall)
                if tc.index not in calls:
                    assert tc.id and tc.type == "function" and tc.function.name
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return reasoning, content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.anyio
async def test_auto_tool_call_with_reasoning_whole_and_streamed(tokenizer):
    script = "<think>\nI should call the tool first.\n</think>\n\nLet me check." + CALL
    client, _ = make_client(tokenizer, SERVE, script)
    r = await client.chat.completions.create(model="fake", messages=USER, tools=TOOLS)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.model_extra["reasoning"] == "\nI should call the tool first.\n"
    assert msg.content == "\n\nLet me check."
    think = tokenizer.encode("\nI should call the tool first.\n", add_special_tokens=False)
    assert r.usage.completion_tokens_details.reasoning_tokens == len(think)
    (call,) = msg.tool_calls
    assert isinstance(call, ChatCompletionMessageToolCall) and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    reasoning, content, calls, finish = await _stream(client, messages=USER, tools=TOOLS,
                                                      stream_options={"include_usage": True})
    assert (reasoning, content, finish) == (msg.model_extra["reasoning"], msg.content, "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [(call.function.name, call.function.arguments)]


@pytest.mark.anyio
async def test_tool_results_round_trip_through_the_template(tokenizer):
    client, engine = make_client(tokenizer, SERVE, "It is sunny.")
    messages = USER + [
        {"role": "assistant", "content": "", "reasoning_content": "need data",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}]
    r = await client.chat.completions.create(model="fake", messages=messages, tools=TOOLS)
    prompt = engine.prompts[-1]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in prompt
    assert "<think>\nneed data\n</think>" in prompt
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather", "description"' in prompt
    # No </think>: Qwen3 with thinking on reads it all as reasoning; no call: finish stays "stop".
    assert r.choices[0].message.model_extra["reasoning"] == "It is sunny."
    assert r.choices[0].message.content is None and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.anyio
async def test_thinking_off_and_include_reasoning(tokenizer):
    client, engine = make_client(tokenizer, SERVE, "Plain answer.")
    r = await client.chat.completions.create(model="fake", messages=USER,
                                             extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert engine.prompts[-1].endswith("<think>\n\n</think>\n\n")
    assert r.choices[0].message.content == "Plain answer." and "reasoning" not in r.choices[0].message.model_extra
    engine.script = "hidden</think>shown"
    r = await client.chat.completions.create(model="fake", messages=USER, extra_body={"include_reasoning": False})
    assert r.choices[0].message.content == "shown" and "reasoning" not in r.choices[0].message.model_extra
    _, content, _, _ = await _stream(client, messages=USER, extra_body={"include_reasoning": False})
    assert content == "shown"


@pytest.mark.anyio
async def test_tool_choice_none_and_parallel_tool_calls(tokenizer):
    client, engine = make_client(tokenizer, SERVE + ["--exclude-tools-when-tool-choice-none"], "</think>" + CALL * 2)
    r = await client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content == CALL * 2 and r.choices[0].finish_reason == "stop"
    assert "<tools>" not in engine.prompts[-1]
    r = await client.chat.completions.create(model="fake", messages=USER, tools=TOOLS)
    assert len(r.choices[0].message.tool_calls) == 2 and "<tools>" in engine.prompts[-1]
    r = await client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1
    _, _, calls, _ = await _stream(client, messages=USER, tools=TOOLS, parallel_tool_calls=False)
    assert len(calls) == 1


@pytest.mark.anyio
async def test_refusals_name_the_flags(tokenizer):
    plain, _ = make_client(tokenizer, [], "x")
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice and --tool-call-parser"):
        await plain.chat.completions.create(model="fake", messages=USER, tools=TOOLS)
    with pytest.raises(openai.BadRequestError, match="requires --tool-call-parser"):
        await plain.chat.completions.create(model="fake", messages=USER, tools=TOOLS, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="--reasoning-parser"):
        await plain.chat.completions.create(model="fake", messages=USER, extra_body={"thinking_token_budget": 4})
    client, _ = make_client(tokenizer, ["--tool-call-parser", "hermes"], CALL)
    # A parser without --enable-auto-tool-choice: the text stays content (vLLM).
    r = await client.chat.completions.create(model="fake", messages=USER, tools=TOOLS)
    assert r.choices[0].message.content == CALL and not r.choices[0].message.tool_calls
    for bad, param in [({"tools": []}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
                       ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                        "tool_choice"), ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice")]:
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="fake", messages=USER, **bad)
        assert e.value.body["param"] == param


@pytest.mark.anyio
async def test_thinking_token_budget_reaches_the_engine(tokenizer):
    client, engine = make_client(tokenizer, SERVE + ["--reasoning-config", '{"reasoning_end_str": "Done.</think>"}'],
                                 "x</think>y")
    await client.chat.completions.create(model="fake", messages=USER, extra_body={"thinking_token_budget": 5})
    params = engine.params[-1]
    assert params.thinking_token_budget == 5
    assert params._thinking_token_ids == (tokenizer.encode("<think>", add_special_tokens=False),
                                          tokenizer.encode("Done.</think>", add_special_tokens=False))
    await client.chat.completions.create(model="fake", messages=USER)
    assert engine.params[-1].thinking_token_budget is None
