"""``GrammarSpec``: a request's constraint in canonical, hashable form (the compile-cache key).

``spec_from_params(params, config)`` validates what can be checked without compiling (types,
JSON text that does not parse, an empty choice, options xgrammar cannot honour) and raises
``InvalidRequestError`` (a ``ValueError``, answered with HTTP 400) naming the field.
User strings are never evaluated; they only reach xgrammar's parsers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from lmserve.errors import InvalidRequestError
from lmserve.sampling_params import StructuredOutputsParams
from lmserve.structured_output.config import StructuredOutputsConfig

# A bound on a grammar's text (JSON schema, regex, grammar, choices together): compile time and
# memory grow with it.
MAX_SPEC_CHARS = 1_000_000
_PARAM = "structured_outputs"


@dataclass(frozen=True)
class GrammarSpec:
    """``kind`` is json | json_object | regex | grammar | lark | structural_tag; ``text`` the
    canonical source (JSON text with sorted keys for json and structural_tag, EBNF for a choice);
    ``any_whitespace``: JSON may hold whitespace between tokens."""

    kind: str
    text: str
    any_whitespace: bool = True


def _canonical_json(value: Any, what: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise InvalidRequestError(f"{_PARAM}.{what} is not valid JSON: {e}", f"{_PARAM}.{what}") from None
    if not isinstance(value, (dict, bool)):
        raise InvalidRequestError(f"{_PARAM}.{what} must be a JSON object, got {type(value).__name__}",
                                  f"{_PARAM}.{what}")
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _escape_ebnf(text: str) -> str:
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return "".join(escapes.get(c, f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in text)


def choice_as_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices``."""
    return "root ::= " + " | ".join(f'"{_escape_ebnf(c)}"' for c in choices)


def grammar_is_lark(text: str) -> bool:
    """As vLLM: a grammar is Lark unless a (non-comment) line holds ``::=`` (EBNF/GBNF)."""
    for line in text.split("\n"):
        if "::=" in re.sub(r"(#|//).*$", "", line):
            return False
    return True


def spec_from_params(params: StructuredOutputsParams, config: StructuredOutputsConfig | None = None
                     ) -> GrammarSpec:
    """The canonical spec of ``params`` under the server ``config``; raises InvalidRequestError."""
    config = config or StructuredOutputsConfig()
    if params.whitespace_pattern is not None:
        raise InvalidRequestError("structured_outputs.whitespace_pattern is not supported by the xgrammar "
                                  "backend; use disable_any_whitespace for compact JSON.",
                                  f"{_PARAM}.whitespace_pattern")
    any_ws = not (params.disable_any_whitespace or config.disable_any_whitespace)
    kind = params.constraint_kinds()[0]
    value = getattr(params, kind)
    if kind == "json":
        spec = GrammarSpec("json", _canonical_json(value, "json"), any_ws)
    elif kind == "json_object":
        spec = GrammarSpec("json_object", "", any_ws)
    elif kind == "structural_tag":
        spec = GrammarSpec("structural_tag", _canonical_json(value, "structural_tag"))
    elif kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise InvalidRequestError("structured_outputs.choice must be a non-empty list of strings.",
                                      f"{_PARAM}.choice")
        spec = GrammarSpec("grammar", choice_as_ebnf(value))
    else:  # regex, grammar
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequestError(f"structured_outputs.{kind} must be a non-empty string.", f"{_PARAM}.{kind}")
        if kind == "grammar" and grammar_is_lark(value):
            kind = "lark"
        spec = GrammarSpec(kind, value)
    if len(spec.text) > MAX_SPEC_CHARS:
        raise InvalidRequestError(f"structured_outputs.{params.constraint_kinds()[0]} is longer than "
                                  f"{MAX_SPEC_CHARS} characters.", _PARAM)
    return spec
