"""/v1/messages over a scripted engine (in-process, official AsyncAnthropic client): tool_use
blocks (streamed as input_json_delta and not), tool_result round trip, stop reasons, and
Anthropic-shaped errors, forced tool calls (tool_choice any / tool) and thinking options."""

from __future__ import annotations

import pytest

from tests.server.scripted_app import HERMES_CALL, anthropic_client, scripted_app
from tests.server.tiny_model import build_tokenizer

pytestmark = pytest.mark.anyio
TOOLS = [{"name": "get_weather", "description": "The weather in a city.",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
HI = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


async def test_tool_use_block(tokenizer):
    app, _ = scripted_app(tokenizer, HERMES_CALL)
    async with anthropic_client(app) as c:
        m = await c.messages.create(model="fake", max_tokens=100, messages=HI, tools=TOOLS)
    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["tool_use"]
    assert m.content[0].name == "get_weather" and m.content[0].input == {"city": "Paris"}
    assert m.content[0].id.startswith("toolu_") and m.id.startswith("msg_")


async def test_streamed_tool_use(tokenizer):
    app, _ = scripted_app(tokenizer, "Checking. " + HERMES_CALL)
    async with anthropic_client(app) as c:
        async with c.messages.stream(model="fake", max_tokens=100, messages=HI, tools=TOOLS) as s:
            events = [e async for e in s]
            final = await s.get_final_message()
    raw = [e.type for e in events if e.type in ("message_start", "content_block_start", "content_block_delta",
                                                 "content_block_stop", "message_delta", "message_stop")]
    assert raw == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                   "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                   "message_stop"]
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "Checking." and final.content[1].input == {"city": "Paris"}


async def test_tool_result_round_trip_and_system_blocks(tokenizer):
    app, engine = scripted_app(tokenizer, "Sunny.")
    async with anthropic_client(app) as c:
        m = await c.messages.create(model="fake", max_tokens=50, tools=TOOLS,
                                    system=[{"type": "text", "text": "Be terse."}],
                                    messages=[*HI,
                                              {"role": "assistant", "content": [
                                                  {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                   "input": {"city": "Paris"}}]},
                                              {"role": "user", "content": [
                                                  {"type": "tool_result", "tool_use_id": "toolu_1",
                                                   "content": [{"type": "text", "text": "25C"}]},
                                                  {"type": "text", "text": "Thanks"}]}])
    assert m.stop_reason == "end_turn" and m.content[0].text == "Sunny."
    p = engine.prompts[-1]
    assert p.index("Be terse.") < p.index("Weather in Paris?") < p.index("25C") < p.index("Thanks")
    assert "<|im_start|>tool\n25C" in p


async def test_stop_reasons(tokenizer):
    app, _ = scripted_app(tokenizer, "abc", stop_reason="STOP")
    async with anthropic_client(app) as c:
        m = await c.messages.create(model="fake", max_tokens=50, messages=HI, stop_sequences=["STOP"])
        assert m.stop_reason == "stop_sequence" and m.stop_sequence == "STOP"
        m = await c.messages.create(model="fake", max_tokens=1, messages=HI)
        assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 1


async def test_anthropic_errors(tokenizer):
    import anthropic

    app, _ = scripted_app(tokenizer, "x")
    async with anthropic_client(app) as c:
        with pytest.raises(anthropic.BadRequestError) as e:
            await c.messages.create(model="fake", max_tokens=5, messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
        assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
        assert "text-only" in e.value.body["error"]["message"]
        with pytest.raises(anthropic.NotFoundError) as e:
            await c.messages.create(model="claude-nope", max_tokens=5, messages=HI)
        assert e.value.body["error"]["type"] == "not_found_error"
        # thinking with a budget needs a reasoning parser (vLLM's 400 for thinking_token_budget)
        with pytest.raises(anthropic.BadRequestError) as e:
            await c.messages.create(model="fake", max_tokens=5, messages=HI,
                                    thinking={"type": "enabled", "budget_tokens": 2048})
        assert "--reasoning-parser" in e.value.body["error"]["message"]
        # a forced tool call needs --tool-call-parser, as on /v1/chat/completions
        with pytest.raises(anthropic.BadRequestError) as e:
            await c.messages.create(model="fake", max_tokens=5, messages=HI, tools=TOOLS,
                                    tool_choice={"type": "any"})
        assert "--tool-call-parser" in e.value.body["error"]["message"]
    # a body that is not valid JSON, or misses max_tokens, is still an Anthropic error
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
        for content in (b"{not json", b'{"model": "fake", "messages": []}'):
            r = await h.post("/v1/messages", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["type"] == "error", r.text


async def test_tool_use_read_by_the_configured_tool_parser(tokenizer):
    """With --enable-auto-tool-choice --tool-call-parser, /v1/messages reads tool calls with that
    parser (here Qwen3-Coder's XML, with the parameter typed by the tool's schema)."""
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}]
    xml = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" \
          "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    app, _ = scripted_app(tokenizer, "Let me see.\n" + xml,
                          ["--enable-auto-tool-choice", "--tool-call-parser", "qwen3_xml"], max_model_len=1024)
    async with anthropic_client(app) as c:
        m = await c.messages.create(model="fake", max_tokens=200, messages=HI, tools=tools)
    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["text", "tool_use"]
    assert m.content[0].text == "Let me see." and m.content[1].input == {"city": "Paris", "days": 3}


async def test_thinking_blocks_from_the_reasoning_parser(tokenizer):
    """With --reasoning-parser, the thinking comes back as a ``thinking`` block before the text,
    whole and streamed."""
    app, _ = scripted_app(tokenizer, "<think>plan it</think>The answer.", ["--reasoning-parser", "deepseek_r1"],
                          max_model_len=1024)
    async with anthropic_client(app) as c:
        m = await c.messages.create(model="fake", max_tokens=200, messages=HI)
        assert [b.type for b in m.content] == ["thinking", "text"]
        assert m.content[0].thinking == "plan it" and m.content[1].text == "The answer."
        async with c.messages.stream(model="fake", max_tokens=200, messages=HI) as s:
            final = await s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "plan it" and final.content[1].text == "The answer."


FORCED = ["--tool-call-parser", "hermes"]


async def test_tool_choice_any_reads_the_required_array(tokenizer):
    """tool_choice any is chat's "required": the (constrained) output is vLLM's JSON array of
    calls; disable_parallel_tool_use caps the grammar at one call."""
    script = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, ' \
             '{"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    app, engine = scripted_app(tokenizer, script, FORCED, max_model_len=1024)
    async with anthropic_client(app) as c:
        m = await c.messages.create(model="fake", max_tokens=200, messages=HI, tools=TOOLS,
                                    tool_choice={"type": "any"})
        assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["tool_use", "tool_use"]
        assert [b.input for b in m.content] == [{"city": "Paris"}, {"city": "Oslo"}]
        assert engine.params[-1].structured_outputs is not None
        async with c.messages.stream(model="fake", max_tokens=200, messages=HI, tools=TOOLS,
                                     tool_choice={"type": "any", "disable_parallel_tool_use": True}) as s:
            final = await s.get_final_message()
    assert [(b.type, b.input) for b in final.content] == [("tool_use", {"city": "Paris"})]


async def test_tool_choice_tool_reads_the_named_arguments(tokenizer):
    import anthropic

    app, engine = scripted_app(tokenizer, '{"city": "Paris"}', FORCED, max_model_len=1024)
    async with anthropic_client(app) as c:
        m = await c.messages.create(model="fake", max_tokens=200, messages=HI, tools=TOOLS,
                                    tool_choice={"type": "tool", "name": "get_weather"})
        assert m.stop_reason == "tool_use" and len(m.content) == 1
        assert m.content[0].name == "get_weather" and m.content[0].input == {"city": "Paris"}
        assert engine.params[-1].structured_outputs is not None
        with pytest.raises(anthropic.BadRequestError) as e:
            await c.messages.create(model="fake", max_tokens=5, messages=HI, tools=TOOLS,
                                    tool_choice={"type": "tool", "name": "rm_rf"})
        assert "rm_rf" in e.value.body["error"]["message"]


async def test_thinking_budget_and_effort_reach_the_engine(tokenizer):
    """thinking enabled: budget_tokens is the SamplingParams' thinking_token_budget;
    output_config.effort reaches the chat template as reasoning_effort."""
    template = "{% for m in messages %}{{ m.content }}{% endfor %}|{{ reasoning_effort }}|{{ enable_thinking }}|"
    app, engine = scripted_app(tokenizer, "<think>plan it</think>The answer.",
                               ["--reasoning-parser", "deepseek_r1", "--chat-template", template], max_model_len=1024)
    async with anthropic_client(app) as c:
        m = await c.messages.create(model="fake", max_tokens=200, messages=HI,
                                    thinking={"type": "enabled", "budget_tokens": 2048},
                                    output_config={"effort": "low"})
        assert [b.type for b in m.content] == ["thinking", "text"]
        assert engine.params[-1].thinking_token_budget == 2048
        assert engine.prompts[-1].endswith("|low|True|")
        await c.messages.create(model="fake", max_tokens=200, messages=HI, thinking={"type": "adaptive"})
        assert engine.params[-1].thinking_token_budget is None and engine.prompts[-1].endswith("||")
        # disabled thinking: the --anthropic-disabled-thinking-effort ("auto": none here) wins over effort
        await c.messages.create(model="fake", max_tokens=200, messages=HI, thinking={"type": "disabled"},
                                output_config={"effort": "high"})
        assert engine.prompts[-1].endswith("|none||")
        n = await c.messages.count_tokens(model="fake", messages=HI, output_config={"effort": "high"})
    assert n.input_tokens == len(tokenizer.encode("Weather in Paris?|high|True|", add_special_tokens=False))
