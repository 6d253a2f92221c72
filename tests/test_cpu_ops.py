"""Fused CPU ops (lmserve/model/layers/cpu_kernels/cpu_ops.c): RMSNorm and rotary equal their torch
reference ops (rotary bit for bit; RMSNorm to the last fp32 bits / one bf16 ulp), get_model attaches
them, and a model runs the same with and without them."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from lmserve.model.backends.elementwise import NativeRMSNorm, NativeRope, NativeSiluAndMul, TorchRope
from lmserve.model.layers.cpu_kernels import build
from lmserve.model.layers.activation import SiluAndMul
from lmserve.model.layers.cpu_kernels.cpu_ops import get_cpu_ops
from lmserve.model.layers.norm import RMSNorm
from lmserve.model.layers.rotary import RotaryEmbedding, RotaryInputs
from lmserve.model.loader import get_model
from tests.backend_utils import cpu_plan
from tests.model_utils import PagedTestCache, hf_logits, make_hf_model
from tests.test_model_llama import _assert_batched_runs_agree, _model_config, _run, _tokens

OPS = get_cpu_ops()
pytestmark = pytest.mark.skipif(OPS is None, reason="no C compiler (or LMSERVE_DISABLE_CPU_KERNELS=1)")
DTYPES = [torch.float32, torch.bfloat16]


def _assert_last_bit(got: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: within a few ulps (relative 2^-20: a row's scale may differ in its last bit, which
    moves the whole row); bf16: equal but for one ulp in a few elements."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    rtol = 2.0 ** -20 if ref.dtype == torch.float32 else 2.0 ** -7
    torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=1e-30)
    if ref.dtype == torch.bfloat16 and ref.numel():
        assert (got != ref).float().mean().item() < 0.05


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [0, 1, 7, 300])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, rows, with_residual):
    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm(200, eps=1e-5, dtype=dtype)
    norm.weight.data = torch.randn(200, generator=gen).to(dtype)
    x = (torch.randn(rows, 260, generator=gen) * 4).to(dtype)[:, 30:230]  # a strided row view
    res = torch.randn(rows, 200, generator=gen).to(dtype) if with_residual else None
    ref = norm(x, res)
    got = OPS.rms_norm(x, norm.weight, 1e-5, res)
    if with_residual:
        assert torch.equal(got[1], ref[1])  # x + residual: one rounding either way
        _assert_last_bit(got[0], ref[0])
    else:
        assert got[1] is None
        _assert_last_bit(got[0], ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [0, 1, 9, 300])
def test_rope_is_bit_identical_to_reference(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    hq, hkv, d = 6, 2, 32
    qkv = torch.randn(rows, (hq + 2 * hkv) * d, generator=gen).to(dtype)  # q, k: views into one row
    q = qkv[:, : hq * d].reshape(rows, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].reshape(rows, hkv, d)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    rot = RotaryEmbedding(d, 2048, inv_freq, 1.0, dtype)
    positions = torch.randint(0, 2048, (rows,), generator=gen)
    ref = RotaryInputs(rot.cos_sin_cache.index_select(0, positions), TorchRope()).rotate(q, k)
    got = RotaryInputs(rot.cos_sin_cache.index_select(0, positions), NativeRope(OPS)).rotate(q, k)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert got[0].is_contiguous() and got[1].is_contiguous()


@pytest.mark.skipif(OPS is None or not OPS.has_silu, reason="the fused SiLU needs AVX-512")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 40), (3, 576), (32, 4864), (0, 64)])
def test_silu_and_mul_matches_torch(dtype, rows, width):
    """silu(gate) * up with torch's roundings: bf16 equal to torch's two ops; fp32 within a few ulp
    (the exp is not torch's: 3 ulp with the multiply); a row stride wider than the row (a view) is read in place."""
    wide = (torch.randn(rows, 2 * width + 8, generator=torch.Generator().manual_seed(rows)) * 4).to(dtype)
    x = wide[:, :2 * width]  # rows 8 elements apart from their neighbours' ends
    if rows:
        x[0, :4] = torch.tensor([0.0, -90.0, 90.0, 1e-30]).to(dtype)
    fused = SiluAndMul()
    fused.backend = NativeSiluAndMul(OPS)
    got, ref = fused(x), SiluAndMul()(x)
    assert got.shape == ref.shape == (rows, width) and got.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=4e-7, atol=1e-37)


def test_kernels_decline_what_they_do_not_take():
    """float16, a strided last dim, mismatched shapes: the kernels return None; the plan never
    chooses them for such layers, and a native backend given one anyway raises."""
    h = torch.randn(3, 16, dtype=torch.float16)
    assert OPS.rms_norm(h, torch.ones(16, dtype=torch.float16), 1e-6) is None
    assert OPS.rms_norm(torch.randn(16, 6).t(), torch.ones(16), 1e-6) is None  # last dim strided
    wide = torch.randn(1, 16385)  # past the kernel's row buffer
    assert OPS.rms_norm(wide, torch.ones(16385), 1e-6) is None
    q, k = torch.randn(2, 4, 8), torch.randn(2, 2, 8)
    assert OPS.rope_neox(q, k, torch.randn(3, 8)) is None  # wrong row count
    plan = cpu_plan(torch.float16)
    assert plan.rms_norm(torch.float16, 16).backend == "torch"
    assert plan.rms_norm(torch.float32, 16385).backend == "torch"
    assert plan.rope(torch.float16, 64).backend == "torch"
    norm = RMSNorm(16, dtype=torch.float16)
    norm.backend = NativeRMSNorm(OPS)
    with pytest.raises(ValueError, match="declined"):
        norm(h)
    x3 = torch.randn(2, 3, 16)  # 3-D rows (per-head q/k norms) are flattened, not sent elsewhere
    norm32 = RMSNorm(16)
    norm32.weight.data = torch.randn(16)
    ref = norm32(x3)
    norm32.backend = NativeRMSNorm(OPS)
    _assert_last_bit(norm32(x3), ref)
    strided = torch.randn(16, 6).t()  # [6, 16] with a strided last dim: made dense by the backend
    _assert_last_bit(norm32(strided), RMSNorm(16)(strided) * norm32.weight)


def _llama(tmp_path):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    hf = make_hf_model(cfg, seed=11)
    hf.save_pretrained(str(tmp_path))
    return hf


def test_get_model_attaches_kernels_and_matches_hf(tmp_path, monkeypatch):
    """get_model gives every norm, the rotary and the SiLUs the kernels; logits still equal HF's, and equal
    the same model without the kernels over a batched chunked run."""
    hf = _llama(tmp_path)
    fused = get_model(_model_config(str(tmp_path)), "cpu")
    kinds = (RMSNorm, RotaryEmbedding, SiluAndMul)
    mods = [m for m in fused.modules() if isinstance(m, kinds)]
    assert len(mods) == 2 * 2 + 1 + 1 + 2
    native = (NativeRMSNorm, NativeRope, NativeSiluAndMul if OPS.has_silu else type(SiluAndMul().backend))
    assert all(isinstance(m.backend, native) for m in mods)
    toks = _tokens(23, 3)
    out = _run(fused, PagedTestCache(fused.kv_cache_spec()), [("a", toks)])["a"]
    ref = hf_logits(hf, toks)
    assert (out - ref).abs().max() < 1e-4 and torch.equal(out.argmax(-1), ref.argmax(-1))

    monkeypatch.setenv(build.DISABLE_ENV, "1")
    plain = get_model(_model_config(str(tmp_path)), "cpu")
    assert all(m.backend.name == "torch" for m in plain.modules() if isinstance(m, kinds))
    _assert_batched_runs_agree(fused, plain)
