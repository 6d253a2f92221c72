"""The native one-call decode step (``cpu_kernels/decode_step.c``) against the eager path it
replaces: tiny Llama / Qwen2 / Qwen3 (q/k norms) GGUFs kept quantized (Q4_0, Q4_1, Q8_0), decode steps of 1-4
sequences of different lengths over a paged cache with scattered blocks: equal bit for bit, in
bfloat16 and in float32 (the same kernels, the eager path's SiLU included).
Also: which models get the step, and the calls it declines (the eager path then runs)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from lmserve.model.layers.cpu_kernels.cpu_ops import get_cpu_ops
from lmserve.model.layers.cpu_kernels.decode_step import ENV, MAX_ROWS, LlamaDecodeStep
from lmserve.model.loader import get_model
from tests.model_utils import PagedTestCache, make_hf_model, write_tiny_gguf
from tests.test_loader import _model_config

_OPS = get_cpu_ops()
pytestmark = pytest.mark.skipif(_OPS is None or not _OPS.has_qgemv,
                                reason="the native decode step needs the VNNI GEMV (AVX-512 VNNI, a C compiler)")

# K = 128 (one group of 4 blocks) and 192 (a group of 4 and one of 2) for the GEMV's two tails
_SHAPE = dict(vocab_size=96, hidden_size=128, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)


def _model(tmp_path, arch: str, quant: str, dtype: torch.dtype):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    hf = make_hf_model(cls(**_SHAPE, tie_word_embeddings=arch == "qwen2"), seed=4)
    write_tiny_gguf(hf, str(tmp_path / "tiny.gguf"), arch, quant=quant)
    return get_model(_model_config(str(tmp_path), "tiny.gguf", dtype=dtype, quantization="gguf"), "cpu")


def _run(model, use_step: bool, steps: int = 6) -> list[torch.Tensor]:
    """Prefill four prompts of different lengths, then decode steps of 4, 3, 1 and 2 sequences;
    the hidden states of every decode step."""
    saved = model.decode_step
    if not use_step:
        model.decode_step = None
    try:
        cache = PagedTestCache(model.kv_cache_spec(), num_blocks=96, block_size=4, seed=1)
        prompts = {s: [(7 * s + 3 * j) % 96 for j in range(5 + 9 * s)] for s in range(4)}
        batch = cache.step(list(prompts.items()))
        model(batch.input_ids, batch.positions, cache.kv_caches, batch.meta)
        outs = []
        for i in range(steps):
            live = [[0, 1, 2, 3], [1, 2, 3], [2], [0, 3]][i % 4]
            batch = cache.step([(s, [(11 * s + i) % 96]) for s in live], decode_only=True)
            outs.append(model(batch.input_ids, batch.positions, cache.kv_caches, batch.meta))
        return outs
    finally:
        model.decode_step = saved


@pytest.mark.parametrize("arch,quant", [("llama", "Q4_0"), ("llama", "Q4_1"), ("qwen2", "Q8_0"), ("qwen2", "Q4_1"),
                                        ("qwen3", "Q8_0")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_step_equals_eager(tmp_path, arch, quant, dtype):
    model = _model(tmp_path, arch, quant, dtype)
    assert isinstance(model.decode_step, LlamaDecodeStep)
    fast, eager = _run(model, True), _run(model, False)
    for f, e in zip(fast, eager, strict=True):
        assert f.dtype == dtype and f.shape == e.shape
        assert torch.equal(f, e)


def test_decode_step_declines_and_is_optional(tmp_path, monkeypatch):
    """More than MAX_ROWS sequences, or a step with a prompt token, go to the eager path; a dense
    model, or LMSERVE_DECODE_STEP=0, gets no step at all."""
    model = _model(tmp_path, "llama", "Q4_1", torch.bfloat16)
    step = model.decode_step
    cache = PagedTestCache(model.kv_cache_spec(), num_blocks=96, block_size=4)
    seqs = list(range(MAX_ROWS + 1))
    cache.step([(s, [1, 2, 3]) for s in seqs])
    batch = cache.step([(s, [4]) for s in seqs], decode_only=True)
    assert step(batch.input_ids, batch.positions, cache.kv_caches, batch.meta) is None
    batch = cache.step([(0, [5])], decode_only=False)  # a 1-token prompt chunk, not a generated token
    assert step(batch.input_ids, batch.positions, cache.kv_caches, batch.meta) is None
    assert step(batch.input_ids, batch.positions, cache.kv_caches[:1], batch.meta) is None  # caches of another model
    dense = get_model(_model_config(str(tmp_path), "tiny.gguf", dtype=torch.bfloat16, quantization="none"), "cpu")
    assert dense.decode_step is None
    monkeypatch.setenv(ENV, "0")
    assert get_model(_model_config(str(tmp_path), "tiny.gguf", dtype=torch.bfloat16, quantization="gguf"),
                     "cpu").decode_step is None
