"""/v1/messages over a scripted engine (in-process, official AsyncAnthropic client): tool_use
blocks (streamed as input_json_delta and not), tool_result round trip, stop reasons, and
Anthropic-shaped errors."""

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
        with pytest.raises(anthropic.BadRequestError) as e:
            await c.messages.create(model="fake", max_tokens=5, messages=HI,
                                    thinking={"type": "enabled", "budget_tokens": 2048})
        assert "thinking" in e.value.body["error"]["message"]
        with pytest.raises(anthropic.BadRequestError):
            await c.messages.create(model="fake", max_tokens=5, messages=HI, tools=TOOLS,
                                    tool_choice={"type": "any"})
    # a body that is not valid JSON, or misses max_tokens, is still an Anthropic error
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
        for content in (b"{not json", b'{"model": "fake", "messages": []}'):
            r = await h.post("/v1/messages", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["type"] == "error", r.text
