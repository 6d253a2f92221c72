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

from lmserve.entrypoints.openai.protocol_common import INT64_MAX, INT64_MIN, OpenAIBaseModel, random_uuid
from lmserve.entrypoints.openai.protocol_completions import REASONING_EFFORTS, ChatCompletionRequest
from lmserve.errors import InvalidRequestError

_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


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
        self.response_format()
        if not self.input:
            raise InvalidRequestError("input must not be empty: send a string or at least one input item.", "input")
        if (self.model_extra or {}).get("conversation") is not None:
            raise InvalidRequestError("conversation is not supported: there is no Conversations API; chain "
                                      "responses with previous_response_id.", "conversation")
        self.reasoning_effort()
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
        if self.background and self.store is False:
            raise InvalidRequestError("background=true needs store=true: a background response is fetched from "
                                      "the store.", "background")
        self.chat_tool_choice()

    def reasoning_effort(self) -> str | None:
        """``reasoning.effort`` as the chat request's ``reasoning_effort`` (vLLM: a chat-template
        kwarg, with ``enable_thinking``). Reasoning summaries are refused: the reasoning comes back
        whole, as the reasoning item's ``reasoning_text`` content."""
        reasoning = self.reasoning or {}
        for key in ("summary", "generate_summary"):
            if reasoning.get(key) is not None:
                raise InvalidRequestError(f"reasoning.{key} is not supported: the reasoning (with --reasoning-parser) "
                                          "comes back whole as reasoning_text content, not summarized; leave it "
                                          "unset.", f"reasoning.{key}")
        effort = reasoning.get("effort")
        if effort is not None and effort not in REASONING_EFFORTS:
            raise InvalidRequestError(f"reasoning.effort must be one of {', '.join(REASONING_EFFORTS)}, not "
                                      f"{effort!r}.", "reasoning.effort")
        return effort

    def chat_tool_choice(self) -> str | dict[str, Any] | None:
        """``tool_choice`` in chat-completions form: "auto" (None: chat's default), "none",
        "required", or ``{"type": "function", "name": X}`` as ``{"type": "function", "function":
        {"name": X}}``; a forced call needs tools, and a named one a tool of that name."""
        choice = self.tool_choice
        names = [t.get("name") for t in self.tools if t.get("type") == "function"]
        if isinstance(choice, dict):
            name = choice.get("name")
            if choice.get("type") != "function" or not isinstance(name, str) or not name:
                raise InvalidRequestError(f"tool_choice {choice!r} is not supported: use 'auto', 'none', 'required' "
                                          "or {'type': 'function', 'name': ...} (only function tools exist here).",
                                          "tool_choice")
            if name not in names:
                raise InvalidRequestError(f"tool_choice names the function {name!r}, which is not in tools.",
                                          "tool_choice")
            return {"type": "function", "function": {"name": name}}
        if choice not in ("auto", "none", "required"):
            raise InvalidRequestError(f"tool_choice {choice!r} is not supported: use 'auto', 'none', 'required' or "
                                      "{'type': 'function', 'name': ...}.", "tool_choice")
        if choice == "required" and not self.tools:
            raise InvalidRequestError("Tool choice 'required' must be specified with 'tools' parameter.",
                                      "tool_choice")
        return None if choice == "auto" else choice

    def text_format(self) -> dict[str, Any]:
        fmt = (self.text or {}).get("format")
        return fmt if isinstance(fmt, dict) else {"type": "text"}

    def response_format(self) -> dict[str, Any] | None:
        """``text.format`` as the chat request's ``response_format`` (None for plain text), as
        vLLM maps it: ``json_object``, or ``json_schema`` with its ``schema``."""
        fmt = self.text_format()
        kind = fmt.get("type", "text")
        if kind == "text":
            return None
        if self.structured_outputs is not None:
            raise InvalidRequestError("Cannot specify both structured_outputs and text.format", "structured_outputs")
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            if not isinstance(fmt.get("schema"), (dict, bool)):
                raise InvalidRequestError("text.format of type 'json_schema' needs its 'schema'.", "text.format.schema")
            return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "description", "schema",
                                                                                 "strict") if k in fmt}}
        raise InvalidRequestError(f"text.format type {kind!r} is not supported (text, json_object and json_schema "
                                  "are).", "text.format.type")

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
            "kv_transfer_params": self.kv_transfer_params,
            "logit_bias": self.logit_bias, "response_format": self.response_format(),
            "structured_outputs": self.structured_outputs, "reasoning_effort": self.reasoning_effort(),
            "parallel_tool_calls": self.parallel_tool_calls}
        if tools:
            body["tool_choice"] = self.chat_tool_choice()
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
