"""Request and response models of the pooling APIs (vLLM's field names and defaults):
/v1/embeddings, /pooling, /classify, /score (+ /v1/score) and /rerank (+ /v1, /v2).

Invariants:
- type and shape errors are pydantic errors (400 naming the field); cross-field rules are
  ``InvalidRequestError`` from ``validate_request()``;
- unknown fields are accepted and ignored, as in the other APIs;
- ``to_pooling_params()`` never mutates the request; it sets the task of the API and
  leaves ``truncate_prompt_tokens`` to the server (it truncates while tokenizing);
- response ids carry vLLM's prefixes: ``embd-``, ``pool-``, ``classify-``, ``score-``, ``rerank-``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lmserve.entrypoints.openai.protocol_common import (INT64_MAX, INT64_MIN, PROMPT_SCHEMA, ChatMessageParam,
                                                        OpenAIBaseModel, check_request_id, now, random_uuid)
from lmserve.entrypoints.openai.protocol_responses import ResponseModel, UsageInfo
from lmserve.errors import InvalidRequestError
from lmserve.pooling_params import POOLING_TASKS, PoolingParams

EncodingFormat = Literal["float", "base64"]

_INPUT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


def check_input_shape(v: Any) -> Any:
    """``input`` as the OpenAI embeddings API takes it; ValueError naming the problem."""
    if isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise ValueError(f"input must be {_INPUT_SHAPES}")
    if not v:
        raise ValueError(f"input must be {_INPUT_SHAPES} (got an empty list)")
    if all(isinstance(p, str) for p in v):
        return v
    if all(type(t) is int for t in v):
        return v
    if all(isinstance(p, list) for p in v):
        for p in v:
            if not p:
                raise ValueError("a prompt of token ids cannot be empty")
            if not all(type(t) is int for t in p):
                raise ValueError("each prompt of token ids must be a list of integers")
        return v
    raise ValueError(f"input must be {_INPUT_SHAPES}, not a mix")


def input_items(v: str | list) -> list[str | list[int]]:
    """The prompts of a checked ``input``: each item is text or token ids."""
    if isinstance(v, str) or (v and type(v[0]) is int):
        return [v]
    return list(v)


# ---------------------------------------------------------------------- requests
class PoolingBaseRequest(OpenAIBaseModel):
    """Fields every pooling request shares."""

    model: str | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=INT64_MAX)
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)
    request_id: str = Field(default_factory=random_uuid, max_length=256)
    additional_data: Any = None

    @field_validator("request_id")
    @classmethod
    def _printable_id(cls, v: str) -> str:
        return check_request_id(v)

    def validate_request(self) -> None:
        if self.truncate_prompt_tokens == 0:
            raise InvalidRequestError("truncate_prompt_tokens must be -1 or at least 1.", "truncate_prompt_tokens")

    def pooling_kwargs(self) -> dict[str, Any]:
        """The PoolingParams fields this request sets (besides the task)."""
        return {}

    def to_pooling_params(self, task: str | None) -> PoolingParams:
        try:
            return PoolingParams(task=task, **self.pooling_kwargs())
        except ValueError as e:
            raise InvalidRequestError(str(e), str(e).split(" ", 1)[0]) from e


class InputRequest(PoolingBaseRequest):
    """``input``: text(s) or token ids, each one prompt."""

    input: Any = Field(..., json_schema_extra=PROMPT_SCHEMA)
    add_special_tokens: bool = True

    @field_validator("input")
    @classmethod
    def _check_input(cls, v: Any) -> Any:
        return check_input_shape(v)

    def items(self) -> list[str | list[int]]:
        return input_items(self.input)


class ChatInputRequest(PoolingBaseRequest):
    """``messages``: one conversation rendered through the chat template into one prompt."""

    messages: list[ChatMessageParam] = Field(min_length=1)
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the template holds the special tokens
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None

    def validate_request(self) -> None:
        super().validate_request()
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequestError("Cannot set both `continue_final_message` and `add_generation_prompt` "
                                      "to True.", "continue_final_message")


class _EmbedFields(OpenAIBaseModel):
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = Field(None, ge=1, le=INT64_MAX)
    normalize: bool | None = None

    def pooling_kwargs(self) -> dict[str, Any]:
        return {"dimensions": self.dimensions, "normalize": self.normalize}


class _ActivationFields(OpenAIBaseModel):
    use_activation: bool | None = None
    activation: bool | None = None  # older names of use_activation
    softmax: bool | None = None

    def pooling_kwargs(self) -> dict[str, Any]:
        value = self.use_activation
        for alias in (self.activation, self.softmax):
            if value is None and alias is not None:
                value = alias
        return {"use_activation": value}


class EmbeddingCompletionRequest(_EmbedFields, InputRequest):
    """POST /v1/embeddings with ``input``."""


class EmbeddingChatRequest(_EmbedFields, ChatInputRequest):
    """POST /v1/embeddings with ``messages``."""


EmbeddingRequest = EmbeddingCompletionRequest | EmbeddingChatRequest


class _PoolingFields(_EmbedFields, _ActivationFields):
    task: str | None = None  # None or "encode": the model's per-token task

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str | None) -> str | None:
        if v is not None and v != "encode" and v not in POOLING_TASKS:
            raise ValueError(f"task must be one of {', '.join(POOLING_TASKS)} or encode")
        return v

    def pooling_kwargs(self) -> dict[str, Any]:
        return {**_EmbedFields.pooling_kwargs(self), **_ActivationFields.pooling_kwargs(self)}


class PoolingCompletionRequest(_PoolingFields, InputRequest):
    """POST /pooling with ``input``."""


class PoolingChatRequest(_PoolingFields, ChatInputRequest):
    """POST /pooling with ``messages``."""


PoolingRequest = PoolingCompletionRequest | PoolingChatRequest


class ClassificationCompletionRequest(_ActivationFields, InputRequest):
    """POST /classify with ``input``."""


class ClassificationChatRequest(_ActivationFields, ChatInputRequest):
    """POST /classify with ``messages``."""


ClassificationRequest = ClassificationCompletionRequest | ClassificationChatRequest


def _texts(v: Any, name: str) -> Any:
    if isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v)):
        return v
    raise ValueError(f"{name} must be a string or a list of strings")


class ScoreRequest(_ActivationFields, PoolingBaseRequest):
    """POST /score: ``text_1`` against ``text_2`` (1-1, 1-N or N-N). ``data_1``/``data_2`` and
    ``queries``/``documents`` are accepted as other names of the two sides."""

    text_1: Any = Field(...)
    text_2: Any = Field(...)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for a, b in (("data_1", "data_2"), ("queries", "documents")):
                if "text_1" not in data and a in data:
                    data = {**data, "text_1": data[a]}
                if "text_2" not in data and b in data:
                    data = {**data, "text_2": data[b]}
        return data

    @field_validator("text_1", "text_2")
    @classmethod
    def _check_texts(cls, v: Any, info: Any) -> Any:
        return _texts(v, info.field_name)


class RerankDocumentParam(OpenAIBaseModel):
    text: str


class RerankRequest(_ActivationFields, PoolingBaseRequest):
    """POST /rerank, /v1/rerank, /v2/rerank (Jina's and Cohere's request shapes).

    ``top_n`` of 0 (the default) or less returns every document; ``return_documents``
    (Cohere) leaves the document text out of the results when false. Documents are strings
    or ``{"text": ...}`` objects (Cohere v1)."""

    query: str
    documents: list[str | RerankDocumentParam]
    top_n: int = Field(0, ge=INT64_MIN, le=INT64_MAX)
    return_documents: bool = True
    max_tokens_per_doc: int | None = Field(None, ge=1)  # Cohere v2; documents are truncated by the model

    @field_validator("documents")
    @classmethod
    def _nonempty(cls, v: list) -> list:
        if not v:
            raise ValueError("documents must hold at least one document")
        return v

    def document_texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


# ---------------------------------------------------------------------- responses
class EmbeddingResponseData(ResponseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str


class EmbeddingResponse(ResponseModel):
    id: str = Field(default_factory=lambda: f"embd-{random_uuid()}")
    object: Literal["list"] = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[EmbeddingResponseData]
    usage: UsageInfo


class PoolingResponseData(ResponseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[list[float]] | list[float] | str


class PoolingResponse(ResponseModel):
    id: str = Field(default_factory=lambda: f"pool-{random_uuid()}")
    object: Literal["list"] = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[PoolingResponseData]
    usage: UsageInfo


class ClassificationData(ResponseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(ResponseModel):
    id: str = Field(default_factory=lambda: f"classify-{random_uuid()}")
    object: Literal["list"] = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[ClassificationData]
    usage: UsageInfo


class ScoreResponseData(ResponseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(ResponseModel):
    id: str = Field(default_factory=lambda: f"score-{random_uuid()}")
    object: Literal["list"] = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[ScoreResponseData]
    usage: UsageInfo


class RerankDocument(ResponseModel):
    text: str


class RerankResult(ResponseModel):
    _omit_if_none = frozenset({"document"})
    index: int
    document: RerankDocument | None = None
    relevance_score: float


class RerankUsage(ResponseModel):
    total_tokens: int


class RerankResponse(ResponseModel):
    id: str = Field(default_factory=lambda: f"rerank-{random_uuid()}")
    model: str
    usage: RerankUsage
    results: list[RerankResult]
