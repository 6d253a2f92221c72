"""``deepseek_r1``: DeepSeek R1 thinking, ``<think>...</think>``; R1's template opens the think
block in the prompt, so the output starts inside the reasoning (a leading ``<think>`` is dropped)."""

from __future__ import annotations

from lmserve.reasoning.basic_parsers import BaseThinkingReasoningParser


class DeepSeekR1ReasoningParser(BaseThinkingReasoningParser):
    start_token = "<think>"
    end_token = "</think>"
