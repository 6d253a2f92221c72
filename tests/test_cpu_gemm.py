"""Prepacked CPU linears (lmserve/model/layers/cpu_gemm.py, cpu_kernels/sgemm.c, sbgemm.c, sbgemm_amx.h): every backend
equals F.linear, applied by get_model to every dense matmul, freeing the dense copy, off where they do not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config

from lmserve.config import cpu_has_fast_bf16
from lmserve.model.backends.cpu_features import CpuFeatures
from lmserve.model.backends.linear import PrepackedLinear, TorchLinear
from lmserve.model.backends.plan import BackendPlan
from lmserve.model.layers.cpu_kernels.build import DISABLE_ENV
from lmserve.model.layers.cpu_kernels.sgemm import PANEL_KERNELS as KERNEL_NAMES, get_kernel, get_sbgemm_kernel
from lmserve.model.layers.linear import Linear, VocabEmbedding
from lmserve.model.loader import get_model
from tests.backend_utils import bind, cpu_plan, pack_weight
from tests.model_utils import PagedTestCache, hf_logits, make_hf_model
from tests.test_model_llama import _assert_batched_runs_agree, _model_config, _run, _tokens

pytestmark = pytest.mark.skipif(torch.float32 not in cpu_plan().onednn_dtypes,
                                reason="torch without oneDNN (or LMSERVE_DISABLE_CPU_KERNELS=1)")


PANEL_KERNELS = [(name, kernel.dtype) for name in KERNEL_NAMES if (kernel := get_kernel(name)) is not None]
BACKENDS = [("onednn", torch.float32)] + ([("onednn", torch.bfloat16)] if cpu_has_fast_bf16() else []) + PANEL_KERNELS


def _assert_linear_close(y, x, w, b):
    """fp32: F.linear's result to fp32 rounding; bf16: the exact product of the bf16 inputs, rounded
    once to bf16 (within one bf16 rounding, 2^-8 relative)."""
    if y.dtype == torch.float32:
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    else:
        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        torch.testing.assert_close(y.double(), ref, rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("rows", [0, 1, 3, 7, 17, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [96, 98])  # the AMX kernel's K steps of 32, and K it hands to the AVX-512 one
def test_packed_linear_matches_f_linear(backend, dtype, rows, bias, k):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(200, k, generator=gen).to(dtype)  # 200 = 12 full 16-column panels + a partial one (3 + 1 of 64)
    b = torch.randn(200, generator=gen).to(dtype) if bias else None
    x = torch.randn(rows, k, generator=gen).to(dtype)
    packed = pack_weight(w, backend)
    assert packed.backend == backend and packed.shape == w.shape and packed.dtype == dtype
    _assert_linear_close(packed.linear(x, b), x, w, b)
    # leading dims and a non-contiguous input (a transposed view) are taken as F.linear takes them
    x3 = torch.randn(2, k, rows, generator=gen).to(dtype).transpose(1, 2)
    _assert_linear_close(packed.linear(x3, b), x3, w, b)
    assert torch.equal(packed.to_dense(), w)


@pytest.mark.skipif(not PANEL_KERNELS, reason="no panel kernel applies to this CPU")
@pytest.mark.parametrize("backend,dtype", PANEL_KERNELS)
@pytest.mark.parametrize("n", [130, 40, 600])  # 40: fewer column blocks than 2 per thread, so threads split rows too
def test_panel_kernel_rows_are_batch_invariant(backend, dtype, n):
    """A row's output is bit-identical whatever the batch around it and the thread count (one
    fixed-order sum per element)."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(n, 320, generator=gen).to(dtype), torch.randn(40, 320, generator=gen).to(dtype)
    packed = pack_weight(w, backend)
    full = packed.linear(x, None)
    for rows in (slice(0, 1), slice(5, 12), slice(17, 40), slice(3, 35)):
        assert torch.equal(packed.linear(x[rows], None), full[rows])
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 3, 8):  # more threads than cores: descheduled ones get their blocks taken (stealing)
            torch.set_num_threads(n_threads)
            for _ in range(5):
                assert torch.equal(packed.linear(x, None), full)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend,dtype", PANEL_KERNELS)
def test_panel_kernel_writes_into_a_column_slice(backend, dtype):
    """``matmul(..., out=view)`` writes the product into a column slice of a wider matrix (its row
    stride) and nothing else; a wrongly shaped ``out`` is refused."""
    kernel = get_kernel(backend)
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=gen).to(dtype), torch.randn(7, 64, generator=gen).to(dtype)
    panels = kernel.pack(w)
    wide = torch.full((7, 200), 3.0, dtype=dtype)
    kernel.matmul(x, panels, 96, None, out=wide[:, 50:146])
    assert torch.equal(wide[:, 50:146], kernel.matmul(x, panels, 96, None))
    assert (wide[:, :50] == 3).all() and (wide[:, 146:] == 3).all()
    with pytest.raises(ValueError, match="out must be"):
        kernel.matmul(x, panels, 96, None, out=wide[:, :95])


@pytest.mark.skipif(get_sbgemm_kernel() is None, reason="no AVX512-BF16")
def test_sbgemm_does_not_take_odd_k_which_goes_to_onednn():
    w = torch.randn(8, 33).bfloat16()
    assert pack_weight(w, "sbgemm") is None and pack_weight(w, "sbgemm_amx") is None
    assert pack_weight(w).backend == "onednn"
    assert pack_weight(torch.randn(8, 34).bfloat16()).backend == get_sbgemm_kernel().name


def _tied_qwen2(tmp_path):
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    hf = make_hf_model(cfg, seed=7)
    hf.save_pretrained(str(tmp_path))
    return hf


def test_get_model_prepacks_and_frees_dense_weights(tmp_path):
    """Every Linear and the tied head are packed; a packed Linear holds no dense weight, and its
    ``dense_weight()`` is the checkpoint's; logits still equal HF's."""
    hf = _tied_qwen2(tmp_path)
    ours = get_model(_model_config(str(tmp_path)), "cpu")
    linears = [m for m in ours.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.backend, PrepackedLinear) and m.weight.numel() == 0 for m in linears)
    head = ours.lm_head
    assert isinstance(head, VocabEmbedding) and isinstance(head.head_backend, PrepackedLinear)
    assert head.weight.shape == (128, 64)  # the table stays for lookups
    state = hf.state_dict()
    assert torch.equal(ours.model.layers[0].self_attn.o_proj.dense_weight(),
                       state["model.layers.0.self_attn.o_proj.weight"])
    toks = _tokens(23, 3)
    out = _run(ours, PagedTestCache(ours.kv_cache_spec()), [("a", toks)])["a"]
    ref = hf_logits(hf, toks)
    assert (out - ref).abs().max() < 1e-4
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_packed_and_reference_paths_agree(tmp_path, monkeypatch):
    """The same checkpoint with and without prepacking gives the same greedy tokens over a
    batched chunked run (the fast path and the eager path are equal)."""
    _tied_qwen2(tmp_path)
    packed = get_model(_model_config(str(tmp_path)), "cpu")
    monkeypatch.setenv(DISABLE_ENV, "1")
    plain = get_model(_model_config(str(tmp_path)), "cpu")
    assert all(isinstance(m.backend, TorchLinear) for m in plain.modules() if isinstance(m, Linear))
    assert isinstance(plain.lm_head.head_backend, TorchLinear)
    _assert_batched_runs_agree(packed, plain)


def test_not_packed_where_it_does_not_apply():
    """bf16 only on a CPU with native bf16; fp16 never; a model's layers are bound once."""
    avx2 = BackendPlan.simulated(CpuFeatures(avx2_fma=True), torch.bfloat16)
    assert avx2.linear(torch.bfloat16, 64).backend == "torch"
    assert avx2.linear(torch.float16, 64).backend == "torch"
    assert avx2.linear(torch.float32, 64).backend == "sgemm"
    zen4 = BackendPlan.simulated(CpuFeatures(avx2_fma=True, avx512=True, avx512_bf16=True), torch.bfloat16)
    assert zen4.linear(torch.bfloat16, 64).backend == "sbgemm"
    assert zen4.linear(torch.float16, 64).backend == "torch"

    lin = Linear(8, 4, dtype=torch.float32)
    torch.nn.init.normal_(lin.weight)
    wrapper = torch.nn.Sequential(lin)
    table = bind(wrapper)
    assert table.backends("linear") == {lin.backend.name} and isinstance(lin.backend, PrepackedLinear)
    with pytest.raises(ValueError, match="already"):
        bind(wrapper)
