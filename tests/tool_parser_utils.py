"""Helpers for the tool/reasoning parser tests: run a parser over a whole output and as a stream
cut at given points, and put the stream's pieces back together."""

from __future__ import annotations

import json
from typing import Any

from lmserve.tool_parsers import ToolParserManager


class Req:
    """The request attributes parsers read."""

    def __init__(self, tools: list[dict] | None = None, tool_choice: Any = "auto") -> None:
        self.tools = tools
        self.tool_choice = tool_choice
        self.skip_special_tokens = True


def make(name: str, tools: list[dict] | None = None):
    return ToolParserManager.get_tool_parser(name)(None, tools)


def whole(name: str, text: str, tools: list[dict] | None = None) -> tuple[str | None, list[tuple[str, str]]]:
    info = make(name, tools).extract_tool_calls(text, Req(tools))
    calls = [(c.function.name, c.function.arguments) for c in info.tool_calls]
    assert info.tools_called == bool(calls)
    for c in info.tool_calls:
        assert c.type == "function" and c.id.startswith("chatcmpl-tool-")
    return info.content, calls


def streamed(name: str, pieces: list[str], tools: list[dict] | None = None) -> tuple[str, list[tuple[str, str]]]:
    """Feeds ``pieces`` one by one, then finishes; returns (content, [(name, arguments)]) rebuilt
    from the deltas, checking the delta protocol on the way (header first, then fragments)."""
    parser = make(name, tools)
    req = Req(tools)
    text = ""
    content = ""
    calls: dict[int, dict] = {}
    deltas = []
    for piece in pieces:
        prev, text = text, text + piece
        deltas.append(parser.extract_tool_calls_streaming(prev, text, piece, [], [], [], req))
    deltas.append(parser.finish_streaming(text, req))
    for d in deltas:
        if d is None:
            continue
        json.loads(d.model_dump_json())
        content += d.content or ""
        for tc in d.tool_calls:
            if tc.index not in calls:
                assert tc.id and tc.type == "function" and tc.function and tc.function.name, tc
                assert tc.index == len(calls), "calls start in order"
                calls[tc.index] = {"name": tc.function.name, "arguments": tc.function.arguments or ""}
            else:
                assert tc.id is None and tc.function.name is None, "the header comes once"
                calls[tc.index]["arguments"] += tc.function.arguments or ""
    return content, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]


def check_all_splits(name: str, text: str, tools: list[dict] | None = None) -> tuple[str | None, list]:
    """The whole-output result, after checking that streaming it one character at a time and cut
    in two at every boundary rebuilds exactly the same content and calls."""
    content, calls = whole(name, text, tools)
    expect = (content or "", calls)
    assert streamed(name, list(text), tools) == expect, "char by char"
    for k in range(len(text) + 1):
        assert streamed(name, [text[:k], text[k:]], tools) == expect, f"split at {k}: {text[:k]!r}"
    return content, calls
