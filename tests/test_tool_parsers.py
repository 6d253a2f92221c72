"""Every built-in tool parser on hand-written outputs: text only, one call, several calls, text
plus calls, malformed; streamed one character at a time and cut in two at every boundary, the
pieces rebuild exactly the whole-output result (tests/tool_parser_utils.py)."""

from __future__ import annotations

import json
import textwrap

import pytest

from lmserve.tool_parsers import ToolParser, ToolParserManager
from lmserve.tool_parsers.partial_json import parse_partial, render
from tests.tool_parser_utils import check_all_splits, streamed, whole

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "opts": {"type": "object"}, "flag": {"type": "boolean"},
                                     "ratio": {"type": "number"}, "maybe": {"type": ["integer", "null"]},
                                     "free": {}}}}}]
W = ("get_weather", '{"city": "Paris", "days": 3}')
B = '<｜tool▁calls▁begin｜>'
C, S, E, X = '<｜tool▁call▁begin｜>', '<｜tool▁sep｜>', '<｜tool▁call▁end｜>', '<｜tool▁calls▁end｜>'


def _ds(name: str, args: str) -> str:
    return f"{C}function{S}{name}\n```json\n{args}\n```{E}"


def _qx(name: str, params: dict[str, str]) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


CASES = [
    # (parser, output, expected content, expected calls)
    ("hermes", "Just text, no <tool call here.", "Just text, no <tool call here.", []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
     None, [W]),
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
     '</tool_call>\n<tool_call>\n{"name": "f", "arguments": {"s": "é\\n\\u00e9\\ud83d\\ude00", "x": [1.50, null]}}\n'
     '</tool_call>', "Let me look.\n", [W, ("f", '{"s": "é\\né😀", "x": [1.5, null]}')]),
    ("hermes", "a<tool_call>not json</tool_call>", "a<tool_call>not json</tool_call>", []),
    ("qwen3_json", '<tool_call>{"name": "f", "arguments": {}}', None, [("f", "{}")]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}; '
     '{"name": "f", "arguments": {}}', None, [W, ("f", "{}")]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', None, [W]),
    ("llama3_json", "Hello {world}", "Hello {world}", []),
    ("llama4_json", '{"name": 3}', '{"name": 3}', []),
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}[TOOL_CALLS]f[ARGS]{}',
     "Sure.", [W, ("f", "{}")]),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]', None, [W]),
    ("mistral", "no calls [TOOL", "no calls [TOOL", []),
    ("mistral", "x[TOOL_CALLS]bad name[ARGS]{}", "x[TOOL_CALLS]bad name[ARGS]{}", []),
    ("pythonic", '[get_weather(city="Paris", days=3), f(x=[1, (2)], y={"a": None}, z=true)]', None,
     [W, ("f", '{"x": [1, 2], "y": {"a": null}, "z": true}')]),
    ("pythonic", "[1, 2] are numbers", "[1, 2] are numbers", []),
    ("pythonic", "plain", "plain", []),
    ("deepseek_v3", "Hi" + B + _ds("get_weather", '{"city": "Paris", "days": 3}') + _ds("f", "{}") + X,
     "Hi", [W, ("f", "{}")]),
    ("deepseek_v3", "text only", "text only", []),
    ("deepseek_v3", B + _ds("bad name", "{}") + X, B + _ds("bad name", "{}") + X, []),
    ("qwen3_xml", "Checking.\n" + _qx("get_weather", {"city": "Paris", "days": "3"}) + "\n" + _qx("other", {}),
     "Checking.", [W, ("other", "{}")]),
    ("qwen3_coder", _qx("get_weather", {"city": 'multi\nline "q"', "opts": '{"a": [1]}'}), None,
     [("get_weather", '{"city": "multi\\nline \\"q\\"", "opts": {"a": [1]}}')]),
    ("qwen3_xml", "no call <tool", "no call <tool", []),
    ("qwen3_xml", _qx("get_weather", {"flag": "True", "ratio": "3.0", "maybe": "null", "free": "[1]", "days": "x"}),
     None, [("get_weather", '{"flag": true, "ratio": 3, "maybe": null, "free": "[1]", "days": "x"}')]),
]


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_whole_and_every_split(name: str, text: str, content: str | None, calls: list) -> None:
    got_content, got_calls = check_all_splits(name, text, TOOLS)
    assert got_content == content
    assert got_calls == calls
    for _, args in got_calls:
        assert json.dumps(json.loads(args), ensure_ascii=False) == args  # canonical, as json.dumps writes


@pytest.mark.parametrize("name,text", [
    ("hermes", 'x<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>'),
    ("qwen3_xml", "<tool_call>\n<function=f>\n<parameter=a>\n1\n</function>\n</tool_call>"),
    ("pythonic", "[f(a=1)] trailing"),
])
def test_malformed_late_is_content_whole_and_cut_short_streamed(name: str, text: str) -> None:
    """Found malformed only after a call's name went out: the whole output is content; the stream
    cannot take the call back and stops its arguments where they were."""
    assert whole(name, text, TOOLS) == (text, [])
    content, calls = streamed(name, list(text), TOOLS)
    assert len(calls) == 1 and text.startswith(content)


def test_partial_json_prefix_property() -> None:
    doc = '{"a": [1, 2.50, {"b": null}], "c": "x\\n\\u00e9\\ud83d\\ude00\\"q", "d": true, "e": -1e5, "f": {}}'
    final = render(parse_partial(doc).root)
    assert final == json.dumps(json.loads(doc), ensure_ascii=False)
    for k in range(len(doc)):
        p = parse_partial(doc[:k])
        assert not p.error and final.startswith(render(p.root))
    for bad in ['{"a" 1}', "[1,]", "{,}", "nul!", '"\\x"', '{"a": 01}']:
        assert parse_partial(bad).error, bad


def test_registry_names_and_plugin(tmp_path) -> None:
    for name in ("hermes", "qwen3_xml", "qwen3_coder", "llama3_json", "llama4_json", "mistral", "pythonic",
                 "deepseek_v3", "qwen3_json"):
        assert issubclass(ToolParserManager.get_tool_parser(name), ToolParser)
    plugin = tmp_path / "my_parser.py"
    plugin.write_text(textwrap.dedent('''
        from lmserve.tool_parsers import (ToolParser, ToolParserManager, ExtractedToolCallInformation,
                                          ToolCall, FunctionCall)

        @ToolParserManager.register_module("shout_test")
        class ShoutParser(ToolParser):
            def extract_tool_calls(self, model_output, request):
                if not model_output.startswith("CALL "):
                    return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)
                return ExtractedToolCallInformation(tools_called=True, content=None, tool_calls=[
                    ToolCall(function=FunctionCall(name=model_output[5:], arguments="{}"))])
    '''))
    ToolParserManager.import_tool_parser(str(plugin))
    parser = ToolParserManager.get_tool_parser("shout_test")(None, None)
    info = parser.extract_tool_calls("CALL ping", None)
    assert info.tools_called and info.tool_calls[0].function.name == "ping"
    with pytest.raises(ValueError, match="no such file"):
        ToolParserManager.import_tool_parser(str(tmp_path / "missing.py"))
    with pytest.raises(KeyError, match="not found"):
        ToolParserManager.get_tool_parser("nope")
