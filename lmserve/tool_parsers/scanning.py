"""The base of lmserve's built-in tool parsers: each one writes a single ``scan(text, final)``
and gets both vLLM entry points from it, consistent by construction.

``scan`` reads the output so far and says what it holds: the content text that is certain
(``final=False`` holds back any tail that could still become a tool-call marker) and each tool
call begun, with its name once known and its arguments as canonical JSON text so far
(``partial_json.render``).

Contract every ``scan`` keeps (the tests check it at every character boundary): for a prefix ``p``
of ``t``, ``scan(p, False)`` reports content that is a prefix of ``scan(t, True)``'s, the same
names, and argument texts that are prefixes of ``scan(t, True)``'s. Hence the stream's content
pieces and argument fragments concatenate to exactly the non-streaming content and arguments.

Whole output (``extract_tool_calls``): a tool call counts only when complete and well formed; if
any begun call is not, no call is returned and the whole output is the content (vLLM's rule).
Streaming cannot take back what it sent: a call found malformed after its name went out stays
sent, cut short; one found malformed earlier is sent as content at the end, as the whole output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmserve.entrypoints.openai.protocol_responses import (DeltaFunctionCall, DeltaMessage, DeltaToolCall,
                                                          ExtractedToolCallInformation, FunctionCall, ToolCall,
                                                          make_tool_call_id)
from lmserve.tool_parsers.abstract_tool_parser import ToolParser


@dataclass
class ScannedCall:
    name: str | None = None  # set once the whole name is known
    arguments: str = ""  # canonical JSON argument text so far
    complete: bool = False  # the call (arguments included) is finished
    error: bool = False  # the call cannot be read


@dataclass
class Scan:
    content: str = ""
    calls: list[ScannedCall] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every begun call is complete and well formed (only meaningful for a final scan)."""
        return bool(self.calls) and all(c.complete and not c.error and c.name for c in self.calls)


def tag_overlap(text: str, tag: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def content_before(text: str, marker: str, final: bool) -> tuple[str, int]:
    """(content, index of ``marker`` or -1): the text before the marker; without it, all the
    text, less a tail that could begin the marker unless ``final``."""
    at = text.find(marker)
    if at >= 0:
        return text[:at], at
    if final:
        return text, -1
    return text[:len(text) - tag_overlap(text, marker)], -1


def tool_schema(tools: list[Any], name: str) -> dict[str, Any]:
    """The JSON schema of the named function's parameters ({} when unknown)."""
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else getattr(tool, "function", None)
        if isinstance(fn, dict) and fn.get("name") == name:
            params = fn.get("parameters")
            return params if isinstance(params, dict) else {}
        if fn is not None and getattr(fn, "name", None) == name:
            params = getattr(fn, "parameters", None)
            return params if isinstance(params, dict) else {}
    return {}


class ScanningToolParser(ToolParser):
    """A ToolParser defined by ``scan``; see the module docstring for the contract."""

    def __init__(self, tokenizer: Any, tools: list[Any] | None = None) -> None:
        super().__init__(tokenizer, tools)
        self._sent_content = 0  # characters of content sent
        self._sent_ids: list[str] = []  # the id of each call whose header went out
        self._sent_args: list[str] = []
        self._finished = False

    def scan(self, text: str, final: bool) -> Scan:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ whole output
    def extract_tool_calls(self, model_output: str, request: Any) -> ExtractedToolCallInformation:
        s = self.scan(model_output, True)
        if not s.ok:
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)
        calls = [ToolCall(function=FunctionCall(name=c.name or "", arguments=c.arguments)) for c in s.calls]
        return ExtractedToolCallInformation(tools_called=True, tool_calls=calls, content=s.content or None)

    # ------------------------------------------------------------------ streaming
    def _delta(self, s: Scan, final: bool) -> DeltaMessage | None:
        content = s.content[self._sent_content:] if len(s.content) > self._sent_content else ""
        self._sent_content = max(self._sent_content, len(s.content))
        pieces: list[DeltaToolCall] = []
        for i, call in enumerate(s.calls):
            if call.name is None or call.error:
                break
            if i >= len(self._sent_ids):
                self._sent_ids.append(make_tool_call_id())
                self._sent_args.append("")
                self.prev_tool_call_arr.append({"name": call.name, "arguments": ""})
                self.streamed_args_for_tool.append("")
                self.current_tool_id = i
                pieces.append(DeltaToolCall(index=i, id=self._sent_ids[i], type="function",
                                            function=DeltaFunctionCall(name=call.name)))
            sent = self._sent_args[i]
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                pieces.append(DeltaToolCall(index=i, function=DeltaFunctionCall(arguments=call.arguments[len(sent):])))
                self._sent_args[i] = self.streamed_args_for_tool[i] = call.arguments
                self.prev_tool_call_arr[i]["arguments"] = call.arguments
        if not content and not pieces:
            return None
        return DeltaMessage(content=content or None, tool_calls=pieces)

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                     previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                     delta_token_ids: Sequence[int], request: Any) -> DeltaMessage | None:
        return self._delta(self.scan(current_text, False), False)

    def finish_streaming(self, current_text: str, request: Any) -> DeltaMessage | None:
        """The last delta: what the final scan adds, or, when the output turned out to hold no
        well-formed call and no call went out, the rest of the output as content."""
        if self._finished:
            return None
        self._finished = True
        s = self.scan(current_text, True)
        if not s.ok and not self._sent_ids:
            rest = current_text[self._sent_content:]
            self._sent_content = len(current_text)
            return DeltaMessage(content=rest) if rest else None
        return self._delta(s, True)
