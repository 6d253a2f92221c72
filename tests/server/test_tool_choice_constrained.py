"""tool_choice "required" and named functions against a real server: a tiny random Llama sampled
at temperature 1 can only produce valid calls if constrained decoding enforces vLLM's tool-call
JSON schemas. Arguments validate against each tool's schema, whole and streamed."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.server.conftest import ServerProcess

MODEL = "tiny"
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "celsius": {"type": "boolean"}},
           "required": ["city", "celsius"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MSG = [{"role": "user", "content": "Weather or time?"}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    s = ServerProcess([tiny_model_dir, "--served-model-name", MODEL, "--kv-cache-memory", "32MiB", "--dtype",
                       "float32", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                       "--structured-outputs-config.disable_any_whitespace", "true"],
                      str(tmp_path_factory.mktemp("logs") / "tools-server.log"))
    try:
        s.wait_ready()
        with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
            yield c
    finally:
        s.stop()


def _check(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_gives_valid_calls(client):
    out = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, tool_choice="required", n=4,
                                         temperature=1.0, seed=3, max_tokens=120)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content in ("", None)
        _check(choice.message.tool_calls)
    out = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, temperature=1.0, seed=4, max_tokens=120)
    assert len(out.choices[0].message.tool_calls) == 1


def test_named_gives_that_function_streamed_too(client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    out = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, tool_choice=choice,
                                         temperature=1.0, seed=5, max_tokens=60)
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_time" and out.choices[0].finish_reason == "stop"
    _check([call])
    args = ""
    names = []
    for chunk in client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, tool_choice=choice,
                                                temperature=1.0, seed=5, max_tokens=60, stream=True):
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                names += [tc.function.name] if tc.function.name else []
                args += tc.function.arguments or ""
    assert names == ["get_time"] and args == call.function.arguments


def test_named_with_another_constraint(client):
    """As vLLM: the tool schema replaces response_format; structured_outputs json/regex/choice is a 400."""
    named = {"type": "function", "function": {"name": "get_time"}}
    out = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, tool_choice=named, max_tokens=60,
                                         temperature=1.0, seed=6, response_format={"type": "json_object"})
    _check(out.choices[0].message.tool_calls)
    with pytest.raises(openai.BadRequestError, match="either use constraints"):
        client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, max_tokens=5, tool_choice=named,
                                       extra_body={"structured_outputs": {"regex": "a+"}})
