"""Response and stream-chunk models of the OpenAI-compatible API (vLLM's shapes).

Standard OpenAI fields are always serialized (``null`` included, as OpenAI does); the
extra fields a request opts into (``prompt_token_ids``, ``token_ids``, ``prompt_text``,
``prompt_logprobs``, usage in chunks, ...) are listed in ``_omit_if_none`` and left out
when unset, so a plain request gets a plain OpenAI body.
"""

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_serializer

from lmserve.entrypoints.openai.protocol import random_uuid


class ResponseModel(BaseModel):
    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_unset_extras(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in self._omit_if_none:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(ResponseModel):
    error: ErrorInfo


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0


class UsageInfo(ResponseModel):
    _omit_if_none = frozenset({"prompt_tokens_details"})
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class LogprobEntry(ResponseModel):
    """One entry of ``prompt_logprobs`` (vLLM's ``Logprob``)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# ---------------------------------------------------------------------- completions
class CompletionLogProbs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(ResponseModel):
    _omit_if_none = frozenset({"prompt_logprobs", "prompt_token_ids", "token_ids"})
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, LogprobEntry] | None] | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(ResponseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{random_uuid()}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    # vLLM's disaggregated-serving hand-off: always present, null here (no KV connector on this
    # build: a request's kv_transfer_params are accepted and the request runs locally, in full).
    kv_transfer_params: dict[str, Any] | None = None


class CompletionResponseStreamChoice(ResponseModel):
    _omit_if_none = frozenset({"prompt_token_ids", "token_ids"})
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionStreamResponse(ResponseModel):
    _omit_if_none = frozenset({"usage"})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------------- chat
class ChatCompletionLogProb(ResponseModel):
    token: str
    logprob: float = -9999.0
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(ResponseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class ChatMessage(ResponseModel):
    role: str
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatCompletionResponseChoice(ResponseModel):
    _omit_if_none = frozenset({"token_ids"})
    index: int
    message: ChatMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(ResponseModel):
    _omit_if_none = frozenset({"prompt_logprobs", "prompt_token_ids", "prompt_text"})
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_logprobs: list[dict[int, LogprobEntry] | None] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None
    # vLLM's disaggregated-serving hand-off: always present, null here (no KV connector on this
    # build: a request's kv_transfer_params are accepted and the request runs locally, in full).
    kv_transfer_params: dict[str, Any] | None = None


class DeltaMessage(ResponseModel):
    _omit_if_none = frozenset({"role", "content"})
    role: str | None = None
    content: str | None = None


class ChatCompletionResponseStreamChoice(ResponseModel):
    _omit_if_none = frozenset({"token_ids"})
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionStreamResponse(ResponseModel):
    _omit_if_none = frozenset({"usage", "prompt_token_ids", "prompt_text"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None


# ---------------------------------------------------------------------- models, tokenizer
class ModelPermission(ResponseModel):
    id: str = Field(default_factory=lambda: f"modelperm-{random_uuid()}")
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "lmserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(ResponseModel):
    prompt: str
