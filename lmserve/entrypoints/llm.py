"""The offline API, shaped as vLLM's ``LLM``: ``generate``, ``chat``, ``beam_search`` for
generative models; ``embed``, ``classify``, ``score``, ``encode``, ``reward`` for pooling models.

All requests of one call are validated first, then queued together and run as one
continuously batched workload (a bad input raises before anything runs); outputs come back
in the order of the inputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from lmserve.engine.arg_utils import EngineArgs
from lmserve.engine.llm_engine import LLMEngine, PromptType
from lmserve.lora.request import LoRARequest
from lmserve.entrypoints.score_utils import (cross_encoder_prompt, dedup_inputs, embedding_pair_scores,
                                             ensure_text, score_mode, truncation_length,
                                             validate_score_input)
from lmserve.outputs import (ClassificationRequestOutput, EmbeddingRequestOutput, PoolingRequestOutput,
                             RequestOutput, ScoringRequestOutput)
from lmserve.pooling_params import PoolingParams
from lmserve.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams


class LLM:
    """``LLM(model=None, **engine_args)``: ``model`` is a directory, a .gguf file or a
    hub id in the local Hugging Face cache; None loads the embedded SmolLM2-135M-Instruct.
    Every other keyword is an ``EngineArgs`` field (dtype, max_model_len, block_size,
    kv_cache_memory, enable_prefix_caching, logits_processors, ...)."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        if int(kwargs.get("data_parallel_size", 1) or 1) != 1:
            raise ValueError("LLM(data_parallel_size=N) is not supported: as in vLLM, offline data parallelism is N "
                             "separate launches, each with its share of the prompts; or serve the model with "
                             "`lmserve serve --data-parallel-size N` and send the prompts to it.")
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._counter = itertools.count()

    def shutdown(self) -> None:
        """Stops the worker processes / Ray actors of a tensor- or pipeline-parallel engine (they
        also stop when this object is garbage-collected or the process exits)."""
        self.llm_engine.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.get_default_sampling_params()

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: PromptType | Sequence[PromptType] | Sequence[int] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, priority: Sequence[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """``lora_request``: one adapter for every prompt, or one (or None: the base model) per
        prompt, as vLLM; needs ``LLM(enable_lora=True)``."""
        self._require_generate("LLM.generate()")
        prompt_list = _normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = list(sampling_params) if isinstance(sampling_params, Sequence) else \
            [sampling_params] * len(prompt_list)
        if len(params_list) != len(prompt_list):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError("The lengths of prompts and priority must be the same.")
        loras = _lora_list(lora_request, len(prompt_list))
        if any(p.use_beam_search for p in params_list):
            if any(loras):
                raise ValueError("beam search with LoRA adapters is not supported")
            return self._beam_search_generate(prompt_list, params_list)
        return self._run(prompt_list, params_list, priority, use_tqdm, loras=loras)

    def _run(self, prompt_list: list[PromptType], params_list: list[SamplingParams],
             priority: Sequence[int] | None, use_tqdm: bool,
             add_special_tokens: bool = True, loras: list[LoRARequest | None] | None = None
             ) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompt_list, params_list)):
                params = params.clone()
                params.output_kind = RequestOutputKind.FINAL_ONLY
                rid = str(next(self._counter))
                engine.add_request(rid, prompt, params, priority=priority[i] if priority else 0,
                                   add_special_tokens=add_special_tokens, lora_request=loras[i] if loras else None)
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
             chat_template_kwargs: dict[str, Any] | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        from lmserve.chat_template import apply_chat_template, load_chat_template

        self._require_generate("LLM.chat()")
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
        return self._run(list(prompts), params_list, None, use_tqdm, add_special_tokens=False,
                         loras=_lora_list(lora_request, len(prompts)))

    # ------------------------------------------------------------------ beam search
    def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams):
        from lmserve.engine.beam_search import beam_search

        self._require_generate("LLM.beam_search()")
        return [beam_search(self.llm_engine, p, params) for p in _normalize_prompts(prompts)]

    def _beam_search_generate(self, prompts: list[PromptType],
                              params_list: list[SamplingParams]) -> list[RequestOutput]:
        from lmserve.engine.beam_search import beam_search_request_output

        return [beam_search_request_output(self.llm_engine, p, sp) for p, sp in zip(prompts, params_list)]

    # ------------------------------------------------------------------ pooling models
    def _require_generate(self, api: str) -> None:
        if self.llm_engine.model_config.runner_type != "generate":
            raise ValueError(f"{api} is only supported for generative models. Try passing `--runner generate` "
                             "to use the model as a generative model.")

    def _require_pooling(self, api: str, task: str | None = None, convert_hint: str = "") -> None:
        mc = self.llm_engine.model_config
        if mc.runner_type != "pooling":
            raise ValueError(f"{api} is only supported for pooling models. Try passing `--runner pooling` "
                             "to use the model as a pooling model.")
        if task is not None and task not in mc.supported_pooling_tasks:
            raise ValueError(f"{api} is not supported by this model (it supports the pooling tasks "
                             f"{', '.join(mc.supported_pooling_tasks) or 'none'}).{convert_hint}")

    @staticmethod
    def _pooling_params_list(pooling_params: PoolingParams | Sequence[PoolingParams] | None, n: int,
                             task: str | None, truncate_prompt_tokens: int | None) -> list[PoolingParams]:
        """One params object per prompt (cloned: the caller's are never changed), with the
        task and the truncation of this call set."""
        if pooling_params is None:
            pooling_params = PoolingParams()
        params = list(pooling_params) if isinstance(pooling_params, Sequence) else [pooling_params] * n
        if len(params) != n:
            raise ValueError("The lengths of prompts and pooling_params must be the same.")
        out = []
        for p in params:
            p = p.clone()
            if truncate_prompt_tokens is not None:
                p.truncate_prompt_tokens = truncate_prompt_tokens
            if task is not None:
                if p.task not in (None, "encode", task):
                    raise ValueError(f"These pooling params are for task {p.task!r}, not {task!r}")
                p.task = task
            out.append(p)
        return out

    def _run_pooling(self, prompts: list[PromptType], params_list: list[PoolingParams], use_tqdm: bool,
                     add_special_tokens: bool = True) -> list[PoolingRequestOutput]:
        """Validates every prompt, then queues them all and steps until each has its output."""
        engine = self.llm_engine
        prepared = [engine.prepare_pooling_request(str(next(self._counter)), prompt, params,
                                                   add_special_tokens=add_special_tokens)
                    for prompt, params in zip(prompts, params_list)]
        ids: list[str] = []
        finished: dict[str, PoolingRequestOutput] = {}
        try:
            for pr in prepared:
                engine.add_prepared(pr)
                ids.append(pr.request_id)
            bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
            while len(finished) < len(ids) and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
            bar.close()
        except BaseException:
            engine.abort_request([rid for rid in ids if rid not in finished])
            raise
        return [finished[rid] for rid in ids]

    def encode(self, prompts: PromptType | Sequence[PromptType] | Sequence[int] | Sequence[Sequence[int]],
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, *,
               truncate_prompt_tokens: int | None = None, use_tqdm: bool = False,
               pooling_task: str | None = None) -> list[PoolingRequestOutput]:
        """The raw pooler output of each prompt. ``pooling_task`` (or ``pooling_params.task``)
        picks the task; with neither, the model's per-token task (token_embed / token_classify)."""
        self._require_pooling("LLM.encode()", pooling_task if pooling_task != "encode" else None)
        truncation_length(truncate_prompt_tokens, self.llm_engine.model_config.max_model_len)
        prompt_list = _normalize_prompts(prompts)
        params = self._pooling_params_list(pooling_params, len(prompt_list), pooling_task, truncate_prompt_tokens)
        return self._run_pooling(prompt_list, params, use_tqdm)

    def embed(self, prompts: PromptType | Sequence[PromptType] | Sequence[int] | Sequence[Sequence[int]], *,
              truncate_prompt_tokens: int | None = None, use_tqdm: bool = False,
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None
              ) -> list[EmbeddingRequestOutput]:
        """One embedding vector per prompt (``outputs.embedding``)."""
        self._require_pooling("Embedding API", "embed", " Try converting the model using `--convert embed`.")
        outs = self.encode(prompts, pooling_params, truncate_prompt_tokens=truncate_prompt_tokens,
                           use_tqdm=use_tqdm, pooling_task="embed")
        return [EmbeddingRequestOutput.from_base(o) for o in outs]

    def classify(self, prompts: PromptType | Sequence[PromptType] | Sequence[int] | Sequence[Sequence[int]], *,
                 truncate_prompt_tokens: int | None = None, use_tqdm: bool = False,
                 pooling_params: PoolingParams | Sequence[PoolingParams] | None = None
                 ) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt (``outputs.probs``; raw logits with use_activation=False)."""
        self._require_pooling("Classification API", "classify",
                              " Try converting the model using `--convert classify`.")
        outs = self.encode(prompts, pooling_params, truncate_prompt_tokens=truncate_prompt_tokens,
                           use_tqdm=use_tqdm, pooling_task="classify")
        return [ClassificationRequestOutput.from_base(o) for o in outs]

    def reward(self, prompts: PromptType | Sequence[PromptType] | Sequence[int] | Sequence[Sequence[int]], *,
               truncate_prompt_tokens: int | None = None, use_tqdm: bool = False,
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None
               ) -> list[PoolingRequestOutput]:
        """Per-token rewards of a reward model (the ``token_classify`` task)."""
        self._require_pooling("Reward API", "token_classify")
        return self.encode(prompts, pooling_params, truncate_prompt_tokens=truncate_prompt_tokens,
                           use_tqdm=use_tqdm, pooling_task="token_classify")

    def score(self, data_1: PromptType | Sequence[PromptType], data_2: PromptType | Sequence[PromptType], *,
              truncate_prompt_tokens: int | None = None, use_tqdm: bool = False,
              pooling_params: PoolingParams | None = None) -> list[ScoringRequestOutput]:
        """Scores of the pairs (1-1, 1-N or N-N): a cross-encoder's output for each pair, or
        the cosine similarity of the two embeddings for an embedding model."""
        self._require_pooling("LLM.score()")
        mc = self.llm_engine.model_config
        try:
            mode = score_mode(mc)
        except ValueError as e:
            raise ValueError(f"{e} Try converting the model using `--convert embed` or "
                             "`--convert classify`.") from e
        items_1, items_2 = validate_score_input(data_1, data_2)
        tok = self.get_tokenizer()
        max_len = truncation_length(truncate_prompt_tokens, mc.max_model_len)
        if mode == "cross_encoder":
            prompts = [cross_encoder_prompt(tok, ensure_text(a, tok), ensure_text(b, tok), max_len)
                       for a, b in zip(items_1, items_2)]
            params = self._pooling_params_list(pooling_params, len(prompts), "score", truncate_prompt_tokens)
            outs = self._run_pooling(prompts, params, use_tqdm)
        else:
            unique, pos_1, pos_2 = dedup_inputs(items_1, items_2)
            prompts = _normalize_prompts(unique)
            params = self._pooling_params_list(pooling_params, len(prompts), "embed", truncate_prompt_tokens)
            embeds = self._run_pooling(prompts, params, use_tqdm)
            outs = embedding_pair_scores([embeds[i] for i in pos_1], [embeds[j] for j in pos_2],
                                         getattr(tok, "pad_token_id", None))
        return [ScoringRequestOutput.from_base(o) for o in outs]

def _lora_list(lora_request: Any, n: int) -> list[LoRARequest | None]:
    """One ``LoRARequest`` (or None) per prompt."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * n
    if isinstance(lora_request, Sequence) and not isinstance(lora_request, str):
        loras = list(lora_request)
        if len(loras) != n:
            raise ValueError("The lengths of prompts and lora_request must be the same.")
        for lr in loras:
            if lr is not None and not isinstance(lr, LoRARequest):
                raise ValueError(f"lora_request entries must be LoRARequest or None, got {type(lr).__name__}")
        return loras
    raise ValueError(f"lora_request must be a LoRARequest or a list of them, got {type(lora_request).__name__}")


def _normalize_prompts(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [{"prompt_token_ids": prompts}]
    return [{"prompt_token_ids": list(p)} if isinstance(p, (list, tuple)) else p for p in prompts]
