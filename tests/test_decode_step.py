"""The native one-call decode step (``cpu_kernels/decode_step.c``) against the eager path it
replaces: tiny Llama / Qwen2 / Qwen3 (q/k norms) GGUFs kept quantized (Q4_0, Q4_1, Q8_0), decode steps of 1-4
sequences of different lengths over a paged cache with scattered blocks: equal bit for bit, in
bfloat16 and in float32 (the same kernels, the eager path's SiLU included); and bf16 safetensors
models on the bf16 panel GEMM (sbgemm, sbgemm_amx), steps of 1-20 sequences, K on and off the AMX
kernel's multiple of 32.
Also: which models get the step, and the calls it declines (the eager path then runs)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from lmserve.model.backends.decode_step import PANEL_MAX_ROWS, VNNI_MAX_ROWS as MAX_ROWS
from lmserve.model.backends.plan import DECODE_STEP_ENV as ENV
from lmserve.model.backends.plan import GEMM_ENV as BACKEND_ENV
from lmserve.model.layers.cpu_kernels.cpu_ops import get_cpu_ops
from lmserve.model.layers.cpu_kernels.decode_step import LlamaDecodeStep
from lmserve.model.layers.cpu_kernels.sgemm import get_kernel
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


_FOUR = [[0, 1, 2, 3], [1, 2, 3], [2], [0, 3]]
_TWENTY = [list(range(20)), list(range(3, 20)), [0, 4, 9, 19, 2], [7]]


def _run(model, use_step: bool, steps: int = 6, schedule=_FOUR, block_size: int = 4) -> list[torch.Tensor]:
    """Prefill prompts of different lengths, then decode steps of the live sequences in
    ``schedule`` (cycled; default 4, 3, 1 and 2 sequences); the hidden states of every decode step."""
    saved = model.decode_step
    if not use_step:
        model.decode_step = None
    try:
        n = 1 + max(max(live) for live in schedule)
        cache = PagedTestCache(model.kv_cache_spec(), num_blocks=48 * n, block_size=block_size, seed=1)
        prompts = {s: [(7 * s + 3 * j) % 96 for j in range(5 + 9 * (s % 5))] for s in range(n)}
        batch = cache.step(list(prompts.items()))
        model(batch.input_ids, batch.positions, cache.kv_caches, batch.meta)
        outs = []
        for i in range(steps):
            live = schedule[i % len(schedule)]
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


_PANELS = [name for name in ("sbgemm", "sbgemm_amx") if get_kernel(name) is not None]


@pytest.mark.skipif(not _PANELS, reason="no bf16 panel GEMM on this CPU (AVX512-BF16)")
@pytest.mark.parametrize("backend", _PANELS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("hidden,intermediate", [(128, 192), (112, 176)])  # K % 32 == 0 (AMX) and == 16 (AVX-512)
def test_bf16_panel_decode_step_equals_eager(tmp_path, monkeypatch, backend, arch, hidden, intermediate):
    monkeypatch.setenv(BACKEND_ENV, backend)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    shape = dict(_SHAPE, hidden_size=hidden, intermediate_size=intermediate)
    make_hf_model(cls(**shape, tie_word_embeddings=arch == "qwen2"), seed=4).save_pretrained(str(tmp_path))
    model = get_model(_model_config(str(tmp_path), None, dtype=torch.bfloat16), "cpu")
    assert model.model.layers[0].mlp.down_proj.backend.name == backend
    assert isinstance(model.decode_step, LlamaDecodeStep) and model.decode_step.max_rows == PANEL_MAX_ROWS
    fast, eager = _run(model, True, schedule=_TWENTY), _run(model, False, schedule=_TWENTY)
    for f, e in zip(fast, eager, strict=True):
        assert f.dtype == torch.bfloat16 and f.shape == e.shape
        assert torch.equal(f, e)


@pytest.mark.skipif("sbgemm_amx" not in _PANELS, reason="no AMX on this CPU")
def test_bf16_decode_step_with_amx_attention_equals_eager(tmp_path, monkeypatch):
    """7 query heads per KV head, head dim 64, blocks of 16: the step's attention runs on AMX tiles
    between the AMX GEMMs (both set their own tile shape); the same bits as the eager path."""
    from lmserve.model.layers.cpu_kernels.paged_attention import get_paged_attention_kernel

    attn_kernel = get_paged_attention_kernel()
    if attn_kernel is None or not attn_kernel.amx:
        pytest.skip("no AMX attention path")
    monkeypatch.setenv(BACKEND_ENV, "sbgemm_amx")
    shape = dict(_SHAPE, hidden_size=896, intermediate_size=192, num_attention_heads=14, num_key_value_heads=2,
                 num_hidden_layers=2)
    make_hf_model(Qwen2Config(**shape, tie_word_embeddings=True), seed=4).save_pretrained(str(tmp_path))
    model = get_model(_model_config(str(tmp_path), None, dtype=torch.bfloat16), "cpu")
    assert isinstance(model.decode_step, LlamaDecodeStep)
    fast = _run(model, True, schedule=_TWENTY, block_size=16)
    eager = _run(model, False, schedule=_TWENTY, block_size=16)
    for f, e in zip(fast, eager, strict=True):
        assert torch.isfinite(f.float()).all()
        assert torch.equal(f, e)


def test_decode_step_declines_and_is_optional(tmp_path, monkeypatch):
    """More than MAX_ROWS sequences, or a step with a prompt token, go to the eager path (the step
    does not take them, and refuses them if called); caches of another model are refused; a dense
    model, or LMSERVE_DECODE_STEP=0, gets no step at all."""
    model = _model(tmp_path, "llama", "Q4_1", torch.bfloat16)
    step = model.decode_step
    cache = PagedTestCache(model.kv_cache_spec(), num_blocks=96, block_size=4)
    seqs = list(range(MAX_ROWS + 1))
    cache.step([(s, [1, 2, 3]) for s in seqs])
    batch = cache.step([(s, [4]) for s in seqs], decode_only=True)
    assert not step.takes(batch.meta)
    with pytest.raises(ValueError, match="does not take"):
        step(batch.input_ids, batch.positions, cache.kv_caches, batch.meta)
    batch = cache.step([(0, [5])], decode_only=False)  # a 1-token prompt chunk, not a generated token
    assert not step.takes(batch.meta)
    with pytest.raises(ValueError, match="does not take"):
        step(batch.input_ids, batch.positions, cache.kv_caches, batch.meta)
    batch = cache.step([(0, [6])], decode_only=True)
    assert step.takes(batch.meta)
    with pytest.raises(ValueError, match="KV caches"):  # caches of another model
        step(batch.input_ids, batch.positions, cache.kv_caches[:1], batch.meta)
    dense = get_model(_model_config(str(tmp_path), "tiny.gguf", dtype=torch.float32, quantization="none"), "cpu")
    assert dense.decode_step is None  # fp32 dense weights: no panel kernel in the step
    dense = get_model(_model_config(str(tmp_path), "tiny.gguf", dtype=torch.bfloat16, quantization="none"), "cpu")
    assert (dense.decode_step is not None) == bool(_PANELS)
    monkeypatch.setenv(BACKEND_ENV, "onednn")
    dense = get_model(_model_config(str(tmp_path), "tiny.gguf", dtype=torch.bfloat16, quantization="none"), "cpu")
    assert dense.decode_step is None
    monkeypatch.delenv(BACKEND_ENV)
    monkeypatch.setenv(ENV, "0")
    assert get_model(_model_config(str(tmp_path), "tiny.gguf", dtype=torch.bfloat16, quantization="gguf"),
                     "cpu").decode_step is None
