"""What a chat choice's generated text means: reasoning, content and tool calls.

``ChoiceParser`` runs, per choice, the reasoning parser (``--reasoning-parser``) first and then,
on the content after the reasoning, the tool-call reading that the request's ``tool_choice``
calls for:

- ``auto`` (with ``--enable-auto-tool-choice``): the ``--tool-call-parser`` reads the text;
- ``required``: the text is the JSON array ``[{"name": ..., "parameters": {...}}, ...]`` that
  constrained decoding makes the model write (vLLM's schema, ``tool_choice_schema``);
- a named function: the text is that function's arguments object;
- otherwise (``none``, or auto without --enable-auto-tool-choice) the text is plain content.

``full()`` reads a whole output; ``stream()`` / ``finish()`` read it delta by delta. For the
built-in parsers the streamed reasoning, content and argument fragments concatenate to exactly
what ``full()`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmserve.entrypoints.openai.protocol_responses import DeltaMessage, FunctionCall, ToolCall, make_tool_call_id
from lmserve.reasoning.abs_reasoning_parsers import ReasoningParser
from lmserve.tool_parsers.abstract_tool_parser import ToolParser
from lmserve.tool_parsers.json_calls import call_from_node
from lmserve.tool_parsers.partial_json import parse_partial, render
from lmserve.tool_parsers.scanning import Scan, ScannedCall, ScanningToolParser

TOOL_MODES = ("none", "auto", "required", "named")


def _schema_or_empty(params: Any) -> dict[str, Any]:
    return params if isinstance(params, dict) and params else {"type": "object", "properties": {}}


def tool_choice_schema(tools: list[dict[str, Any]], tool_choice: Any,
                       parallel_tool_calls: bool | None) -> dict[str, Any] | None:
    """The JSON schema constrained decoding enforces for ``tool_choice`` (vLLM's
    ``get_json_schema_from_tools``): a named function's parameters; for "required" an array of
    at least one ``{"name": <one of the tools>, "parameters": <its schema>}`` (at most one
    when ``parallel_tool_calls`` is false); None for auto/none."""
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        for tool in tools:
            if tool["function"]["name"] == name:
                return _schema_or_empty(tool["function"].get("parameters"))
        raise ValueError(f"Tool '{name}' has not been passed in `tools`.")
    if tool_choice != "required":
        return None
    defs: dict[str, Any] = {}
    options = []
    for tool in tools:
        fn = tool["function"]
        params = dict(_schema_or_empty(fn.get("parameters")))
        for key, value in (params.pop("$defs", None) or {}).items():
            if key in defs and defs[key] != value:
                raise ValueError(f"Tool definition '{key}' has multiple schemas, which is not supported.")
            defs[key] = value
        options.append({"properties": {"name": {"type": "string", "enum": [fn["name"]]}, "parameters": params},
                        "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": options}}
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


class RequiredCallsReader(ScanningToolParser):
    """Reads the ``tool_choice="required"`` array ``[{"name": ..., "parameters": {...}}, ...]``."""

    def scan(self, text: str, final: bool) -> Scan:
        p = parse_partial(text)
        out = Scan(content="")
        root = p.root
        if root is None:
            if final or p.error:
                out.calls.append(ScannedCall(error=True))
            return out
        if root.kind != "arr":
            out.calls.append(ScannedCall(error=True))
            return out
        for k, item in enumerate(root.items):
            ended = final or p.error or root.closed or k < len(root.items) - 1
            out.calls.append(call_from_node(item, ended, ("parameters",)))
        broken = p.error or (final and not root.closed) or not (root.items or not root.closed)
        if broken:
            if not out.calls:
                out.calls.append(ScannedCall())
            out.calls[-1].error = True
        return out


class NamedCallReader(ScanningToolParser):
    """Reads a named ``tool_choice``: the whole text is the arguments object of that function."""

    def __init__(self, name: str) -> None:
        super().__init__(None, None)
        self.name = name

    def scan(self, text: str, final: bool) -> Scan:
        p = parse_partial(text)
        call = ScannedCall(name=self.name)
        if p.error or (p.root is not None and p.root.kind != "obj"):
            call.error = True
        elif p.root is not None:
            call.arguments = render(p.root)
            call.complete = p.root.closed and not text[p.end:].strip()
            call.error = p.root.closed and not call.complete
        if final and not call.complete:
            call.error = True
        if p.root is None and not final:
            return Scan(content="", calls=[])
        return Scan(content="", calls=[call])


@dataclass
class ParsedChoice:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


class ChoiceParser:
    """One choice's reading (see the module docstring). ``mode`` is one of TOOL_MODES."""

    def __init__(self, request: Any, mode: str, reasoning: ReasoningParser | None, tools: ToolParser | None,
                 include_reasoning: bool = True) -> None:
        self.request = request
        self.mode = mode
        self.reasoning_parser = reasoning
        if mode == "required":
            tools = RequiredCallsReader(None, None)
        elif mode == "named":
            tools = NamedCallReader(request.tool_choice["function"]["name"])
        elif mode != "auto":
            tools = None
        self.tool_parser = tools
        self.include_reasoning = include_reasoning
        self.parallel = request.parallel_tool_calls is not False
        self._text = ""
        self._content = ""
        self.tools_streamed = False

    # ------------------------------------------------------------------ whole output
    def full(self, text: str) -> ParsedChoice:
        reasoning, content = (self.reasoning_parser.extract_reasoning(text, self.request)
                              if self.reasoning_parser is not None else (None, text))
        if not self.include_reasoning:
            reasoning = None
        calls: list[ToolCall] = []
        if self.tool_parser is not None:
            info = self.tool_parser.extract_tool_calls(content or "", self.request)
            if info.tools_called:
                calls = [ToolCall(id=c.id or make_tool_call_id(),
                                  function=FunctionCall(name=c.function.name, arguments=c.function.arguments))
                         for c in info.tool_calls]
                content = info.content
                if self.mode != "auto" or (content is not None and not content.strip()):
                    content = None
            elif self.mode != "auto" and not (content or "").strip():
                content = None
        if not self.parallel:
            calls = calls[:1]
        return ParsedChoice(reasoning, content, calls)

    # ------------------------------------------------------------------ streaming
    def _tool_stage(self, piece: str | None, final: bool) -> DeltaMessage | None:
        if self.tool_parser is None:
            return DeltaMessage(content=piece) if piece else None
        prev = self._content
        self._content += piece or ""
        out: DeltaMessage | None = None
        if piece:
            out = self.tool_parser.extract_tool_calls_streaming(prev, self._content, piece, [], [], [], self.request)
        if final:
            last = self.tool_parser.finish_streaming(self._content, self.request)
            out = merge_deltas(out, last)
        return out

    def _deliver(self, reasoning_delta: DeltaMessage | None, tool_delta: DeltaMessage | None) -> DeltaMessage | None:
        reasoning = reasoning_delta.reasoning if reasoning_delta is not None and self.include_reasoning else None
        calls = list(tool_delta.tool_calls) if tool_delta is not None else []
        if not self.parallel:
            calls = [c for c in calls if c.index == 0]
        if calls:
            self.tools_streamed = True
        content = tool_delta.content if tool_delta is not None else None
        if not reasoning and not content and not calls:
            return None
        return DeltaMessage(reasoning=reasoning or None, content=content or None, tool_calls=calls)

    def stream(self, delta_text: str, delta_ids: list[int]) -> DeltaMessage | None:
        """The delta to send for newly generated ``delta_text`` (None: nothing yet)."""
        if not delta_text:
            return None
        prev = self._text
        self._text += delta_text
        if self.reasoning_parser is None:
            return self._deliver(None, self._tool_stage(delta_text, False))
        rd = self.reasoning_parser.extract_reasoning_streaming(prev, self._text, delta_text, [], [], delta_ids)
        return self._deliver(rd, self._tool_stage(rd.content if rd is not None else None, False))

    def finish(self) -> DeltaMessage | None:
        """The last delta: what the parsers held back until the output ended."""
        rd = self.reasoning_parser.finish_streaming(self._text) if self.reasoning_parser is not None else None
        return self._deliver(rd, self._tool_stage(rd.content if rd is not None else None, True))


def merge_deltas(a: DeltaMessage | None, b: DeltaMessage | None) -> DeltaMessage | None:
    if a is None or b is None:
        return a or b
    return DeltaMessage(content=((a.content or "") + (b.content or "")) or None,
                        reasoning=((a.reasoning or "") + (b.reasoning or "")) or None,
                        tool_calls=list(a.tool_calls) + list(b.tool_calls))


def tool_mode(tool_choice: Any, enable_auto_tools: bool, has_parser: bool) -> str:
    """The ChoiceParser mode for a request's (validated) ``tool_choice``."""
    if isinstance(tool_choice, dict):
        return "named"
    if tool_choice == "required":
        return "required"
    if tool_choice == "auto" and enable_auto_tools and has_parser:
        return "auto"
    return "none"

