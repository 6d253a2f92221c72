"""Anthropic Messages API requests (POST /v1/messages, /v1/messages/count_tokens), as vLLM
0.32 accepts them, and their translation into a chat conversation.

Translation (as vLLM's ``to_chat_completion_request``): ``system`` (a string or text blocks)
is a system message; ``text`` blocks are message text; an assistant's ``tool_use`` blocks
are its ``tool_calls`` (``input`` serialized as the JSON arguments); a user's
``tool_result`` blocks are ``tool`` messages placed before the rest of that user turn.
An assistant's ``thinking`` blocks are its message's ``reasoning`` (``redacted_thinking`` is
skipped), as vLLM. Images are refused (text-only models).

Request options, as vLLM maps them onto the chat request: ``tool_choice`` auto/any/tool/none
is chat's "auto"/"required"/named function/"none", ``disable_parallel_tool_use`` is
``parallel_tool_calls=false``; ``thinking`` ``enabled`` is ``thinking_token_budget`` =
``budget_tokens`` (a 400 without ``--reasoning-parser``), ``adaptive`` pins nothing, ``disabled``
hands the chat template the --anthropic-disabled-thinking-effort (it wins over
``output_config.effort``); ``output_config.effort`` is ``reasoning_effort`` (a chat-template
kwarg); ``output_config.format`` is a JSON-schema structured output. The thinking always comes
back whole (``display`` "omitted" is refused).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmserve.entrypoints.openai.protocol_common import find_lone_surrogate
from lmserve.entrypoints.openai.protocol_completions import ChatCompletionRequest
from lmserve.errors import InvalidRequestError

ANTHROPIC_EFFORTS = ("low", "medium", "high", "xhigh", "max")
DISABLED_THINKING_EFFORTS = ("auto", "none", *ANTHROPIC_EFFORTS)
MIN_THINKING_BUDGET = 1024  # Anthropic's (and vLLM's) floor for thinking.budget_tokens


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
    thinking: str | None = None
    signature: str | None = None


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

    def chat_tool_choice(self) -> str | dict[str, Any]:
        """The chat request's ``tool_choice`` (vLLM's ``_convert_tool_choice``)."""
        if self.type == "tool":
            if not self.name:
                raise InvalidRequestError("tool_choice.name is required when type is 'tool'.", "tool_choice.name")
            return {"type": "function", "function": {"name": self.name}}
        return {"any": "required"}.get(self.type, self.type)


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
        self.thinking_budget()
        self.response_format()
        self.reasoning_effort()
        if self.tool_choice is not None:
            choice = self.tool_choice.chat_tool_choice()
            if isinstance(choice, dict) and choice["function"]["name"] not in {t.name for t in self.tools or []}:
                raise InvalidRequestError(f"tool_choice names the tool {self.tool_choice.name!r}, which is not one "
                                          "of the request's tools.", "tool_choice.name")

    def thinking_type(self) -> str | None:
        kind = (self.thinking or {}).get("type")
        if self.thinking is not None and kind not in ("enabled", "disabled", "adaptive"):
            raise InvalidRequestError(f"thinking.type must be 'enabled', 'disabled' or 'adaptive', not {kind!r}.",
                                      "thinking.type")
        if (self.thinking or {}).get("display") == "omitted":
            raise InvalidRequestError("thinking.display 'omitted' is not supported: the thinking always comes back "
                                      "whole (as vLLM); leave display unset.", "thinking.display")
        return kind

    def thinking_budget(self) -> int | None:
        """``thinking.budget_tokens`` for ``{"type": "enabled"}`` (the chat request's
        ``thinking_token_budget``), else None."""
        if self.thinking_type() != "enabled":
            return None
        budget = (self.thinking or {}).get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < MIN_THINKING_BUDGET:
            raise InvalidRequestError(f"thinking.budget_tokens must be an integer of at least {MIN_THINKING_BUDGET} "
                                      "when thinking is enabled.", "thinking.budget_tokens")
        return budget

    def reasoning_effort(self) -> str | None:
        """``output_config.effort`` as the chat request's ``reasoning_effort``; None when unset or
        when ``thinking`` is disabled (the disabled-thinking effort wins, as in vLLM)."""
        effort = (self.output_config or {}).get("effort")
        if effort is not None and effort not in ANTHROPIC_EFFORTS:
            raise InvalidRequestError(f"output_config.effort must be one of {', '.join(ANTHROPIC_EFFORTS)}, not "
                                      f"{effort!r}.", "output_config.effort")
        return None if self.thinking_type() == "disabled" else effort

    def chat_template_kwargs_with(self, disabled_effort: str | None) -> dict[str, Any] | None:
        """The request's ``chat_template_kwargs`` plus the ``reasoning_effort`` for disabled
        thinking (the request's own kwargs win)."""
        kwargs = dict(self.chat_template_kwargs or {})
        if disabled_effort is not None:
            kwargs.setdefault("reasoning_effort", disabled_effort)
        return kwargs or None

    def response_format(self) -> dict[str, Any] | None:
        """``output_config.format`` ({"type": "json_schema", "schema": ...}) as the chat request's
        ``response_format``, as vLLM maps it."""
        fmt = (self.output_config or {}).get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or fmt.get("type", "json_schema") != "json_schema" or \
                not isinstance(fmt.get("schema"), dict):
            raise InvalidRequestError("output_config.format must be {'type': 'json_schema', 'schema': {...}}.",
                                      "output_config.format")
        return {"type": "json_schema", "json_schema": {"name": "json_schema", "schema": fmt["schema"]}}

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
    reasoning: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    tool_results: list[dict[str, Any]] = []
    for j, b in enumerate(m.content):
        at = f"{where}.content.{j}"
        if b.type == "text":
            texts.append(b.text or "")
        elif b.type == "image":
            raise InvalidRequestError(f"{at}: image blocks are not supported; lmserve serves text-only models.", at)
        elif b.type == "thinking" and m.role == "assistant":
            reasoning.append(b.thinking or "")  # the message's reasoning, for templates that render it
        elif b.type == "redacted_thinking" and m.role == "assistant":
            pass  # opaque (encrypted) reasoning: accepted so clients can echo a turn back, as vLLM
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
                                      "thinking and tool_use from the assistant and tool_result from the user "
                                      "are).", at)
    out = list(tool_results)
    if texts or tool_calls or reasoning or not tool_results:
        msg: dict[str, Any] = {"role": m.role, "content": "\n".join(texts)}
        if reasoning:
            msg["reasoning"] = "".join(reasoning)
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

    def to_chat_request(self, request_id: str, disabled_effort: str | None) -> ChatCompletionRequest:
        """The chat request that generates this message (``disabled_effort``: the
        ``reasoning_effort`` for ``thinking: disabled``, None otherwise)."""
        self.check_supported()
        body: dict[str, Any] = {
            "model": self.model, "messages": self.chat_messages(), "tools": self.tools_offered() or None,
            "max_tokens": self.max_tokens, "stop": self.stop_sequences or [], "request_id": request_id,
            "cache_salt": self.cache_salt, "vllm_xargs": self.vllm_xargs,
            "chat_template_kwargs": self.chat_template_kwargs_with(disabled_effort),
            "reasoning_effort": self.reasoning_effort(), "thinking_token_budget": self.thinking_budget(),
            "response_format": self.response_format(), "kv_transfer_params": self.kv_transfer_params}
        if self.tool_choice is not None and (body["tools"] or self.tool_choice.type in ("any", "tool")):
            body["tool_choice"] = self.tool_choice.chat_tool_choice()
            body["parallel_tool_calls"] = not self.tool_choice.disable_parallel_tool_use
        for name in ("temperature", "top_k", "top_p"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        return ChatCompletionRequest.model_validate(body)


class AnthropicCountTokensRequest(_ConversationRequest):
    pass
