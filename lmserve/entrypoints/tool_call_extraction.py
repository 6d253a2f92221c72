"""The seam between the APIs that return tool calls (Responses ``function_call`` items,
Anthropic ``tool_use`` blocks) and whatever turns model text into tool calls.

``tool_call_extractor(chat, request)`` gives the function to apply to a finished output. For a
forced call (``tool_choice`` "required" or a named function, whose output constrained decoding
shapes) it reads vLLM's tool-call JSON as the chat completions API does. Otherwise, with
``--tool-call-parser`` and ``--enable-auto-tool-choice`` (``OpenAIServingChat.auto_tool_parser``, vLLM's
parser interface) it is that parser's ``extract_tool_calls``; else ``extract_tool_calls(text,
tool_names)``, which understands the two formats small instruction-tuned models use when no
model-specific parser is configured:

- Hermes style: one or more ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks (text outside the blocks is the message content);
- a bare JSON object (or list of objects) ``{"name": ..., "arguments"|"parameters": {...}}``
  that is the whole output.

A call whose ``name`` is not one of the request's tools is not a call: the text stays
content, so a model that merely talks JSON is never turned into a bogus call.

Contract: ``content + calls`` account for the whole ``text``; arguments are a JSON object
serialized as a string (what both APIs carry).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from lmserve.entrypoints.openai.chat_output import NamedCallReader, RequiredCallsReader

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


def _with_parser(text: str, tool_names: frozenset[str], parser: Any) -> ExtractedToolCalls:
    """The calls a ``lmserve.tool_parsers.ToolParser`` reads in ``text``; all of the text as content
    when it finds none, names a tool not offered, or gives arguments that are not a JSON object."""
    request = SimpleNamespace(tools=parser.tools, tool_choice="auto", skip_special_tokens=False)
    info = parser.extract_tool_calls(text, request)
    if not info.tools_called or any(c.function.name not in tool_names for c in info.tool_calls):
        return ExtractedToolCalls(text)
    calls = []
    for c in info.tool_calls:
        try:
            args = json.loads(c.function.arguments)
        except ValueError:
            return ExtractedToolCalls(text)
        if not isinstance(args, dict):
            return ExtractedToolCalls(text)
        calls.append(ToolCall(name=c.function.name, arguments=json.dumps(args, ensure_ascii=False),
                              **({"call_id": c.id} if getattr(c, "id", None) else {})))
    return ExtractedToolCalls((info.content or "").strip(), tuple(calls))


def extract_tool_calls(text: str, tool_names: frozenset[str], parser: Any = None) -> ExtractedToolCalls:
    """Splits ``text`` into message content and the calls of tools named in ``tool_names``;
    ``parser``: a ``lmserve.tool_parsers.ToolParser`` that reads the text instead."""
    if not tool_names:
        return ExtractedToolCalls(text)
    if parser is not None:
        return _with_parser(text, tool_names, parser)
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


def forced_tool_call(request: Any) -> bool:
    """Whether a chat request's ``tool_choice`` forces a call ("required" or a named function):
    the generation then runs under the chat completions API's tool rules
    (``start_generation(..., tool_calling=True)``: --tool-call-parser needed, output constrained)."""
    return isinstance(request.tool_choice, dict) or request.tool_choice == "required"


def tool_call_extractor(chat: Any, request: Any) -> Callable[[str], ExtractedToolCalls]:
    """The extraction for one chat request's output (``request``: the ``ChatCompletionRequest`` the
    Responses / Anthropic body became), built before its engine request starts. By its
    ``tool_choice``: "required" reads vLLM's constrained JSON array (``RequiredCallsReader``), a
    named function its arguments object (``NamedCallReader``), both as the chat completions API
    does; otherwise ("auto") the server's ``--tool-call-parser`` when it parses tool calls
    (--enable-auto-tool-choice, ``OpenAIServingChat.auto_tool_parser``), else the Hermes/JSON
    fallback over the tool names. ``parallel_tool_calls=False`` keeps the first call only."""
    tools = request.tools or []
    names = frozenset(t["function"]["name"] for t in tools)
    choice = request.tool_choice
    if not names or choice == "none":
        return ExtractedToolCalls
    if isinstance(choice, dict):
        parser: Any = NamedCallReader(choice["function"]["name"])
    elif choice == "required":
        parser = RequiredCallsReader(None, None)
    else:
        parser = chat.auto_tool_parser(tools)
    first_only = request.parallel_tool_calls is False

    def extract(text: str) -> ExtractedToolCalls:
        out = extract_tool_calls(text, names, parser)
        return ExtractedToolCalls(out.content, out.calls[:1]) if first_only and out.calls else out
    return extract
