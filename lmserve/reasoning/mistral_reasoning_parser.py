"""``mistral``: Magistral thinking, ``[THINK]...[/THINK]``. Reasoning is only what stands between
the markers (the output may begin with content or not think at all)."""

from __future__ import annotations

from lmserve.reasoning.basic_parsers import BaseThinkingReasoningParser


class MistralReasoningParser(BaseThinkingReasoningParser):
    start_token = "[THINK]"
    end_token = "[/THINK]"
    starts_in_reasoning = False
