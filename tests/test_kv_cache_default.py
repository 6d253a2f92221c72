"""The CPU KV cache budget when no flag sets one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lmserve.worker import kv_cache_sizing
from lmserve.worker.kv_cache_sizing import cpu_default_kv_bytes

SMOLLM2_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # layers x (K, V) x KV heads x head dim x bf16


def _config(max_model_len: int = 8192):
    return SimpleNamespace(scheduler_config=SimpleNamespace(max_model_len=max_model_len),
                           cache_config=SimpleNamespace(gpu_memory_utilization=0.9))


def test_small_model_stays_well_under_a_gib(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(kv_cache_sizing, "available_host_memory", lambda: 64 * 2**30)
    budget = cpu_default_kv_bytes(_config(), SMOLLM2_BYTES_PER_TOKEN)
    assert budget == 32 * 1024 * SMOLLM2_BYTES_PER_TOKEN and budget < 0.75 * 2**30


def test_long_context_and_small_machine_bounds(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(kv_cache_sizing, "available_host_memory", lambda: 64 * 2**30)
    assert cpu_default_kv_bytes(_config(32768), 1000) == 2 * 32768 * 1000  # two full sequences
    assert cpu_default_kv_bytes(_config(), 10**6) == 4 * 2**30  # vLLM's 4 GiB at most
    monkeypatch.setattr(kv_cache_sizing, "available_host_memory", lambda: 2**30)
    assert cpu_default_kv_bytes(_config(), 10**6) == int(0.9 * 2**30 / 2)  # half the free RAM


def test_vllm_cpu_kvcache_space(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert cpu_default_kv_bytes(_config(), SMOLLM2_BYTES_PER_TOKEN) == 2 * 2**30
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "lots")
    with pytest.raises(ValueError, match="VLLM_CPU_KVCACHE_SPACE"):
        cpu_default_kv_bytes(_config(), SMOLLM2_BYTES_PER_TOKEN)


def test_pooling_models_fill_their_steps(minilm_path, tiny_models):
    """The memory-bound knee (a latency rule for generation) is off for pooling models: each of
    their requests ends in its one step, so the knee would only split a batch of embeddings."""
    from lmserve.engine.arg_utils import EngineArgs

    pooling = EngineArgs(model=minilm_path, device="cpu").create_engine_config()
    assert pooling.scheduler_config.memory_bound_tokens == 0
    generate = EngineArgs(model=tiny_models["llama"], device="cpu").create_engine_config()
    assert generate.scheduler_config.memory_bound_tokens == 64
