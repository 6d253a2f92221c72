"""``ReasoningParser`` (splits a model's output into reasoning and content) and
``ReasoningParserManager`` (the registry behind ``--reasoning-parser``), with vLLM's interface:
a vLLM reasoning parser ports by changing ``vllm.reasoning`` to ``lmserve.reasoning`` in its
imports. Like ``ToolParserManager``, the registry is class-level so that a
``--reasoning-parser-plugin`` file's ``@ReasoningParserManager.register_module("name")`` reaches
it; it only grows, before serving starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

from lmserve.entrypoints.openai.protocol_responses import DeltaMessage
from lmserve.parser_registry import ParserRegistry, import_plugin_file


class ReasoningParser:
    """Base class (vLLM's contract): ``extract_reasoning(model_output, request) -> (reasoning,
    content)``; ``extract_reasoning_streaming(previous_text, current_text, delta_text,
    previous_token_ids, current_token_ids, delta_token_ids) -> DeltaMessage | None``;
    ``is_reasoning_end(ids)``; ``is_reasoning_end_streaming(ids, delta_ids)`` (structured outputs:
    the grammar starts after the reasoning); ``extract_content_ids(ids)``; ``count_reasoning_tokens(ids)``;
    ``reasoning_start_str`` / ``reasoning_end_str`` (what a thinking budget forces).
    ``finish_streaming(current_text)`` (lmserve's addition, default None) sends what was held back."""

    def __init__(self, tokenizer: Any, *args: Any, **kwargs: Any) -> None:
        self.model_tokenizer = tokenizer

    @cached_property
    def vocab(self) -> dict[str, int]:
        return self.model_tokenizer.get_vocab() if self.model_tokenizer is not None else {}

    @property
    def reasoning_start_str(self) -> str | None:
        return None

    @property
    def reasoning_end_str(self) -> str | None:
        return None

    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        return False

    def is_reasoning_end_streaming(self, input_ids: Sequence[int], delta_ids: Sequence[int]) -> bool:
        """True if the reasoning ends within ``delta_ids``, the last tokens of ``input_ids``
        (vLLM's contract). This default rescans ``input_ids``; a parser should override it with a
        look at the delta alone, since it is called on every step of a constrained request
        whose reasoning is still open."""
        return self.is_reasoning_end(input_ids)

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        return list(input_ids)

    def count_reasoning_tokens(self, token_ids: Sequence[int]) -> int:
        return 0

    def adjust_request(self, request: Any) -> Any:
        return request

    def extract_reasoning(self, model_output: str, request: Any) -> tuple[str | None, str | None]:
        raise NotImplementedError("ReasoningParser.extract_reasoning has not been implemented")

    def extract_reasoning_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                    previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                    delta_token_ids: Sequence[int]) -> DeltaMessage | None:
        raise NotImplementedError("ReasoningParser.extract_reasoning_streaming has not been implemented")

    def finish_streaming(self, current_text: str) -> DeltaMessage | None:
        return None


class ReasoningParserManager(ParserRegistry):
    reasoning_parsers: dict[str, type[ReasoningParser]] = {}
    lazy_parsers: dict[str, tuple[str, str]] = {}
    _registered = reasoning_parsers
    _base = ReasoningParser
    _label = "reasoning parser"

    @classmethod
    def get_reasoning_parser(cls, name: str) -> type[ReasoningParser]:
        return cls._lookup(name)

    @classmethod
    def import_reasoning_parser(cls, plugin_path: str) -> None:
        import_plugin_file(plugin_path, "--reasoning-parser-plugin")
