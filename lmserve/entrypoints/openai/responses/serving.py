"""POST /v1/responses, GET /v1/responses/{id}, POST /v1/responses/{id}/cancel.

Generation goes through the chat handler (``OpenAIServingChat.start_generation``): the
request becomes a chat conversation (earlier turns from the store, ``instructions`` as a
system message, this turn's input items) and the response is built from the outputs.

Stream order (the OpenAI SDK's, every event with a ``sequence_number`` counting from 0):
``response.created``, ``response.in_progress``; per output item ``response.output_item.added``,
then for a message ``response.content_part.added``, ``response.output_text.delta``...,
``response.output_text.done``, ``response.content_part.done``, or for a function call
``response.function_call_arguments.delta`` and ``.done``; ``response.output_item.done``;
finally ``response.completed`` (as vLLM, also when max_output_tokens cut the output: its
``response.status`` is then ``incomplete``).
Text streams as it is generated, except when function tools are offered: then the output is
held until generation ends, since only the whole text tells a call from a message.

Background responses (``background=true``) are stored as ``queued`` and run as a task;
cancelling one cancels the task, which aborts its engine request. A streamed background
response writes its events to an ``EventLog``: the creating request follows it, and
``GET /v1/responses/{id}?stream=true&starting_after=N`` replays and follows it (vLLM's
behaviour); the task runs on when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from lmserve.entrypoints.openai.responses.event_log import EventLog, EventLogs
from lmserve.entrypoints.openai.responses.protocol import ResponsesRequest
from lmserve.entrypoints.openai.responses.store import ResponseStore
from lmserve.entrypoints.openai.serving_chat import OpenAIServingChat
from lmserve.entrypoints.openai.serving_engine import Prompt, error_body, until_disconnected
from lmserve.entrypoints.openai.stream_utils import OutputMerger, SSEResponse
from lmserve.entrypoints.tool_call_extraction import ExtractedToolCalls, forced_tool_call, tool_call_extractor
from lmserve.errors import InvalidRequestError, LMServeError, NotFoundError
from lmserve.sampling_params import SamplingParams

logger = logging.getLogger("lmserve.server")


@dataclass
class _Generated:
    """What one generation produced, accumulated from the engine's deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0

    def add(self, out: Any) -> str:
        """Adds one RequestOutput; returns its new text."""
        self.cached_tokens = out.num_cached_tokens
        delta = ""
        for o in out.outputs:
            delta += o.text
            self.token_ids.extend(o.token_ids)
            if o.finish_reason is not None:
                self.finish_reason = o.finish_reason
        self.text += delta
        return delta


@dataclass
class _Turn:
    """One response being made: the request, what it renders to and how it samples."""

    request: ResponsesRequest
    conversation: list[dict[str, Any]]  # earlier turns + this input (no instructions)
    prompt: Prompt
    params: SamplingParams
    extract: Callable[[str], ExtractedToolCalls]  # the output's tool calls (tool_call_extraction)
    tools_offered: bool
    forced_tool_call: bool = False  # tool_choice required / a named function
    created_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        return self.request.request_id


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OpenAIServingResponses:
    def __init__(self, chat: OpenAIServingChat, store: ResponseStore) -> None:
        self.chat = chat
        self.store = store
        self._background: dict[str, asyncio.Task] = {}
        self._event_logs = EventLogs(max(store.max_entries, 1), store.max_bytes)

    # ------------------------------------------------------------------ create
    async def create_responses(self, request: ResponsesRequest, raw_request: Request | None) -> Any:
        """A response body (dict), an SSEResponse when streaming, or None when the client left."""
        request.check_supported()
        if not self.store.enabled:
            if request.background:
                raise InvalidRequestError("background responses need the response store, which this server runs "
                                          "without (--responses-store-max-entries 0).", "background")
            request.store = False
        history: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            stored = self.store.get(request.previous_response_id)
            if stored is None:
                raise NotFoundError(f"Response with id '{request.previous_response_id}' not found.",
                                    "previous_response_id")
            if stored.response["status"] in ("queued", "in_progress"):
                raise InvalidRequestError(f"Response '{request.previous_response_id}' is still in progress: wait "
                                          "for it to finish (GET /v1/responses/{id}) before continuing it.",
                                          "previous_response_id")
            history = [dict(m) for m in stored.conversation]
        tools = request.function_tools() if request.tool_choice != "none" else []
        conversation = history + request.input_messages()
        messages = ([{"role": "system", "content": request.instructions}] if request.instructions else []) \
            + conversation
        chat_request = request.to_chat_request(messages, tools)
        extract = tool_call_extractor(self.chat, chat_request)  # before the engine request starts
        # a forced call (required / a named function) runs under the chat completions API's tool rules
        forced = forced_tool_call(chat_request)
        prompt, params, merger = await self.chat.start_generation(chat_request, request.request_id,
                                                                  tool_calling=forced)
        turn = _Turn(request, conversation, prompt, params, extract, bool(tools), forced)
        if request.background:
            queued = self._body(turn, [], "queued", None)
            self.store.put(turn.response_id, queued, conversation)
            log = self._event_logs.new(turn.response_id) if request.stream else None
            task = asyncio.ensure_future(self._run_background(turn, merger, log))
            self._background[turn.response_id] = task
            task.add_done_callback(lambda _: self._background.pop(turn.response_id, None))
            return SSEResponse(log.follow()) if log is not None else queued
        if request.stream:
            return SSEResponse(self._stream(turn, merger), cleanup=merger)
        return await until_disconnected(raw_request, self._full(turn, merger), cleanup=merger)

    async def _full(self, turn: _Turn, merger: OutputMerger) -> dict[str, Any]:
        gen = _Generated()
        async for _, out in merger:
            gen.add(out)
        return self._finish(turn, gen)

    async def _run_background(self, turn: _Turn, merger: OutputMerger, log: EventLog | None) -> None:
        try:
            async with merger:
                entry = self.store.get(turn.response_id)
                if entry is not None:
                    entry.response["status"] = "in_progress"
                if log is None:
                    await self._full(turn, merger)
                else:
                    async for event in self._stream(turn, merger):
                        log.append(event)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - recorded on the stored response
            entry = self.store.get(turn.response_id)
            if entry is not None and entry.response["status"] != "cancelled":
                entry.response["status"] = "failed"
                err = e if isinstance(e, LMServeError) else LMServeError(f"Internal server error: {type(e).__name__}")
                entry.response["error"] = {"code": err.err_type, "message": err.message}
            if not isinstance(e, LMServeError):
                logger.error("Background response %r failed", turn.response_id, exc_info=e)
        finally:
            if log is not None:
                log.close()

    # ------------------------------------------------------------------ output
    def _output(self, turn: _Turn, gen: _Generated) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The output items and the assistant message they are in the conversation."""
        status = "incomplete" if gen.finish_reason == "length" else "completed"
        reasoning, text = self.chat.split_reasoning(gen.text, turn.forced_tool_call)
        extracted = turn.extract(text)
        items: list[dict[str, Any]] = []
        if reasoning:
            items.append({"id": _new_id("rs"), "type": "reasoning", "summary": [],
                          "content": [{"type": "reasoning_text", "text": reasoning}], "status": status})
        if extracted.content or not extracted.calls:
            items.append(_message_item(_new_id("msg"), extracted.content, status))
        for call in extracted.calls:
            items.append({"id": _new_id("fc"), "type": "function_call", "call_id": call.call_id,
                          "name": call.name, "arguments": call.arguments, "status": "completed"})
        assistant: dict[str, Any] = {"role": "assistant", "content": extracted.content}
        if extracted.calls:
            assistant["tool_calls"] = [{"id": c.call_id, "type": "function",
                                        "function": {"name": c.name, "arguments": c.arguments}}
                                       for c in extracted.calls]
        return items, assistant

    def _finish(self, turn: _Turn, gen: _Generated, items: list[dict[str, Any]] | None = None,
                assistant: dict[str, Any] | None = None) -> dict[str, Any]:
        """The final response body; stored when the request asked (a cancelled one stays cancelled)."""
        if items is None or assistant is None:
            items, assistant = self._output(turn, gen)
        status = "incomplete" if gen.finish_reason == "length" else "completed"
        body = self._body(turn, items, status, gen)
        if turn.request.store:
            entry = self.store.get(turn.response_id)
            if entry is None or entry.response.get("status") != "cancelled":
                self.store.put(turn.response_id, body, turn.conversation + [assistant])
        return body

    def _body(self, turn: _Turn, output: list[dict[str, Any]], status: str, gen: _Generated | None
              ) -> dict[str, Any]:
        r, p = turn.request, turn.params
        usage = None
        if gen is not None:
            n_in, n_out = len(turn.prompt.token_ids), len(gen.token_ids)
            usage = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": gen.cached_tokens},
                     "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": n_in + n_out}
        body: dict[str, Any] = {
            "id": turn.response_id, "object": "response", "created_at": turn.created_at, "status": status,
            "background": bool(r.background), "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": r.instructions, "max_output_tokens": p.max_tokens, "max_tool_calls": None,
            "model": self.chat.model_name, "output": output, "parallel_tool_calls": bool(r.parallel_tool_calls),
            "previous_response_id": r.previous_response_id, "reasoning": r.reasoning, "service_tier": r.service_tier,
            "store": bool(r.store), "temperature": p.temperature, "text": {"format": r.text_format()},
            "tool_choice": r.tool_choice, "tools": r.tools, "top_logprobs": r.top_logprobs, "top_p": p.top_p,
            "truncation": r.truncation or "disabled", "usage": usage, "user": r.user, "metadata": r.metadata,
            "presence_penalty": r.presence_penalty, "frequency_penalty": r.frequency_penalty,
            # vLLM's disaggregated-serving hand-off: null, as on the other routes (no KV connector here)
            "kv_transfer_params": None}
        if r.enable_response_messages and gen is not None:
            body["input_messages"] = [{"message": turn.prompt.text or "", "tokens": turn.prompt.token_ids,
                                       "type": "raw_message_tokens"}]
            body["output_messages"] = [{"message": gen.text, "tokens": gen.token_ids,
                                        "type": "raw_message_tokens"}]
        return body

    # ------------------------------------------------------------------ streaming
    async def _stream(self, turn: _Turn, merger: OutputMerger) -> AsyncIterator[str]:
        seq = 0

        def event(kind: str, **fields: Any) -> str:
            nonlocal seq
            data = {"type": kind, **fields, "sequence_number": seq}
            seq += 1
            return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

        gen = _Generated()
        live_id: str | None = None  # the message item whose text streams live (no tools offered)
        try:
            yield event("response.created", response=self._body(turn, [], "in_progress", None))
            yield event("response.in_progress", response=self._body(turn, [], "in_progress", None))
            if not turn.tools_offered and self.chat.options.reasoning_parser is None:  # else: read at the end
                live_id = _new_id("msg")
                yield event("response.output_item.added", output_index=0,
                            item={"id": live_id, "type": "message", "role": "assistant", "status": "in_progress",
                                  "content": []})
                yield event("response.content_part.added", item_id=live_id, output_index=0, content_index=0,
                            part=_text_part(""))
            async for _, out in merger:
                delta = gen.add(out)
                if live_id is not None and delta:
                    yield event("response.output_text.delta", item_id=live_id, output_index=0, content_index=0,
                                delta=delta, logprobs=[])
            items, assistant = self._output(turn, gen)
            if live_id is not None:
                items[0]["id"] = live_id
            for index, item in enumerate(items):
                if item["type"] == "message":
                    text = item["content"][0]["text"]
                    if live_id is None:
                        yield event("response.output_item.added", output_index=index,
                                    item={**item, "status": "in_progress", "content": []})
                        yield event("response.content_part.added", item_id=item["id"], output_index=index,
                                    content_index=0, part=_text_part(""))
                        if text:
                            yield event("response.output_text.delta", item_id=item["id"], output_index=index,
                                        content_index=0, delta=text, logprobs=[])
                    yield event("response.output_text.done", item_id=item["id"], output_index=index,
                                content_index=0, text=text, logprobs=[])
                    yield event("response.content_part.done", item_id=item["id"], output_index=index,
                                content_index=0, part=_text_part(text))
                elif item["type"] == "reasoning":
                    text = item["content"][0]["text"]
                    yield event("response.output_item.added", output_index=index,
                                item={**item, "status": "in_progress", "content": []})
                    yield event("response.reasoning_text.delta", item_id=item["id"], output_index=index,
                                content_index=0, delta=text)
                    yield event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                content_index=0, text=text)
                else:
                    yield event("response.output_item.added", output_index=index,
                                item={**item, "arguments": "", "status": "in_progress"})
                    yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                delta=item["arguments"])
                    yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                name=item["name"], arguments=item["arguments"])
                yield event("response.output_item.done", output_index=index, item=item)
            body = self._finish(turn, gen, items, assistant)
            yield event("response.completed", response=body)
        except Exception as e:  # noqa: BLE001 - the stream already started: report in-band
            if not isinstance(e, LMServeError):
                logger.error("Internal error in a responses stream", exc_info=e)
                e = LMServeError(f"Internal server error: {type(e).__name__}")
            info = error_body(e).error
            yield event("error", code=info.type, message=info.message, param=info.param)

    # ------------------------------------------------------------------ retrieve, cancel
    def retrieve(self, response_id: str, stream: bool | None, starting_after: int | None = None) -> Any:
        """The stored response, or with ``stream`` the events of a streamed background one."""
        entry = self.store.get(response_id)
        if entry is None:
            raise NotFoundError(f"Response with id '{response_id}' not found.", "response_id")
        if stream:
            log = self._event_logs.get(response_id)
            if log is None:
                raise InvalidRequestError("stream=true needs a response created with background=true and "
                                          "stream=true (its events are kept); retrieve this one without stream.",
                                          "stream")
            return SSEResponse(log.follow(-1 if starting_after is None else starting_after))
        return entry.response

    async def cancel(self, response_id: str) -> dict[str, Any]:
        entry = self.store.get(response_id)
        if entry is None:
            raise NotFoundError(f"Response with id '{response_id}' not found.", "response_id")
        if entry.response["status"] not in ("queued", "in_progress"):
            raise InvalidRequestError("Cannot cancel a synchronous response.", "response_id")
        entry.response["status"] = "cancelled"
        task = self._background.get(response_id)
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        return entry.response


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [_text_part(text)]}
