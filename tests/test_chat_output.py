"""``ChoiceParser``: reasoning then tool calls, whole and streamed at every split, for each
tool_choice mode; and the JSON schema "required" / named tool choices are constrained to."""

from __future__ import annotations

import json

import jsonschema
import pytest

from lmserve.entrypoints.openai.chat_output import ChoiceParser, tool_choice_schema
from lmserve.reasoning import ReasoningParserManager
from lmserve.tool_parsers import ToolParserManager

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "now"}}]


class Req:
    def __init__(self, tool_choice, parallel_tool_calls=None):
        self.tools, self.tool_choice, self.parallel_tool_calls = TOOLS, tool_choice, parallel_tool_calls


def _parser(mode: str, tool_choice, reasoning: str | None = "qwen3", parallel=None) -> ChoiceParser:
    r = ReasoningParserManager.get_reasoning_parser(reasoning)(None) if reasoning else None
    t = ToolParserManager.get_tool_parser("hermes")(None, TOOLS) if mode == "auto" else None
    return ChoiceParser(Req(tool_choice, parallel), mode, r, t)


def _streamed(make, pieces):
    p = make()
    reasoning = content = ""
    calls: dict[int, list[str]] = {}
    for d in [p.stream(piece, []) for piece in pieces] + [p.finish()]:
        if d is None:
            continue
        reasoning += d.reasoning or ""
        content += d.content or ""
        for tc in d.tool_calls:
            if tc.index not in calls:
                calls[tc.index] = [tc.function.name, ""]
            calls[tc.index][1] += tc.function.arguments or ""
    return reasoning, content, [tuple(c) for _, c in sorted(calls.items())]


@pytest.mark.parametrize("mode,choice,reasoning,text", [
    ("auto", "auto", "qwen3", 'hmm</think>ok<tool_call>{"name": "now", "arguments": {}}</tool_call>'),
    ("none", "none", "qwen3", 'hmm</think><tool_call>{"name": "now", "arguments": {}}</tool_call>'),
    ("required", "required", None, '[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
                                   '{"name": "now", "parameters": {}}]'),
    ("named", {"type": "function", "function": {"name": "get_weather"}}, None, '{"city": "Paris"}'),
])
def test_modes_whole_equals_streamed_at_every_split(mode, choice, reasoning, text) -> None:
    def make():
        return _parser(mode, choice, reasoning)

    whole = make().full(text)
    expect = (whole.reasoning or "", whole.content or "",
              [(c.function.name, c.function.arguments) for c in whole.tool_calls])
    assert _streamed(make, list(text)) == expect
    for k in range(len(text) + 1):
        assert _streamed(make, [text[:k], text[k:]]) == expect, k
    if mode in ("required", "named", "auto"):
        assert whole.tool_calls and whole.content in (None, "ok")
        for call in whole.tool_calls:
            json.loads(call.function.arguments)


def test_parallel_tool_calls_false_keeps_the_first() -> None:
    text = '[{"name": "now", "parameters": {}}, {"name": "now", "parameters": {}}]'
    assert len(_parser("required", "required", None, parallel=False).full(text).tool_calls) == 1
    assert len(_streamed(lambda: _parser("required", "required", None, parallel=False), list(text))[2]) == 1


def test_tool_choice_schemas_as_vllm_builds_them() -> None:
    named = tool_choice_schema(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, None)
    assert named == TOOLS[0]["function"]["parameters"]
    assert tool_choice_schema(TOOLS, {"type": "function", "function": {"name": "now"}}, None) == {
        "type": "object", "properties": {}}
    required = tool_choice_schema(TOOLS, "required", False)
    assert required["type"] == "array" and required["minItems"] == 1 and required["maxItems"] == 1
    assert "maxItems" not in tool_choice_schema(TOOLS, "required", None)
    ok = [{"name": "get_weather", "parameters": {"city": "Paris"}}]
    jsonschema.validate(ok, required)
    for bad in ([], [{"name": "other", "parameters": {}}], [{"name": "get_weather", "parameters": {}}],
                ok + [{"name": "now", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, required)
    assert tool_choice_schema(TOOLS, "auto", None) is None
