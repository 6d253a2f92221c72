"""lmserve's answer to each flag of ``vllm serve`` 0.32 that it does not implement itself.

A vLLM command line must parse, so every such flag is registered on the serve parser (unless a
part of lmserve defines it: then that definition wins). Its answer is one of:

- ``noop``: accepted; it asks for nothing this build does differently (a CUDA graph size, a GPU
  kernel autotuner, ...). Given with any value, it is named once in the start-up log.
- ``refused``: accepted while it keeps vLLM's default (which asks for what lmserve does anyway);
  any other value exits at start-up with the reason, which names what to use instead where
  there is something.

``lmserve/entrypoints/vllm_serve_flags.json`` (written from vLLM's own parser by
``tools/dump_vllm_serve_flags.py``) is the reference list; ``tools/flag_table.py`` writes the
README's table from it and from lmserve's parser, and ``tests/test_flag_table.py`` keeps the
two from drifting: a vLLM flag that lmserve's parser does not know fails that test.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Literal

Answer = Literal["noop", "refused"]


@dataclass(frozen=True)
class ForeignFlag:
    """One vLLM flag lmserve does not implement. ``default`` is vLLM's default: a value equal to it
    is accepted silently by a refused flag. ``switch`` flags take no value (``--x`` / ``--no-x``)."""

    flag: str
    answer: Answer
    why: str
    default: Any = None
    switch: bool = False
    aliases: tuple[str, ...] = ()

    def keeps_default(self, value: Any) -> bool:
        """Whether ``value`` (as parsed) asks for what vLLM's default asks for."""
        if value is None or value == self.default:
            return True
        if isinstance(value, str) and not isinstance(self.default, str):
            try:
                return json.loads(value) == self.default
            except ValueError:
                return False
        return str(value) == str(self.default)


def _many(answer: Answer, why: str, values: dict[str, Any] | None = None, switches: dict[str, bool] | None = None,
          aliases: dict[str, tuple[str, ...]] | None = None) -> tuple[ForeignFlag, ...]:
    aliases = aliases or {}
    out = [ForeignFlag(f, answer, why, d, False, aliases.get(f, ())) for f, d in (values or {}).items()]
    out += [ForeignFlag(f, answer, why, d, True, aliases.get(f, ())) for f, d in (switches or {}).items()]
    return tuple(out)


_MM = "lmserve serves text-only models (no multimodal inputs)"
_MAMBA = "lmserve has no state-space (Mamba/GDN/KDA) models"
_SPEC = "speculative decoding is not supported by lmserve"
_DP = ("multi-node, external- and hybrid-LB data parallelism are not supported: --data-parallel-size N runs N "
       "replicas on this machine behind one API server; across machines, run one lmserve each behind a load "
       "balancer")
_MULTI = ("not supported: lmserve starts its own worker ranks (mp on one machine, --distributed-executor-backend "
          "ray across machines); no torchrun-style launch, context- or expert-parallel execution yet")
_EP = "expert parallelism is not supported: MoE layers run their experts on the one engine process"
_GPU_KERNELS = ("lmserve chooses its kernels once at start-up from the CPU/GPU it runs on (the table in the "
                "start-up log); set LMSERVE_CPU_GEMM or LMSERVE_DISABLE_CPU_KERNELS=1 to change the choice")
_EAGER = "the model runs eagerly; nothing is compiled or captured (no torch.compile, no CUDA graphs)"
_LOAD = "weights are memory-mapped from safetensors or GGUF files and read once"
_OFFLOAD = "weight and KV-cache offloading are not supported: the whole model and KV cache stay in memory"
_SLEEP = "sleep mode frees the KV cache only; there are no CUDA graphs or NCCL communicators to keep"
_NO_HUB = "lmserve reads local files only and never contacts the Hugging Face hub"
_GRPC = "only the HTTP OpenAI-compatible server is provided"
_COHERE = "the Cohere API is not served; use /v1/chat/completions"
_OBS = "this metric family is not exported; /metrics has lmserve's Prometheus metrics"

FOREIGN_FLAGS: tuple[ForeignFlag, ...] = (
    # Frontend
    *_many("refused", "there is no headless or multi-node data-parallel mode", switches={"--headless": False}),
    *_many("refused", _GRPC, values={"--grpc-port": None}, switches={"--grpc": False}),
    *_many("refused", _MM, switches={"--trust-request-mm-kwargs": False}),
    *_many("refused", "responses are not annotated with per-request timings; the Prometheus metrics at "
           "/metrics have them", switches={"--enable-per-request-metrics": False}),
    *_many("refused", "only whole tokens are streamed as they come", values={"--stream-interval": 1}),
    *_many("refused", _COHERE, values={"--cohere-format": "cmd4"}, switches={"--cohere-is-reasoning-model": True}),
    *_many("refused", "lmserve has no tool server (neither the demo tools nor MCP servers): tools run on the client, "
           "which sends their results back as role \"tool\" messages", values={"--tool-server": None}),
    *_many("refused", "structural-tag tool calling is not supported: auto tool calls are parsed from the text, "
           "required and named ones are constrained to JSON", values={"--tool-strict-level": "auto"}),
    *_many("refused", "every route of the API server is served (there is no tokens-only or scale-out mode)",
           switches={"--tokens-only": False, "--enable-scale-out": False}),
    *_many("refused", "system_fingerprint is not set on responses", values={"--fingerprint-mode": "full",
                                                                            "--fingerprint-value": None}),
    *_many("refused", _DP, values={"--data-parallel-supervisor-port": 9256,
                                   "--dp-supervisor-probe-interval-s": 5.0,
                                   "--dp-supervisor-probe-timeout-s": 5.0,
                                   "--dp-supervisor-probe-failure-threshold": 3}),
    *_many("refused", "certificates are read once at start-up; restart the server to load new ones",
           switches={"--enable-ssl-refresh": False}),
    *_many("refused", "the API docs (/docs) load their assets from FastAPI's default CDN; use "
           "--disable-fastapi-docs to turn them off", switches={"--enable-offline-docs": False}),
    *_many("noop", "late-interaction (MaxSim) scores are computed by the engine",
           switches={"--enable-flash-late-interaction": True}),
    # ModelConfig
    *_many("refused", "the config is read from the model directory; use --hf-overrides to change it",
           values={"--hf-config-path": None}),
    *_many("refused", _MM, values={"--allowed-media-domains": None}),
    *_many("refused", "lmserve runs bf16/fp16/fp32 weights and GGUF block quantizations only (--quantization "
           "gguf or a .gguf file)", values={"--quantization-config": None},
           switches={"--allow-deprecated-quantization": False}),
    *_many("refused", "routed-expert outputs are not returned", switches={"--enable-return-routed-experts": False}),
    *_many("refused", "sampling masks are not returned", switches={"--return-sampling-mask": False}),
    *_many("refused", "logprobs are the model's raw log-softmax (vLLM's default raw_logprobs)",
           values={"--logprobs-mode": "raw_logprobs"}),
    *_many("refused", "sampling draws fp32 noise", switches={"--use-fp64-gumbel": False}),
    *_many("refused", "forced decode traces are not supported", switches={"--enable-trace-replay": False}),
    *_many("noop", "there is no cascade attention (deprecated in vLLM too)", switches={"--disable-cascade-attn": None}),
    *_many("refused", "prompts are text or token ids; prompt_embeds are not accepted",
           switches={"--enable-prompt-embeds": False}),
    *_many("noop", _NO_HUB, values={"--hf-token": None}),
    *_many("refused", "architectures map to lmserve's own implementations (lmserve/model/models/registry.py); "
           "add a registry entry to add one", values={"--model-class-overrides": {}}),
    *_many("refused", "lmserve runs its own model implementations only", values={"--model-impl": "auto"}),
    *_many("refused", _SLEEP, values={"--sleep-preserve-parameter-names": []},
           switches={"--sleep-mode-offload-cudagraph": False, "--enable-cumem-allocator": False,
                     "--enable-nccl-comm-suspend": False}),
    *_many("refused", "IO-processor plugins are not supported", values={"--io-processor-plugin": None}),
    *_many("noop", "chat templates render in the API server's own worker threads",
           values={"--renderer-num-workers": 1}),
    # LoadConfig
    *_many("noop", _LOAD, values={"--safetensors-load-strategy": None, "--safetensors-prefetch-num-threads": 8,
                                  "--safetensors-prefetch-block-size": 16777216},
           switches={"--use-tqdm-on-load": True}),
    *_many("refused", _LOAD + " onto the serving device", values={"--pt-load-map-location": "cpu"}),
    # Attention, Mamba, kernels
    *_many("refused", _GPU_KERNELS, values={"--attention-backend": None, "--moe-backend": "auto",
                                            "--linear-backend": "auto", "--sparse-indexer-topk-backend": "auto",
                                            "--attention-config": None, "--kernel-config": None,
                                            "--ir-op-priority": None},
           aliases={"--attention-config": ("-ac",)}),
    *_many("noop", "there is no FlashInfer autotuning", switches={"--enable-flashinfer-autotune": None}),
    *_many("refused", _MAMBA, values={"--mamba-backend": "triton", "--mamba-ssu-algorithm": None,
                                      "--mamba-cache-philox-rounds": 0, "--mamba-cache-dtype": "auto",
                                      "--mamba-ssm-cache-dtype": "auto", "--mamba-block-size": None,
                                      "--mamba-cache-mode": "none", "--replayssm-buffer-len": 16,
                                      "--gdn-prefill-backend": None, "--kda-prefill-backend": None,
                                      "--kda-decode-backend": None},
           switches={"--enable-mamba-cache-stochastic-rounding": False,
                     "--enable-mamba-shared-prefix-checkpoint": False, "--use-replayssm": False}),
    # ParallelConfig
    *_many("refused", _MULTI, values={"--master-addr": "127.0.0.1", "--master-port": 29501, "--nnodes": 1,
                                      "--node-rank": 0, "--device-ids": None,
                                      "--decode-context-parallel-size": 1, "--dcp-comm-backend": None,
                                      "--dcp-kv-cache-interleave-size": 1, "--cp-kv-cache-interleave-size": None,
                                      "--prefill-context-parallel-size": 1, "--ubatch-size": 0,
                                      "--dbo-decode-token-threshold": 32, "--dbo-prefill-token-threshold": 512,
                                      "--worker-extension-cls": "", "--fault-tolerance-config": None},
           switches={"--dcp-q-replicate": None, "--enable-hc-sp": False, "--enable-batch-sharded-sampling": None,
                     "--enable-dbo": False, "--enable-shm-tensor-arena": False,
                     "--enable-fault-tolerance": False},
           aliases={"--nnodes": ("-n",), "--node-rank": ("-r",), "--decode-context-parallel-size": ("-dcp",),
                    "--prefill-context-parallel-size": ("-pcp",)}),
    *_many("refused", "the CPU threads are not pinned by lmserve; use numactl or taskset on the command",
           values={"--numa-bind-nodes": None, "--numa-bind-cpus": None}, switches={"--numa-bind": False}),
    *_many("refused", _DP, values={"--data-parallel-rank": None, "--data-parallel-start-rank": None,
                                   "--data-parallel-size-local": None, "--data-parallel-address": None,
                                   "--data-parallel-rpc-port": None, "--data-parallel-backend": "mp",
                                   "--dp-sync-interval": 16, "--prefill-schedule-interval": 1},
           switches={"--data-parallel-hybrid-lb": False, "--data-parallel-external-lb": False,
                     "--data-parallel-multi-port-external-lb": False, "--disable-nccl-for-dp-synchronization": None,
                     "--aggregate-engine-logging": False},
           aliases={"--data-parallel-rank": ("-dpn",), "--data-parallel-start-rank": ("-dpr",),
                    "--data-parallel-size-local": ("-dpl",), "--data-parallel-address": ("-dpa",),
                    "--data-parallel-rpc-port": ("-dpp",), "--data-parallel-backend": ("-dpb",),
                    "--data-parallel-hybrid-lb": ("-dph",), "--data-parallel-external-lb": ("-dpe",),
                    "--data-parallel-multi-port-external-lb": ("-dpm",)}),
    *_many("refused", _EP, values={"--all2all-backend": "allgather_reducescatter", "--elastic-ep-max-dp-size": None,
                                   "--eplb-config": None, "--expert-placement-strategy": "linear"},
           switches={"--enable-expert-parallel": False, "--enable-ep-weight-filter": False,
                     "--enable-elastic-ep": False, "--enable-eplb": False},
           aliases={"--enable-expert-parallel": ("-ep",)}),
    # CacheConfig
    *_many("refused", "prefix-cache blocks are keyed by SHA-256", values={"--prefix-caching-hash-algo": "sha256"}),
    *_many("refused", "cached blocks are evicted least-recently-used, with no retention interval",
           values={"--prefix-cache-retention-interval": 0, "--prefix-match-unit": None}),
    *_many("refused", "KV caches hold the model dtype in every layer", values={"--kv-cache-dtype-skip-layers": []}),
    *_many("refused", "every layer computes its own keys and values", switches={"--kv-sharing-fast-prefill": False}),
    *_many("noop", "there is one KV-cache manager for every attention layer",
           switches={"--swa-bounded-replay": True, "--disable-hybrid-kv-cache-manager": None}),
    *_many("refused", _OFFLOAD, values={"--kv-offloading-size": None, "--kv-offloading-backend": "native",
                                        "--offload-backend": "auto", "--cpu-offload-params": [],
                                        "--offload-group-size": 0, "--offload-num-in-group": 1,
                                        "--offload-prefetch-step": 1, "--offload-params": []}),
    # MultiModalConfig
    *_many("refused", _MM, values={"--media-io-kwargs": {}, "--mm-processor-cache-gb": 4,
                                   "--mm-processor-cache-type": "lru", "--mm-hasher-algorithm": "blake3",
                                   "--mm-shm-cache-max-object-size-mb": 128, "--mm-encoder-tp-mode": "weights",
                                   "--mm-encoder-attn-backend": None, "--mm-encoder-attn-dtype": None,
                                   "--mm-encoder-fp8-scale-path": None, "--mm-encoder-fp8-scale-save-path": None,
                                   "--mm-encoder-fp8-scale-save-margin": 1.5, "--video-pruning-rate": None,
                                   "--video-pruning-method": "evs", "--mm-tensor-ipc": "direct_rpc",
                                   "--mm-processor-device": "auto", "--mm-ipc-gpu-memory-gb": 0,
                                   "--default-mm-loras": None},
           switches={"--enable-mm-embeds": False, "--mm-encoder-only": False, "--interleave-mm-strings": False,
                     "--skip-mm-profiling": False, "--mm-device-do-normalize": None,
                     "--enable-tower-connector-lora": False}),
    *_many("noop", "lmserve serves text-only models: multimodal inputs are never accepted",
           switches={"--language-model-only": False}),
    # LoRAConfig (the flags lmserve's LoRA support does not take)
    *_many("refused", "LoRA adapters apply to the attention and MLP projections of every layer",
           values={"--lora-target-modules": None}, switches={"--specialize-active-lora": False}),
    *_many("refused", "LoRA adapters on MoE experts are not supported",
           switches={"--enable-mixed-moe-lora-format": False, "--enable-moe-shared-loras": False}),
    *_many("refused", "LoRA classification heads are not supported", values={"--max-lora-cls-labels": None}),
    # Observability
    *_many("noop", "lmserve hides no deprecated metrics", values={"--show-hidden-metrics-for-version": None}),
    *_many("refused", _SPEC, values={"--per-request-spec-decode-metrics": "none", "--spec-method": None,
                                     "--spec-model": None, "--spec-tokens": None}),
    *_many("refused", _OBS, values={"--kv-cache-metrics-sample": 0.01, "--custom-histogram-buckets": None},
           switches={"--kv-cache-metrics": False, "--cudagraph-metrics": False, "--enable-mfu-metrics": False}),
    *_many("refused", "there is no NVTX tracing; profile with torch.profiler or py-spy",
           switches={"--enable-layerwise-nvtx-tracing": False}),
    *_many("refused", "per-iteration details are not logged; /metrics has the step counters",
           switches={"--enable-logging-iteration-details": False}),
    *_many("noop", _EAGER, values={"--jit-monitor-mode": "warn", "--cudagraph-capture-sizes": None,
                                   "--max-cudagraph-capture-size": None, "--optimization-level": 2},
           switches={"--jit-monitor-verbose": False}),
    # SchedulerConfig
    *_many("refused", "the scheduler's budget per step is --max-num-batched-tokens",
           values={"--max-num-scheduled-tokens": None}),
    *_many("refused", "--max-num-seqs bounds the running requests", values={"--max-num-active-seqs": None}),
    *_many("refused", "queued requests are bounded by --max-waiting-requests (refused with a 503 beyond it)",
           values={"--max-num-queued-reqs": None, "--max-num-queued-tokens": None}),
    *_many("refused", "chunked prefill splits long prompts by --max-num-batched-tokens only",
           values={"--long-prefill-token-threshold": 0}, switches={"--long-prefill-token-threshold-adaptive": False}),
    *_many("refused", _MM, switches={"--disable-chunked-mm-input": False}),
    *_many("refused", "the scheduler is lmserve's own (lmserve/engine/scheduler.py)",
           values={"--scheduler-cls": None}),
    *_many("refused", "a request is admitted only when its whole prompt fits in the free KV blocks",
           switches={"--scheduler-reserve-full-isl": True}),
    *_many("refused", "admission keeps no KV watermark: a running request that runs out of blocks preempts the "
           "newest one", values={"--watermark": 0.0}),
    # VllmConfig
    *_many("refused", "text watermarking is not supported", values={"--watermark-config": None}),
    *_many("refused", "diffusion language models are not supported", values={"--diffusion-config": None},
           aliases={"--diffusion-config": ("-dc",)}),
    *_many("refused", "KV-cache events are not published", values={"--kv-events-config": None}),
    *_many("refused", _MM, values={"--ec-transfer-config": None, "--ec-manager-config": None}),
    *_many("refused", "n-gram embedding storage is not supported", values={"--engram-config": None}),
    *_many("refused", "there is no platform-specific additional config", values={"--additional-config": {}}),
    *_many("refused", "auxiliary execution outputs are not returned", values={"--aux-output-config": None}),
    *_many("refused", "the torch profiler is not built into the server; use py-spy or torch.profiler on the "
           "engine", values={"--profiler-config": None}),
    *_many("noop", "lmserve has one performance mode", values={"--performance-mode": "balanced"}),
    *_many("refused", "weights are not updated at run time", values={"--weight-transfer-config": None}),
    *_many("noop", "lmserve validates no VLLM_* environment", switches={"--fail-on-environ-validation": False}),
)


def register_foreign_flags(parser: argparse.ArgumentParser) -> dict[str, tuple[ForeignFlag, argparse.Action]]:
    """Adds each ``FOREIGN_FLAGS`` entry the parser does not already know (a definition elsewhere in
    lmserve wins). Returns ``{flag: (entry, action)}`` for ``check_foreign_flags``."""
    known = {opt for action in parser._actions for opt in action.option_strings}  # noqa: SLF001
    group = parser.add_argument_group(
        "vllm flags lmserve answers without implementing (see the README's flag table)")
    added: dict[str, tuple[ForeignFlag, argparse.Action]] = {}
    for entry in FOREIGN_FLAGS:
        if entry.flag in known:
            continue
        names = [entry.flag, *(a for a in entry.aliases if a not in known)]
        label = "No-op here" if entry.answer == "noop" else f"Refused here unless {entry.default!r} (vLLM's default)"
        kwargs: dict[str, Any] = {"action": argparse.BooleanOptionalAction} if entry.switch else {}
        name = entry.flag.lstrip("-").replace("-", "_")
        if not entry.switch:
            kwargs["metavar"] = name.upper()
        action = group.add_argument(*names, default=None, dest="foreign_" + name,
                                    help=f"{label}: {entry.why}.", **kwargs)
        added[entry.flag] = (entry, action)
    return added


def check_foreign_flags(args: argparse.Namespace, added: dict[str, tuple[ForeignFlag, argparse.Action]]) -> tuple[
        list[str], list[str]]:
    """``(start-up log lines for no-ops given, errors for refused flags given a non-default value)``."""
    notes: list[str] = []
    errors: list[str] = []
    for flag, (entry, action) in added.items():
        value = getattr(args, action.dest, None)
        if value is None:
            continue
        shown = flag if entry.switch and value is True else (f"--no-{flag[2:]}" if entry.switch else f"{flag} {value}")
        if entry.answer == "noop":
            notes.append(f"{shown} changes nothing on this build: {entry.why}")
        elif not entry.keeps_default(value):
            errors.append(f"{shown} is not supported: {entry.why}.")
    return notes, errors
