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
from lmserve.entrypoints.openai.chat_output import ChoiceParser, merge_deltas, tool_choice_schema, tool_mode
from lmserve.entrypoints.openai.protocol_common import ChatMessageParam
from lmserve.entrypoints.openai.protocol_completions import ChatCompletionRequest
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
from lmserve.outputs import CompletionOutput, Logprob, VocabLogprobs
from lmserve.reasoning import ReasoningParserManager
from lmserve.sampling_params import SamplingParams
from lmserve.tool_parsers import ToolParserManager

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
    text: str = ""  # the generated text alone (without an echo)
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
        tools = request.tools
        if request.tool_choice == "none" and self.options.exclude_tools_when_tool_choice_none:
            tools = None
        text = await self.render(request.template_messages(), add_generation_prompt=request.add_generation_prompt,
                                 continue_final_message=request.continue_final_message, tools=tools,
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
        prompt, _, merger = await self.start_generation(request, request_id, tool_calling=True)
        mode = self.tool_mode(request)
        created = int(time.time())
        if request.stream:
            return SSEResponse(self._stream(request, request_id, created, prompt, merger, mode), cleanup=merger)
        return await until_disconnected(raw_request, self._full(request, request_id, created, prompt, merger, mode),
                                        cleanup=merger)

    # ------------------------------------------------------------------ tools and reasoning
    def check_tool_choice(self, request: ChatCompletionRequest) -> str:
        """The request's tool mode (chat_output.TOOL_MODES), after vLLM's checks against the
        server's flags; lets the tool parser adjust the request (it may keep special tokens)."""
        opts = self.options
        has_parser = opts.tool_call_parser is not None
        choice = request.tool_choice
        if not has_parser and choice not in (None, "none"):
            if choice == "auto":
                raise InvalidRequestError('"auto" tool choice requires --enable-auto-tool-choice and '
                                          "--tool-call-parser to be set", "tool_choice")
            desc = f'function "{choice["function"]["name"]}"' if isinstance(choice, dict) else f'"{choice}"'
            raise InvalidRequestError(f"tool_choice={desc} requires --tool-call-parser to be set", "tool_choice")
        mode = self.tool_mode(request)
        if mode == "auto":
            self._tool_parser_cls()(self.tokenizer, request.tools).adjust_request(request)
        return mode

    def tool_mode(self, request: ChatCompletionRequest) -> str:
        """The chat_output mode of a validated request under the server's tool flags."""
        opts = self.options
        return tool_mode(request.tool_choice, opts.enable_auto_tool_choice, opts.tool_call_parser is not None)

    @staticmethod
    def constrain_tool_call(request: ChatCompletionRequest, mode: str, params: Any) -> None:
        """For "required" / a named function: the output is constrained to vLLM's tool-call JSON
        (``chat_output.tool_choice_schema``), replacing any response_format (as vLLM). A named call
        with a json/regex/choice ``structured_outputs`` is vLLM's 400."""
        if mode not in ("required", "named"):
            return
        from lmserve.structured_output import json_schema_constraint
        given = request.structured_outputs or {}
        if mode == "named" and any(given.get(k) is not None for k in ("json", "regex", "choice")):
            raise InvalidRequestError("You can only either use constraints for structured outputs or tools, not "
                                      "both.", "tool_choice")
        try:
            schema = tool_choice_schema(request.tools or [], request.tool_choice, request.parallel_tool_calls)
        except ValueError as e:
            raise InvalidRequestError(str(e), "tools") from e
        assert schema is not None
        params.structured_outputs = json_schema_constraint(schema)

    def auto_tool_parser(self, tools: list[dict[str, Any]] | None) -> Any:
        """A fresh ``--tool-call-parser`` instance for ``tools`` when the server parses tool calls
        (--enable-auto-tool-choice), else None: the Responses and Anthropic APIs read their tool
        calls with it."""
        if not (tools and self.options.enable_auto_tool_choice and self.options.tool_call_parser):
            return None
        return self._tool_parser_cls()(self.tokenizer, tools)

    def split_reasoning(self, text: str, forced_tool_call: bool = False) -> tuple[str | None, str]:
        """A finished output's (reasoning, the rest) by the server's ``--reasoning-parser``; (None,
        text) without one, or for a forced tool call whose grammar held from the first token
        (``grammar_in_reasoning``, as ``choice_parser``). The Responses and Anthropic APIs turn the
        reasoning into their own ``reasoning`` item / ``thinking`` block."""
        name = self.options.reasoning_parser
        if name is None or (forced_tool_call and self.options.grammar_in_reasoning):
            return None, text
        parser = ReasoningParserManager.get_reasoning_parser(name)(
            self.tokenizer, chat_template_kwargs=dict(self.options.default_chat_template_kwargs or {}))
        reasoning, content = parser.extract_reasoning(text, None)
        return reasoning, content or ""

    def reasoning_tokens(self, request: ChatCompletionRequest, mode: str, outputs: list[list[int]]) -> int | None:
        """The reasoning tokens of all choices for ``usage.completion_tokens_details`` (None without a
        reasoning parser; 0 for required/named tool calls whose grammar holds from the first token)."""
        opts = self.options
        if opts.reasoning_parser is None:
            return None
        if mode in ("required", "named") and opts.grammar_in_reasoning:
            return 0
        kwargs = {**(opts.default_chat_template_kwargs or {}), **(request.chat_template_kwargs or {})}
        parser = ReasoningParserManager.get_reasoning_parser(opts.reasoning_parser)(
            self.tokenizer, chat_template_kwargs=kwargs)
        return sum(parser.count_reasoning_tokens(ids) for ids in outputs)

    def _tool_parser_cls(self) -> Any:
        return ToolParserManager.get_tool_parser(self.options.tool_call_parser or "")

    def choice_parser(self, request: ChatCompletionRequest, mode: str) -> ChoiceParser | None:
        """A fresh parser for one choice, or None when the text is plain content."""
        opts = self.options
        if opts.reasoning_parser is None and mode == "none":
            return None
        reasoning = None
        # required/named too: their grammar constrains only what follows the thinking (vLLM), unless
        # enable_in_reasoning makes it hold from the first token (no thinking section then).
        if opts.reasoning_parser is not None and not (mode in ("required", "named") and opts.grammar_in_reasoning):
            kwargs = {**(opts.default_chat_template_kwargs or {}), **(request.chat_template_kwargs or {})}
            reasoning = ReasoningParserManager.get_reasoning_parser(opts.reasoning_parser)(
                self.tokenizer, chat_template_kwargs=kwargs)
        tools = self._tool_parser_cls()(self.tokenizer, request.tools) if mode == "auto" else None
        return ChoiceParser(request, mode, reasoning, tools, include_reasoning=request.include_reasoning)

    async def start_generation(self, request: ChatCompletionRequest, request_id: str, tool_calling: bool = False
                               ) -> tuple[Prompt, SamplingParams, OutputMerger]:
        """Validates ``request``, renders and tokenizes it and starts its engine request(s).

        The one generation path of every chat-shaped API (chat completions, the Responses and
        Anthropic Messages APIs, batch chat): each translates its body into a
        ``ChatCompletionRequest`` and builds its own answer from the merger's outputs. Its
        ``model`` may name a LoRA adapter (``--enable-lora``), which the generation then runs with. A
        refusal (bad request, overload) raises here, before any response starts; the caller
        owns the merger and must ``aclose()`` it. ``tool_calling``: the chat completions API's
        ``tool_choice`` rules apply (``check_tool_choice``; required/named constrain the output)."""
        lora = self.resolve_model(request.model)  # the adapter ``model`` names, if any
        request.validate_request()
        mode = self.check_tool_choice(request) if tool_calling else "none"
        prompt = await self.prepare_prompt(request)
        params = self.sampling_params(request, len(prompt.token_ids))
        self.constrain_tool_call(request, mode, params)
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
            if k == -1 and isinstance(d, VocabLogprobs) and not request.logprob_token_ids:
                tops = self.vocab_top_logprobs(d, as_ids)
            else:
                tops = [ChatCompletionLogProb(token=(t2 := self.token_text(t, e, as_ids)),
                                              logprob=self.safe_logprob(e.logprob), bytes=list(t2.encode()))
                        for t, e in self.listed(d, request, k)] if k else []
            fields = dict(token=text, logprob=self.safe_logprob(chosen.logprob) if chosen else -9999.0,
                          bytes=list(text.encode()), top_logprobs=tops)
            # whole-vocabulary dicts are built right here: no validation of one model per entry
            whole = tops and isinstance(tops[0], dict)
            out.append(ChatCompletionLogProbsContent.model_construct(**fields) if whole
                       else ChatCompletionLogProbsContent(**fields))
        return out

    # ------------------------------------------------------------------ streaming
    async def _stream(self, request: ChatCompletionRequest, request_id: str, created: int, prompt: Prompt,
                      merger: OutputMerger, mode: str = "none") -> AsyncIterator[str]:
        role = self.response_role(request)
        echo = self.echo_text(request, role)
        include_usage, continuous = should_include_usage(request.stream_options, self.options.force_include_usage)
        prompt_len = len(prompt.token_ids)
        generated = [0] * request.n
        cached = 0
        parsers = [self.choice_parser(request, mode) for _ in range(request.n)]
        out_ids: list[list[int]] = [[] for _ in range(request.n)]

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
                    out_ids[o.index].extend(o.token_ids)
                    if not o.text and not o.token_ids and o.finish_reason is None:
                        continue
                    lps = self._logprobs(request, o)
                    parser = parsers[o.index]
                    finish = o.finish_reason
                    if parser is None:
                        delta = DeltaMessage(content=o.text) if o.text or finish is None else DeltaMessage()
                    else:
                        parsed = parser.stream(o.text, list(o.token_ids))
                        if finish is not None:
                            parsed = merge_deltas(parsed, parser.finish())
                            if parser.tools_streamed and mode != "named" and finish == "stop":
                                finish = "tool_calls"
                        if parsed is None and finish is None and lps is None and not request.return_token_ids:
                            continue  # held back (a marker may be starting): nothing to send yet
                        delta = parsed or DeltaMessage()
                    yield chunk(ChatCompletionResponseStreamChoice(
                        index=o.index, delta=delta,
                        logprobs=ChatCompletionLogProbs(content=lps) if lps is not None else None,
                        finish_reason=finish, stop_reason=o.stop_reason,
                        token_ids=list(o.token_ids) if request.return_token_ids else None))
            if include_usage:
                usage = self.usage(prompt_len, sum(generated), cached, self.reasoning_tokens(request, mode, out_ids))
                yield sse(ChatCompletionStreamResponse(id=request_id, created=created, model=self.response_model(request),
                                                       choices=[], usage=usage))
        except Exception as e:  # noqa: BLE001 - the stream already started: report in-band
            yield stream_error(e)
        yield SSE_DONE

    # ------------------------------------------------------------------ non-streaming
    async def full_response(self, request: ChatCompletionRequest, request_id: str, created: int, prompt: Prompt,
                            merger: OutputMerger) -> ChatCompletionResponse:
        """The whole ``chat.completion`` of a started generation (batch chat answers with these)."""
        return await self._full(request, request_id, created, prompt, merger)

    async def _full(self, request: ChatCompletionRequest, request_id: str, created: int, prompt: Prompt,
                    merger: OutputMerger, mode: str = "none") -> ChatCompletionResponse:
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
                st.text += o.text
                st.token_ids.extend(o.token_ids)
                lps = self._logprobs(request, o)
                if lps is not None:
                    st.logprobs = (st.logprobs or []) + lps
                if o.finish_reason is not None:
                    st.finish_reason, st.stop_reason = o.finish_reason, o.stop_reason
        result = [ChatCompletionResponseChoice(
            index=i, message=message, logprobs=ChatCompletionLogProbs(content=st.logprobs or []) if request.logprobs
            else None, finish_reason=finish, stop_reason=st.stop_reason,
            token_ids=st.token_ids if request.return_token_ids else None)
            for i, st in enumerate(choices) for message, finish in [self._message(request, mode, role, echo, st)]]
        return ChatCompletionResponse(
            id=request_id, created=created, model=self.response_model(request), choices=result,
            usage=self.usage(len(prompt.token_ids), sum(len(c.token_ids) for c in choices), cached,
                             self.reasoning_tokens(request, mode, [c.token_ids for c in choices])),
            prompt_logprobs=self.prompt_logprobs_json(prompt_lps) if request.prompt_logprobs is not None else None,
            prompt_token_ids=prompt.token_ids if request.return_token_ids else None,
            prompt_text=prompt.text if request.return_prompt_text else None)

    def _message(self, request: ChatCompletionRequest, mode: str, role: str, echo: str,
                 st: _ChatChoice) -> tuple[ChatMessage, str | None]:
        """A whole choice's message and finish reason (vLLM's rules: "tool_calls" when auto found
        calls, or "required" stopped normally; a named call keeps "stop")."""
        parser = self.choice_parser(request, mode)
        if parser is None:
            return ChatMessage(role=role, content=st.content), st.finish_reason
        parsed = parser.full(st.text)
        content = parsed.content
        if mode in ("required", "named"):
            content = content or ""
        if echo:
            content = echo + (content or "")
        finish = st.finish_reason
        if (mode == "auto" and parsed.tool_calls) or (mode == "required" and finish == "stop"):
            finish = "tool_calls"
        return ChatMessage(role=role, content=content, reasoning=parsed.reasoning,
                           tool_calls=parsed.tool_calls), finish
