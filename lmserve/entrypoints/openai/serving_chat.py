"""POST /v1/chat/completions: render the chat template, generate ``n`` choices, answer
as one ``chat.completion`` or a stream of ``chat.completion.chunk``s.

Stream order per choice (as vLLM/OpenAI): a role chunk (``delta.role``, empty content),
the echoed last message when ``echo``, content deltas, the last delta carrying
``finish_reason``; then, with ``stream_options.include_usage``, a usage chunk with no
choices; then ``[DONE]``. The non-streaming body is that same sequence accumulated.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from lmserve.chat_template import TemplateLimitError, apply_chat_template, special_tokens_of
from lmserve.entrypoints.chat_template_sandbox import TemplateSandbox
from lmserve.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessageParam
from lmserve.entrypoints.openai.protocol_responses import (ChatCompletionLogProb, ChatCompletionLogProbs,
                                                          ChatCompletionLogProbsContent, ChatCompletionResponse,
                                                          ChatCompletionResponseChoice,
                                                          ChatCompletionResponseStreamChoice,
                                                          ChatCompletionStreamResponse, ChatMessage,
                                                          DeltaMessage)
from lmserve.entrypoints.openai.serving_engine import (SSE_DONE, OpenAIServing, Prompt, sse, stream_error,
                                                       until_disconnected)
from lmserve.entrypoints.openai.stream_utils import OutputMerger, SSEResponse, should_include_usage
from lmserve.errors import InvalidRequestError, LMServeError
from lmserve.outputs import CompletionOutput, Logprob
from lmserve.sampling_params import SamplingParams

def _named_template(tokenizer: Any, name: str) -> bool:
    """Whether ``name`` names one of the tokenizer's own (trusted) templates."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, list):
        return any(isinstance(t, dict) and t.get("name") == name for t in own)
    return isinstance(own, dict) and name in own


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text") or "" for p in content if isinstance(p, dict))


@dataclass
class _ChatChoice:
    content: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[ChatCompletionLogProbsContent] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class OpenAIServingChat(OpenAIServing):
    # ------------------------------------------------------------------ rendering
    async def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                     continue_final_message: bool = False, tools: list[dict] | None = None,
                     documents: list[dict] | None = None, chat_template: str | None = None,
                     chat_template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt text the chat template makes of ``messages``; any problem is a 400.

        A request's ``chat_template`` (template text, never a path on the server; or one in
        ``chat_template_kwargs``) is refused unless the server runs with
        --trust-request-chat-template, as vLLM; when trusted it renders in the sandbox
        processes (time and memory limits). The server's own templates render on the worker
        thread. Either way the event loop never runs a template."""
        tok = self.require_tokenizer("messages", "Chat messages (rendered by the chat template)")
        if self.options.default_chat_template_kwargs:  # --default-chat-template-kwargs; the request's win
            chat_template_kwargs = {**self.options.default_chat_template_kwargs, **(chat_template_kwargs or {})}
        if chat_template is not None or (chat_template_kwargs or {}).get("chat_template") is not None:
            if not self.options.trust_request_chat_template:
                raise InvalidRequestError("Chat template is passed with request, but --trust-request-chat-template "
                                          "is not set. Refused request with untrusted chat template.",
                                          "chat_template")
        kwargs: dict[str, Any] = dict(add_generation_prompt=add_generation_prompt,
                                      continue_final_message=continue_final_message, tools=tools,
                                      documents=documents, chat_template_kwargs=chat_template_kwargs,
                                      content_format=self.options.chat_template_content_format)
        try:
            if chat_template is not None and not _named_template(tok, chat_template):
                return await self._sandbox().render(chat_template, messages, special_tokens_of(tok), **kwargs)
            return await self.off_loop(functools.partial(
                apply_chat_template, tok, messages, chat_template=chat_template or self.options.chat_template,
                **kwargs))
        except LMServeError:
            raise
        except TemplateLimitError as e:
            raise InvalidRequestError(str(e), "chat_template") from e
        except Exception as e:  # noqa: BLE001 - ValueError from the template module, jinja errors
            raise InvalidRequestError(str(e), "messages") from e

    def _sandbox(self) -> TemplateSandbox:
        sandbox = self.options.template_sandbox
        if sandbox is None:
            if self._own_sandbox is None:
                self._own_sandbox = TemplateSandbox()
            sandbox = self._own_sandbox
        return sandbox

    async def prepare_prompt(self, request: ChatCompletionRequest) -> Prompt:
        text = await self.render(request.template_messages(), add_generation_prompt=request.add_generation_prompt,
                                 continue_final_message=request.continue_final_message, tools=request.tools,
                                 documents=request.documents, chat_template=request.chat_template,
                                 chat_template_kwargs=request.chat_template_kwargs)
        ids = await self.off_loop(self.tokenize, text, request.add_special_tokens, "messages")
        return Prompt(self.truncate(ids, request), text)

    def response_role(self, request: ChatCompletionRequest) -> str:
        return self.options.response_role if request.add_generation_prompt else request.messages[-1].role

    @staticmethod
    def echo_text(request: ChatCompletionRequest, role: str) -> str:
        last: ChatMessageParam = request.messages[-1]
        if not request.echo or last.role != role or last.content is None:
            return ""
        return _content_text(last.to_template_dict()["content"])

    # ------------------------------------------------------------------ entry
    async def create_chat_completion(self, request: ChatCompletionRequest, request_id: str,
                                     raw_request: Request | None):
        """Returns a ChatCompletionResponse, an SSEResponse when streaming, or None when the
        client went away first."""
        prompt, _, merger = await self.start_generation(request, request_id)
        created = int(time.time())
        if request.stream:
            return SSEResponse(self._stream(request, request_id, created, prompt, merger), cleanup=merger)
        return await until_disconnected(raw_request, self._full(request, request_id, created, prompt, merger),
                                        cleanup=merger)

    async def start_generation(self, request: ChatCompletionRequest, request_id: str
                               ) -> tuple[Prompt, SamplingParams, OutputMerger]:
        """Validates ``request``, renders and tokenizes it and starts its engine request(s).

        The one generation path of every chat-shaped API (chat completions, the Responses and
        Anthropic Messages APIs, batch chat): each translates its body into a
        ``ChatCompletionRequest`` and builds its own answer from the merger's outputs. Its
        ``model`` may name a LoRA adapter (``--enable-lora``), which the generation then runs with. A
        refusal (bad request, overload) raises here, before any response starts; the caller
        owns the merger and must ``aclose()`` it."""
        lora = self.resolve_model(request.model)  # the adapter ``model`` names, if any
        request.validate_request()
        prompt = await self.prepare_prompt(request)
        params = self.sampling_params(request, len(prompt.token_ids))
        merger = OutputMerger([self.generate(prompt, params, request_id, request, lora)])
        await merger.start()
        return prompt, params, merger

    # ------------------------------------------------------------------ logprobs
    def _logprobs(self, request: ChatCompletionRequest, o: CompletionOutput
                  ) -> list[ChatCompletionLogProbsContent] | None:
        if not request.logprobs or o.logprobs is None:
            return None
        as_ids = self.as_ids(request)
        k = -1 if request.logprob_token_ids else (request.top_logprobs or 0)
        out = []
        for tid, d in zip(o.token_ids, o.logprobs):
            chosen: Logprob | None = d.get(tid)
            text = self.token_text(tid, chosen, as_ids)
            tops = [ChatCompletionLogProb(token=(t2 := self.token_text(t, e, as_ids)),
                                          logprob=self.safe_logprob(e.logprob), bytes=list(t2.encode()))
                    for t, e in self.listed(d, request, k)] if k else []
            out.append(ChatCompletionLogProbsContent(
                token=text, logprob=self.safe_logprob(chosen.logprob) if chosen else -9999.0,
                bytes=list(text.encode()), top_logprobs=tops))
        return out

    # ------------------------------------------------------------------ streaming
    async def _stream(self, request: ChatCompletionRequest, request_id: str, created: int, prompt: Prompt,
                      merger: OutputMerger) -> AsyncIterator[str]:
        role = self.response_role(request)
        echo = self.echo_text(request, role)
        include_usage, continuous = should_include_usage(request.stream_options, self.options.force_include_usage)
        prompt_len = len(prompt.token_ids)
        generated = [0] * request.n
        cached = 0

        def chunk(choice: ChatCompletionResponseStreamChoice, first: bool = False) -> str:
            c = ChatCompletionStreamResponse(id=request_id, created=created, model=self.response_model(request),
                                             choices=[choice])
            if first and request.return_token_ids:
                c.prompt_token_ids = prompt.token_ids
            if first and request.return_prompt_text:
                c.prompt_text = prompt.text
            if continuous:
                c.usage = self.usage(prompt_len, sum(generated), cached)
            return sse(c)

        try:
            for i in range(request.n):
                yield chunk(ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(role=role, content="")),
                            first=i == 0)
                if echo:
                    yield chunk(ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(content=echo)))
            async for _, out in merger:
                cached = out.num_cached_tokens
                for o in out.outputs:
                    generated[o.index] += len(o.token_ids)
                    if not o.text and not o.token_ids and o.finish_reason is None:
                        continue
                    lps = self._logprobs(request, o)
                    delta = DeltaMessage(content=o.text) if o.text or o.finish_reason is None else DeltaMessage()
                    yield chunk(ChatCompletionResponseStreamChoice(
                        index=o.index, delta=delta,
                        logprobs=ChatCompletionLogProbs(content=lps) if lps is not None else None,
                        finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                        token_ids=list(o.token_ids) if request.return_token_ids else None))
            if include_usage:
                yield sse(ChatCompletionStreamResponse(id=request_id, created=created, model=self.response_model(request),
                                                       choices=[], usage=self.usage(prompt_len, sum(generated),
                                                                                    cached)))
        except Exception as e:  # noqa: BLE001 - the stream already started: report in-band
            yield stream_error(e)
        yield SSE_DONE

    # ------------------------------------------------------------------ non-streaming
    async def full_response(self, request: ChatCompletionRequest, request_id: str, created: int, prompt: Prompt,
                            merger: OutputMerger) -> ChatCompletionResponse:
        """The whole ``chat.completion`` of a started generation (batch chat answers with these)."""
        return await self._full(request, request_id, created, prompt, merger)

    async def _full(self, request: ChatCompletionRequest, request_id: str, created: int, prompt: Prompt,
                    merger: OutputMerger) -> ChatCompletionResponse:
        role = self.response_role(request)
        echo = self.echo_text(request, role)
        choices = [_ChatChoice(content=echo) for _ in range(request.n)]
        prompt_lps = None
        cached = 0
        async for _, out in merger:
            cached = out.num_cached_tokens
            if out.prompt_logprobs is not None and prompt_lps is None:
                prompt_lps = list(out.prompt_logprobs)
            for o in out.outputs:
                st = choices[o.index]
                st.content += o.text
                st.token_ids.extend(o.token_ids)
                lps = self._logprobs(request, o)
                if lps is not None:
                    st.logprobs = (st.logprobs or []) + lps
                if o.finish_reason is not None:
                    st.finish_reason, st.stop_reason = o.finish_reason, o.stop_reason
        result = [ChatCompletionResponseChoice(
            index=i, message=ChatMessage(role=role, content=st.content),
            logprobs=ChatCompletionLogProbs(content=st.logprobs or []) if request.logprobs else None,
            finish_reason=st.finish_reason, stop_reason=st.stop_reason,
            token_ids=st.token_ids if request.return_token_ids else None) for i, st in enumerate(choices)]
        return ChatCompletionResponse(
            id=request_id, created=created, model=self.response_model(request), choices=result,
            usage=self.usage(len(prompt.token_ids), sum(len(c.token_ids) for c in choices), cached),
            prompt_logprobs=self.prompt_logprobs_json(prompt_lps) if request.prompt_logprobs is not None else None,
            prompt_token_ids=prompt.token_ids if request.return_token_ids else None,
            prompt_text=prompt.text if request.return_prompt_text else None)
