"""tool_choice "required" / named with a reasoning parser (vLLM's behaviour): their grammar
constrains only what follows the thinking, so the answer is the reasoning, then the calls; with
``--structured-outputs-config.enable_in_reasoning true`` the grammar holds from the first token
and the whole output is the calls. The scripted engine (tests/server/test_tool_calling.py) writes
what the constrained model would; the engine-side gating is tested in
tests/test_structured_output_reasoning.py."""

from __future__ import annotations

import json

import pytest

from tests.server.test_tool_calling import SERVE, TOOLS, USER, ScriptedLLM, _stream, make_client

THINK = "<think>\nThe user wants the weather.\n</think>"
REQUIRED = '[{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}]'
NAMED = {"type": "function", "function": {"name": "get_weather"}}


class RecordingLLM(ScriptedLLM):
    """Also keeps the keyword arguments each ``generate`` call got."""

    calls: list = []

    async def generate(self, prompt, sampling_params, request_id, priority=0, cache_salt=None, **kw):
        self.calls.append(kw)
        async for out in super().generate(prompt, sampling_params, request_id, priority, cache_salt, **kw):
            yield out


@pytest.fixture(scope="module")
def tokenizer(qwen3):
    return qwen3


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setattr("tests.server.test_tool_calling.ScriptedLLM", RecordingLLM)
    RecordingLLM.calls = []
    return RecordingLLM.calls


@pytest.mark.anyio
async def test_required_and_named_calls_follow_the_reasoning(tokenizer, recording):
    client, engine = make_client(tokenizer, SERVE, THINK + REQUIRED)
    r = await client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, tool_choice="required",
                                             extra_body={"chat_template_kwargs": {"custom": 1}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.model_extra["reasoning"] == "\nThe user wants the weather.\n"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    # the engine builds the gate's reasoning parser with the request's template kwargs (vLLM's reasoning_parser_kwargs)
    assert recording[-1]["reasoning_parser_kwargs"] == {"chat_template_kwargs": {"custom": 1}}
    assert engine.params[-1].structured_outputs.json is not None
    reasoning, content, calls, finish = await _stream(client, messages=USER, tools=TOOLS, tool_choice="required")
    assert reasoning == "\nThe user wants the weather.\n" and not content and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris", "days": 2})]

    engine.script = THINK + '{"city": "Rome"}'
    r = await client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, tool_choice=NAMED)
    (call,) = r.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Rome"}
    assert r.choices[0].message.model_extra["reasoning"] == "\nThe user wants the weather.\n"


@pytest.mark.anyio
async def test_enable_in_reasoning_reads_the_whole_output_as_the_calls(tokenizer, recording):
    client, _ = make_client(tokenizer, SERVE + ["--structured-outputs-config.enable_in_reasoning", "true"], REQUIRED)
    r = await client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, tool_choice="required")
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    assert "reasoning" not in r.choices[0].message.model_extra
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
