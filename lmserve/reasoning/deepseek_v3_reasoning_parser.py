"""``deepseek_v3``: DeepSeek V3.1+ hybrid thinking. With ``chat_template_kwargs`` ``thinking`` (or
``enable_thinking``) true it reads the output as DeepSeek R1 does; otherwise the whole output is
content (vLLM's rule: thinking is off unless asked for)."""

from __future__ import annotations

from typing import Any

from lmserve.reasoning.basic_parsers import BaseThinkingReasoningParser


class DeepSeekV3ReasoningParser(BaseThinkingReasoningParser):
    start_token = "<think>"
    end_token = "</think>"

    def __init__(self, tokenizer: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(tokenizer, *args, **kwargs)
        chat_kwargs = kwargs.get("chat_template_kwargs") or {}
        self.thinking_enabled = bool(chat_kwargs.get("thinking", False) or chat_kwargs.get("enable_thinking", False))
