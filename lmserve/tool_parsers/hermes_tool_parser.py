"""``hermes`` (also ``qwen3_json``): Hermes 2 Pro / Qwen2.5 / Qwen3 JSON tool calls.

Format (as the Hermes and Qwen chat templates write it)::

    optional text<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call><tool_call>
    ...

The content is the text before the first ``<tool_call>``; text after the calls is dropped (as
vLLM). A call without its closing ``</tool_call>`` at the end of the output still counts when its
JSON is complete.
"""

from __future__ import annotations

from typing import Any

from lmserve.tool_parsers.json_calls import scan_json_call
from lmserve.tool_parsers.scanning import Scan, ScanningToolParser, content_before, tag_overlap


class Hermes2ProToolParser(ScanningToolParser):
    tool_call_start_token = "<tool_call>"
    tool_call_end_token = "</tool_call>"

    def adjust_request(self, request: Any) -> Any:
        # <tool_call> is a special token in some vocabularies: keep it in the text.
        if getattr(request, "tools", None) and getattr(request, "tool_choice", None) != "none":
            request.skip_special_tokens = False
        return request

    def scan(self, text: str, final: bool) -> Scan:
        start, end = self.tool_call_start_token, self.tool_call_end_token
        content, at = content_before(text, start, final)
        out = Scan(content=content)
        while at >= 0:
            body_start = at + len(start)
            close = text.find(end, body_start)
            body_end = close if close >= 0 else len(text)
            body = text[body_start:body_end]
            if close < 0 and not final:
                body = body[:len(body) - tag_overlap(body, end)]
            call, stop = scan_json_call(body, 0, final or close >= 0, ("arguments",))
            if call.complete and body[stop:].strip():
                call.error = True  # text after the JSON inside the tags
            out.calls.append(call)
            if close < 0 or call.error:
                break
            at = text.find(start, close + len(end))
        return out
