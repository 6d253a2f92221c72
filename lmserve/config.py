"""Engine configuration: frozen dataclasses validated in ``__post_init__``.

``EngineConfig`` bundles them and is what custom logits processors receive as
``vllm_config`` (it has the same attribute names as vLLM's ``VllmConfig`` for
the parts that exist here: ``model_config``, ``cache_config``,
``scheduler_config``, ``parallel_config``, ``device_config``).
Runtime-derived values (e.g. the number of KV blocks actually allocated) are
not stored here; the engine keeps them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "half": torch.float16, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float": torch.float32, "float32": torch.float32, "fp32": torch.float32,
}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN's AVX-512 / AMX bf16 paths). Without
    them (an AVX2-only CPU) oneDNN emulates bf16, orders of magnitude below its fp32 speed."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype | None, device: str,
                  fast_bf16: bool | None = None) -> torch.dtype:
    """vLLM's rule: "auto" keeps a 16-bit checkpoint's dtype and turns fp32 into a 16-bit type
    (bf16 on CPU, fp16 on CUDA). On a CPU without native bf16 (``fast_bf16``, default
    ``cpu_has_fast_bf16()``) "auto" is float32 whatever the checkpoint: 16-bit matmuls are
    emulated there and 50-100x slower. An explicit dtype is always kept."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}; choose from auto, {', '.join(sorted(_DTYPES))}.")
        return _DTYPES[dtype]
    if device == "cpu" and not (cpu_has_fast_bf16() if fast_bf16 is None else fast_bf16):
        return torch.float32
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    return torch.bfloat16 if device == "cpu" else torch.float16


def parse_memory_size(value: str | int | float | None) -> int | None:
    """'4GiB', '512MiB', '2G', '1e9' or a number of bytes -> bytes."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    s = value.strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "b": 1}
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * units[unit])
    return int(float(s))


POOLING_TYPES = ("LAST", "ALL", "CLS", "MEAN", "STEP")


@dataclass(frozen=True)
class PoolerConfig:
    """How a pooling model turns hidden states into its output (vLLM's ``PoolerConfig``).

    Resolved from the checkpoint (sentence-transformers ``modules.json`` and
    ``1_Pooling/config.json``, the ``Normalize`` module) and the model class's defaults,
    then overridden by ``--pooler-config`` / ``--override-pooler-config``. After resolution
    ``pooling_type`` is one of ``POOLING_TYPES`` and ``normalize`` is a bool.
    """

    pooling_type: str | None = None
    normalize: bool | None = None
    dimensions: int | None = None  # default output dimensions (matryoshka models)
    use_activation: bool | None = None  # default for classify/score (None: yes)
    logit_bias: float | None = None  # subtracted from classification logits before the activation (vLLM's sign)
    step_tag_id: int | None = None  # STEP pooling: keep positions whose token is this id
    returned_token_ids: list[int] | None = None  # STEP pooling: keep only these label columns

    def __post_init__(self) -> None:
        if self.pooling_type is not None:
            if str(self.pooling_type).upper() not in POOLING_TYPES:
                raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, "
                                 f"got {self.pooling_type!r}")
            object.__setattr__(self, "pooling_type", str(self.pooling_type).upper())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PoolerConfig":
        """From a JSON override; ``activation``/``softmax`` are aliases of ``use_activation``.
        Unknown keys are a ValueError naming the accepted ones."""
        d = dict(d)
        for alias in ("activation", "softmax"):
            if alias in d:
                value = d.pop(alias)
                d.setdefault("use_activation", value)
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown pooler config key(s) {unknown}; accepted: {sorted(known)}")
        return cls(**d)

    def merged(self, override: "PoolerConfig | None") -> "PoolerConfig":
        """This config with every field the override sets (not None) replaced."""
        if override is None:
            return self
        values = {k: getattr(override, k) if getattr(override, k) is not None else getattr(self, k)
                  for k in self.__dataclass_fields__}
        return PoolerConfig(**values)


def generation_config_problem(value: str) -> str | None:
    """Why ``--generation-config value`` cannot be used, or None ("auto", "vllm" or a directory
    holding generation_config.json)."""
    if value in ("auto", "vllm"):
        return None
    if not os.path.isdir(value):
        return (f"--generation-config {value!r}: not a directory (give 'auto', 'vllm' or a directory holding "
                "generation_config.json)")
    if not os.path.isfile(os.path.join(value, "generation_config.json")):
        return f"--generation-config {value!r}: the directory has no generation_config.json"
    return None


@dataclass(frozen=True)
class ModelConfig:
    model: str  # what the user named (path, GGUF file or hub id)
    model_path: str  # the resolved local directory
    gguf_file: str | None  # file name inside model_path when the weights are a GGUF file
    tokenizer: str  # resolved local path of the tokenizer (directory or GGUF file)
    hf_config: Any  # transformers.PretrainedConfig
    dtype: torch.dtype
    max_model_len: int
    served_model_name: str
    seed: int = 0
    revision: str | None = None
    # "auto": the model's generation_config.json; "vllm": no sampling defaults from it (its EOS ids
    # still count); a directory: that directory's generation_config.json for both (vLLM 0.32).
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] = field(default_factory=dict)
    max_logprobs: int = 20
    skip_tokenizer_init: bool = False
    tokenizer_mode: str = "auto"  # "auto" | "hf" | "slow" (see lmserve.tokenizer.check_tokenizer_mode)
    load_format: str = "auto"  # "auto" | "safetensors" | "gguf" | "dummy"
    # "generate": a causal LM sampling tokens; "pooling": embed/classify/score requests only.
    runner_type: str = "generate"
    # "none", or how a generative architecture is used as a pooling model: "embed" | "classify".
    convert_type: str = "none"
    pooler_config: PoolerConfig | None = None  # set (resolved) exactly when runner_type == "pooling"
    supported_pooling_tasks: tuple[str, ...] = ()
    # A GGUF file on CPU keeps its Q4_0/Q4_1/Q8_0 weights quantized and runs them with int4 kernels:
    # None in bf16, "gguf" in bf16 and fp32 (``keeps_gguf_quantized``); "none" dequantizes every weight.
    quantization: str | None = None
    # passed to transformers when loading the config and the tokenizer (never runs remote modeling code)
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.quantization not in (None, "gguf", "none"):
            raise ValueError(f"quantization {self.quantization!r} is not supported: lmserve runs unquantized "
                             "weights and GGUF files; choose None, 'gguf' or 'none'")
        if self.quantization == "gguf" and not self.gguf_file:
            raise ValueError("quantization='gguf' needs a GGUF model file")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.max_logprobs < -1:
            raise ValueError("max_logprobs must be >= -1")
        from lmserve.tokenizer import check_tokenizer_mode
        check_tokenizer_mode(self.tokenizer_mode)
        problem = generation_config_problem(self.generation_config)
        if problem is not None:
            raise ValueError(problem)
        if self.runner_type not in ("generate", "pooling"):
            raise ValueError(f"runner must be 'generate' or 'pooling', got {self.runner_type!r}")
        if (self.runner_type == "pooling") != (self.pooler_config is not None):
            raise ValueError("a pooler config is set exactly for pooling models")

    @property
    def is_pooling(self) -> bool:
        return self.runner_type == "pooling"

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        return archs[0] if archs else ""


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; wins over gpu_memory_utilization
    gpu_memory_utilization: float = 0.9  # fraction of device memory (CPU: of available RAM)
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be positive")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 2:
            raise ValueError("num_gpu_blocks_override must be at least 2")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # "fcfs" | "priority"
    max_waiting_requests: int = 4096  # beyond this, new requests are refused (HTTP 503)
    # Steps of up to this many tokens are memory-bound (a step reads every weight whatever its
    # rows), so further new prompts join one nearly free; past it a step is compute-bound and each
    # further new prompt waits for the next step. 0: new prompts join up to the token budget.
    memory_bound_tokens: int = 0

    def __post_init__(self) -> None:
        if self.memory_bound_tokens < 0:
            raise ValueError("memory_bound_tokens must be at least 0")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                f"({self.max_model_len}): without chunked prefill a prompt of max_model_len tokens could "
                "never be scheduled. Raise max_num_batched_tokens or enable chunked prefill.")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    # --distributed-timeout-seconds: the ranks' rendezvous, and NCCL groups' collectives (None: 300 s)
    distributed_timeout_seconds: float | None = None
    # --cpu-distributed-timeout-seconds: gloo TP/PP groups' collectives and transfers (None: 300 s)
    cpu_distributed_timeout_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("parallel sizes must be at least 1")
        for name in ("distributed_timeout_seconds", "cpu_distributed_timeout_seconds"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (``--enable-lora``): at most ``max_loras`` distinct adapters in one step,
    ranks up to ``max_lora_rank``, an LRU of ``max_cpu_loras`` loaded adapters, their weights in
    ``lora_dtype`` (None: the model dtype)."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max_loras
    lora_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be at least 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")

    @property
    def cache_size(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    device_config: DeviceConfig
    logits_processors: tuple[Any, ...] = ()  # classes or "module:Class" strings
    enforce_eager: bool = True
    # lmserve.structured_output.StructuredOutputsConfig (None: the defaults)
    structured_outputs_config: Any = None
    # --logits-processor-pattern: qualified names a request's ``logits_processors`` may name (None: none)
    logits_processor_pattern: str | None = None
    lora_config: LoRAConfig | None = None  # None: LoRA adapters are not enabled
    # --reasoning-parser (a registered name): structured outputs constrain only after the reasoning
    reasoning_parser: str | None = None
