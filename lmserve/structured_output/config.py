"""``--structured-outputs-config``: the server-wide structured-output settings (vLLM's
``StructuredOutputsConfig``, same keys), validated once at start-up.

Contract: ``StructuredOutputsConfig.from_cli(value)`` takes the flag's JSON (a dict or a JSON
string; the dotted form ``--structured-outputs-config.backend xgrammar`` arrives as a dict) and
returns a config, or raises ``ValueError`` naming the key and what to use instead. Every key of
vLLM's config is either honoured or refused there; nothing is silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

# Backends vLLM can use. lmserve runs xgrammar only; "auto" picks it.
SUPPORTED_BACKENDS = ("auto", "xgrammar")
VLLM_ONLY_BACKENDS = ("guidance", "outlines", "lm-format-enforcer")
DEFAULT_COMPILE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """Server-wide structured-output settings.

    - ``backend``: "auto" or "xgrammar" (both run xgrammar).
    - ``disable_any_whitespace``: JSON is generated compact (no whitespace between tokens).
    - ``disable_additional_properties``: JSON objects get no properties the schema does not
      declare. xgrammar's strict mode always behaves so, so the key is accepted either way
      (vLLM needs it only to make its guidance backend behave like xgrammar).
    - ``reasoning_parser`` / ``reasoning_parser_plugin``: must be empty here; choose the
      reasoning parser with ``--reasoning-parser``.
    - ``enable_in_reasoning``: with a reasoning parser (``--reasoning-parser``) the grammar
      constrains only what follows the reasoning; true makes it constrain from the first token.
    - ``disable_fallback`` (older vLLM): accepted; there is never a fallback backend, a constraint
      xgrammar cannot take is a 400.
    - ``compile_timeout_s`` (lmserve): a grammar that takes longer to compile is refused with a 400.
    """

    backend: str = "auto"
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    reasoning_parser: str = ""
    reasoning_parser_plugin: str = ""
    enable_in_reasoning: bool = False
    disable_fallback: bool = False
    compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.backend in VLLM_ONLY_BACKENDS:
            raise ValueError(f"--structured-outputs-config: backend {self.backend!r} is not available in lmserve; "
                             "lmserve constrains decoding with xgrammar (backend 'xgrammar' or 'auto').")
        if self.backend not in SUPPORTED_BACKENDS:
            raise ValueError(f"--structured-outputs-config: unknown backend {self.backend!r}; use 'xgrammar' or "
                             "'auto'.")
        for name in ("disable_any_whitespace", "disable_additional_properties", "enable_in_reasoning",
                     "disable_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"--structured-outputs-config: {name} must be true or false.")
        for name in ("reasoning_parser", "reasoning_parser_plugin"):
            if getattr(self, name):
                raise ValueError(f"--structured-outputs-config: {name} is not read here; choose the reasoning "
                                 "parser with --reasoning-parser (and --reasoning-parser-plugin).")
        if isinstance(self.compile_timeout_s, bool) or not isinstance(self.compile_timeout_s, (int, float)) \
                or not 0 < self.compile_timeout_s <= 3600:
            raise ValueError("--structured-outputs-config: compile_timeout_s must be a number of seconds in "
                             "(0, 3600].")

    @classmethod
    def from_cli(cls, value: Any) -> "StructuredOutputsConfig":
        if value is None:
            return cls()
        if isinstance(value, StructuredOutputsConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"--structured-outputs-config must be a JSON object: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("--structured-outputs-config must be a JSON object, e.g. '{\"backend\": \"xgrammar\"}'.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"--structured-outputs-config: unknown key(s) {unknown}; known keys: {sorted(known)}.")
        return cls(**value)
