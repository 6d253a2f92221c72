"""The offline API, shaped as vLLM's ``LLM``: ``generate``, ``chat``, ``beam_search``.

All requests of one call are queued together and run as one continuously batched
workload; outputs come back in the order of the inputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from lmserve.engine.arg_utils import EngineArgs
from lmserve.engine.llm_engine import LLMEngine, PromptType
from lmserve.outputs import RequestOutput
from lmserve.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams


class LLM:
    """``LLM(model=None, **engine_args)``: ``model`` is a directory, a .gguf file or a
    hub id in the local Hugging Face cache; None loads the embedded SmolLM2-135M-Instruct.
    Every other keyword is an ``EngineArgs`` field (dtype, max_model_len, block_size,
    kv_cache_memory, enable_prefix_caching, logits_processors, ...)."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.get_default_sampling_params()

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: PromptType | Sequence[PromptType] | Sequence[int] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        prompt_list = _normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = list(sampling_params) if isinstance(sampling_params, Sequence) else \
            [sampling_params] * len(prompt_list)
        if len(params_list) != len(prompt_list):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError("The lengths of prompts and priority must be the same.")
        if any(p.use_beam_search for p in params_list):
            return self._beam_search_generate(prompt_list, params_list)
        return self._run(prompt_list, params_list, priority, use_tqdm)

    def _run(self, prompt_list: list[PromptType], params_list: list[SamplingParams],
             priority: Sequence[int] | None, use_tqdm: bool,
             add_special_tokens: bool = True) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompt_list, params_list)):
                params = params.clone()
                params.output_kind = RequestOutputKind.FINAL_ONLY
                rid = str(next(self._counter))
                engine.add_request(rid, prompt, params, priority=priority[i] if priority else 0,
                                   add_special_tokens=add_special_tokens)
                ids.append(rid)
            finished: dict[str, RequestOutput] = {}
            bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
            bar.close()
        except BaseException:
            engine.abort_request(ids)
            raise
        return [finished[rid] for rid in ids]

    # ------------------------------------------------------------------ chat
    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False, chat_template: str | None = None,
             chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        from lmserve.chat_template import apply_chat_template, load_chat_template

        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        template = load_chat_template(chat_template) if chat_template else None
        prompts = [apply_chat_template(self.get_tokenizer(), conv, chat_template=template,
                                       add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message, tools=tools,
                                       chat_template_kwargs=chat_template_kwargs,
                                       content_format=chat_template_content_format)
                   for conv in conversations]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = list(sampling_params) if isinstance(sampling_params, Sequence) else \
            [sampling_params] * len(prompts)
        # The template already holds the special tokens (BOS etc.).
        return self._run(list(prompts), params_list, None, use_tqdm, add_special_tokens=False)

    # ------------------------------------------------------------------ beam search
    def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams):
        from lmserve.engine.beam_search import beam_search

        return [beam_search(self.llm_engine, p, params) for p in _normalize_prompts(prompts)]

    def _beam_search_generate(self, prompts: list[PromptType],
                              params_list: list[SamplingParams]) -> list[RequestOutput]:
        from lmserve.engine.beam_search import beam_search_request_output

        return [beam_search_request_output(self.llm_engine, p, sp) for p, sp in zip(prompts, params_list)]


def _normalize_prompts(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [{"prompt_token_ids": prompts}]
    return [{"prompt_token_ids": list(p)} if isinstance(p, (list, tuple)) else p for p in prompts]
