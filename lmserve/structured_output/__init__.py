"""Constrained decoding (structured outputs) on xgrammar, as vLLM 0.32 does it.

A request's ``SamplingParams.structured_outputs`` (a ``StructuredOutputsParams``: json schema,
regex, choice, grammar, json_object or structural_tag) is compiled before the request is queued
(``StructuredOutputManager``), each sequence gets its own matcher (``GrammarState``, advanced by
the engine on every token it appends), and every step the sampler masks the logits of the
constrained rows with one token bitmask (``GrammarBitmask``).

For other subsystems (tool calling: ``tool_choice`` required / named), the whole API is to set
``params.structured_outputs``; ``json_schema_constraint`` and ``structural_tag_constraint`` build
one.
"""

from __future__ import annotations

import json
from typing import Any

from lmserve.sampling_params import StructuredOutputsParams
from lmserve.structured_output.config import StructuredOutputsConfig
from lmserve.structured_output.spec import GrammarSpec, spec_from_params


def json_schema_constraint(schema: dict[str, Any], disable_any_whitespace: bool = False) -> StructuredOutputsParams:
    """A constraint: the output is one JSON value valid against ``schema``."""
    return StructuredOutputsParams(json=schema, disable_any_whitespace=disable_any_whitespace)


def structural_tag_constraint(tag: dict[str, Any]) -> StructuredOutputsParams:
    """A constraint from an xgrammar structural tag (``{"type": "structural_tag", "format": ...}``
    or the legacy ``{"structures": [...], "triggers": [...]}``)."""
    return StructuredOutputsParams(structural_tag=json.dumps(tag))


__all__ = ["GrammarSpec", "StructuredOutputsConfig", "StructuredOutputsParams", "json_schema_constraint",
           "spec_from_params", "structural_tag_constraint"]
