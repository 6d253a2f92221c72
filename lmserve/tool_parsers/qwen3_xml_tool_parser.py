"""``qwen3_xml`` / ``qwen3_coder``: Qwen3-Coder (and Qwen3.5) XML tool calls::

    text<tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

A value loses one leading and one trailing newline (the template's). Values are typed by the
tool's parameter schema: a parameter whose schema allows "string", or has no type, or is not in
the schema, stays text; any other is read as JSON when it parses (3 -> 3, true -> true, {...}),
else kept as text. The content is the text before the first ``<tool_call>``. String values
stream as they grow; typed ones are sent once their ``</parameter>`` arrives.
"""

from __future__ import annotations

import json
from typing import Any

from lmserve.tool_parsers.partial_json import canonical_json
from lmserve.tool_parsers.scanning import (Scan, ScannedCall, ScanningToolParser, content_before, tag_overlap,
                                           tool_schema)

TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"
FUNC_START, FUNC_END = "<function=", "</function>"
PARAM_START, PARAM_END = "<parameter=", "</parameter>"
_WS = " \t\r\n"


def _is_text(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return True
    kinds = schema.get("type")
    if kinds is None:
        options = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(options, list):
            return any(_is_text(o) for o in options)
        return "enum" not in schema and "const" not in schema
    return kinds == "string" or (isinstance(kinds, list) and "string" in kinds)


def _typed(value: str, text: bool) -> Any:
    if text:
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _expect(text: str, pos: int, token: str, final: bool) -> int | None:
    """Index past ``token`` at ``pos`` (whitespace skipped first); -1: the text ends in a prefix
    of it; None: something else is there."""
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    if text.startswith(token, pos):
        return pos + len(token)
    if not final and token.startswith(text[pos:]):
        return -1
    return None


class Qwen3XMLToolParser(ScanningToolParser):
    supports_required_and_named = True

    def adjust_request(self, request: Any) -> Any:
        if getattr(request, "tools", None) and getattr(request, "tool_choice", None) != "none":
            request.skip_special_tokens = False
        return request

    def scan(self, text: str, final: bool) -> Scan:
        content, at = content_before(text, TOOL_START, final)
        out = Scan(content=content)
        while at >= 0:
            call, pos = self._one_call(text, at + len(TOOL_START), final)
            out.calls.append(call)
            if call.error or not call.complete:
                break
            while pos < len(text) and text[pos] in _WS:
                pos += 1
            at = pos if text.startswith(TOOL_START, pos) else -1
            if at >= 0:
                continue
            rest = text[pos:]
            if rest and not (not final and TOOL_START.startswith(rest)):
                break  # trailing text after the calls is dropped
        return out

    def _one_call(self, text: str, pos: int, final: bool) -> tuple[ScannedCall, int]:
        call = ScannedCall()
        nxt = _expect(text, pos, FUNC_START, final)
        if nxt is None or nxt < 0:
            call.error = nxt is None
            return call, len(text)
        close = text.find(">", nxt)
        if close < 0:
            call.error = final or "\n" in text[nxt:]
            return call, len(text)
        name = text[nxt:close].strip()
        if not name:
            call.error = True
            return call, len(text)
        call.name = name
        props = tool_schema(self.tools, name).get("properties")
        props = props if isinstance(props, dict) else {}
        parts: list[str] = []  # rendered "key": value items
        seen: set[str] = set()
        pos = close + 1
        while True:
            nxt = _expect(text, pos, PARAM_START, final)
            if nxt is None:
                end = _expect(text, pos, FUNC_END, final)
                if end is None:
                    call.error = True
                    return call, len(text)
                call.arguments = "{" + ", ".join(parts) + ("}" if end >= 0 else "")
                if end < 0:
                    return call, len(text)
                after = _expect(text, end, TOOL_END, final)
                if after is None and final and not text[end:].strip():
                    after = len(text)  # </tool_call> may be cut off at the very end
                if after is None:
                    call.error = True
                    return call, len(text)
                call.complete = after >= 0
                return call, (after if after >= 0 else len(text))
            if nxt < 0:
                call.arguments = "{" + ", ".join(parts)
                return call, len(text)
            close = text.find(">", nxt)
            if close < 0:
                call.arguments = "{" + ", ".join(parts)
                call.error = final or "\n" in text[nxt:]
                return call, len(text)
            key = text[nxt:close].strip()
            value_end = text.find(PARAM_END, close + 1)
            raw = text[close + 1:value_end if value_end >= 0 else len(text)]
            is_text = _is_text(props.get(key))
            sep = ", " if parts else ""
            if value_end < 0:
                if final:
                    call.error = True
                    return call, len(text)
                if is_text and key not in seen:
                    raw = raw[:len(raw) - tag_overlap(raw, PARAM_END)]
                    raw = raw[1:] if raw.startswith("\n") else raw
                    raw = raw[:-1] if raw.endswith("\n") else raw
                    call.arguments = "{" + ", ".join(parts) + sep + canonical_json(key) + ": " + \
                        canonical_json(raw)[:-1]
                else:
                    call.arguments = "{" + ", ".join(parts)
                return call, len(text)
            value = raw[1:] if raw.startswith("\n") else raw
            value = value[:-1] if value.endswith("\n") else value
            if key not in seen:  # a repeated parameter keeps its first value
                seen.add(key)
                parts.append(canonical_json(key) + ": " + canonical_json(_typed(value, is_text)))
            pos = value_end + len(PARAM_END)
