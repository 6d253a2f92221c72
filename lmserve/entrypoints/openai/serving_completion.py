"""POST /v1/completions: a batch of prompts (text or token ids) times ``n`` choices.

Choice ``i * n + j`` is the j-th sample of prompt i. The non-streaming response is the
streaming event sequence drained into per-choice accumulators, so both paths agree
token for token.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request

from lmserve.entrypoints.openai.protocol_completions import CompletionRequest
from lmserve.entrypoints.openai.protocol_responses import (CompletionLogProbs, CompletionResponse,
                                                          CompletionResponseChoice,
                                                          CompletionResponseStreamChoice,
                                                          CompletionStreamResponse)
from lmserve.entrypoints.openai.serving_engine import (SSE_DONE, OpenAIServing, Prompt, sse, stream_error,
                                                       until_disconnected)
from lmserve.entrypoints.openai.stream_utils import OutputMerger, SSEResponse, should_include_usage
from lmserve.errors import InvalidRequestError
from lmserve.outputs import CompletionOutput, Logprob, RequestOutput, VocabLogprobs
from lmserve.sampling_params import SamplingParams


@dataclass
class _Choice:
    """What a choice has produced so far (the non-streaming accumulator)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    offset: int = 0  # text offset of the next token, for logprobs.text_offset
    started: bool = False


class OpenAIServingCompletion(OpenAIServing):
    # ------------------------------------------------------------------ preparation
    def prepare_prompts(self, request: CompletionRequest) -> list[Prompt]:
        prompts = []
        for p in request.prompts():
            if isinstance(p, str):
                ids = self.tokenize(p, request.add_special_tokens)
                text: str | None = p
            else:
                self.check_token_ids(p)
                ids, text = list(p), None
            prompts.append(Prompt(self.truncate(ids, request), text))
        return prompts

    async def create_completion(self, request: CompletionRequest, request_id: str,
                                raw_request: Request | None):
        """Returns a CompletionResponse, an SSEResponse when streaming, or None when the
        client went away first."""
        lora = self.resolve_model(request.model)
        request.validate_request()
        self.check_fanout(len(request.prompts()) * request.n, "prompt")
        prompts = await self.off_loop(self.prepare_prompts, request)
        params = [self.sampling_params(request, len(p.token_ids)) for p in prompts]
        created = int(time.time())
        merger = OutputMerger([self.generate(p, sp, f"{request_id}-{i}", request, lora)
                               for i, (p, sp) in enumerate(zip(prompts, params))])
        await merger.start()
        if request.stream:
            return SSEResponse(self._stream(request, request_id, created, prompts, merger), cleanup=merger)
        return await until_disconnected(raw_request, self._full(request, request_id, created, prompts, params,
                                                                merger), cleanup=merger)

    # ------------------------------------------------------------------ shared event walk
    def _prompt_echo(self, prompt: Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        tok = self.require_tokenizer("echo", "echo of a token-id prompt")
        return tok.decode(prompt.token_ids)

    def _append_logprobs(self, lp: CompletionLogProbs, token_ids: list[int],
                         entries: list[dict[int, Logprob] | None], offset: int, as_ids: bool,
                         first_prompt_token: bool = False, keep_order: bool = False) -> int:
        """Appends one entry per token; returns the text offset after them. ``keep_order``
        (``logprob_token_ids``): every entry in the engine's order, not by rank (as vLLM)."""
        for j, (tid, d) in enumerate(zip(token_ids, entries)):
            chosen = d.get(tid) if d is not None else None
            text = self.token_text(tid, chosen, as_ids)
            lp.tokens.append(text)
            lp.text_offset.append(offset)
            offset += len(text)
            if d is None or (first_prompt_token and j == 0) or chosen is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(self.safe_logprob(chosen.logprob))
            if isinstance(d, VocabLogprobs):  # the whole vocabulary: table lookups, no Logprob objects
                lp.top_logprobs.append(dict(zip(self.vocab_names(d, as_ids), map(self.safe_logprob, d.lps.tolist()))))
                continue
            lp.top_logprobs.append({self.token_text(t, e, as_ids): self.safe_logprob(e.logprob)
                                    for t, e in (d.items() if keep_order else self.ranked(d))})
        return offset

    def _delta(self, request: CompletionRequest, prompt: Prompt, out: RequestOutput, o: CompletionOutput,
               st: _Choice) -> tuple[str, CompletionLogProbs | None, list[int] | None]:
        """The text, logprobs and prompt ids to emit for this output of one choice."""
        want_lp = request.logprobs is not None
        as_ids = self.as_ids(request)
        lp = CompletionLogProbs() if want_lp else None
        text = ""
        prompt_ids = None
        if not st.started:
            st.started = True
            if request.return_token_ids:
                prompt_ids = prompt.token_ids
            if request.echo:
                text = self._prompt_echo(prompt)
                if lp is not None:
                    plps = out.prompt_logprobs
                    entries: list = list(plps) if plps else [None] * len(prompt.token_ids)
                    st.offset = self._append_logprobs(lp, prompt.token_ids, entries, st.offset, as_ids, True)
                    st.offset = len(text)
                else:
                    st.offset = len(text)
        text += o.text
        if lp is not None and o.logprobs is not None:
            st.offset = self._append_logprobs(lp, o.token_ids, list(o.logprobs), st.offset, as_ids,
                                              keep_order=bool(request.logprob_token_ids))
        return text, lp, prompt_ids

    # ------------------------------------------------------------------ streaming
    async def _stream(self, request: CompletionRequest, request_id: str, created: int,
                      prompts: list[Prompt], merger: OutputMerger) -> AsyncIterator[str]:
        n = request.n
        states: dict[int, _Choice] = {}
        num_generated: dict[int, int] = {}
        include_usage, continuous = should_include_usage(request.stream_options, self.options.force_include_usage)
        cached = [0] * len(prompts)
        try:
            async for i, out in merger:
                cached[i] = out.num_cached_tokens
                for o in out.outputs:
                    idx = i * n + o.index
                    st = states.setdefault(idx, _Choice())
                    first = not st.started
                    text, lp, prompt_ids = self._delta(request, prompts[i], out, o, st)
                    num_generated[idx] = num_generated.get(idx, 0) + len(o.token_ids)
                    if not text and not o.token_ids and o.finish_reason is None and not first:
                        continue
                    choice = CompletionResponseStreamChoice(
                        index=idx, text=text, logprobs=lp, finish_reason=o.finish_reason,
                        stop_reason=o.stop_reason, prompt_token_ids=prompt_ids,
                        token_ids=list(o.token_ids) if request.return_token_ids else None)
                    chunk = CompletionStreamResponse(id=request_id, created=created, model=self.response_model(request),
                                                     choices=[choice])
                    if continuous:
                        chunk.usage = self.usage(len(prompts[i].token_ids), num_generated[idx], cached[i])
                    yield sse(chunk)
            if include_usage:
                usage = self.usage(sum(len(p.token_ids) for p in prompts), sum(num_generated.values()),
                                   sum(cached))
                yield sse(CompletionStreamResponse(id=request_id, created=created, model=self.response_model(request),
                                                   choices=[], usage=usage))
        except Exception as e:  # noqa: BLE001 - the stream already started: report in-band
            yield stream_error(e)
        yield SSE_DONE

    # ------------------------------------------------------------------ non-streaming
    async def _full(self, request: CompletionRequest, request_id: str, created: int, prompts: list[Prompt],
                    params: list[SamplingParams], merger: OutputMerger) -> CompletionResponse:
        n = request.n
        states: dict[int, _Choice] = {i: _Choice() for i in range(len(prompts) * n)}
        prompt_lps: dict[int, list] = {}
        cached = [0] * len(prompts)
        async for i, out in merger:
            cached[i] = out.num_cached_tokens
            if out.prompt_logprobs is not None and i not in prompt_lps:
                prompt_lps[i] = list(out.prompt_logprobs)
            for o in out.outputs:
                st = states[i * n + o.index]
                text, lp, _ = self._delta(request, prompts[i], out, o, st)
                st.text += text
                st.token_ids.extend(o.token_ids)
                if lp is not None:
                    if st.logprobs is None:
                        st.logprobs = lp
                    else:
                        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                            getattr(st.logprobs, name).extend(getattr(lp, name))
                if o.finish_reason is not None:
                    st.finish_reason, st.stop_reason = o.finish_reason, o.stop_reason
        choices = []
        for idx in range(len(prompts) * n):
            st, i = states[idx], idx // n
            if not st.started:
                raise InvalidRequestError("The engine returned no output for a choice.")
            want_plp = params[i].prompt_logprobs is not None
            choices.append(CompletionResponseChoice(
                index=idx, text=st.text, logprobs=st.logprobs, finish_reason=st.finish_reason,
                stop_reason=st.stop_reason,
                prompt_logprobs=self.prompt_logprobs_json(prompt_lps.get(i)) if want_plp else None,
                prompt_token_ids=prompts[i].token_ids if request.return_token_ids else None,
                token_ids=st.token_ids if request.return_token_ids else None))
        usage = self.usage(sum(len(p.token_ids) for p in prompts), sum(len(s.token_ids) for s in states.values()),
                           sum(cached))
        return CompletionResponse(id=request_id, created=created, model=self.response_model(request), choices=choices,
                                  usage=usage)
