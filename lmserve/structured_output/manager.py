"""``StructuredOutputManager``: the engine's entry point for constrained decoding.

Contract:
- ``compile_async(params)`` (the API server) and ``compile(params)`` (offline ``LLM``) turn a
  request's ``StructuredOutputsParams`` into a compiled grammar BEFORE the request is queued: the
  compile runs on the manager's own thread pool (never on the event loop, never in the engine
  step), bounded by ``config.compile_timeout_s``; a bad spec or a compile past the timeout raises
  ``InvalidRequestError`` (HTTP 400), and nothing reaches the engine;
- a compile that timed out keeps running on its worker thread until xgrammar returns (it cannot
  be interrupted); its result then lands in the cache;
- ``new_state(compiled, prompt_token_ids, reasoning_parser_kwargs)`` gives one sequence its own
  ``GrammarState``. With a reasoning parser (``--reasoning-parser``; the ``reasoning_parser``
  argument) and ``enable_in_reasoning`` false, the state leaves the reasoning free and
  constrains from the first token after its end (or from the first token, when the prompt
  already ended it); the parser is built per request with ``reasoning_parser_kwargs`` (the
  request's ``chat_template_kwargs``: thinking turned off means no reasoning), as vLLM does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from typing import Any

from lmserve.errors import InvalidRequestError
from lmserve.sampling_params import StructuredOutputsParams
from lmserve.structured_output.backend import XgrammarBackend
from lmserve.structured_output.config import StructuredOutputsConfig
from lmserve.structured_output.request import GrammarState
from lmserve.structured_output.spec import GrammarSpec, spec_from_params

COMPILE_THREAD_PREFIX = "lmserve-grammar"


class StructuredOutputManager:
    def __init__(self, config: StructuredOutputsConfig, tokenizer: Any, vocab_size: int,
                 stop_token_ids: list[int] | None = None, num_workers: int = 2,
                 reasoning_parser: str | None = None) -> None:
        if tokenizer is None:
            raise ValueError("structured outputs need the tokenizer (not available with --skip-tokenizer-init)")
        self.config = config
        self.stop_token_ids = list(stop_token_ids or []) or None
        self.tokenizer = tokenizer
        self.reasoner_cls: Any = None  # the ReasoningParser class that gates the grammar, if any
        if reasoning_parser and not config.enable_in_reasoning:
            from lmserve.reasoning import ReasoningParserManager
            self.reasoner_cls = ReasoningParserManager.get_reasoning_parser(reasoning_parser)
        self.backend = XgrammarBackend(tokenizer, vocab_size)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=num_workers,
                                                               thread_name_prefix=COMPILE_THREAD_PREFIX)

    def spec(self, params: StructuredOutputsParams) -> GrammarSpec:
        return spec_from_params(params, self.config)

    def _timeout_error(self, spec: GrammarSpec) -> InvalidRequestError:
        return InvalidRequestError(f"structured_outputs: compiling the {spec.kind} constraint took longer than "
                                   f"{self.config.compile_timeout_s:g} s; simplify it (the limit is "
                                   "--structured-outputs-config.compile_timeout_s).", "structured_outputs")

    def compile(self, params: StructuredOutputsParams) -> Any:
        """Blocking: the compiled grammar of ``params``. Raises InvalidRequestError."""
        spec = self.spec(params)
        if self.backend.cached(spec):
            return self.backend.compile(spec)
        future = self._executor.submit(self.backend.compile, spec)
        try:
            return future.result(timeout=self.config.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            raise self._timeout_error(spec) from None

    async def compile_async(self, params: StructuredOutputsParams) -> Any:
        """As ``compile``, awaiting the compile on the manager's thread pool."""
        spec = self.spec(params)
        future = asyncio.wrap_future(self._executor.submit(self.backend.compile, spec))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.config.compile_timeout_s)
        except asyncio.TimeoutError:
            raise self._timeout_error(spec) from None

    def new_state(self, compiled: Any, prompt_token_ids: Sequence[int] = (),
                  reasoning_parser_kwargs: dict[str, Any] | None = None) -> GrammarState:
        reasoner = (self.reasoner_cls(self.tokenizer, **(reasoning_parser_kwargs or {}))
                    if self.reasoner_cls is not None else None)
        return GrammarState(compiled, self.stop_token_ids, reasoner, prompt_token_ids)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
