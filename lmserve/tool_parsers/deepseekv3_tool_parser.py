"""``deepseek_v3``: DeepSeek V3 / R1 tool calls (their chat template's format)::

    text<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁call▁begin｜>...<｜tool▁calls▁end｜>

The content is the text before ``<｜tool▁calls▁begin｜>``.
"""

from __future__ import annotations

from typing import Any

from lmserve.tool_parsers.partial_json import parse_partial, render
from lmserve.tool_parsers.scanning import Scan, ScannedCall, ScanningToolParser, content_before

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
ARGS_OPEN = "\n```json\n"
ARGS_CLOSE = "```"
_WS = " \t\r\n"


def _expect(text: str, pos: int, token: str, final: bool) -> int | None:
    """The index past ``token`` at ``pos``; -1 when the text ends inside a prefix of it (more
    may come); None when something else is there."""
    if text.startswith(token, pos):
        return pos + len(token)
    if not final and token.startswith(text[pos:]):
        return -1
    return None


class DeepSeekV3ToolParser(ScanningToolParser):
    def adjust_request(self, request: Any) -> Any:
        if getattr(request, "tools", None) and getattr(request, "tool_choice", None) != "none":
            request.skip_special_tokens = False
        return request

    def scan(self, text: str, final: bool) -> Scan:
        content, at = content_before(text, CALLS_BEGIN, final)
        out = Scan(content=content)
        if at < 0:
            return out
        pos = at + len(CALLS_BEGIN)
        while True:
            while pos < len(text) and text[pos] in _WS:
                pos += 1
            if pos >= len(text):
                if final and not out.calls:
                    out.calls.append(ScannedCall(error=True))
                return out
            if out.calls and (text.startswith(CALLS_END, pos) or (not final and CALLS_END.startswith(text[pos:]))):
                return out
            nxt = _expect(text, pos, CALL_BEGIN, final)
            if nxt is None:
                out.calls.append(ScannedCall(error=True))
                return out
            if nxt < 0:
                return out
            call, pos = self._one_call(text, nxt, final)
            out.calls.append(call)
            if call.error or not call.complete:
                return out

    @staticmethod
    def _one_call(text: str, pos: int, final: bool) -> tuple[ScannedCall, int]:
        call = ScannedCall()
        sep = text.find(SEP, pos)
        if sep < 0:
            call.error = final
            return call, len(text)
        opened = text.find(ARGS_OPEN, sep)
        name_part = text[sep + len(SEP):opened if opened >= 0 else len(text)]
        if opened < 0:
            nl = name_part.find("\n")
            call.error = final or (nl >= 0 and not ARGS_OPEN.startswith(name_part[nl:]))
            return call, len(text)
        name = name_part.strip()
        if not name or any(c in _WS for c in name):
            call.error = True
            return call, len(text)
        call.name = name
        p = parse_partial(text, opened + len(ARGS_OPEN))
        if p.error or (p.root is not None and p.root.kind != "obj"):
            call.error = True
            return call, len(text)
        call.arguments = render(p.root)
        if p.end < 0:
            call.error = final
            return call, len(text)
        pos = p.end
        while pos < len(text) and text[pos] in _WS:
            pos += 1
        for token in (ARGS_CLOSE, CALL_END):
            nxt = _expect(text, pos, token, final)
            if nxt is None:
                call.error = True
                return call, len(text)
            if nxt < 0:
                return call, len(text)
            pos = nxt
        call.complete = True
        return call, pos
