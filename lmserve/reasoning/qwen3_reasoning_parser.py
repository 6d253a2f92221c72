"""``qwen3``: Qwen3 thinking, ``<think>...</think>``. The output starts inside the reasoning
unless the request turned thinking off (``chat_template_kwargs={"enable_thinking": false}``: the
template then closes an empty think block in the prompt and the whole output is content)."""

from __future__ import annotations

from typing import Any

from lmserve.reasoning.basic_parsers import BaseThinkingReasoningParser


class Qwen3ReasoningParser(BaseThinkingReasoningParser):
    start_token = "<think>"
    end_token = "</think>"

    def __init__(self, tokenizer: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(tokenizer, *args, **kwargs)
        chat_kwargs = kwargs.get("chat_template_kwargs") or {}
        self.thinking_enabled = bool(chat_kwargs.get("enable_thinking", True))
