"""``--reasoning-config`` (vLLM's ReasoningConfig): the strings that open and forcibly close a
thinking section, used by ``thinking_token_budget``.

``reasoning_start_str`` / ``reasoning_end_str`` default to the reasoning parser's markers; the end
string may add a transition phrase before the parser's own end marker (e.g.
``"\\nTime to answer.</think>"``). ``resolve`` tokenizes them once at start-up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_KEYS = ("reasoning_parser", "reasoning_start_str", "reasoning_end_str")


@dataclass
class ReasoningConfig:
    reasoning_parser: str = ""
    reasoning_start_str: str = ""
    reasoning_end_str: str = ""
    start_token_ids: list[int] = field(default_factory=list)
    end_token_ids: list[int] = field(default_factory=list)  # what the budget forces

    @classmethod
    def from_flag(cls, value: Any) -> "ReasoningConfig":
        """From --reasoning-config's JSON (a string or an already-parsed dict)."""
        data = json.loads(value) if isinstance(value, str) else (value or {})
        if not isinstance(data, dict):
            raise ValueError("--reasoning-config must be a JSON object")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise ValueError(f"--reasoning-config: unknown key(s) {unknown}; known: {list(_KEYS)}")
        for key in _KEYS:
            if key in data and not isinstance(data[key], str):
                raise ValueError(f"--reasoning-config: {key} must be a string")
        return cls(**{k: data[k] for k in _KEYS if k in data})

    @property
    def enabled(self) -> bool:
        return bool(self.start_token_ids and self.end_token_ids)

    def resolve(self, tokenizer: Any, parser: Any | None) -> "ReasoningConfig":
        """Fills the strings from ``parser`` (a ReasoningParser instance) where unset and
        tokenizes them; raises ValueError if a string tokenizes to nothing."""
        start = self.reasoning_start_str or (getattr(parser, "reasoning_start_str", None) or "")
        end = self.reasoning_end_str or (getattr(parser, "reasoning_end_str", None) or "")
        self.reasoning_start_str, self.reasoning_end_str = start, end
        if not start or not end or tokenizer is None:
            return self
        self.start_token_ids = list(tokenizer.encode(start, add_special_tokens=False))
        self.end_token_ids = list(tokenizer.encode(end, add_special_tokens=False))
        if not self.start_token_ids or not self.end_token_ids:
            raise ValueError(f"--reasoning-config: {start!r} / {end!r} do not tokenize to any token")
        return self
