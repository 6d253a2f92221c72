"""What every OpenAI API handler shares: the served model names, prompt preparation
(tokenize, truncate, context-length check), ``SamplingParams`` from a request, engine
calls with metrics and guaranteed abort, logprob formatting, SSE framing.

Invariants:
- every engine request started through ``generate()`` is either finished or aborted when
  the iterator is closed, cancelled or raises (``aclosing`` + the engine's own abort);
- each started request is reported to ``EngineMetrics`` exactly once;
- token text for logprobs comes from one function (``token_text``), so the
  ``return_tokens_as_token_ids`` rule is applied everywhere alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request

from lmserve.entrypoints.openai.output_logging import OutputLogger, clip
from lmserve.entrypoints.openai.protocol_responses import (CompletionTokensDetails, ErrorInfo, ErrorResponse,
                                                          LogprobEntry, PromptTokensDetails, UsageInfo)
from lmserve.entrypoints.openai.protocol_sampling import SamplingRequest
from lmserve.errors import InvalidRequestError, LMServeError, NotFoundError
from lmserve.lora.request import LoRARequest
from lmserve.metrics import EngineMetrics
from lmserve.outputs import Logprob, RequestOutput, VocabLogprobs
from lmserve.sampling_params import SamplingParams

logger = logging.getLogger("lmserve.server")
T = TypeVar("T")

_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


DEFAULT_MAX_LOG_LEN = 2048
DEFAULT_MAX_STOP_STRINGS = 128


@dataclass(frozen=True)
class ServerOptions:
    """Server-side settings taken from the serve flags (none of them reach the engine), and
    the helpers the handlers share: ``executor`` (one thread: tokenizing and rendering trusted
    templates off the event loop, one at a time, as HF tokenizers are not re-entrant) and
    ``template_sandbox`` (render processes for request templates). None: made on first use
    by each handler."""

    served_model_names: tuple[str, ...]
    model_root: str | None = None
    response_role: str = "assistant"
    chat_template: str | None = None
    chat_template_content_format: str = "auto"
    return_tokens_as_token_ids: bool = False
    enable_prompt_tokens_details: bool = False
    log_requests: bool = False
    log_outputs: bool = False  # --enable-log-outputs (needs --enable-log-requests)
    log_deltas: bool = True  # --enable-log-deltas: streamed requests also log each delta
    default_chat_template_kwargs: dict[str, Any] | None = None  # under each request's own
    max_log_len: int | None = DEFAULT_MAX_LOG_LEN
    trust_request_chat_template: bool = False
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS
    force_include_usage: bool = False  # --enable-force-include-usage: every stream ends with a usage chunk
    tool_call_parser: str | None = None  # --tool-call-parser (a ToolParserManager name)
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice: tool_choice "auto" is parsed
    exclude_tools_when_tool_choice_none: bool = False
    reasoning_parser: str | None = None  # --reasoning-parser (a ReasoningParserManager name)
    reasoning_config: Any = None  # lmserve.reasoning.config.ReasoningConfig, token ids resolved
    # --structured-outputs-config.enable_in_reasoning: grammars constrain from the first token, even
    # inside the reasoning (else, with a reasoning parser, only what follows it)
    grammar_in_reasoning: bool = False
    loras: Any = field(default=None, compare=False, repr=False)  # ServedLoRAs with --enable-lora, else None
    executor: Any = field(default=None, compare=False, repr=False)
    template_sandbox: Any = field(default=None, compare=False, repr=False)


@dataclass
class Prompt:
    """One engine prompt: token ids (truncated as asked) and the text, when known."""

    token_ids: list[int]
    text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _effective_max_len(engine: Any) -> int:
    n = engine.model_config.max_model_len
    core = getattr(getattr(engine, "engine", None), "core", None)
    seq = getattr(engine, "max_seq_len", None) or getattr(core, "max_seq_len", None)
    return min(n, seq) if isinstance(seq, int) and seq > 0 else n


def error_body(err: LMServeError) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=err.message, type=err.err_type, param=err.param,
                                         code=err.status_code))


def sse(data: Any) -> str:
    """One Server-Sent Events frame."""
    if hasattr(data, "model_dump_json"):
        return f"data: {data.model_dump_json()}\n\n"
    return f"data: {json.dumps(data)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def stream_error(exc: BaseException) -> str:
    """The SSE error event for a failure after the stream started: an ``LMServeError`` as
    itself; anything else is logged here and reported without its text (which may hold
    internals)."""
    if not isinstance(exc, LMServeError):
        logger.error("Internal error in a stream", exc_info=exc)
        exc = LMServeError(f"Internal server error: {type(exc).__name__}")
    return sse(error_body(exc))


def _safe(lp: float) -> float:
    return max(lp, _MIN_LOGPROB) if lp == lp else _MIN_LOGPROB  # NaN -> floor as well


class OpenAIServing:
    def __init__(self, engine: Any, options: ServerOptions, metrics: EngineMetrics | None) -> None:
        self.engine = engine
        self._vocab_bytes: list[list[int]] | None = None  # UTF-8 of each vocabulary token, made on first use
        self.options = options
        self.metrics = metrics
        self.model_config = engine.model_config
        # The longest sequence the engine can hold: max_model_len, or less when the KV cache is smaller.
        self.max_model_len: int = _effective_max_len(engine)
        self.tokenizer = engine.tokenizer
        self.default_sampling_params: dict[str, Any] = dict(engine.default_sampling_params() or {})
        self._max_token_bytes = self._longest_token_bytes()
        self._own_executor: Any = None
        self._own_sandbox: Any = None

    async def off_loop(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the handlers' worker thread (tokenizing, trusted templates), so the
        event loop keeps serving meanwhile."""
        executor = self.options.executor
        if executor is None:
            if self._own_executor is None:
                from concurrent.futures import ThreadPoolExecutor
                self._own_executor = ThreadPoolExecutor(1, thread_name_prefix="lmserve-prep")
            executor = self._own_executor
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    # ------------------------------------------------------------------ model names
    @property
    def model_name(self) -> str:
        return self.options.served_model_names[0]

    def resolve_model(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's ``model`` names (None: the base model); 404 for unknown names."""
        if model is None or model == "" or model in self.options.served_model_names:
            return None
        lora = self.options.loras.get(model) if self.options.loras is not None else None
        if lora is None:
            raise NotFoundError(f"The model `{model}` does not exist.", "model")
        return lora

    def response_model(self, request: Any) -> str:
        """The ``model`` a response reports: the adapter's name for an adapter request (as vLLM),
        else the first served name. Call after ``resolve_model`` accepted ``request.model``."""
        model = getattr(request, "model", None)
        return model if model and model not in self.options.served_model_names else self.model_name

    def check_model(self, model: str | None) -> None:
        """404 unless ``model`` is a served name, an adapter's, or empty."""
        self.resolve_model(model)

    # ------------------------------------------------------------------ prompts
    def require_tokenizer(self, param: str = "prompt", what: str = "Text prompts") -> Any:
        """The tokenizer, or a 400 naming ``param`` when the server runs with --skip-tokenizer-init."""
        if self.tokenizer is None:
            raise InvalidRequestError(f"{what}: not available, as this server does not load the tokenizer "
                                      "(--skip-tokenizer-init). Send prompts as token ids; outputs come back as "
                                      "token ids (token_ids, and logprobs as 'token_id:N').", param)
        return self.tokenizer

    def _longest_token_bytes(self) -> int:
        tok = self.tokenizer
        if tok is None:
            return 0
        try:
            longest = max(len(t) for t in tok.get_vocab())
        except Exception:  # noqa: BLE001 - any tokenizer without a plain vocab
            return 0
        # Byte-level vocab strings are at least one char per byte; allow for SentencePiece's
        # multi-byte characters with a factor of 4 (UTF-8's longest encoding).
        return 4 * max(longest, 1)

    def tokenize(self, text: str, add_special_tokens: bool, param: str = "prompt") -> list[int]:
        """Tokenizes ``text``; a text that certainly holds more tokens than the context is
        refused before tokenizing (a 10 MB prompt costs nothing)."""
        tok = self.require_tokenizer(param)
        self.check_text(text, param)
        return list(tok.encode(text, add_special_tokens=add_special_tokens))

    def check_text(self, text: str, param: str, check_length: bool = True) -> None:
        """Refuses text no tokenizer can take (lone surrogates) and, with ``check_length``,
        text that certainly holds more tokens than the context, before any tokenizing."""
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError(f"{param} contains a lone UTF-16 surrogate, which is not valid Unicode "
                                          "text.", param) from None
        if check_length and self._max_token_bytes and len(text) > self.max_model_len * self._max_token_bytes:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"{param} is {len(text)} characters long, which is more than that many tokens can hold. "
                "Please reduce the length of the input.", param)

    def check_fanout(self, count: int, param: str) -> None:
        """Refuses, before any tokenizing, a request that would start more engine requests
        (prompts x n) than the engine ever holds at once (running plus waiting): it could only
        end in a 503 after the work of preparing them all."""
        sched = getattr(self.engine.engine_config, "scheduler_config", None)
        limit = getattr(sched, "max_num_seqs", None), getattr(sched, "max_waiting_requests", None)
        if None in limit:
            return
        if count > limit[0] + limit[1]:
            raise InvalidRequestError(f"The request would start {count} sequences (prompts x n); the server "
                                      f"holds at most {limit[0] + limit[1]} at once (--max-num-seqs plus "
                                      "--max-waiting-requests).", param)

    def check_token_ids(self, ids: list[int], param: str = "prompt") -> None:
        vocab = self.model_config.vocab_size
        for t in ids:
            if not 0 <= t < vocab:
                raise InvalidRequestError(f"Token id {t} is out of vocabulary (vocab size {vocab}).", param)

    def truncate(self, ids: list[int], request: SamplingRequest) -> list[int]:
        k = request.truncate_prompt_tokens
        if k is None:
            return ids
        keep = self.max_model_len if k == -1 else k
        if k == 0:
            raise InvalidRequestError("truncate_prompt_tokens must be -1 or at least 1.", "truncate_prompt_tokens")
        if keep > self.max_model_len:
            raise InvalidRequestError(f"truncate_prompt_tokens value ({keep}) is greater than max_model_len "
                                      f"({self.max_model_len}). Please, select a smaller truncation size.",
                                      "truncate_prompt_tokens")
        return ids[-keep:]

    def check_context(self, prompt_len: int, requested_max_tokens: int | None) -> int:
        """Raises vLLM's 400 when the prompt (plus the asked completion) does not fit;
        returns the room left for the completion."""
        if prompt_len == 0:
            raise InvalidRequestError("The prompt is empty: at least one token is needed.", "prompt")
        n = self.max_model_len
        if requested_max_tokens is not None and prompt_len + requested_max_tokens > n:
            raise InvalidRequestError(
                f"This model's maximum context length is {n} tokens. However, you requested "
                f"{prompt_len + requested_max_tokens} tokens ({prompt_len} in the messages, "
                f"{requested_max_tokens} in the completion). Please reduce the length of the messages "
                "or completion.", "max_tokens" if prompt_len < n else "messages")
        if prompt_len >= n:
            raise InvalidRequestError(
                f"This model's maximum context length is {n} tokens. However, you requested {prompt_len} "
                f"tokens ({prompt_len} in the messages, 0 in the completion). Please reduce the length of "
                "the messages.", "messages")
        return n - prompt_len

    def sampling_params(self, request: Any, prompt_len: int) -> SamplingParams:
        request.check_list_limits(self.options.max_stop_strings)
        room = self.check_context(prompt_len, request.requested_max_tokens())
        params = request.to_sampling_params(room, self.default_sampling_params, self.model_config.max_logprobs,
                                            self.model_config.vocab_size)
        if getattr(request, "logits_processors", None):
            from lmserve.worker.logits_processors.per_request import resolve_request_logits_processors
            params.logits_processors = resolve_request_logits_processors(
                request.logits_processors, self.engine.engine_config.logits_processor_pattern)
        if request.priority != 0 and self.engine.engine_config.scheduler_config.policy != "priority":
            raise InvalidRequestError("Priority scheduling is not enabled: a request's priority must be 0 "
                                      "unless the server runs with --scheduling-policy priority.", "priority")
        if params.use_beam_search:
            limit = self.model_config.max_logprobs
            if limit != -1 and 2 * params.n > limit:
                raise InvalidRequestError(f"Beam search with n={params.n} needs {2 * params.n} logprobs per step; "
                                          f"the server allows {limit} (--max-logprobs).", "n")
        self._thinking_budget(request, params)
        if self.tokenizer is None:  # --skip-tokenizer-init: vLLM's detokenize=False
            for name in ("stop", "bad_words"):
                if getattr(params, name):
                    self.require_tokenizer(name, f"{name} strings")
            params.detokenize = False
            if request.return_token_ids is None:  # the only way to see the output: token ids
                request.return_token_ids = True
        try:
            params.verify_against_vocab(self.model_config.vocab_size)
        except ValueError as e:
            raise InvalidRequestError(str(e), str(e).split(" ", 1)[0]) from e
        return params

    def _thinking_budget(self, request: Any, params: SamplingParams) -> None:
        """Carries ``thinking_token_budget`` and the thinking markers' token ids into ``params``."""
        budget = getattr(request, "thinking_token_budget", None)
        if budget is None or budget == -1:
            return
        config = self.options.reasoning_config
        if config is None or not config.enabled:
            raise InvalidRequestError("thinking_token_budget is set but reasoning_config is not configured. Please "
                                      "set --reasoning-parser and/or --reasoning-config to use "
                                      "thinking_token_budget.", "thinking_token_budget")
        params.thinking_token_budget = budget
        params._thinking_token_ids = (list(config.start_token_ids), list(config.end_token_ids))

    def reasoning_parser_kwargs(self, request: SamplingRequest) -> dict[str, Any] | None:
        """What the engine builds this request's structured-output reasoning gate with (None:
        no reasoning parser, or a request without a chat template): the chat template kwargs,
        the server's defaults under the request's own, as the output's reasoning parser sees them."""
        if self.options.reasoning_parser is None or not hasattr(request, "chat_template_kwargs"):
            return None
        return {"chat_template_kwargs": {**(self.options.default_chat_template_kwargs or {}),
                                         **(getattr(request, "chat_template_kwargs", None) or {})}}

    # ------------------------------------------------------------------ engine calls
    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str,
                       request: SamplingRequest, lora_request: LoRARequest | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """The engine's output stream for one prompt (under ``lora_request``'s adapter, if any),
        with metrics; closing it aborts."""
        self.log_request(request_id, prompt, params)
        engine_prompt: dict[str, Any] = {"prompt_token_ids": prompt.token_ids}
        if prompt.text is not None:
            engine_prompt["prompt"] = prompt.text
        start = time.time()
        first_at: float | None = None  # when the first output arrived
        last: float | None = None
        num_generated = 0
        finish = "abort"
        queue_s = None
        try:
            if params.use_beam_search and lora_request is not None:
                raise InvalidRequestError("use_beam_search is not supported with LoRA adapters", "use_beam_search")
            if params.use_beam_search:
                from lmserve.entrypoints.openai.beam_search import beam_search_stream
                stream = beam_search_stream(self.engine, prompt, params, request_id, self.max_model_len)
            else:
                stream = self.engine.generate(engine_prompt, params, request_id, priority=request.priority,
                                              cache_salt=request.cache_salt, lora_request=lora_request,
                                              reasoning_parser_kwargs=self.reasoning_parser_kwargs(request))
            out_log = OutputLogger(request_id, params, self.options.max_log_len, self.options.log_deltas) \
                if self.options.log_requests and self.options.log_outputs else None
            async with aclosing(stream) as outputs:
                async for out in outputs:
                    if out_log is not None:
                        out_log.observe(out)
                    now = time.time()
                    m = out.metrics
                    if first_at is None:
                        first_at = now
                        arrival = m.arrival_time if m is not None else start
                        if self.metrics is not None:
                            first = m.first_token_time if m is not None and m.first_token_time else now
                            self.metrics.observe_first_token(first - arrival)
                        if m is not None and m.first_scheduled_time:
                            queue_s = m.first_scheduled_time - arrival
                    elif self.metrics is not None:
                        self.metrics.observe_inter_token(now - last)
                    last = now
                    num_generated += sum(len(o.token_ids) for o in out.outputs)
                    if out.finished:
                        reasons = [o.finish_reason for o in out.outputs if o.finish_reason]
                        finish = reasons[-1] if reasons else "stop"
                    yield out
        except ValueError as e:  # the engine's validation (InvalidRequestError is a ValueError too)
            finish = "error"
            if isinstance(e, LMServeError):
                raise
            raise InvalidRequestError(str(e)) from e
        except LMServeError:
            finish = "error"
            raise
        finally:
            # A request refused before its first output never started: it is not counted.
            if self.metrics is not None and (first_at is not None or finish == "abort"):
                decode_s = last - first_at if first_at is not None and last is not None else None
                self.metrics.observe_request_finished(finish, time.time() - start,
                                                      prompt_tokens=len(prompt.token_ids),
                                                      generation_tokens=num_generated, queue_s=queue_s,
                                                      decode_s=decode_s)

    def log_request(self, request_id: str, prompt: Prompt, params: Any) -> None:
        """With --enable-log-requests, as vLLM: the params at INFO, the prompt at DEBUG. Every
        user-controlled part is a repr (no raw newlines) cut to --max-log-len characters."""
        if not self.options.log_requests:
            return
        n = self.options.max_log_len
        rid = clip(repr(request_id), n)
        logger.info("Received request %s: params: %s, num_prompt_tokens: %d", rid, clip(repr(params), n),
                    len(prompt.token_ids))
        if logger.isEnabledFor(logging.DEBUG):
            ids = prompt.token_ids if n is None else prompt.token_ids[:n]
            text = None if prompt.text is None else prompt.text if n is None else prompt.text[:n + 1]
            logger.debug("Request %s details: prompt: %s, prompt_token_ids: %s", rid, clip(repr(text), n),
                         clip(str(ids), n))

    # ------------------------------------------------------------------ formatting
    def token_text(self, token_id: int, logprob: Logprob | None, as_ids: bool) -> str:
        if as_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        tok = self.tokenizer
        if tok is None:
            return f"token_id:{token_id}"
        try:
            from lmserve.engine.detokenizer import decode_logprob_token
        except ImportError:
            return tok.decode([token_id])
        return decode_logprob_token(tok, token_id, False)

    def as_ids(self, request: SamplingRequest) -> bool:
        flag = request.return_tokens_as_token_ids
        return self.options.return_tokens_as_token_ids if flag is None else bool(flag)

    @staticmethod
    def ranked(entries: dict[int, Logprob], k: int | None = None) -> list[tuple[int, Logprob]]:
        """The entries by rank (best first); ``k`` keeps the k best (None or -1: all). A
        whole-vocabulary entry is already in rank order (no sort)."""
        if isinstance(entries, VocabLogprobs):
            items = entries.ranked_items()
        else:
            items = sorted(entries.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 62,
                                                            -kv[1].logprob))
        return items if k is None or k == -1 else items[:k]

    def vocab_names(self, entries: VocabLogprobs, as_ids: bool) -> list[str]:
        """The token names of a whole-vocabulary entry, best first, as ``token_text`` names them
        (table lookups: no per-entry ``Logprob``)."""
        ids = entries.ids.tolist()
        if as_ids or entries.texts is None:
            return [f"token_id:{t}" for t in ids]
        texts = entries.texts
        return [texts[t] for t in ids]

    def vocab_top_logprobs(self, entries: VocabLogprobs, as_ids: bool) -> list[dict[str, Any]]:
        """A whole-vocabulary entry as chat ``top_logprobs`` items (plain dicts, best first): about
        5x cheaper than one response model per vocabulary entry."""
        names = self.vocab_names(entries, as_ids)
        if as_ids or entries.texts is None:
            encoded = [list(n.encode()) for n in names]
        else:
            if self._vocab_bytes is None or len(self._vocab_bytes) < len(entries.texts):
                self._vocab_bytes = [list(t.encode("utf-8", errors="replace")) for t in entries.texts]
            table = self._vocab_bytes
            encoded = [table[t] for t in entries.ids.tolist()]
        return [{"token": n, "logprob": _safe(lp), "bytes": b}
                for n, lp, b in zip(names, entries.lps.tolist(), encoded)]

    def listed(self, entries: dict[int, Logprob], request: Any, k: int | None = None) -> list[tuple[int, Logprob]]:
        """The entries a response lists for one token: with ``logprob_token_ids`` all of them in
        the engine's order (the sampled token, then the asked-for ids, as vLLM), else ``ranked``."""
        if getattr(request, "logprob_token_ids", None):
            return list(entries.items())
        return self.ranked(entries, k)

    @staticmethod
    def safe_logprob(lp: float) -> float:
        return _safe(lp)

    def prompt_logprobs_json(self, plps: list[dict[int, Logprob] | None] | None
                             ) -> list[dict[int, Any] | None] | None:
        """vLLM's ``prompt_logprobs``: per prompt token {id: {logprob, rank, decoded_token}}. A
        whole-vocabulary position becomes plain dicts straight from its arrays."""
        if plps is None:
            return None
        return [None if d is None else self._vocab_prompt_entry(d) if isinstance(d, VocabLogprobs)
                else {t: LogprobEntry(logprob=_safe(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
                      for t, lp in d.items()} for d in plps]

    @staticmethod
    def _vocab_prompt_entry(d: VocabLogprobs) -> dict[int, dict[str, Any]]:
        ids, texts = d.ids.tolist(), d.texts
        return {t: {"logprob": _safe(lp), "rank": d.chosen_rank if t == d.chosen else i + 1,
                    "decoded_token": None if texts is None else texts[t]}
                for i, (t, lp) in enumerate(zip(ids, d.lps.tolist()))}

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
              reasoning_tokens: int | None = None) -> UsageInfo:
        """``reasoning_tokens`` (chat with --reasoning-parser): reported as
        ``completion_tokens_details.reasoning_tokens``, as vLLM."""
        details = PromptTokensDetails(cached_tokens=cached_tokens) \
            if self.options.enable_prompt_tokens_details else None
        completion = CompletionTokensDetails(reasoning_tokens=reasoning_tokens) if reasoning_tokens is not None \
            else None
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details,
                         completion_tokens_details=completion)


async def until_disconnected(raw_request: Request | None, work: Awaitable[T], cleanup: Any = None) -> T | None:
    """Runs ``work``; if the client disconnects first, cancels it and returns None.
    ``cleanup.aclose()`` (the engine streams) is awaited in every case, which aborts
    whatever is still running."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(raw_request)) if raw_request is not None else None
    try:
        if watcher is None:
            return await task
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return None
    finally:
        if watcher is not None:
            watcher.cancel()
        if not task.done():
            task.cancel()
        if cleanup is not None:
            await cleanup.aclose()


async def _wait_disconnect(raw_request: Request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return
