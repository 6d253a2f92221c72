"""``llama3_json`` / ``llama4_json``: Llama 3.1+/4 JSON tool calls.

Format (vLLM's examples/tool_chat_template_llama3.1_json.jinja asks for it)::

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ...}

The leading ``<|python_tag|>`` is optional; ``"arguments"`` is read where ``"parameters"`` is
absent. The output is a tool call only when it begins (after whitespace) with the tag or ``{``;
then it is nothing but calls separated by ``;`` (no content). Any other output is content.
"""

from __future__ import annotations

from typing import Any

from lmserve.tool_parsers.json_calls import call_from_node
from lmserve.tool_parsers.partial_json import parse_partial
from lmserve.tool_parsers.scanning import Scan, ScannedCall, ScanningToolParser

_ARG_KEYS = ("parameters", "arguments")


class Llama3JsonToolParser(ScanningToolParser):
    bot_token = "<|python_tag|>"

    def adjust_request(self, request: Any) -> Any:
        if getattr(request, "tools", None) and getattr(request, "tool_choice", None) != "none":
            request.skip_special_tokens = False  # <|python_tag|> is a special token
        return request

    def scan(self, text: str, final: bool) -> Scan:
        rest = text.lstrip()
        start = len(text) - len(rest)
        if rest.startswith(self.bot_token):
            start += len(self.bot_token)
        elif not rest.startswith("{"):
            if not final and (not rest or self.bot_token.startswith(rest)):
                return Scan(content="")  # may still turn into a call
            return Scan(content=text)
        out = Scan(content="")
        pos = start
        while True:
            p = parse_partial(text, pos)
            if p.root is None and not p.error:
                if final and not out.calls:
                    out.calls.append(ScannedCall(error=True))
                return out  # nothing (more) begun yet
            call = call_from_node(p.root, final or p.error, _ARG_KEYS)
            call.error = call.error or p.error
            out.calls.append(call)
            if p.end < 0 or call.error:
                return out
            pos = p.end
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos >= len(text):
                return out
            if text[pos] != ";":
                call.error = True
                return out
            pos += 1
