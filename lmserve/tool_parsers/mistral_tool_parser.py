"""``mistral``: Mistral tool calls, both tokenizer generations.

    text[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]other[ARGS]{}     (v11+ tokenizers)
    text[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]  (older ones)

The content is the text before the first ``[TOOL_CALLS]``.
"""

from __future__ import annotations

from typing import Any

from lmserve.tool_parsers.json_calls import call_from_node
from lmserve.tool_parsers.partial_json import parse_partial, render
from lmserve.tool_parsers.scanning import Scan, ScannedCall, ScanningToolParser, content_before, tag_overlap

_WS = " \t\r\n"


class MistralToolParser(ScanningToolParser):
    bot_token = "[TOOL_CALLS]"
    args_token = "[ARGS]"

    def adjust_request(self, request: Any) -> Any:
        if getattr(request, "tools", None) and getattr(request, "tool_choice", None) != "none":
            request.skip_special_tokens = False  # [TOOL_CALLS] is a control token
        return request

    def scan(self, text: str, final: bool) -> Scan:
        content, at = content_before(text, self.bot_token, final)
        out = Scan(content=content)
        if at < 0:
            return out
        pos = at + len(self.bot_token)
        while pos < len(text) and text[pos] in _WS:
            pos += 1
        if text.startswith("[", pos):
            self._scan_list(text, pos, final, out)
        else:
            self._scan_named(text, pos, final, out)
        return out

    @staticmethod
    def _scan_list(text: str, pos: int, final: bool, out: Scan) -> None:
        p = parse_partial(text, pos)
        root = p.root
        assert root is not None and root.kind == "arr"
        for k, item in enumerate(root.items):
            last = k == len(root.items) - 1
            call = call_from_node(item, final or p.error or root.closed or not last, ("arguments",))
            out.calls.append(call)
        broken = p.error or (final and not root.closed) or (p.end >= 0 and bool(text[p.end:].strip()))
        if root.closed and not root.items:
            broken = True
        if broken:
            if not out.calls:
                out.calls.append(ScannedCall())
            out.calls[-1].error = True

    def _scan_named(self, text: str, pos: int, final: bool, out: Scan) -> None:
        while True:
            at = text.find(self.args_token, pos)
            if at < 0:
                name_part = text[pos:]
                kept = name_part[:len(name_part) - tag_overlap(name_part, self.args_token)]
                bad = any(c in _WS for c in kept.strip()) or "[" in kept
                if final or bad:
                    out.calls.append(ScannedCall(error=True))
                elif name_part.strip():
                    out.calls.append(ScannedCall())
                return
            name = text[pos:at].strip()
            call = self._with_arguments(text, at + len(self.args_token), final, name)
            out.calls.append(call)
            if call.error or not call.complete:
                return
            pos = parse_partial(text, at + len(self.args_token)).end
            while pos < len(text) and text[pos] in _WS:
                pos += 1
            if pos >= len(text):
                return
            if text.startswith(self.bot_token, pos):
                pos += len(self.bot_token)
                continue
            if not final and self.bot_token.startswith(text[pos:]):
                return
            call.error = True
            return

    @staticmethod
    def _with_arguments(text: str, pos: int, final: bool, name: str) -> ScannedCall:
        call = ScannedCall(name=name or None, error=not name or any(c in _WS for c in name))
        p = parse_partial(text, pos)
        if p.error or (p.root is not None and p.root.kind != "obj"):
            call.error = True
            return call
        call.arguments = render(p.root)
        call.complete = p.root is not None and p.root.closed
        if final and not call.complete:
            call.error = True
        return call
