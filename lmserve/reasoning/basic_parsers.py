"""Reasoning parsers for models that think between a start and an end marker
(``<think>...</think>``, ``[THINK]...[/THINK]``).

``scan(text, final) -> (reasoning, content)`` says what the output holds so far; while not
``final`` it holds back a tail that could still become a marker. As for tool parsers, a scan
of a prefix reports a prefix of the final reasoning and content, so the streamed pieces
concatenate to the whole-output split exactly.

Two kinds:
- ``starts_in_reasoning`` (DeepSeek R1, Qwen3 with thinking on): the output begins inside the
  reasoning (the prompt's template may have opened it); an optional start marker at the very
  beginning is dropped; everything up to the end marker is reasoning. Without an end marker
  the whole output is reasoning (vLLM's rule).
- otherwise (Mistral): reasoning only inside start...end; an unclosed start runs to the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

from lmserve.entrypoints.openai.protocol_responses import DeltaMessage
from lmserve.reasoning.abs_reasoning_parsers import ReasoningParser
from lmserve.tool_parsers.scanning import tag_overlap


class BaseThinkingReasoningParser(ReasoningParser):
    start_token: str = "<think>"
    end_token: str = "</think>"
    starts_in_reasoning: bool = True

    def __init__(self, tokenizer: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(tokenizer, *args, **kwargs)
        self.thinking_enabled = True  # False: the whole output is content
        self._sent_reasoning = 0
        self._sent_content = 0
        self._finished = False

    @property
    def reasoning_start_str(self) -> str:
        return self.start_token

    @property
    def reasoning_end_str(self) -> str:
        return self.end_token

    # ------------------------------------------------------------------ token ids
    def _ids(self, text: str) -> list[int]:
        tok = self.model_tokenizer
        if tok is None:
            return []
        return list(tok.encode(text, add_special_tokens=False))

    @cached_property
    def _start_ids(self) -> list[int]:
        return self._ids(self.start_token)

    @cached_property
    def _end_ids(self) -> list[int]:
        return self._ids(self.end_token)

    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        """The last marker in ``input_ids`` is an end marker. Always True with thinking off (the
        whole output is content, as vLLM's identity parser says)."""
        if not self.thinking_enabled:
            return True
        start, end = self._start_ids, self._end_ids
        ids = list(input_ids)
        for i in range(len(ids), 0, -1):
            if start and ids[max(0, i - len(start)):i] == start:
                return False
            if end and ids[max(0, i - len(end)):i] == end:
                return True
        return False

    def is_reasoning_end_streaming(self, input_ids: Sequence[int], delta_ids: Sequence[int]) -> bool:
        """An end marker finishes within the last ``len(delta_ids)`` tokens of ``input_ids``
        (O(len(delta_ids) * marker length): no rescan of the whole sequence)."""
        if not self.thinking_enabled:
            return True
        end = self._end_ids
        n, k = len(input_ids), len(end)
        if not end:
            return False
        for stop in range(max(k, n - len(delta_ids) + 1), n + 1):
            if all(input_ids[stop - k + j] == end[j] for j in range(k)):
                return True
        return False

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        end = self._end_ids
        ids = list(input_ids)
        for i in range(len(ids) - len(end) + 1):
            if end and ids[i:i + len(end)] == end:
                return ids[i + len(end):]
        return []

    def count_reasoning_tokens(self, token_ids: Sequence[int]) -> int:
        """Tokens inside the reasoning (markers excluded); from the first token when the output
        starts inside it."""
        if not self.thinking_enabled:
            return 0
        start, end = self._start_ids, self._end_ids
        ids = list(token_ids)
        count, inside, i = 0, self.starts_in_reasoning, 0
        while i < len(ids):
            if start and ids[i:i + len(start)] == start:
                inside, i = True, i + len(start)
                continue
            if end and ids[i:i + len(end)] == end:
                inside, i = False, i + len(end)
                continue
            count += inside
            i += 1
        return count

    # ------------------------------------------------------------------ text
    def scan(self, text: str, final: bool) -> tuple[str, str]:
        if not self.thinking_enabled:
            return "", text
        start, end = self.start_token, self.end_token
        if self.starts_in_reasoning:
            body = text
            if body.startswith(start):
                body = body[len(start):]
            elif not final and start.startswith(body):
                return "", ""
            at = body.find(end)
            if at >= 0:
                return body[:at], body[at + len(end):]
            if not final:
                body = body[:len(body) - tag_overlap(body, end)]
            return body, ""
        at = text.find(start)
        if at < 0:
            keep = text if final else text[:len(text) - tag_overlap(text, start)]
            return "", keep
        inner = text[at + len(start):]
        close = inner.find(end)
        if close < 0:
            if not final:
                inner = inner[:len(inner) - tag_overlap(inner, end)]
            return inner, text[:at]
        return inner[:close], text[:at] + inner[close + len(end):]

    def extract_reasoning(self, model_output: str, request: Any) -> tuple[str | None, str | None]:
        reasoning, content = self.scan(model_output, True)
        if not self.thinking_enabled or (not self.starts_in_reasoning and self.start_token not in model_output):
            return None, model_output
        return reasoning, content or None

    def _delta(self, reasoning: str, content: str) -> DeltaMessage | None:
        r = reasoning[self._sent_reasoning:]
        c = content[self._sent_content:]
        self._sent_reasoning = max(self._sent_reasoning, len(reasoning))
        self._sent_content = max(self._sent_content, len(content))
        if not r and not c:
            return None
        return DeltaMessage(reasoning=r or None, content=c or None)

    def extract_reasoning_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                    previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                    delta_token_ids: Sequence[int]) -> DeltaMessage | None:
        return self._delta(*self.scan(current_text, False))

    def finish_streaming(self, current_text: str) -> DeltaMessage | None:
        if self._finished:
            return None
        self._finished = True
        return self._delta(*self.scan(current_text, True))


class IdentityReasoningParser(ReasoningParser):
    """No reasoning: the whole output is content (thinking turned off)."""

    def extract_reasoning(self, model_output: str, request: Any) -> tuple[str | None, str | None]:
        return None, model_output

    def extract_reasoning_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                    previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                    delta_token_ids: Sequence[int]) -> DeltaMessage | None:
        return DeltaMessage(content=delta_text) if delta_text else None
