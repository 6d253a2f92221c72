"""What the pooling handlers (embeddings, pooling, classify, score, rerank) share: turning a
request's ``input`` or ``messages`` into token-id prompts, checking the params against the
model once, fanning the prompts out to the engine together and gathering the results.

Invariants:
- every prompt is tokenized, truncated and length-checked here, before any is handed to
  the engine: a bad prompt anywhere in a batch is a 400 and nothing runs;
- the engine receives final token ids (truncation already applied), so the usage the
  response reports is exactly what ran;
- every engine request started by ``encode_all`` is finished or aborted when it returns,
  raises or is cancelled (client disconnect), and is reported to the metrics once;
- outputs come back in the order of the prompts.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from lmserve.entrypoints.openai.protocol_pooling import PoolingBaseRequest, ChatInputRequest, InputRequest
from lmserve.entrypoints.openai.protocol_responses import UsageInfo
from lmserve.entrypoints.openai.serving_chat import OpenAIServingChat
from lmserve.entrypoints.openai.serving_engine import Prompt, until_disconnected
from lmserve.entrypoints.openai.stream_utils import OutputMerger
from lmserve.entrypoints.score_utils import truncation_length
from lmserve.errors import InvalidRequestError, LMServeError
from lmserve.outputs import PoolingRequestOutput
from lmserve.pooling_params import PoolingParams, resolve_encode_task


@dataclass
class PoolingPrompt:
    """One engine prompt of a pooling request."""

    token_ids: list[int]
    text: str | None = None
    token_type_ids: list[int] | None = None  # cross-encoder pairs: the segment of each token

    def engine_prompt(self) -> dict[str, Any]:
        p: dict[str, Any] = {"prompt_token_ids": self.token_ids}
        if self.text is not None:
            p["prompt"] = self.text
        if self.token_type_ids is not None:
            p["token_type_ids"] = self.token_type_ids
        return p


def encode_tensor(data: Any, encoding_format: str) -> list | str:
    """A pooled tensor as JSON: nested float lists, or base64 of its little-endian float32
    bytes in row-major order (what OpenAI's ``encoding_format="base64"`` means)."""
    if encoding_format == "base64":
        arr = data.detach().float().contiguous().cpu().numpy().astype("<f4", copy=False)
        return base64.b64encode(arr.tobytes()).decode("ascii")
    return data.tolist()


def pooling_usage(outputs: Sequence[PoolingRequestOutput]) -> UsageInfo:
    n = sum(len(o.prompt_token_ids) for o in outputs)
    return UsageInfo(prompt_tokens=n, total_tokens=n)


class OpenAIServingPoolingBase(OpenAIServingChat):
    """Base of the pooling handlers. Shares chat-template rendering with the chat handler."""

    # ------------------------------------------------------------------ params
    def verify_params(self, params: PoolingParams, request: PoolingBaseRequest) -> PoolingParams:
        """``params`` with its task resolved (None/"encode" -> the model's per-token task),
        checked against the model; ValueError -> 400 naming the field when it can."""
        mc = self.model_config
        params = params.clone()
        try:
            task = resolve_encode_task(params.task, tuple(mc.supported_pooling_tasks))
            params.task = task
            params.clone().verify(task, mc)
        except ValueError as e:
            raise InvalidRequestError(str(e), self.param_of(str(e), request, None)) from e
        params.truncate_prompt_tokens = None  # applied while tokenizing (see ``prompts_for``)
        return params

    @staticmethod
    def param_of(message: str, request: Any, default: str | None) -> str | None:
        """The field of ``request`` that ``message`` names (one the client set), else ``default``."""
        fields = request.model_fields_set - {"model", "input", "messages"}
        for word in message.split():
            word = word.strip(".,:;()`'\"")
            if word in fields:
                return word
        return default

    def max_length(self, request: PoolingBaseRequest) -> int | None:
        """Tokens to truncate each prompt to (None: no truncation)."""
        try:
            return truncation_length(request.truncate_prompt_tokens, self.max_model_len)
        except ValueError as e:
            raise InvalidRequestError(str(e), "truncate_prompt_tokens") from e

    # ------------------------------------------------------------------ prompts
    def tokenize_text(self, text: str, add_special_tokens: bool, max_length: int | None,
                      param: str) -> list[int]:
        """``text`` as ids; with ``max_length``, the tokenizer truncates (its special tokens
        kept, as sentence-transformers does), else an over-long text is refused early."""
        if max_length is None:
            return self.tokenize(text, add_special_tokens, param=param)
        tok = self.require_tokenizer()
        self.check_text(text, param, check_length=False)
        return list(tok(text, add_special_tokens=add_special_tokens, truncation=True,
                        max_length=max_length)["input_ids"])

    def check_length(self, n: int, operation: str, param: str) -> None:
        if n == 0:
            raise InvalidRequestError("The prompt is empty: at least one token is needed.", param)
        if n > self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n} tokens in the input for {operation}. Please reduce the length of the input, or set "
                "truncate_prompt_tokens.", param)

    async def prompts_for(self, request: InputRequest | ChatInputRequest, operation: str) -> list[PoolingPrompt]:
        """The prompts of an ``input`` (one per item) or ``messages`` (one) request; templates
        and tokenizing run off the event loop."""
        if isinstance(request, ChatInputRequest):
            text = await self.render([m.to_template_dict() for m in request.messages],
                                     add_generation_prompt=request.add_generation_prompt,
                                     continue_final_message=request.continue_final_message,
                                     chat_template=request.chat_template,
                                     chat_template_kwargs=request.chat_template_kwargs)
            return await self.off_loop(self._chat_prompts, request, text, operation)
        self.check_fanout(len(request.items()), "input")
        return await self.off_loop(self._input_prompts, request, operation)

    def _chat_prompts(self, request: ChatInputRequest, text: str, operation: str) -> list[PoolingPrompt]:
        ids = self.tokenize_text(text, request.add_special_tokens, self.max_length(request), "messages")
        self.check_length(len(ids), operation, "messages")
        return [PoolingPrompt(ids, text)]

    def _input_prompts(self, request: InputRequest, operation: str) -> list[PoolingPrompt]:
        max_length = self.max_length(request)
        prompts: list[PoolingPrompt] = []
        param = "input"
        for item in request.items():
            if isinstance(item, str):
                ids = self.tokenize_text(item, request.add_special_tokens, max_length, param)
                prompts.append(PoolingPrompt(ids, item))
            else:
                self.check_token_ids(item, param)
                prompts.append(PoolingPrompt(list(item) if max_length is None else list(item)[-max_length:]))
        for p in prompts:
            self.check_length(len(p.token_ids), operation, param)
        return prompts

    # ------------------------------------------------------------------ engine calls
    async def encode_all(self, prompts: Sequence[PoolingPrompt], params: PoolingParams, request_id: str,
                         request: PoolingBaseRequest,
                         raw_request: Request | None) -> list[PoolingRequestOutput] | None:
        """Runs every prompt (engine request ids ``{request_id}-{i}``), all submitted together;
        returns their outputs in order, or None when the client went away first."""
        if request.priority != 0 and self.engine.engine_config.scheduler_config.policy != "priority":
            raise InvalidRequestError("Priority scheduling is not enabled: a request's priority must be 0 "
                                      "unless the server runs with --scheduling-policy priority.", "priority")
        merger = OutputMerger([self._encode_one(p, params, f"{request_id}-{i}", request.priority)
                               for i, p in enumerate(prompts)])
        await merger.start()
        return await until_disconnected(raw_request, self._gather(merger, len(prompts)), cleanup=merger)

    @staticmethod
    async def _gather(merger: OutputMerger, n: int) -> list[PoolingRequestOutput]:
        outs: list[PoolingRequestOutput | None] = [None] * n
        async for i, out in merger:
            if out.finished:
                outs[i] = out
        if any(o is None for o in outs):
            raise LMServeError("The engine returned no output for a prompt.")
        return outs  # type: ignore[return-value]

    async def _encode_one(self, prompt: PoolingPrompt, params: PoolingParams, request_id: str,
                          priority: int) -> AsyncIterator[PoolingRequestOutput]:
        """The engine's output for one prompt, with metrics; closing it early aborts it."""
        self.log_request(request_id, Prompt(prompt.token_ids, prompt.text), params)  # type: ignore[arg-type]
        start = time.time()
        got_output = False
        finish = "abort"
        try:
            stream = self.engine.encode(prompt.engine_prompt(), params, request_id, priority=priority)
            async with aclosing(stream) as outputs:
                async for out in outputs:
                    got_output = True
                    if out.finished:
                        finish = "stop"
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
            # A request refused before it ran is not counted, as in ``OpenAIServing.generate``.
            if self.metrics is not None and (got_output or finish == "abort"):
                self.metrics.observe_request_finished(finish, time.time() - start,
                                                      prompt_tokens=len(prompt.token_ids), generation_tokens=0)

