"""Response and stream-chunk models of the OpenAI-compatible API (vLLM's shapes).

Standard OpenAI fields are always serialized (``null`` included, as OpenAI does); the
extra fields a request opts into (``prompt_token_ids``, ``token_ids``, ``prompt_text``,
``prompt_logprobs``, usage in chunks, ...) are listed in ``_omit_if_none`` and left out
when unset, so a plain request gets a plain OpenAI body.
"""

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_serializer

from lmserve.entrypoints.openai.protocol_common import random_uuid


def _is_none(value: Any) -> bool:
    return value is None


class ResponseModel(BaseModel):
    """``_omit_if_none`` fields are left out of the output when None (pydantic's ``exclude_if``,
    set per subclass: unlike a wrap serializer it keeps serialization in pydantic-core, which
    matters for whole-vocabulary logprobs, tens of thousands of entries a token)."""

    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        changed = False
        for name in cls._omit_if_none:
            info = cls.model_fields.get(name)
            if info is not None and info.exclude_if is None:
                info.exclude_if = _is_none
                changed = True
        if changed:
            cls.model_rebuild(force=True)


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(ResponseModel):
    error: ErrorInfo


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(ResponseModel):
    reasoning_tokens: int = 0


class UsageInfo(ResponseModel):
    _omit_if_none = frozenset({"prompt_tokens_details", "completion_tokens_details"})
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None  # with a reasoning parser (vLLM)


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
    # LogprobEntry values, or plain {logprob, rank, decoded_token} dicts for a whole vocabulary.
    prompt_logprobs: list[dict[int, Any] | None] | None = None
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
    # ChatCompletionLogProb items, or for a whole vocabulary (top_logprobs=-1) plain {token, logprob,
    # bytes} dicts (``list[Any]``: serialized as they are, 5-10x cheaper than one model per entry).
    top_logprobs: list[Any] = Field(default_factory=list)


class ChatCompletionLogProbs(ResponseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


def make_tool_call_id() -> str:
    """A tool call id as vLLM makes them."""
    return f"chatcmpl-tool-{random_uuid()}"


class FunctionCall(ResponseModel):
    name: str
    arguments: str


class ToolCall(ResponseModel):
    id: str = Field(default_factory=make_tool_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(ResponseModel):
    _omit_if_none = frozenset({"name", "arguments"})
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(ResponseModel):
    """One tool call's piece of a stream delta: the first carries id, type and the function
    name; later ones carry argument text only (``index`` says which call)."""

    _omit_if_none = frozenset({"id", "type", "function"})
    id: str | None = None
    type: Literal["function"] | None = None
    index: int
    function: DeltaFunctionCall | None = None


class ExtractedToolCallInformation(BaseModel):
    """What a tool parser makes of a whole output (vLLM's shape)."""

    tools_called: bool
    tool_calls: list[ToolCall]
    content: str | None = None


class ChatMessage(ResponseModel):
    """An answer message; ``tool_calls`` and ``reasoning`` are left out when empty/unset (as vLLM)."""

    _omit_if_none = frozenset({"reasoning"})
    role: str
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    reasoning: str | None = None

    @model_serializer(mode="wrap")
    def _drop_empty(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)
        if data.get("reasoning") is None:
            data.pop("reasoning", None)
        return data


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
    # LogprobEntry values, or plain {logprob, rank, decoded_token} dicts for a whole vocabulary.
    prompt_logprobs: list[dict[int, Any] | None] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None
    # vLLM's disaggregated-serving hand-off: always present, null here (no KV connector on this
    # build: a request's kv_transfer_params are accepted and the request runs locally, in full).
    kv_transfer_params: dict[str, Any] | None = None


class DeltaMessage(ResponseModel):
    """A stream delta (vLLM's shape): unset role/content/reasoning and empty tool_calls are left out."""

    _omit_if_none = frozenset({"role", "content", "reasoning"})
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _drop_empty(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in ("role", "content", "reasoning"):
            if data.get(key) is None:
                data.pop(key, None)
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)
        return data


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
