"""Shared pieces of the OpenAI-compatible request models: the base model that every request
extends (unknown fields ignored, no lone surrogates, no NaN/inf), the chat message of the chat,
tokenizer and pooling APIs, request-id checks and the bounds and schemas the request modules share.
The invariants of the request models are listed in ``protocol``.
"""

import time
import unicodedata
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmserve.errors import InvalidRequestError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The OpenAPI schema of a prompt / input field (validated by hand, for vLLM's messages): text, texts,
# token ids, or lists of token ids.
PROMPT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                           {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                           {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                            "minItems": 1}]}


def random_uuid() -> str:
    return uuid.uuid4().hex


def find_lone_surrogate(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string in ``value`` (JSON data) that holds a lone
    surrogate, or None. Dict keys are checked too."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return where or "body"
        elif isinstance(v, dict):
            for k, item in v.items():
                key = str(k).encode("utf-8", "backslashreplace").decode("utf-8")  # the path is text too
                sub = f"{where}.{key}" if where else key
                if isinstance(k, str) and key != k:
                    return sub
                stack.append((item, sub))
        elif isinstance(v, list):
            stack.extend((item, f"{where}.{i}") for i, item in enumerate(v) if isinstance(item, (str, dict, list)))
    return None


def check_request_id(value: str, param: str = "request_id") -> str:
    """``value`` if it can be a request id: at most 256 characters, none of them control or
    format characters (Unicode category C*: newlines, escapes, bidi overrides)."""
    if len(value) > 256:
        raise InvalidRequestError(f"{param} is longer than 256 characters.", param)
    if not value.isprintable() or any(unicodedata.category(c)[0] == "C" for c in value):
        raise InvalidRequestError(f"{param} must not contain control or format characters.", param)
    return value


class OpenAIBaseModel(BaseModel):
    """Accepts unknown fields (ignored, as vLLM does); refuses lone surrogates and NaN/inf."""

    model_config = ConfigDict(extra="allow", protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = find_lone_surrogate(data)
        if where is not None:
            raise ValueError(f"{where} contains a lone UTF-16 surrogate (such as \\ud800), which is not valid "
                             "Unicode text")
        return data

    def ignored_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class ChatMessageParam(OpenAIBaseModel):
    """One chat message. Extra keys (tool_calls, name, ...) are passed to the template."""

    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None

    def to_template_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def now() -> int:
    return int(time.time())
