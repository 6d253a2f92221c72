"""POST /v1/messages and /v1/messages/count_tokens (Anthropic's Messages API, as vLLM 0.32
serves it), on top of the chat handler's generation path.

Stream order (Anthropic's): ``message_start`` (usage with the input tokens), ``ping``; per
content block ``content_block_start``, ``content_block_delta`` (``text_delta`` or
``input_json_delta``)..., ``content_block_stop``; ``message_delta`` (``stop_reason``,
``stop_sequence``, usage); ``message_stop``. Text streams as generated unless tools are
offered: then the output is held to the end, as only the whole text tells a tool call from
prose. Stop reasons: ``max_tokens`` (length), ``tool_use`` (the output is tool calls),
``stop_sequence`` (a stop string matched; it is reported), else ``end_turn``.

Errors on these routes are Anthropic-shaped: ``{"type": "error", "error": {"type", "message"}}``
(``anthropic_error``), in-band as an ``error`` event once a stream started.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from lmserve.chat_template import apply_chat_template
from lmserve.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from lmserve.entrypoints.openai.serving_chat import OpenAIServingChat
from lmserve.entrypoints.openai.serving_engine import Prompt, until_disconnected
from lmserve.entrypoints.openai.stream_utils import OutputMerger, SSEResponse
from lmserve.entrypoints.tool_call_extraction import ExtractedToolCalls, forced_tool_call, tool_call_extractor
from lmserve.errors import LMServeError

logger = logging.getLogger("lmserve.server")
_Extract = Callable[[str], ExtractedToolCalls]

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_error_body(err: LMServeError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(err.status_code, "api_error"),
                                       "message": err.message}}


def anthropic_error(err: LMServeError) -> JSONResponse:
    return JSONResponse(anthropic_error_body(err), status_code=err.status_code)


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


class AnthropicServingMessages:
    def __init__(self, chat: OpenAIServingChat, disabled_thinking_effort: str = "auto") -> None:
        self.chat = chat
        self.disabled_thinking_effort = disabled_thinking_effort
        self._resolved_effort: str | None = None

    # ------------------------------------------------------------------ thinking
    async def _effort_for(self, request: AnthropicMessagesRequest | AnthropicCountTokensRequest) -> str | None:
        """The ``reasoning_effort`` handed to the chat template for ``thinking: disabled``
        (--anthropic-disabled-thinking-effort); ``auto`` is ``none`` unless the template
        refuses it, then ``low``. None when the request says nothing about thinking."""
        if (request.thinking or {}).get("type") != "disabled":
            return None
        if self.disabled_thinking_effort != "auto":
            return self.disabled_thinking_effort
        if self._resolved_effort is None:
            tok = self.chat.require_tokenizer()
            probe = [{"role": "user", "content": "hi"}]
            try:
                await self.chat.off_loop(functools.partial(
                    apply_chat_template, tok, probe, chat_template=self.chat.options.chat_template,
                    add_generation_prompt=True, chat_template_kwargs={"reasoning_effort": "none"}))
                self._resolved_effort = "none"
            except Exception:  # noqa: BLE001 - a template that refuses 'none'
                self._resolved_effort = "low"
        return self._resolved_effort

    # ------------------------------------------------------------------ count_tokens
    async def count_tokens(self, request: AnthropicCountTokensRequest) -> dict[str, Any]:
        self.chat.check_model(request.model)
        request.check_supported()
        kwargs = request.chat_template_kwargs_with(await self._effort_for(request))
        effort = request.reasoning_effort()
        if effort is not None:  # as the chat request folds it in (ChatCompletionRequest.reasoning_effort)
            kwargs = {"enable_thinking": True, **(kwargs or {}), "reasoning_effort": effort}
        text = await self.chat.render(request.chat_messages(), tools=request.tools_offered() or None,
                                      chat_template_kwargs=kwargs)
        ids = await self.chat.off_loop(self.chat.tokenize, text, False, "messages")
        return {"input_tokens": len(ids), "context_management": {"original_input_tokens": len(ids)}}

    # ------------------------------------------------------------------ messages
    async def create_messages(self, request: AnthropicMessagesRequest, raw_request: Request | None) -> Any:
        """A message body (dict), an SSEResponse when streaming, or None when the client left.
        A forced tool call (tool_choice any/tool) follows the chat completions API's rules: it
        needs --tool-call-parser and its output is constrained to vLLM's tool-call JSON."""
        message_id = f"msg_{uuid.uuid4().hex}"
        chat_request = request.to_chat_request(message_id, await self._effort_for(request))
        extract = tool_call_extractor(self.chat, chat_request) if chat_request.tools else None
        forced = forced_tool_call(chat_request)
        prompt, _, merger = await self.chat.start_generation(chat_request, message_id, tool_calling=forced)
        if request.stream:
            return SSEResponse(self._stream(request, message_id, prompt, merger, extract, forced), cleanup=merger)
        return await until_disconnected(raw_request, self._full(request, message_id, prompt, merger, extract, forced),
                                        cleanup=merger)

    def _usage(self, prompt: Prompt, output_tokens: int, cached: int) -> dict[str, int]:
        usage = {"input_tokens": len(prompt.token_ids), "output_tokens": output_tokens}
        if self.chat.options.enable_prompt_tokens_details:  # as vLLM: cache reads only with the details on
            usage["input_tokens"] = max(0, len(prompt.token_ids) - cached)
            usage["cache_read_input_tokens"] = cached
        return usage

    @staticmethod
    def _calls(text: str, extract: _Extract | None) -> ExtractedToolCalls:
        """The tool calls in ``text`` (the extractor keeps one when parallel calls are disabled)."""
        return extract(text) if extract is not None else ExtractedToolCalls(text)

    @staticmethod
    def _stop(finish_reason: str | None, stop_reason: Any, tool_use: bool) -> tuple[str, str | None]:
        if finish_reason == "length":
            return "max_tokens", None
        if tool_use:
            return "tool_use", None
        if isinstance(stop_reason, str):
            return "stop_sequence", stop_reason
        return "end_turn", None

    async def _collect(self, merger: OutputMerger, on_text: Any = None) -> tuple[str, int, str | None, Any, int]:
        text, n_out, finish, stop_reason, cached = "", 0, None, None, 0
        async for _, out in merger:
            cached = out.num_cached_tokens
            for o in out.outputs:
                text += o.text
                n_out += len(o.token_ids)
                if o.finish_reason is not None:
                    finish, stop_reason = o.finish_reason, o.stop_reason
                if on_text is not None and o.text:
                    on_text(o.text)
        return text, n_out, finish, stop_reason, cached

    async def _full(self, request: AnthropicMessagesRequest, message_id: str, prompt: Prompt, merger: OutputMerger,
                    extract: _Extract | None, forced: bool) -> dict[str, Any]:
        text, n_out, finish, stop_reason, cached = await self._collect(merger)
        reasoning, text = self.chat.split_reasoning(text, forced)
        extracted = self._calls(text, extract)
        content: list[dict[str, Any]] = []
        if reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        if extracted.content:
            content.append({"type": "text", "text": extracted.content})
        content += [{"type": "tool_use", "id": _tool_use_id(c.call_id), "name": c.name,
                     "input": json.loads(c.arguments)} for c in extracted.calls]
        if not content:
            content.append({"type": "text", "text": ""})
        reason, sequence = self._stop(finish, stop_reason, bool(extracted.calls))
        return {"id": message_id, "type": "message", "role": "assistant", "content": content,
                "model": self.chat.model_name, "stop_reason": reason, "stop_sequence": sequence,
                "usage": self._usage(prompt, n_out, cached)}

    async def _stream(self, request: AnthropicMessagesRequest, message_id: str, prompt: Prompt,
                      merger: OutputMerger, extract: _Extract | None, forced: bool) -> AsyncIterator[str]:
        try:
            yield _event("message_start", {"message": {
                "id": message_id, "type": "message", "role": "assistant", "content": [],
                "model": self.chat.model_name, "stop_reason": None, "stop_sequence": None,
                "usage": self._usage(prompt, 0, 0)}})
            yield _event("ping", {})
            text, n_out, finish, stop_reason, cached = "", 0, None, None, 0
            live = extract is None and self.chat.options.reasoning_parser is None  # else: read at the end
            if live:
                yield _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
            async for _, out in merger:
                cached = out.num_cached_tokens
                for o in out.outputs:
                    text += o.text
                    n_out += len(o.token_ids)
                    if o.finish_reason is not None:
                        finish, stop_reason = o.finish_reason, o.stop_reason
                    if live and o.text:
                        yield _event("content_block_delta", {"index": 0,
                                                             "delta": {"type": "text_delta", "text": o.text}})
            reasoning, text = (None, text) if live else self.chat.split_reasoning(text, forced)
            extracted = self._calls(text, extract)
            index = 0
            if reasoning:
                yield _event("content_block_start", {"index": 0, "content_block": {"type": "thinking", "thinking": "",
                                                                                   "signature": ""}})
                yield _event("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta",
                                                                            "thinking": reasoning}})
                yield _event("content_block_stop", {"index": 0})
                index = 1
            if live:
                yield _event("content_block_stop", {"index": 0})
                index = 1
            elif extracted.content or not extracted.calls:
                yield _event("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
                if extracted.content:
                    yield _event("content_block_delta", {"index": index, "delta": {"type": "text_delta",
                                                                                    "text": extracted.content}})
                yield _event("content_block_stop", {"index": index})
                index += 1
            for call in extracted.calls:
                yield _event("content_block_start", {"index": index, "content_block": {
                    "type": "tool_use", "id": _tool_use_id(call.call_id), "name": call.name, "input": {}}})
                yield _event("content_block_delta", {"index": index, "delta": {"type": "input_json_delta",
                                                                                "partial_json": call.arguments}})
                yield _event("content_block_stop", {"index": index})
                index += 1
            reason, sequence = self._stop(finish, stop_reason, bool(extracted.calls))
            yield _event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                           "usage": self._usage(prompt, n_out, cached)})
            yield _event("message_stop", {})
        except Exception as e:  # noqa: BLE001 - the stream already started: report in-band
            if not isinstance(e, LMServeError):
                logger.error("Internal error in a messages stream", exc_info=e)
                e = LMServeError(f"Internal server error: {type(e).__name__}")
            yield f"event: error\ndata: {json.dumps(anthropic_error_body(e))}\n\n"


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")
