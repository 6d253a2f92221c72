"""``EngineArgs``: the flat set of engine options (the ``serve`` flags and ``LLM(**kwargs)``),
turned into the frozen configs by ``create_engine_config``. Flag names and defaults are
vLLM's; ``add_cli_args`` registers them on an argparse parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from lmserve.config import (CacheConfig, DeviceConfig, EngineConfig, LoRAConfig, ModelConfig, ParallelConfig,
                            PoolerConfig, SchedulerConfig, parse_memory_size, resolve_dtype)
from lmserve.structured_output.config import StructuredOutputsConfig

logger = logging.getLogger(__name__)


# --task (the seed's flag) -> the --runner it implies and the pooling task the model must support.
_TASKS = {"auto": ("auto", None), "generate": ("generate", None), "embed": ("pooling", "embed"),
          "embedding": ("pooling", "embed"), "classify": ("pooling", "classify"),
          "score": ("pooling", "score"), "reward": ("pooling", "token_classify")}


def _json_or_none(value: str | dict | None) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    return json.loads(value)


def _compile_pattern(pattern: str | None) -> str | None:
    """--logits-processor-pattern must be a valid regex (checked at start-up)."""
    if pattern is None:
        return None
    import re
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--logits-processor-pattern {pattern!r} is not a valid regular expression: {e}") from None
    return pattern


def default_token_budget(device: str) -> int:
    """Default ``max_num_batched_tokens`` with chunked prefill. On CPU, 512: a CPU's matmuls are
    saturated from a few hundred rows on, and past that the activations outgrow the caches, while a
    smaller step lets earlier prompts finish first (lower TTFT) and keeps decode steps short
    (figures: benchmarks/README.md, "Kernel measurements"). Elsewhere 2048, as vLLM."""
    return 512 if device == "cpu" else 2048


def default_memory_bound_tokens(device: str, pooling: bool = False) -> int:
    """Default ``memory_bound_tokens`` (see ``SchedulerConfig``). On CPU, 64: a step reads all
    the weights whatever its rows, so it turns compute-bound only at a few dozen rows (figures:
    benchmarks/README.md, "Kernel measurements"). Elsewhere 0 (off): not measured on GPUs. For a
    pooling model 0 too: its requests end in the step that runs them, so the knee would only cut
    a batch of embeddings into steps of one or two prompts (each step paying the weights again)."""
    return 64 if device == "cpu" and not pooling else 0


@dataclass
class EngineArgs:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF (MiniLM for pooling)
    runner: str = "auto"  # "auto" | "generate" | "pooling"
    convert: str = "auto"  # "auto" | "none" | "embed" | "classify"
    task: str = "auto"  # the seed's --task: auto, generate, embed/embedding, classify, score, reward
    pooler_config: dict[str, Any] | str | None = None
    override_pooler_config: dict[str, Any] | str | None = None  # older name of pooler_config
    tokenizer: str | None = None
    revision: str | None = None
    tokenizer_revision: str | None = None
    download_dir: str | None = None
    tokenizer_mode: str = "auto"
    trust_remote_code: bool = False
    skip_tokenizer_init: bool = False
    load_format: str = "auto"
    # GGUF Q4_0/Q4_1/Q8_0 weights kept quantized on CPU: None in bf16, "gguf" in bf16 and fp32; "none": never
    quantization: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    served_model_name: str | list[str] | None = None
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] | str | None = None
    max_logprobs: int = 20
    hf_overrides: dict[str, Any] | str | None = None
    block_size: int = 16
    kv_cache_memory: int | str | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    kv_cache_dtype: str = "auto"
    max_num_batched_tokens: int | None = None
    memory_bound_tokens: int | None = None  # None: default_memory_bound_tokens(device)
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    max_waiting_requests: int = 4096
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    distributed_timeout_seconds: float | None = None
    cpu_distributed_timeout_seconds: float | None = None
    # engine replicas in their own processes behind one API server (lmserve.engine.data_parallel);
    # the server reads it, each replica's engine ignores it
    data_parallel_size: int = 1
    device: str = "auto"
    logits_processors: list[Any] | None = None
    structured_outputs_config: Any = None  # dict, JSON text or StructuredOutputsConfig
    # vLLM's EngineArgs.reasoning_parser(_plugin): with one, structured outputs constrain only what
    # follows the reasoning (the server's --reasoning-parser flags fill them; the flags are its own)
    reasoning_parser: str | None = None
    reasoning_parser_plugin: str | None = None
    logits_processor_pattern: str | None = None
    enforce_eager: bool = True
    disable_log_stats: bool = False
    # LoRA (vLLM's LoRAConfig flags)
    enable_lora: bool | None = None
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_dtype: str = "auto"
    fully_sharded_loras: bool = False

    # ------------------------------------------------------------------ CLI
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Registers the engine flags (vLLM's names and defaults). The positional MODEL
        is added by the serve command itself."""
        d = EngineArgs()
        g = parser.add_argument_group("engine")
        g.add_argument("--model", default=None, help="Model: a local directory, a .gguf file or a Hugging "
                       "Face id found in the local HF cache. Default: the embedded SmolLM2-135M-Instruct.")
        g.add_argument("--runner", default=d.runner, choices=["auto", "generate", "pooling"],
                       help="generate: a text-generation model; pooling: embeddings, scores, classification. "
                       "auto: from the architecture.")
        g.add_argument("--convert", default=d.convert, choices=["auto", "none", "embed", "classify"],
                       help="Use a generative architecture as a pooling model (embed: last-token embeddings).")
        g.add_argument("--task", default=d.task, choices=list(_TASKS),
                       help="The task to serve; embed/classify/score/reward imply --runner pooling. With no "
                       "model, --task embed serves the embedded all-MiniLM-L6-v2.")
        g.add_argument("--pooler-config", type=json.loads, default=None,
                       help='Pooling settings, e.g. \'{"pooling_type": "MEAN", "normalize": false}\'.')
        g.add_argument("--override-pooler-config", type=json.loads, default=None,
                       help="Older name of --pooler-config.")
        g.add_argument("--tokenizer", default=None)
        g.add_argument("--revision", default=None)
        g.add_argument("--tokenizer-revision", default=None)
        g.add_argument("--download-dir", default=None)
        g.add_argument("--tokenizer-mode", default=d.tokenizer_mode,
                       help="auto / hf: the fast Hugging Face tokenizer; slow: transformers' Python tokenizer "
                            "(use_fast=False). vLLM's other modes (mistral, deepseek_v32, kimi_k3, cohere, ...) "
                            "are refused at start-up with the reason.")
        g.add_argument("--trust-remote-code", action="store_true")
        g.add_argument("--skip-tokenizer-init", action="store_true")
        g.add_argument("--load-format", default=d.load_format, choices=["auto", "safetensors", "gguf", "dummy"])
        g.add_argument("--quantization", "-q", type=_parse_quantization, default=d.quantization,
                       help="Weight quantization. A GGUF file's Q4_0/Q4_1/Q8_0 weights stay quantized on CPU and run "
                       "with int4 kernels: by default (None) in bf16; gguf: in bf16 and in float32 (the int kernel "
                       "rounds fp32 rows to bf16); none: dequantize them at load.")
        g.add_argument("--dtype", default=d.dtype,
                       choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
        g.add_argument("--max-model-len", type=_parse_int_suffix, default=None)
        g.add_argument("--seed", type=int, default=d.seed)
        g.add_argument("--generation-config", default=d.generation_config)
        g.add_argument("--override-generation-config", type=json.loads, default=None)
        g.add_argument("--max-logprobs", type=int, default=d.max_logprobs)
        g.add_argument("--hf-overrides", type=json.loads, default=None)
        g.add_argument("--block-size", type=int, default=d.block_size, choices=[1, 2, 4, 8, 16, 32, 64, 128])
        g.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", dest="kv_cache_memory", default=None,
                       help="KV cache size, in bytes or with a unit (e.g. 2GiB). Default: a fraction of memory.")
        g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=d.enable_prefix_caching)
        g.add_argument("--num-gpu-blocks-override", type=int, default=None)
        g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=["auto"])
        g.add_argument("--max-num-batched-tokens", type=_parse_int_suffix, default=None,
                       help="tokens per engine step (default: 512 on CPU, 2048 on GPU with chunked prefill)")
        g.add_argument("--memory-bound-tokens", type=_parse_int_suffix, default=None,
                       help="lmserve: past this many tokens in a step, further new prompts wait for the next "
                            "step (default: 64 on CPU, 0 = off on GPU)")
        g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
        g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                       default=d.enable_chunked_prefill)
        g.add_argument("--scheduling-policy", default=d.scheduling_policy, choices=["fcfs", "priority"])
        g.add_argument("--max-waiting-requests", type=int, default=d.max_waiting_requests,
                       help="Requests queued beyond this are refused with HTTP 503.")
        g.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size,
                       help="Ranks that split each layer (attention heads, MLP columns, vocabulary).")
        g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=d.pipeline_parallel_size,
                       help="Ranks that each hold a contiguous part of the layers (Llama family), run in "
                       "micro-batches.")
        g.add_argument("--distributed-executor-backend", default=None,
                       choices=["ray", "mp", "uni", "external_launcher"],
                       help="mp: worker processes on this machine (the default with several ranks); ray: Ray "
                       "actors (the cluster RAY_ADDRESS or 'ray start --head' runs, else a local one); uni: one "
                       "rank in the engine's process. external_launcher is refused.")
        g.add_argument("--data-parallel-size", "-dp", type=int, default=d.data_parallel_size,
                       help="Engine replicas, each in its own process with its own KV cache, behind this one "
                            "API server; requests go to the least-loaded one (prefix-cache aware). On CPU the "
                            "threads are split between them. Default: %(default)s.")
        g.add_argument("--distributed-timeout-seconds", type=float, default=None,
                       help="Seconds the worker ranks may take to join at start-up, and a CUDA (NCCL) collective "
                       "may wait (default 300).")
        g.add_argument("--cpu-distributed-timeout-seconds", type=float, default=None,
                       help="Seconds a CPU (gloo) tensor/pipeline-parallel collective or transfer may wait for "
                       "the other ranks (default 300). An idle server's workers wait for the next step forever.")
        g.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
        g.add_argument("--logits-processors", nargs="+", default=None,
                       help="Custom logits processors as module:Class or module.Class.")
        g.add_argument("--structured-outputs-config", default=None,
                       help='Structured outputs (xgrammar), as JSON or dotted keys, e.g. '
                       '\'{"backend": "xgrammar", "disable_any_whitespace": true}\' or '
                       '--structured-outputs-config.backend xgrammar. Keys: backend (auto|xgrammar), '
                       'disable_any_whitespace, disable_additional_properties, enable_in_reasoning, '
                       'compile_timeout_s (lmserve).')
        g.add_argument("--logits-processor-pattern", default=None,
                       help="A regex of the qualified names a request's logits_processors field may name "
                       "(None: the field is refused).")
        g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=d.enforce_eager)
        g.add_argument("--disable-log-stats", action="store_true")
        lg = parser.add_argument_group("LoRA")
        lg.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=None,
                        help="Serve LoRA adapters (PEFT checkpoints of the q/k/v/o/gate/up/down projections).")
        lg.add_argument("--max-loras", type=int, default=d.max_loras,
                        help="The most distinct adapters in one step (batch). Default: %(default)s.")
        lg.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank,
                        help="The largest adapter rank accepted. Default: %(default)s.")
        lg.add_argument("--max-cpu-loras", type=int, default=None,
                        help="How many loaded adapters stay in memory (LRU); >= --max-loras. Default: --max-loras.")
        lg.add_argument("--lora-dtype", default=d.lora_dtype, choices=["auto", "float16", "bfloat16", "float32"],
                        help="dtype of the adapter weights and of their delta; auto: the model dtype.")
        lg.add_argument("--fully-sharded-loras", action=argparse.BooleanOptionalAction, default=d.fully_sharded_loras,
                        help="Accepted: with one device (no tensor parallelism) there is nothing to shard, so both "
                             "settings compute the same thing.")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    # ------------------------------------------------------------------ configs
    def create_engine_config(self) -> EngineConfig:
        from lmserve.model.loader.hf_config import checkpoint_dtype, load_hf_config
        from lmserve.model.loader.resolve import default_embedding_model, default_model, resolve_model
        from lmserve.model.models.registry import resolve_model_class

        if self.data_parallel_size < 1:
            raise ValueError(f"--data-parallel-size must be at least 1, got {self.data_parallel_size}")
        if self.kv_cache_dtype != "auto":
            raise ValueError("--kv-cache-dtype: only 'auto' (the model dtype) is supported")
        parallel_config = self._parallel_config()
        runner, task = self._runner_and_task()
        model = self.model or (default_embedding_model() if runner == "pooling" else default_model())
        model_dir, gguf_file = resolve_model(model, self.revision, self.download_dir)
        if self.load_format == "gguf" and gguf_file is None:
            raise ValueError(f"--load-format gguf, but {model} is not a GGUF file")
        hf_config = load_hf_config(model_dir, gguf_file, trust_remote_code=self.trust_remote_code)
        for k, v in (_json_or_none(self.hf_overrides) or {}).items():
            setattr(hf_config, k, v)
        model_cls, runner_type, convert_type = resolve_model_class(hf_config, runner, self.convert)
        pooler, tasks = self._pooling_setup(model_dir, hf_config, model_cls, runner_type, task)
        if parallel_config.pipeline_parallel_size > 1 and runner_type != "pooling" and \
                not getattr(model_cls, "supports_pipeline_parallel", False):
            arch = (getattr(hf_config, "architectures", None) or [model_cls.__name__])[0]
            raise ValueError(f"--pipeline-parallel-size: {arch} does not split into pipeline stages (supported: the "
                             "Llama family: Llama, Mistral, Qwen2, Qwen3, SmolLM2, Phi-3); use "
                             "--pipeline-parallel-size 1")
        if parallel_config.pipeline_parallel_size > int(getattr(hf_config, "num_hidden_layers", 0) or 0) > 0:
            raise ValueError(f"--pipeline-parallel-size {parallel_config.pipeline_parallel_size} is more than the "
                             f"model's {hf_config.num_hidden_layers} layers")
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        ckpt_dtype = checkpoint_dtype(hf_config, model_dir=model_dir, gguf_file=gguf_file)
        if pooler is not None and self.dtype == "auto" and device == "cpu" and ckpt_dtype in (torch.float32, None):
            # Pooling models are small and their outputs are compared as vectors: a float32 checkpoint
            # stays float32 (bf16 would cost ~1e-4 of cosine agreement with the reference). A config
            # without torch_dtype means float32, as in transformers.
            dtype = torch.float32
        else:
            dtype = resolve_dtype(self.dtype, ckpt_dtype, device)
        derived_len = _derive_max_model_len(hf_config)
        if pooler is not None:
            from lmserve.model.loader.pooler_config import sentence_transformers_max_seq_length
            st_len = sentence_transformers_max_seq_length(model_dir)
            if st_len:
                derived_len = min(derived_len, st_len)
        max_model_len = self.max_model_len or derived_len
        if max_model_len > derived_len:
            raise ValueError(f"max_model_len {max_model_len} is longer than the model's maximum "
                             f"context length {derived_len} (max_position_embeddings)")
        if self.tokenizer:
            tok_dir, tok_gguf = resolve_model(self.tokenizer, self.tokenizer_revision, self.download_dir)
            tokenizer = tok_dir if tok_gguf is None else f"{tok_dir}/{tok_gguf}"
        else:
            tokenizer = model_dir if gguf_file is None else f"{model_dir}/{gguf_file}"
        names = self.served_model_name
        if isinstance(names, list):
            names = names[0] if names else None
        model_config = ModelConfig(
            model=model, model_path=model_dir, gguf_file=gguf_file, tokenizer=tokenizer,
            hf_config=hf_config, dtype=dtype, max_model_len=max_model_len,
            served_model_name=names or (self.model or ("all-MiniLM-L6-v2" if pooler is not None
                                                       else "SmolLM2-135M-Instruct")),
            seed=self.seed, revision=self.revision, generation_config=self.generation_config,
            override_generation_config=_json_or_none(self.override_generation_config) or {},
            max_logprobs=self.max_logprobs, skip_tokenizer_init=self.skip_tokenizer_init,
            tokenizer_mode=self.tokenizer_mode,
            load_format=self.load_format, runner_type=runner_type, convert_type=convert_type,
            pooler_config=pooler, supported_pooling_tasks=tasks,
            quantization=None if self.quantization in (None, "None") else str(self.quantization).lower(),
            trust_remote_code=self.trust_remote_code)
        cache_config = CacheConfig(
            block_size=self.block_size, kv_cache_memory=parse_memory_size(self.kv_cache_memory),
            gpu_memory_utilization=self.gpu_memory_utilization,
            # A pooling request runs once and never reads the prefix cache.
            enable_prefix_caching=self.enable_prefix_caching and pooler is None,
            num_gpu_blocks_override=self.num_gpu_blocks_override)
        if pooler is not None:
            # Pooling requests are never chunked: the budget must hold one whole prompt.
            if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < max_model_len:
                raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                                 f"max_model_len ({max_model_len}) for a pooling model: its prompts run whole.")
            max_batched = self.max_num_batched_tokens or max(2048, max_model_len)
        else:
            max_batched = self.max_num_batched_tokens or (
                default_token_budget(device) if self.enable_chunked_prefill else max(2048, max_model_len))
        scheduler_config = SchedulerConfig(
            max_num_batched_tokens=max_batched, max_num_seqs=self.max_num_seqs,
            max_model_len=max_model_len, enable_chunked_prefill=self.enable_chunked_prefill,
            policy=self.scheduling_policy, max_waiting_requests=self.max_waiting_requests,
            memory_bound_tokens=(default_memory_bound_tokens(device, pooling=pooler is not None)
                                 if self.memory_bound_tokens is None else self.memory_bound_tokens))
        if parallel_config.world_size > 1:
            if pooler is not None:
                raise ValueError("pooling models run on one rank: use --tensor-parallel-size 1 "
                                 "--pipeline-parallel-size 1")
            if self.enable_lora:
                raise ValueError("--enable-lora with tensor/pipeline parallelism is not supported yet (adapter "
                                 "weights are not sharded): use --tensor-parallel-size 1 --pipeline-parallel-size 1")
        return EngineConfig(
            lora_config=self._lora_config(pooler is not None),
            model_config=model_config, cache_config=cache_config, scheduler_config=scheduler_config,
            parallel_config=parallel_config,
            device_config=DeviceConfig(device),
            logits_processors=tuple(self.logits_processors or ()),
            enforce_eager=self.enforce_eager,
            structured_outputs_config=StructuredOutputsConfig.from_cli(self.structured_outputs_config),
            logits_processor_pattern=_compile_pattern(self.logits_processor_pattern),
            reasoning_parser=self._reasoning_parser())

    def _reasoning_parser(self) -> str | None:
        """The checked ``reasoning_parser`` name (its plugin file imported if it is not registered
        yet); ValueError naming the registered parsers when unknown."""
        if not self.reasoning_parser:
            return None
        from lmserve.reasoning import ReasoningParserManager
        if self.reasoning_parser_plugin and self.reasoning_parser not in ReasoningParserManager.list_registered():
            ReasoningParserManager.import_reasoning_parser(self.reasoning_parser_plugin)
        if self.reasoning_parser not in ReasoningParserManager.list_registered():
            raise ValueError(f"invalid reasoning parser: {self.reasoning_parser} (choose from "
                             f"{{{', '.join(ReasoningParserManager.list_registered())}}})")
        return self.reasoning_parser


    def _parallel_config(self) -> ParallelConfig:
        """The layout and the executor backend, as vLLM resolves it: ``mp`` by default with several
        ranks, ``uni`` with one (``mp`` and ``ray`` with one rank run it in the engine's process).
        ``ray`` needs Ray installed; ``external_launcher`` (one engine per torchrun rank) is refused."""
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError(f"--tensor-parallel-size and --pipeline-parallel-size must be at least 1 "
                             f"(got {tp} and {pp})")
        backend = self.distributed_executor_backend
        if backend == "external_launcher":
            raise ValueError("--distributed-executor-backend external_launcher is not supported: lmserve's engine "
                             "starts and drives its own worker ranks; use mp (one machine) or ray (a Ray cluster)")
        if backend not in (None, "uni", "mp", "ray"):
            raise ValueError(f"--distributed-executor-backend {backend!r}: choose from mp, ray, uni")
        if backend == "ray":
            import importlib.util
            if importlib.util.find_spec("ray") is None:
                raise ValueError("--distributed-executor-backend ray needs Ray, which is not installed: "
                                 "pip install ray (or pip install 'lmserve[ray]'), or use "
                                 "--distributed-executor-backend mp on one machine")
        world = tp * pp
        if backend == "uni" and world > 1:
            raise ValueError(f"--distributed-executor-backend uni runs one rank in the engine's process; "
                             f"tensor x pipeline parallel size is {world}: use mp or ray")
        if world == 1 and backend in ("mp", "ray"):
            logger.info("--distributed-executor-backend %s: one rank, so it runs in the engine's process "
                        "(as 'uni')", backend)
        if world > 1 and backend is None:
            backend = "mp"
        return ParallelConfig(tp, pp, backend or "uni", self.distributed_timeout_seconds,
                              self.cpu_distributed_timeout_seconds)

    def _lora_config(self, is_pooling: bool) -> LoRAConfig | None:
        if not self.enable_lora:
            return None
        if is_pooling:
            raise ValueError("--enable-lora: LoRA adapters apply to generative models; this is a pooling model")
        dtypes = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
        if self.lora_dtype not in dtypes:
            raise ValueError(f"--lora-dtype must be one of {', '.join(dtypes)}, got {self.lora_dtype!r}")
        return LoRAConfig(max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                          max_cpu_loras=self.max_cpu_loras, lora_dtype=dtypes[self.lora_dtype])

    def _runner_and_task(self) -> tuple[str, str | None]:
        """(--runner after --task, the pooling task --task asks for). Conflicts are a ValueError."""
        if self.task not in _TASKS:
            raise ValueError(f"Unknown task {self.task!r}; choose from {', '.join(_TASKS)}")
        task_runner, pooling_task = _TASKS[self.task]
        runner = self.runner
        if task_runner != "auto":
            if runner not in ("auto", task_runner):
                raise ValueError(f"--task {self.task} needs --runner {task_runner}, not --runner {runner}")
            runner = task_runner
        if runner == "auto" and self.convert in ("embed", "classify"):
            runner = "pooling"
        if runner == "auto" and self.model is None and (self.pooler_config or self.override_pooler_config):
            runner = "pooling"
        return runner, pooling_task

    def _pooling_setup(self, model_dir: str, hf_config: Any, model_cls: type, runner_type: str,
                       task: str | None) -> tuple[PoolerConfig | None, tuple[str, ...]]:
        """The resolved pooler config and the pooling tasks of a pooling model; (None, ())
        for a generative one. A --task the model cannot do is a ValueError."""
        override = _json_or_none(self.pooler_config) or _json_or_none(self.override_pooler_config)
        if runner_type != "pooling":
            if override:
                raise ValueError("--pooler-config applies to pooling models only (add --runner pooling)")
            if task is not None:
                raise ValueError(f"--task {self.task} needs a pooling model")
            return None, ()
        from lmserve.model.loader.pooler_config import resolve_pooler_config

        pooler = resolve_pooler_config(model_dir, model_cls,
                                       PoolerConfig.from_dict(override) if override else None)
        from lmserve.model.layers.pooler import supported_tasks

        tasks = tuple(supported_tasks(model_cls.pooling_tasks, pooler))
        if "score" in tasks and int(getattr(hf_config, "num_labels", 1)) != 1:
            tasks = tuple(t for t in tasks if t != "score")  # a score is one number: one label only
        if task is not None and task not in tasks:
            raise ValueError(f"--task {self.task}: this model ({model_cls.__name__}) supports the pooling "
                             f"tasks {', '.join(tasks)}")
        return pooler, tasks


def _derive_max_model_len(hf_config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(hf_config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def _parse_quantization(value: str) -> str | None:
    """--quantization: None/gguf/none (vLLM's other methods are refused with a reason)."""
    if value == "None":
        return None
    if value.lower() in ("gguf", "none"):
        return value.lower()
    raise argparse.ArgumentTypeError(f"{value} is not supported: lmserve runs unquantized weights and GGUF "
                                     "files (quantization None, gguf or none)")


def _parse_int_suffix(value: str) -> int:
    """'32k' -> 32768, '1m' -> 1048576, '4096' -> 4096 (as vLLM's human-readable ints)."""
    s = value.strip().lower()
    mult = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)
