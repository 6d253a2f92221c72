"""The request of POST /v1/responses (OpenAI's Responses API plus vLLM 0.32's extra fields,
seed 001) and its translation into a chat conversation.

Invariants:
- every field is honoured or refused with a 400 naming it (``check_supported``); unknown
  fields are accepted and logged as ignored, as on the other routes;
- ``input`` items become chat-template messages (``input_messages``): ``message`` items keep
  their role (``developer`` renders as ``system``), ``function_call`` items become an
  assistant message's ``tool_calls``, ``function_call_output`` items ``tool`` messages;
  images and files are refused (lmserve serves text-only models);
- ``instructions`` are a system message in front of this turn only: with
  ``previous_response_id`` the earlier turn's instructions are not carried over (OpenAI's rule).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from lmserve.entrypoints.openai.protocol import (INT64_MAX, INT64_MIN, ChatCompletionRequest, OpenAIBaseModel,
                                                 random_uuid)
from lmserve.errors import InvalidRequestError

_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
_STRUCTURED = ("structured outputs are not available in this build of lmserve, so text.format {kind!r} cannot "
               "be enforced; use text.format {{'type': 'text'}} and describe the format in the instructions")


class ResponsesRequest(OpenAIBaseModel):
    """POST /v1/responses."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool | None = True
    previous_response_id: str | None = None
    store: bool | None = True
    stream: bool | None = False
    background: bool | None = False
    metadata: dict[str, str] | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: str | None = "disabled"
    user: str | None = None
    service_tier: str = "auto"
    max_tool_calls: int | None = None
    prompt: dict[str, Any] | None = None
    top_logprobs: int | None = 0
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's extra request fields (seed 001)
    request_id: str = Field(default_factory=lambda: f"resp_{random_uuid()}", max_length=256)
    media_io_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)
    cache_salt: str | None = None
    enable_response_messages: bool = False
    previous_input_messages: list[Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    repetition_penalty: float | None = Field(None, gt=0.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = Field(default_factory=list)
    ignore_eos: bool = False
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None
    kv_transfer_params: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    # ------------------------------------------------------------------ checks
    def check_supported(self) -> None:
        """Refuses, with a 400 naming the field, what this server cannot do."""
        fmt = (self.text or {}).get("format") or {"type": "text"}
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        if kind != "text":
            raise InvalidRequestError(_STRUCTURED.format(kind=kind), "text.format")
        if self.structured_outputs:
            raise InvalidRequestError(_STRUCTURED.format(kind="structured_outputs"), "structured_outputs")
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            raise InvalidRequestError("reasoning is not supported: lmserve has no reasoning parser; leave "
                                      "reasoning unset.", "reasoning")
        if self.include:
            raise InvalidRequestError(f"include {self.include!r} is not supported: responses carry no logprobs, "
                                      "reasoning or tool outputs to include.", "include")
        if self.top_logprobs:
            raise InvalidRequestError("top_logprobs is not supported on /v1/responses; use /v1/chat/completions "
                                      "with logprobs=true.", "top_logprobs")
        if self.truncation not in (None, "disabled"):
            raise InvalidRequestError("truncation 'auto' is not supported: an input longer than the context is "
                                      "refused (truncation 'disabled').", "truncation")
        if self.prompt is not None:
            raise InvalidRequestError("prompt templates (prompt.id) are not supported: send the input itself.",
                                      "prompt")
        if self.max_tool_calls is not None:
            raise InvalidRequestError("max_tool_calls is not supported: there are no built-in tools; the model "
                                      "returns function calls for the client to run.", "max_tool_calls")
        if self.media_io_kwargs or self.mm_processor_kwargs:
            raise InvalidRequestError("lmserve serves text-only models: media_io_kwargs and mm_processor_kwargs "
                                      "do not apply.", "media_io_kwargs" if self.media_io_kwargs
                                      else "mm_processor_kwargs")
        if self.previous_input_messages is not None:
            raise InvalidRequestError("previous_input_messages is for harmony (gpt-oss) models only; use "
                                      "previous_response_id or send the earlier turns as input items.",
                                      "previous_input_messages")
        if self.kv_transfer_params:
            raise InvalidRequestError("kv_transfer_params: disaggregated serving is not supported.",
                                      "kv_transfer_params")
        if self.background and self.stream:
            raise InvalidRequestError("background=true with stream=true is not supported: create the response "
                                      "in the background and poll GET /v1/responses/{id}.", "stream")
        if self.background and self.store is False:
            raise InvalidRequestError("background=true needs store=true: a background response is fetched from "
                                      "the store.", "background")
        if isinstance(self.tool_choice, dict) or self.tool_choice not in ("auto", "none"):
            raise InvalidRequestError(f"tool_choice {self.tool_choice!r} is not supported: forcing a tool call "
                                      "needs structured outputs; use 'auto' or 'none'.", "tool_choice")

    def function_tools(self) -> list[dict[str, Any]]:
        """The tools in chat-completions form ({"type": "function", "function": {...}})."""
        out = []
        for i, tool in enumerate(self.tools):
            if tool.get("type") != "function":
                raise InvalidRequestError(f"tools[{i}]: tool type {tool.get('type')!r} is not supported; only "
                                          "'function' tools are (there are no built-in tools).", f"tools.{i}")
            name = tool.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidRequestError(f"tools[{i}].name is required.", f"tools.{i}.name")
            fn = {"name": name, "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
            if tool.get("description") is not None:
                fn["description"] = tool["description"]
            out.append({"type": "function", "function": fn})
        return out

    # ------------------------------------------------------------------ translation
    def input_messages(self) -> list[dict[str, Any]]:
        """This turn's ``input`` as chat-template messages."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        messages: list[dict[str, Any]] = []
        for i, item in enumerate(self.input):
            kind = item.get("type", "message")
            where = f"input.{i}"
            if kind == "message":
                role = item.get("role")
                if role not in ("user", "assistant", "system", "developer"):
                    raise InvalidRequestError(f"{where}.role must be user, assistant, system or developer.",
                                              f"{where}.role")
                messages.append({"role": "system" if role == "developer" else role,
                                 "content": _text_of(item.get("content"), f"{where}.content")})
            elif kind == "function_call":
                call = {"id": _required_str(item, "call_id", where), "type": "function",
                        "function": {"name": _required_str(item, "name", where),
                                     "arguments": _required_str(item, "arguments", where)}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif kind == "function_call_output":
                messages.append({"role": "tool", "tool_call_id": _required_str(item, "call_id", where),
                                 "content": _text_of(item.get("output"), f"{where}.output")})
            else:
                raise InvalidRequestError(f"{where}: input items of type {kind!r} are not supported (message, "
                                          "function_call and function_call_output are).", f"{where}.type")
        return messages

    def to_chat_request(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
                        ) -> ChatCompletionRequest:
        """The chat request that generates this response (validated like any chat request)."""
        body: dict[str, Any] = {
            "model": self.model, "messages": messages, "tools": tools or None, "stream": False,
            "request_id": self.request_id, "priority": self.priority, "cache_salt": self.cache_salt,
            "skip_special_tokens": self.skip_special_tokens, "ignore_eos": self.ignore_eos,
            "include_stop_str_in_output": self.include_stop_str_in_output, "stop": self.stop,
            "chat_template_kwargs": self.chat_template_kwargs, "vllm_xargs": self.vllm_xargs,
            "logit_bias": self.logit_bias}
        for name in ("max_output_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty", "seed"):
            value = getattr(self, name)
            if value is not None:
                body["max_tokens" if name == "max_output_tokens" else name] = value
        return ChatCompletionRequest.model_validate(body)


def _required_str(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequestError(f"{where}.{key} is required (a string).", f"{where}.{key}")
    return value


def _text_of(content: Any, where: str) -> str:
    """The text of a content field: a string, or a list of text parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where} must be a string or a list of content parts.", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise InvalidRequestError(f"{where}.{j}: content parts of type {kind!r} are not supported; lmserve "
                                      "serves text-only models (input_text and output_text parts).", f"{where}.{j}")
        texts.append(part.get("text") or part.get("refusal") or "")
    return "\n".join(texts)
