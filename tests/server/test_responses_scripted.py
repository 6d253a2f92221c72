"""/v1/responses over a scripted engine (in-process, official AsyncOpenAI client): function
calls as output items, streamed and not, the function_call_output round trip, instructions
and the chain of previous_response_id, stop reasons, forced tool calls (tool_choice required /
a named function) and reasoning.effort."""

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


async def test_background_stream_and_replay(tokenizer):
    app, _ = scripted_app(tokenizer, "One two three four.")
    async with openai_client(app) as c:
        stream = await c.responses.create(model="fake", input="count", background=True, stream=True)
        events = [e async for e in stream]
        assert events[0].type == "response.created" and events[-1].type == "response.completed"
        rid = events[0].response.id
        assert events[-1].response.background is True
        replay = await c.responses.retrieve(rid, stream=True, starting_after=3)
        again = [e async for e in replay]
        assert [e.sequence_number for e in again] == list(range(4, len(events)))
        assert [e.type for e in again] == [e.type for e in events[4:]]
        done = await c.responses.retrieve(rid)
        assert done.status == "completed" and done.output_text == "One two three four."
        plain = await c.responses.create(model="fake", input="x")
        import openai

        with pytest.raises(openai.BadRequestError):
            await c.responses.retrieve(plain.id, stream=True)
async def test_reasoning_item_from_the_reasoning_parser(tokenizer):
    """With --reasoning-parser the thinking is a ``reasoning`` output item before the message,
    whole and streamed."""
    app, _ = scripted_app(tokenizer, "<think>plan it</think>The answer.", ["--reasoning-parser", "deepseek_r1"],
                          max_model_len=1024)
    async with openai_client(app) as c:
        r = await c.responses.create(model="fake", input="hi")
        assert [o.type for o in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == "plan it" and r.output_text == "The answer."
        events = [e async for e in await c.responses.create(model="fake", input="hi", stream=True)]
    kinds = [e.type for e in events]
    assert "response.reasoning_text.delta" in kinds and "response.reasoning_text.done" in kinds
    done = events[-1].response
    assert [o.type for o in done.output] == ["reasoning", "message"] and done.output_text == "The answer."
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == "plan it"


FORCED = ["--tool-call-parser", "hermes"]


async def test_tool_choice_required_reads_the_array(tokenizer):
    """tool_choice "required" runs as on /v1/chat/completions: the output is constrained to
    vLLM's JSON array of calls, read back as function_call items; parallel_tool_calls=false
    keeps one."""
    script = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, ' \
             '{"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    app, engine = scripted_app(tokenizer, script, FORCED, max_model_len=1024)
    async with openai_client(app) as c:
        r = await c.responses.create(model="fake", input="Weather?", tools=[WEATHER_TOOL], tool_choice="required")
        assert [(o.type, json.loads(o.arguments)) for o in r.output] == [("function_call", {"city": "Paris"}),
                                                                         ("function_call", {"city": "Oslo"})]
        assert engine.params[-1].structured_outputs is not None and r.tool_choice == "required"
        events = [e async for e in await c.responses.create(model="fake", input="Weather?", tools=[WEATHER_TOOL],
                                                            tool_choice="required", parallel_tool_calls=False,
                                                            stream=True)]
    done = events[-1].response
    assert [(o.type, json.loads(o.arguments)) for o in done.output] == [("function_call", {"city": "Paris"})]


async def test_named_tool_choice_and_refusals(tokenizer):
    import openai

    app, engine = scripted_app(tokenizer, '{"city": "Paris"}', FORCED, max_model_len=1024)
    async with openai_client(app) as c:
        r = await c.responses.create(model="fake", input="Weather?", tools=[WEATHER_TOOL],
                                     tool_choice={"type": "function", "name": "get_weather"})
        assert [(o.type, o.name, json.loads(o.arguments)) for o in r.output] == [
            ("function_call", "get_weather", {"city": "Paris"})]
        assert engine.params[-1].structured_outputs is not None
        with pytest.raises(openai.BadRequestError) as e:
            await c.responses.create(model="fake", input="x", tools=[WEATHER_TOOL],
                                     tool_choice={"type": "function", "name": "rm_rf"})
        assert e.value.body["param"] == "tool_choice" and "rm_rf" in e.value.body["message"]
    # without --tool-call-parser a forced call is refused, as on /v1/chat/completions
    app, _ = scripted_app(tokenizer, "x")
    async with openai_client(app) as c:
        with pytest.raises(openai.BadRequestError) as e:
            await c.responses.create(model="fake", input="x", tools=[WEATHER_TOOL], tool_choice="required")
    assert "--tool-call-parser" in e.value.body["message"]


async def test_reasoning_effort_reaches_the_template(tokenizer):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}|{{ reasoning_effort }}|{{ enable_thinking }}|"
    app, engine = scripted_app(tokenizer, "<think>plan it</think>The answer.",
                               ["--reasoning-parser", "deepseek_r1", "--chat-template", template], max_model_len=1024)
    async with openai_client(app) as c:
        r = await c.responses.create(model="fake", input="hi", reasoning={"effort": "none"})
    assert engine.prompts[-1] == "hi|none|False|" and r.reasoning.effort == "none"
