"""How many KV blocks to allocate, from the flags and the machine's memory."""

from __future__ import annotations

import logging
import os

import torch

from lmserve.config import EngineConfig

logger = logging.getLogger(__name__)

_CPU_MAX_DEFAULT_KV_BYTES = 4 * 2**30  # vLLM's CPU backend default (VLLM_CPU_KVCACHE_SPACE=4)
_CPU_DEFAULT_KV_TOKENS = 32 * 1024  # enough for far more concurrent tokens than a CPU decodes at once


def available_host_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), or total physical memory elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def pooling_num_blocks(config: EngineConfig) -> int:
    """Blocks a pooling runner needs: its requests hold KV only during the one step that
    runs their whole prompt, so one full token budget (plus a partial block per sequence)
    is all that is ever in use. For an encoder without a KV cache these ids are pure
    bookkeeping for the scheduler; no memory backs them."""
    cc, sc = config.cache_config, config.scheduler_config
    return -(-sc.max_num_batched_tokens // cc.block_size) + sc.max_num_seqs


def cpu_default_kv_bytes(config: EngineConfig, bytes_per_token: int) -> int:
    """The CPU KV budget when no flag sets one: ``$VLLM_CPU_KVCACHE_SPACE`` GiB where set (vLLM's
    variable), else the smallest of 4 GiB (vLLM's default), utilisation x half the available RAM,
    and the KV of max(32 Ki, 2 x max_model_len) tokens, so a small model's server on a small
    machine does not reserve gigabytes it cannot use (SmolLM2-135M: 0.7 GiB)."""
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
    if space:
        try:
            gib = float(space)
        except ValueError:
            raise ValueError(f"VLLM_CPU_KVCACHE_SPACE must be a number of GiB, not {space!r}") from None
        if gib > 0:
            return int(gib * 2**30)
    tokens = max(_CPU_DEFAULT_KV_TOKENS, 2 * config.scheduler_config.max_model_len)
    utilisation = int(config.cache_config.gpu_memory_utilization * available_host_memory() / 2)
    return min(_CPU_MAX_DEFAULT_KV_BYTES, utilisation, tokens * bytes_per_token)


def determine_num_blocks(config: EngineConfig, kv_spec, device: torch.device) -> int:
    """Blocks for ``--num-gpu-blocks-override``, else ``--kv-cache-memory`` bytes, else
    (CPU) ``cpu_default_kv_bytes`` or (CUDA) utilisation x device memory minus what is
    already used. Never more than all sequences at full length could use, never fewer
    than one full-length sequence needs."""
    cc, sc = config.cache_config, config.scheduler_config
    per_block = kv_spec.bytes_per_block(cc.block_size)
    blocks_per_seq = -(-sc.max_model_len // cc.block_size)
    if cc.num_gpu_blocks_override is not None:
        return cc.num_gpu_blocks_override
    if cc.kv_cache_memory is not None:
        budget = cc.kv_cache_memory
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Leave room for activations of a full token budget (a generous estimate).
        hidden = getattr(config.model_config.hf_config, "hidden_size", 4096)
        vocab = config.model_config.vocab_size
        activations = sc.max_num_batched_tokens * (hidden * 32 + 4) * 4 + sc.max_num_seqs * vocab * 4 * 4
        budget = int(total * cc.gpu_memory_utilization) - (total - free) - activations
    else:
        budget = cpu_default_kv_bytes(config, max(1, per_block // cc.block_size))
    num_blocks = min(budget // per_block, blocks_per_seq * sc.max_num_seqs + 1)
    if config.model_config.is_pooling:
        num_blocks = min(num_blocks, pooling_num_blocks(config))
    if num_blocks < blocks_per_seq and cc.kv_cache_memory is None:
        logger.warning("KV cache fits only %d blocks; one sequence of max_model_len needs %d",
                       num_blocks, blocks_per_seq)
    if num_blocks < 1:
        raise ValueError(f"The KV cache budget ({budget} bytes) is smaller than one block "
                         f"({per_block} bytes). Raise --kv-cache-memory or lower --block-size.")
    return int(num_blocks)
