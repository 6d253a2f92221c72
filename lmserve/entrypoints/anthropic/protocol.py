"""Anthropic Messages API requests (POST /v1/messages, /v1/messages/count_tokens), as vLLM
0.32 accepts them, and their translation into a chat conversation.

Translation (as vLLM's ``to_chat_completion_request``): ``system`` (a string or text blocks)
is a system message; ``text`` blocks are message text; an assistant's ``tool_use`` blocks
are its ``tool_calls`` (``input`` serialized as the JSON arguments); a user's
``tool_result`` blocks are ``tool`` messages placed before the rest of that user turn.
Images are refused (text-only models); so are ``thinking`` blocks and thinking itself
(lmserve has no reasoning parser) and anything that needs structured outputs
(``tool_choice`` any/tool, ``output_config.format``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmserve.entrypoints.openai.protocol import ChatCompletionRequest, find_lone_surrogate
from lmserve.errors import InvalidRequestError

DISABLED_THINKING_EFFORTS = ("auto", "none", "low", "medium", "high", "xhigh", "max")
_NO_STRUCTURED = "structured outputs are not available in this build of lmserve"


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = find_lone_surrogate(data)
        if where is not None:
            raise ValueError(f"{where} contains a lone UTF-16 surrogate, which is not valid Unicode text")
        return data

    def ignored_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class AnthropicContentBlock(_Base):
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None


class AnthropicMessage(_Base):
    role: Literal["user", "assistant", "system"]
    content: str | list[AnthropicContentBlock]


class AnthropicTool(_Base):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]


class AnthropicToolChoice(_Base):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class _ConversationRequest(_Base):
    model: str = Field(min_length=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[AnthropicContentBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        kind = (self.thinking or {}).get("type")
        if kind not in (None, "disabled"):
            raise InvalidRequestError(f"thinking {{'type': {kind!r}}} is not supported: lmserve has no reasoning "
                                      "parser; omit thinking or send {'type': 'disabled'}.", "thinking")
        config = self.output_config or {}
        if config.get("format") is not None:
            raise InvalidRequestError(f"output_config.format: {_NO_STRUCTURED}.", "output_config.format")
        if config.get("effort") is not None:
            raise InvalidRequestError("output_config.effort is not supported: lmserve has no reasoning parser.",
                                      "output_config.effort")
        if self.tool_choice is not None and self.tool_choice.type in ("any", "tool"):
            raise InvalidRequestError(f"tool_choice {{'type': {self.tool_choice.type!r}}} is not supported: forcing "
                                      f"a tool call needs structured outputs ({_NO_STRUCTURED}); use 'auto' or "
                                      "'none'.", "tool_choice")

    def tools_offered(self) -> list[dict[str, Any]]:
        """The tools in chat-completions form; none when tool_choice is 'none'."""
        if not self.tools or (self.tool_choice is not None and self.tool_choice.type == "none"):
            return []
        out = []
        for t in self.tools:
            schema = dict(t.input_schema)
            schema.setdefault("type", "object")
            fn: dict[str, Any] = {"name": t.name, "parameters": schema}
            if t.description is not None:
                fn["description"] = t.description
            out.append({"type": "function", "function": fn})
        return out

    def chat_messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.system is not None:
            text = self.system if isinstance(self.system, str) else _joined_text(self.system, "system")
            if text:
                messages.append({"role": "system", "content": text})
        for i, m in enumerate(self.messages):
            messages.extend(_convert_message(m, f"messages.{i}"))
        return messages


def _joined_text(blocks: list[AnthropicContentBlock], where: str) -> str:
    texts = []
    for j, b in enumerate(blocks):
        if b.type != "text":
            raise InvalidRequestError(f"{where}.{j}: only text blocks are allowed here, not {b.type!r}.",
                                      f"{where}.{j}")
        texts.append(b.text or "")
    return "\n".join(texts)


def _tool_result_text(content: str | list[dict[str, Any]] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise InvalidRequestError(f"{where}.{j}: tool_result content must be text blocks (lmserve serves "
                                      "text-only models).", f"{where}.{j}")
        texts.append(str(part.get("text") or ""))
    return "\n".join(texts)


def _convert_message(m: AnthropicMessage, where: str) -> list[dict[str, Any]]:
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    tool_results: list[dict[str, Any]] = []
    for j, b in enumerate(m.content):
        at = f"{where}.content.{j}"
        if b.type == "text":
            texts.append(b.text or "")
        elif b.type == "image":
            raise InvalidRequestError(f"{at}: image blocks are not supported; lmserve serves text-only models.", at)
        elif b.type == "tool_use" and m.role == "assistant":
            if not b.id or not b.name:
                raise InvalidRequestError(f"{at}: a tool_use block needs id and name.", at)
            tool_calls.append({"id": b.id, "type": "function",
                               "function": {"name": b.name, "arguments": json.dumps(b.input or {},
                                                                                    ensure_ascii=False)}})
        elif b.type == "tool_result" and m.role == "user":
            if not b.tool_use_id:
                raise InvalidRequestError(f"{at}: a tool_result block needs tool_use_id.", at)
            tool_results.append({"role": "tool", "tool_call_id": b.tool_use_id,
                                 "content": _tool_result_text(b.content, f"{at}.content")})
        else:
            raise InvalidRequestError(f"{at}: {b.type!r} blocks are not supported in {m.role} messages (text, "
                                      "tool_use from the assistant and tool_result from the user are).", at)
    out = list(tool_results)
    if texts or tool_calls or not tool_results:
        msg: dict[str, Any] = {"role": m.role, "content": "\n".join(texts)}
        if tool_calls:
            msg["tool_calls"] = tool_calls
        out.append(msg)
    return out


class AnthropicMessagesRequest(_ConversationRequest):
    max_tokens: int = Field(ge=1)
    metadata: dict[str, Any] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_k: int | None = Field(None, ge=-1)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None

    def to_chat_request(self, request_id: str, reasoning_effort: str | None) -> ChatCompletionRequest:
        self.check_supported()
        if self.kv_transfer_params:
            raise InvalidRequestError("kv_transfer_params: disaggregated serving is not supported.",
                                      "kv_transfer_params")
        kwargs = dict(self.chat_template_kwargs or {})
        if reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", reasoning_effort)
        body: dict[str, Any] = {
            "model": self.model, "messages": self.chat_messages(), "tools": self.tools_offered() or None,
            "max_tokens": self.max_tokens, "stop": self.stop_sequences or [], "request_id": request_id,
            "cache_salt": self.cache_salt, "vllm_xargs": self.vllm_xargs, "chat_template_kwargs": kwargs or None}
        for name in ("temperature", "top_k", "top_p"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        return ChatCompletionRequest.model_validate(body)


class AnthropicCountTokensRequest(_ConversationRequest):
    pass
