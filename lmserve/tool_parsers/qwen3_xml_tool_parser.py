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
tool's parameter schema as vLLM does (``_typed``): a parameter without a type in the schema, or
whose types include "string", stays text; otherwise null, integer, number, boolean, object, array
are tried in that order (text when none fits). The content is the text before the first
``<tool_call>``, less trailing whitespace. String values stream as they grow; typed ones are sent
once their ``</parameter>`` arrives.
"""

from __future__ import annotations

import json
import math
from typing import Any

from lmserve.tool_parsers.partial_json import canonical_json
from lmserve.tool_parsers.scanning import (Scan, ScannedCall, ScanningToolParser, content_before, tag_overlap,
                                           tool_schema)

TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"
FUNC_START, FUNC_END = "<function=", "</function>"
PARAM_START, PARAM_END = "<parameter=", "</parameter>"
_WS = " \t\r\n"


def _types(schema: Any) -> set[str]:
    """The JSON types a parameter schema allows (``type``, or the ``type`` of anyOf/oneOf members)."""
    if not isinstance(schema, dict):
        return set()
    kinds = schema.get("type")
    if isinstance(kinds, str):
        return {kinds.strip().lower()}
    if isinstance(kinds, list):
        return {k.strip().lower() for k in kinds if isinstance(k, str)}
    out: set[str] = set()
    for option in (schema.get("anyOf") or schema.get("oneOf") or []):
        out |= _types(option)
    return out


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _typed(value: str, types: set[str]) -> Any:
    """vLLM's coercion of a parameter's text by its schema types, tried in the order null,
    integer, number, boolean, object, array, string; text when nothing fits (or no types)."""
    if not types:
        return value
    for kind in ("null", "integer", "number", "boolean", "object", "array", "string"):
        if kind not in types:
            continue
        if kind == "string":
            return value
        if kind == "null" and value.lower() == "null":
            return None
        if kind == "integer":
            try:
                return int(value)
            except ValueError:
                continue
        if kind == "number":
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                return int(number) if number == int(number) else number
        if kind == "boolean":
            word = value.strip().lower()
            if word in ("true", "1", "false", "0"):
                return word in ("true", "1")
        if kind in ("object", "array"):
            try:
                parsed = json.loads(value)
            except ValueError:
                continue
            if _finite(parsed):
                return parsed
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    return parsed if _finite(parsed) else value


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
        if at >= 0 or not final:
            content = content.rstrip()  # the template's newline before <tool_call> (kept if no call follows)
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
            types = _types(props.get(key))
            is_text = not types or "string" in types
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
                parts.append(canonical_json(key) + ": " + canonical_json(_typed(value, types)))
            pos = value_end + len(PARAM_END)
