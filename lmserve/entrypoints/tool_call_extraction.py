"""The seam between the APIs that return tool calls (Responses ``function_call`` items,
Anthropic ``tool_use`` blocks) and whatever turns model text into tool calls.

``extract_tool_calls(text, tool_names)`` is the only entry point. Today it understands the
two formats small instruction-tuned models use when no model-specific parser is configured:

- Hermes style: one or more ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks (text outside the blocks is the message content);
- a bare JSON object (or list of objects) ``{"name": ..., "arguments"|"parameters": {...}}``
  that is the whole output.

A call whose ``name`` is not one of the request's tools is not a call: the text stays
content, so a model that merely talks JSON is never turned into a bogus call. When
``lmserve.tool_parsers`` (model-specific parsers, selected by ``--tool-call-parser``) is
wired in, it replaces this function behind the same contract.

Contract: ``content + calls`` account for the whole ``text``; arguments are a JSON object
serialized as a string (what both APIs carry).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, serialized
    call_id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class ExtractedToolCalls:
    content: str
    calls: tuple[ToolCall, ...] = ()


def _as_call(obj: object, tool_names: frozenset[str]) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(name, str) or name not in tool_names:
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name=name, arguments=json.dumps(args, ensure_ascii=False))


def _parse_json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def extract_tool_calls(text: str, tool_names: frozenset[str]) -> ExtractedToolCalls:
    """Splits ``text`` into message content and the calls of tools named in ``tool_names``."""
    if not tool_names:
        return ExtractedToolCalls(text)
    if "<tool_call>" in text:
        calls: list[ToolCall] = []
        for m in _HERMES.finditer(text):
            call = _as_call(_parse_json(m.group(1)), tool_names)
            if call is None:
                return ExtractedToolCalls(text)  # a malformed block: keep everything as text
            calls.append(call)
        return ExtractedToolCalls(_HERMES.sub("", text).strip(), tuple(calls))
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        obj = _parse_json(stripped)
        items = obj if isinstance(obj, list) else [obj]
        found = [_as_call(o, tool_names) for o in items]
        if items and all(c is not None for c in found):
            return ExtractedToolCalls("", tuple(c for c in found if c is not None))
    return ExtractedToolCalls(text)
