"""``LLMEngine``: the synchronous engine. Input processing (tokenize, validate, fan out
n), ``EngineCore`` steps, and output processing. ``LLM`` and ``AsyncLLM`` sit on it.

Every validation error is a ``ValueError`` raised by ``add_request`` before anything is
queued, so a bad request never disturbs the others.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from lmserve.config import EngineConfig
from lmserve.engine.arg_utils import EngineArgs
from lmserve.engine.core import EngineCore
from lmserve.engine.output_processor import OutputProcessor
from lmserve.engine.request import Request, RequestStatus
from lmserve.lora.cache import LoRACache
from lmserve.lora.checkpoint import LoRAAdapter
from lmserve.lora.request import LoRARequest
from lmserve.outputs import PoolingOutput, PoolingRequestOutput, RequestOutput
from lmserve.pooling_params import PoolingParams, resolve_encode_task
from lmserve.sampling_params import SamplingParams
from lmserve.structured_output.config import StructuredOutputsConfig
from lmserve.structured_output.manager import StructuredOutputManager
from lmserve.worker.logits_processors.loading import validate_all

logger = logging.getLogger(__name__)

# "text" | {"prompt": text} | {"prompt_token_ids": [...], "prompt": text?}; pooling prompts may add
# "token_type_ids": [...] (one per token: the segments of a cross-encoder pair).
PromptType = str | dict[str, Any]

_GENERATION_CONFIG_FIELDS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens",
}


@dataclass
class PreparedRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[tuple[str, SamplingParams]]
    requests: list[Request]
    arrival_time: float
    pooling: bool = False  # one pooling request: ``requests[0]``, no children


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from lmserve.tokenizer import get_eos_token_ids, get_tokenizer, load_generation_config
        from lmserve.worker.logits_processors.loading import load_custom_logitsprocs

        self.config = config
        mc = config.model_config
        self.model_config = mc
        self.tokenizer = None
        if not mc.skip_tokenizer_init:
            tok_path, tok_gguf = mc.tokenizer, None
            if tok_path.endswith(".gguf"):
                import os
                tok_path, tok_gguf = os.path.dirname(tok_path), os.path.basename(tok_path)
            self.tokenizer = get_tokenizer(tok_path, gguf_file=tok_gguf, revision=mc.revision,
                                           tokenizer_mode=mc.tokenizer_mode, trust_remote_code=mc.trust_remote_code)
        # --generation-config: "auto"/"vllm" read the model's file, a directory its own (vLLM 0.32).
        gen_dir, gen_gguf = ((mc.model_path, mc.gguf_file) if mc.generation_config in ("auto", "vllm")
                             else (mc.generation_config, None))
        self.generation_config: dict[str, Any] = load_generation_config(gen_dir, gen_gguf) or {}
        eos_ids = get_eos_token_ids(self.tokenizer, mc.hf_config, self.generation_config) \
            if self.tokenizer is not None else []
        self.eos_token_id: int | None = eos_ids[0] if eos_ids else getattr(mc.hf_config, "eos_token_id", None)
        self.extra_eos_ids = {"eos_token_id": eos_ids}
        self.logitsprocs_classes = load_custom_logitsprocs(list(config.logits_processors))
        self.core = self._build_core(config)
        self.structured_outputs: StructuredOutputManager | None = None
        if not mc.is_pooling and self.tokenizer is not None:
            self.structured_outputs = StructuredOutputManager(
                config.structured_outputs_config or StructuredOutputsConfig(), self.tokenizer, mc.vocab_size,
                stop_token_ids=sorted(set(eos_ids)) or None, reasoning_parser=config.reasoning_parser)
        self.lora_cache: LoRACache | None = None
        if config.lora_config is not None:
            self.lora_cache = LoRACache(config.lora_config, mc.hf_config, mc.dtype, config.device_config.torch_device)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._pooling: dict[str, Request] = {}  # live pooling requests (they bypass the output processor)

    def _build_core(self, config: EngineConfig) -> EngineCore:
        """The engine core (model, KV cache, scheduler); the data-parallel front overrides this
        with a core-less stand-in, as it only validates requests (lmserve.engine.data_parallel)."""
        return EngineCore(config, self.logitsprocs_classes)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    # ------------------------------------------------------------------ defaults
    def default_sampling_params(self) -> dict[str, Any]:
        """Sampling defaults from generation_config.json (vLLM's behaviour), unless
        ``--generation-config vllm``; ``--override-generation-config`` wins."""
        mc = self.model_config
        out: dict[str, Any] = {}
        if mc.generation_config != "vllm":
            for src, dst in _GENERATION_CONFIG_FIELDS.items():
                if self.generation_config.get(src) is not None:
                    out[dst] = self.generation_config[src]
        for src, value in mc.override_generation_config.items():
            out[_GENERATION_CONFIG_FIELDS.get(src, src)] = value
        return out

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.default_sampling_params())

    # ------------------------------------------------------------------ inputs
    def process_prompt(self, prompt: PromptType, params: SamplingParams | PoolingParams | None = None,
                       add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """-> (text, token ids). ``truncate_prompt_tokens`` keeps the last k token ids, except
        for pooling params on text, where the tokenizer truncates (keeping its special tokens,
        on its truncation side) as sentence-transformers does."""
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, dict):
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        else:
            raise ValueError(f"A prompt must be a string or a dict, got {type(prompt).__name__}")
        trunc = params.truncate_prompt_tokens if params is not None else None
        keep = None if trunc is None else (self.model_config.max_model_len if trunc == -1 else trunc)
        if ids is None:
            if text is None:
                raise ValueError("A prompt needs 'prompt' text or 'prompt_token_ids'")
            if self.tokenizer is None:
                raise ValueError("The tokenizer is not initialised (skip_tokenizer_init): pass token ids")
            if not isinstance(text, str):
                raise ValueError(f"A prompt's text must be a string, got {type(text).__name__}")
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("The prompt contains a lone UTF-16 surrogate, which is not valid Unicode "
                                     "text") from None
            if keep is not None and isinstance(params, PoolingParams):
                ids = self.tokenizer(text, add_special_tokens=add_special_tokens, truncation=True,
                                     max_length=keep)["input_ids"]
            else:
                ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        ids = list(ids)
        vocab = self.model_config.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"Token id {t} is out of vocabulary (vocab size {vocab})")
        if keep is not None:
            ids = ids[-keep:]
        if not ids:
            raise ValueError("The prompt is empty: at least one token is needed")
        return text, ids

    def _prepare_params(self, params: SamplingParams, prompt_len: int) -> int:
        """Validates and completes ``params`` in place; returns the resolved max_tokens."""
        mc = self.model_config
        params.verify_against_vocab(mc.vocab_size)
        # vLLM 0.32: -1 counts as the whole vocabulary; --max-logprobs -1 allows up to it.
        limit = mc.vocab_size if mc.max_logprobs == -1 else mc.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k and (mc.vocab_size if k == -1 else k) > limit:
                raise ValueError(f"Requested {name} of {k}, which is greater than max allowed: {limit}")
        validate_all(self.logitsprocs_classes, params)  # custom processors' checks, as ValueError
        params.update_from_generation_config(self.extra_eos_ids, self.eos_token_id)
        if self.tokenizer is not None:
            params.update_from_tokenizer(self.tokenizer)
        room = self.core.max_seq_len - prompt_len
        if room <= 0:
            raise ValueError(
                f"This model's maximum context length is {self.core.max_seq_len} tokens. However, your "
                f"prompt has {prompt_len} tokens, which leaves no room for the completion.")
        return room if params.max_tokens is None else min(params.max_tokens, room)

    # ------------------------------------------------------------------ LoRA
    def get_lora(self, lora_request: LoRARequest) -> LoRAAdapter:
        """The loaded adapter (read from disk and checked on first use; safe from any thread).
        ValueError when LoRA is not enabled or the adapter cannot be used."""
        if self.lora_cache is None:
            raise ValueError("LoRA adapters are not enabled: start the engine with enable_lora=True (--enable-lora)")
        return self.lora_cache.get(lora_request)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Loads an adapter into the cache ahead of its requests (vLLM's ``add_lora``)."""
        self.get_lora(lora_request)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        """Drops the cached adapter; requests running with it keep their reference and finish."""
        return self.lora_cache.remove(lora_id) if self.lora_cache is not None else False

    def list_loras(self) -> set[int]:
        return set(self.lora_cache.loaded_ids()) if self.lora_cache is not None else set()

    def prepare_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                        priority: int = 0, cache_salt: str | None = None,
                        arrival_time: float | None = None,
                        add_special_tokens: bool = True, *, compiled_grammar: Any = None,
                        lora_request: LoRARequest | None = None,
                        reasoning_parser_kwargs: dict[str, Any] | None = None) -> "PreparedRequest":
        """Tokenizes and validates without touching engine state (safe from any thread);
        raises ValueError for anything wrong with the request. With ``structured_outputs``,
        ``compiled_grammar`` is its grammar from ``compile_structured_outputs_async`` (None: it is
        compiled here, blocking); each of the n sequences gets its own grammar state, which with
        a reasoning parser constrains only after the reasoning (the parser is built with
        ``reasoning_parser_kwargs``, e.g. ``{"chat_template_kwargs": {"enable_thinking": False}}``).
        ``lora_request``: the adapter it runs with (loaded here on first use)."""
        if self.model_config.is_pooling:
            raise ValueError("This model is a pooling model (embeddings, scores, classification): "
                             "it does not generate text.")
        adapter = self.get_lora(lora_request) if lora_request is not None else None
        text, ids = self.process_prompt(prompt, params, add_special_tokens)
        params = params.clone()
        max_tokens = self._prepare_params(params, len(ids))
        if params.use_beam_search:
            raise ValueError("use_beam_search runs through LLM.beam_search / the server's beam search path")
        if params.structured_outputs is not None and compiled_grammar is None:
            compiled_grammar = self.compile_structured_outputs(params)
        if self.config.scheduler_config.policy != "priority" and priority != 0:
            raise ValueError("priority scheduling is not enabled: a request's priority must be 0 "
                             "unless the server runs with --scheduling-policy priority")
        arrival = arrival_time or time.time()
        n = params.n
        children: list[tuple[str, SamplingParams]] = []
        requests: list[Request] = []
        for i in range(n):
            child_id = request_id if n == 1 else f"{i}_{request_id}"
            cp = params if n == 1 else params.clone()
            if n > 1:
                cp.n = 1
                if cp.seed is not None:
                    cp.seed = cp.seed + i
            req = Request(child_id, ids, cp, eos_token_id=self.eos_token_id, priority=priority,
                          cache_salt=cache_salt, arrival_time=arrival, prompt=text,
                          lora_request=lora_request, lora=adapter)
            req.max_tokens = max_tokens
            if compiled_grammar is not None and params.structured_outputs is not None:
                req.grammar = self.structured_outputs.new_state(  # type: ignore[union-attr]
                    compiled_grammar, ids, reasoning_parser_kwargs)
            children.append((child_id, cp))
            requests.append(req)
        return PreparedRequest(request_id, text, ids, children, requests, arrival)

    def _structured_manager(self) -> StructuredOutputManager:
        if self.structured_outputs is None:
            raise ValueError("structured_outputs need a generative model with a tokenizer (not available with "
                             "--skip-tokenizer-init)")
        return self.structured_outputs

    def compile_structured_outputs(self, params: SamplingParams) -> Any:
        """The compiled grammar of ``params.structured_outputs`` (blocking, bounded by the compile
        timeout). Raises InvalidRequestError (a ValueError) for a bad or too-slow constraint."""
        return self._structured_manager().compile(params.structured_outputs)  # type: ignore[arg-type]

    async def compile_structured_outputs_async(self, params: SamplingParams) -> Any:
        """As ``compile_structured_outputs``, on the manager's threads (the event loop stays free)."""
        return await self._structured_manager().compile_async(params.structured_outputs)  # type: ignore[arg-type]

    def prepare_pooling_request(self, request_id: str, prompt: PromptType, params: PoolingParams,
                                priority: int = 0, arrival_time: float | None = None,
                                add_special_tokens: bool = True) -> "PreparedRequest":
        """Like ``prepare_request`` for a pooling model. ``params.task`` names the task ("embed",
        "classify", "score", "token_embed", "token_classify"; "encode" or None: the model's
        per-token task); the params are cloned and verified against the model. Raises
        ValueError for an unsupported task or field, a prompt longer than max_model_len
        (unless truncated), empty or out-of-vocabulary prompts."""
        mc = self.model_config
        if not mc.is_pooling:
            raise ValueError("This model does not support pooling (embeddings, scores, classification): "
                             "it is a generative model. Serve it with --runner pooling to use it as an "
                             "embedding model.")
        params = params.clone()
        task = params.task
        if task in (None, "encode"):
            task = resolve_encode_task(task, mc.supported_pooling_tasks)
        params.verify(task, mc)
        text, ids = self.process_prompt(prompt, params, add_special_tokens)
        token_type_ids = prompt.get("token_type_ids") if isinstance(prompt, dict) else None
        if token_type_ids is not None:
            token_type_ids = list(token_type_ids)[-len(ids):]
            if len(token_type_ids) != len(ids):
                raise ValueError("token_type_ids must have one entry per prompt token")
        limit = self.core.max_seq_len
        if len(ids) > limit:
            raise ValueError(f"This model's maximum context length is {limit} tokens. However, you requested "
                             f"{len(ids)} tokens in the input for {task} pooling. Please reduce the length of "
                             "the input, or set truncate_prompt_tokens.")
        if self.config.scheduler_config.policy != "priority" and priority != 0:
            raise ValueError("priority scheduling is not enabled: a request's priority must be 0 "
                             "unless the server runs with --scheduling-policy priority")
        arrival = arrival_time or time.time()
        req = Request(request_id, ids, None, priority=priority, arrival_time=arrival, prompt=text,
                      pooling_params=params, token_type_ids=token_type_ids)
        return PreparedRequest(request_id, text, ids, [], [req], arrival, pooling=True)

    def add_pooling_request(self, request_id: str, prompt: PromptType, params: PoolingParams,
                            priority: int = 0, add_special_tokens: bool = True) -> None:
        self.add_prepared(self.prepare_pooling_request(request_id, prompt, params, priority,
                                                       add_special_tokens=add_special_tokens))

    def add_prepared(self, prepared: "PreparedRequest") -> None:
        """Queues a prepared request (engine thread only)."""
        if self.output_processor.has(prepared.request_id) or prepared.request_id in self._pooling:
            raise ValueError(f"request id {prepared.request_id!r} is already in use")
        if prepared.pooling:
            req = prepared.requests[0]
            self.core.add_request(req)
            self._pooling[req.request_id] = req
            return
        for req in prepared.requests:
            self.core.add_request(req)
        self.output_processor.add_request(prepared.request_id, prepared.prompt, prepared.prompt_token_ids,
                                          prepared.children, prepared.arrival_time)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    priority: int = 0, cache_salt: str | None = None,
                    arrival_time: float | None = None, add_special_tokens: bool = True,
                    lora_request: LoRARequest | None = None,
                    reasoning_parser_kwargs: dict[str, Any] | None = None) -> None:
        self.add_prepared(self.prepare_request(request_id, prompt, params, priority, cache_salt,
                                               arrival_time, add_special_tokens, lora_request=lora_request,
                                               reasoning_parser_kwargs=reasoning_parser_kwargs))

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outs = []
        for rid in request_ids:
            if self._pooling.pop(rid, None) is not None:
                self.core.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
                continue
            self.core.finish_requests(self.output_processor.child_ids(rid), RequestStatus.FINISHED_ABORTED)
            out = self.output_processor.abort(rid)
            if out is not None:
                outs.append(out)
        return outs

    # ------------------------------------------------------------------ running
    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return self.core.scheduler.num_unfinished

    def step(self) -> list[RequestOutput | PoolingRequestOutput]:
        core_outputs = self.core.step()
        if self.model_config.is_pooling:
            return self._pooling_outputs(core_outputs)
        outputs, to_stop = self.output_processor.process(core_outputs)
        for child_id, stop_str in to_stop:
            self.core.finish_requests([child_id], RequestStatus.FINISHED_STOPPED, stop_str)
        return outputs

    def _pooling_outputs(self, core_outputs: list) -> list[PoolingRequestOutput]:
        """A pooling engine runs only pooling requests; each finishes in the step that ran it."""
        outputs = []
        for co in core_outputs:
            req = self._pooling.pop(co.request_id)
            outputs.append(PoolingRequestOutput(req.request_id, PoolingOutput(co.pooled), req.prompt_token_ids,
                                                finished=True, prompt=req.prompt))
        return outputs

    def get_stats(self) -> dict[str, Any]:
        s = self.core.stats()
        return {"num_running": s.num_running, "num_waiting": s.num_waiting,
                "kv_cache_usage": s.kv_cache_usage, "num_preemptions": s.num_preemptions_total,
                "prefix_cache_queries": s.prefix_cache_queries, "prefix_cache_hits": s.prefix_cache_hits,
                "num_kv_blocks": self.core.executor.num_blocks}

    def shutdown(self) -> None:
        """Stops the executor's worker ranks, if any (idempotent; the engine cannot step after)."""
        self.core.shutdown()
