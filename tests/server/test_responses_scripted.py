"""/v1/responses over a scripted engine (in-process, official AsyncOpenAI client): function
calls as output items, streamed and not, the function_call_output round trip, instructions
and the chain of previous_response_id, stop reasons."""

from __future__ import annotations

import json

import pytest

from tests.server.scripted_app import HERMES_CALL, WEATHER_TOOL, openai_client, scripted_app
from tests.server.tiny_model import build_tokenizer

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


async def test_function_call_item(tokenizer):
    app, _ = scripted_app(tokenizer, HERMES_CALL)
    async with openai_client(app) as c:
        r = await c.responses.create(model="fake", input="Weather in Paris?", tools=[WEATHER_TOOL])
    assert r.status == "completed"
    assert [o.type for o in r.output] == ["function_call"]
    call = r.output[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")


async def test_no_tools_means_text(tokenizer):
    app, _ = scripted_app(tokenizer, HERMES_CALL)
    async with openai_client(app) as c:
        r = await c.responses.create(model="fake", input="hi")
        r_none = await c.responses.create(model="fake", input="hi", tools=[WEATHER_TOOL], tool_choice="none")
    assert r.output_text == HERMES_CALL and r_none.output_text == HERMES_CALL
    # an unknown tool name is not a call
    app, _ = scripted_app(tokenizer, HERMES_CALL.replace("get_weather", "rm_rf"))
    async with openai_client(app) as c:
        r = await c.responses.create(model="fake", input="hi", tools=[WEATHER_TOOL])
    assert [o.type for o in r.output] == ["message"]


async def test_streamed_function_call_events(tokenizer):
    app, _ = scripted_app(tokenizer, "Let me check. " + HERMES_CALL)
    async with openai_client(app) as c:
        stream = await c.responses.create(model="fake", input="Weather?", tools=[WEATHER_TOOL], stream=True)
        events = [e async for e in stream]
    types = [e.type for e in events]
    assert types == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.output_item.added", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[5].text == "Let me check."
    assert json.loads(events[10].arguments) == {"city": "Paris"}
    final = events[-1].response
    assert [o.type for o in final.output] == ["message", "function_call"]
    assert final.output[1].id == events[8].item.id


async def test_function_call_output_round_trip(tokenizer):
    app, engine = scripted_app(tokenizer, HERMES_CALL)
    async with openai_client(app) as c:
        first = await c.responses.create(model="fake", input="Weather in Paris?", tools=[WEATHER_TOOL],
                                         instructions="You are terse.")
        call = first.output[0]
        engine.script = "It is sunny."
        second = await c.responses.create(
            model="fake", previous_response_id=first.id, tools=[WEATHER_TOOL],
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 25C"}])
    assert second.output_text == "It is sunny." and second.previous_response_id == first.id
    prompt = engine.prompts[-1]
    # earlier turn, the call (rendered by the template from tool_calls) and its output, no old instructions
    assert "Weather in Paris?" in prompt and "sunny, 25C" in prompt and "<|im_start|>tool" in prompt
    assert "You are terse." in engine.prompts[0] and "You are terse." not in prompt


async def test_input_items_and_stop_sequence(tokenizer):
    app, engine = scripted_app(tokenizer, "Done", stop_reason="###")
    async with openai_client(app) as c:
        r = await c.responses.create(model="fake", input=[
            {"role": "developer", "content": "dev says"},
            {"role": "user", "content": [{"type": "input_text", "text": "part one"},
                                         {"type": "input_text", "text": "part two"}]},
            {"type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_9", "output": "rainy"}],
            extra_body={"stop": ["###"], "enable_response_messages": True})
    assert r.status == "completed" and r.output_text == "Done"
    prompt = engine.prompts[-1]
    assert "<|im_start|>system\ndev says" in prompt and "part one\npart two" in prompt and "rainy" in prompt
    extra = r.model_extra or {}
    assert extra["input_messages"][0]["message"] == prompt and extra["output_messages"][0]["message"] == "Done"
