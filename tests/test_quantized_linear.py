"""Weight-only quantized layers (``lmserve.model.layers.quantized_linear``): llama.cpp blocks
unpacked exactly, torch's int4 CPU kernel's dequantization rule, the VNNI GEMV (AVX-512 VNNI
CPUs) against its exact definition, and the int path of every module against a reference matmul
with the weight ``gguf.quants.dequantize`` gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")

from lmserve.model.backends.block_formats import BLOCK_BYTES, BlockQuantizedWeight  # noqa: E402
from lmserve.model.backends.quantized import MAX_ROWS, BlockQuantLinear, PackedWeight, VnniWeight  # noqa: E402
from lmserve.model.layers.cpu_kernels.build import DISABLE_ENV  # noqa: E402
from lmserve.model.layers.cpu_kernels.cpu_ops import get_cpu_ops  # noqa: E402
from lmserve.model.layers.linear import Linear, MergedLinear, VocabEmbedding  # noqa: E402
from lmserve.model.layers.quantized_linear import (  # noqa: E402
    QuantizedEmbedding, QuantizedLinear, QuantizedMergedLinear, quantized_module_for)
from tests.backend_utils import bind  # noqa: E402

QTYPES = ["Q4_0", "Q4_1", "Q8_0"]
_OPS = get_cpu_ops()
needs_vnni = pytest.mark.skipif(_OPS is None or not _OPS.has_qgemv,
                                   reason="the VNNI GEMV needs AVX-512 VNNI and a C compiler")


def bound(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its backends bound as a model's would be, but the dense path on ``F.linear``
    (these tests hold the dense path to the dequantized model's exact matmul)."""
    if isinstance(module, VocabEmbedding):  # a table binds as a tied lm_head
        holder = torch.nn.Module()
        holder.lm_head = module
        bind(holder, module.weight.dtype, gemm="torch")
    else:
        bind(module, gemm="torch")
    return module


@pytest.fixture
def torch_int4_path(monkeypatch):
    """Modules pack for torch's int4 kernel even where the VNNI GEMV exists."""
    monkeypatch.setenv(DISABLE_ENV, "1")


def make_blocks(qtype: str, n: int, k: int, seed: int = 0) -> tuple[BlockQuantizedWeight, torch.Tensor]:
    """Random weights [n, k] quantized by gguf -> (our blocks, gguf's own dequantization, float32)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05 + rng.standard_normal((n, 1)) * 0.01).astype(np.float32)
    gtype = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(w, gtype)  # uint8 [n, k / 32 * bytes]
    ref = torch.from_numpy(gguf.quants.dequantize(raw, gtype).reshape(n, k).astype(np.float32))
    blocks = torch.from_numpy(np.ascontiguousarray(raw)).reshape(n, k // 32, BLOCK_BYTES[qtype])
    return BlockQuantizedWeight(qtype, blocks), ref


def _ref_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


def _assert_close_to_ref(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: accumulation order only; bf16: the rounding of the activations' scales and zeros
    (2^-9 relative per block) and of the output (2^-9 relative), against the output's scale."""
    scale = ref.abs().max().item()
    tol = 5e-6 if dtype == torch.float32 else 8e-3  # observed: 7e-7 and 4.5e-3 (a dense bf16 matmul: 3e-3)
    err = (y.double() - ref).abs().max().item()
    assert err <= tol * scale, (err, scale)


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_is_bit_equal_to_gguf(qtype):
    blocks, ref = make_blocks(qtype, 48, 96)
    assert blocks.shape == (48, 96)
    assert torch.equal(blocks.dequantize(), ref)
    q, d, m = blocks.unpack()
    assert q.shape == (48, 96) and d.shape == (48, 3) and (m is None) == (qtype != "Q4_1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_dequantization_rule(dtype):
    """torch's CPU int4 kernel computes w = (q - 8) * scale + zero per group, scales_and_zeros
    [K/group, N, 2] in the activation dtype (the rule every layout here relies on)."""
    gen = torch.Generator().manual_seed(1)
    n, k, group = 32, 128, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    sz = (torch.randn(k // group, n, 2, generator=gen) * 0.1).to(dtype)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    x = torch.randn(3, k, generator=gen).to(dtype)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    scale = sz[..., 0].double().repeat_interleave(group, 0).T  # [n, k]
    zero = sz[..., 1].double().repeat_interleave(group, 0).T
    ref = x.double() @ ((q.double() - 8) * scale + zero).T
    rtol = 1e-6 if dtype == torch.float32 else 2 ** -8  # bf16: the output's rounding
    assert ((y.double() - ref).abs() <= rtol * ref.abs() + 1e-5).all()


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_packed_weight_matches_dequantized_reference(qtype, dtype, rows):
    """The int path, whatever the row count (the kernel works for any M; dispatch is separate)."""
    blocks, ref_w = make_blocks(qtype, 64, 192, seed=rows)
    packed = PackedWeight.from_blocks([blocks], dtype)
    assert packed.layout == ("q8x2" if qtype == "Q8_0" else "int4")
    x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = packed(x)
    assert y.shape == (rows, 64) and y.dtype == dtype
    _assert_close_to_ref(y, _ref_matmul(x, ref_w), dtype)


def test_q8_0_split_is_exact_in_float32():
    """Q8_0 as two int4 halves along a doubled K: with fp32 scales it equals d * q up to fp32
    accumulation (no information lost, unlike a per-row int8 requantization)."""
    blocks, ref_w = make_blocks("Q8_0", 32, 64, seed=3)
    packed = PackedWeight.from_blocks([blocks], torch.float32)
    eye = torch.eye(64)  # rows of the identity read the weight back column by column
    torch.testing.assert_close(packed(eye).T, ref_w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_quantized_linear_bf16_with_bias(qtype, rows):
    blocks, ref_w = make_blocks(qtype, 96, 128, seed=4)
    lin = QuantizedLinear.from_linear(Linear(128, 96, bias=True, dtype=torch.bfloat16))
    lin.bias.data.copy_(torch.linspace(-1, 1, 96))
    lin.load_quantized(blocks)
    bound(lin)
    assert torch.equal(lin.weight, ref_w.bfloat16())  # the dense copy is the dequantized weight
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(5)).bfloat16()
    y = lin(x, decode_only=True)
    _assert_close_to_ref(y, _ref_matmul(x, ref_w, lin.bias), torch.bfloat16)
    if rows > lin.backend.qweight.max_rows:  # the dense path: exactly the dequantized model's matmul
        assert torch.equal(y, F.linear(x, lin.weight, lin.bias))


def test_output_rows_padded_to_kernel_multiple(torch_int4_path):
    """The kernel wants N % 16 == 0: other N are padded with zero rows and cut off."""
    blocks, ref_w = make_blocks("Q4_1", 40, 64, seed=6)
    lin = QuantizedLinear.from_linear(Linear(64, 40, dtype=torch.bfloat16))
    lin.load_quantized(blocks)
    bound(lin)
    assert lin.backend.qweight.packed.shape[0] == 48
    x = torch.randn(2, 64).bfloat16()
    y = lin(x, decode_only=True)
    assert y.shape == (2, 40)
    _assert_close_to_ref(y, _ref_matmul(x, ref_w), torch.bfloat16)


def test_dispatch_crossover(monkeypatch, torch_int4_path):
    """At most ``max_rows`` rows of a decode-only step -> the int kernel (bf16, and fp32 rows rounded
    to bf16 for it); more rows, or a step with prompt tokens -> the dense weight (F.linear, equal
    to the dequantized model)."""
    calls = []
    orig = PackedWeight.forward
    monkeypatch.setattr(PackedWeight, "forward", lambda self, x: calls.append(x.shape[0]) or orig(self, x))
    for qtype in ("Q4_1", "Q8_0"):
        blocks, ref_w = make_blocks(qtype, 32, 64)
        lin = QuantizedLinear.from_linear(Linear(64, 32, dtype=torch.bfloat16))
        lin.load_quantized(blocks)
        bound(lin)
        limit = MAX_ROWS["q8x2" if qtype == "Q8_0" else "int4"]
        assert lin.backend.qweight.max_rows == limit
        calls.clear()
        lin(torch.randn(limit, 64).bfloat16(), decode_only=True)
        assert calls == [limit]
        x = torch.randn(limit + 1, 64).bfloat16()
        assert torch.equal(lin(x, decode_only=True), F.linear(x, lin.weight)) and calls == [limit]
        x = torch.randn(1, 64).bfloat16()  # a step with prompt tokens: always the dense weight
        assert torch.equal(lin(x), F.linear(x, lin.weight)) and calls == [limit]
        f32 = QuantizedLinear.from_linear(Linear(64, 32, dtype=torch.float32))
        f32.load_quantized(blocks)
        bound(f32)
        assert f32.backend.qweight.scales_zeros.dtype == torch.bfloat16
        x = torch.randn(1, 64)
        assert torch.equal(f32(x), F.linear(x, f32.weight)) and calls == [limit]
        y = f32(x, decode_only=True)
        assert calls == [limit, 1] and y.dtype == torch.float32
        _assert_close_to_ref(y, _ref_matmul(x.bfloat16().float(), ref_w), torch.bfloat16)
    # 3-D inputs are flattened to rows and back
    y = lin(torch.randn(1, 1, 64).bfloat16(), decode_only=True)
    assert y.shape == (1, 1, 32)


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_merged_q4_shards_pack_together(rows):
    """Q/K/V shards of different Q4 formats load shard by shard into one int4 matmul; split works."""
    parts = [make_blocks("Q4_1", 64, 128, seed=7), make_blocks("Q4_0", 32, 128, seed=8),
             make_blocks("Q4_1", 32, 128, seed=9)]
    merged = QuantizedMergedLinear.from_merged(MergedLinear(128, [64, 32, 32], ["q", "k", "v"], bias=True,
                                                            dtype=torch.bfloat16))
    for shard, (blocks, _) in zip("qkv", parts):
        merged.load_shard("bias", shard, torch.full((blocks.shape[0],), 0.5))
        merged.load_shard("weight", shard, blocks)
    bound(merged)
    assert isinstance(merged.backend, BlockQuantLinear) and merged.backend.qweight.out_features == 128
    ref_w = torch.cat([r for _, r in parts])
    assert torch.equal(merged.weight, ref_w.bfloat16())
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(10)).bfloat16()
    y = merged(x, decode_only=True)
    _assert_close_to_ref(y, _ref_matmul(x, ref_w, merged.bias), torch.bfloat16)
    q, k, v = merged.split(y)
    assert (q.shape[-1], k.shape[-1], v.shape[-1]) == (64, 32, 32)
    _assert_close_to_ref(k, _ref_matmul(x, parts[1][1], merged.bias[64:96]), torch.bfloat16)


def test_merged_q8_0_shards(torch_int4_path):
    parts = [make_blocks("Q8_0", 48, 64, seed=11), make_blocks("Q8_0", 48, 64, seed=12)]
    merged = QuantizedMergedLinear(64, [48, 48], ["gate", "up"], dtype=torch.bfloat16)
    for shard, (blocks, _) in zip(["gate", "up"], parts):
        merged.load_shard("weight", shard, blocks)
    assert bound(merged).backend.qweight.layout == "q8x2"
    x = torch.randn(2, 64).bfloat16()
    _assert_close_to_ref(merged(x, decode_only=True), _ref_matmul(x, torch.cat([r for _, r in parts])),
                         torch.bfloat16)


def test_merged_mixed_formats_stay_dense():
    """Q8_0 mixed with Q4_* (different layouts), or a dense shard: the module stays dense (and exact)."""
    for second in ("Q8_0", None):
        merged = QuantizedMergedLinear(64, [32, 32], ["gate", "up"], dtype=torch.bfloat16)
        a, ref_a = make_blocks("Q4_1", 32, 64)
        merged.load_shard("weight", "gate", a)
        if second is None:
            ref_b = torch.randn(32, 64)
            merged.load_shard("weight", "up", ref_b)
        else:
            b, ref_b = make_blocks(second, 32, 64)
            merged.load_shard("weight", "up", b)
        assert not isinstance(bound(merged).backend, BlockQuantLinear)
        assert torch.equal(merged.weight, torch.cat([ref_a, ref_b]).bfloat16())


def test_quantized_embedding_lookup_and_tied_head():
    blocks, ref_w = make_blocks("Q8_0", 80, 64, seed=13)
    emb = quantized_module_for(VocabEmbedding(80, 64, dtype=torch.bfloat16))
    assert isinstance(emb, QuantizedEmbedding)
    emb.load_quantized(blocks)
    bound(emb)
    ids = torch.tensor([0, 5, 79, 5])
    assert torch.equal(emb(ids), ref_w.bfloat16()[ids])  # lookups read the exact dequantized table
    h = torch.randn(2, 64).bfloat16()
    _assert_close_to_ref(emb.project(h), _ref_matmul(h, ref_w), torch.bfloat16)
    many = torch.randn(40, 64).bfloat16()
    assert torch.equal(emb.project(many), F.linear(many, emb.weight))


def test_quantized_module_for_shares_parameters():
    lin = Linear(64, 32, bias=True, dtype=torch.bfloat16)
    q = quantized_module_for(lin)
    assert isinstance(q, QuantizedLinear) and q.weight is lin.weight and q.bias is lin.bias
    assert quantized_module_for(q) is q
    merged = MergedLinear(64, [32, 32], ["gate", "up"])
    qm = quantized_module_for(merged)
    assert isinstance(qm, QuantizedMergedLinear) and qm.weight is merged.weight and qm.shard_names == ["gate", "up"]
    assert quantized_module_for(torch.nn.LayerNorm(4)) is None


def test_block_shape_validation():
    with pytest.raises(ValueError, match="Q4_1 blocks"):
        BlockQuantizedWeight("Q4_1", torch.zeros(4, 2, 18, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unsupported"):
        BlockQuantizedWeight("Q5_0", torch.zeros(4, 2, 22, dtype=torch.uint8))
    lin = QuantizedLinear(64, 32, dtype=torch.bfloat16)
    blocks, _ = make_blocks("Q4_0", 16, 64)
    with pytest.raises(ValueError, match="checkpoint shape"):
        lin.load_quantized(blocks)


# ---- the VNNI GEMV (cpu_ops.c) --------------------------------------------------------------

QSCALE = 16256.0  # cpu_ops.c's LMS_QSCALE: activations quantized to |q| <= 127 * 128


def _quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the kernel sees it: per block of 32, q = round_half_even(x * 16256 / max|x|),
    times max|x| / 16256 (float64)."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, QSCALE / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv)  # fp32 product, rounded half to even like VCVTPS2DQ
    return (q.double() * (amax / QSCALE).double()).reshape(x.shape)


@needs_vnni
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("k", [192, 256, 320])
def test_int8dot_equals_its_definition(qtype, dtype, rows, k):
    """The kernel computes (exact weight) . (15-bit-quantized x) in fp32: equal to that product in
    float64 up to fp32 accumulation (bf16: the output's rounding); and within the quantization's
    own bound, sum_k |w| max|x_block| / 32512, of the product with the unquantized x. K = 192 and
    320: one group of 4 blocks and a last one of 2; two full groups and a last one of 2."""
    blocks, ref_w = make_blocks(qtype, 80, k, seed=rows)
    packed = VnniWeight.from_blocks([blocks], _OPS)
    assert packed is not None and packed.layout == "vnni"
    x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(3)) * 2).to(dtype)
    x[0, :32] = 0  # an all-zero block: scale 0
    y = packed(x)
    assert y.shape == (rows, 80) and y.dtype == dtype
    exact = _quantized_activations(x) @ ref_w.double().T
    rtol = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert ((y.double() - exact).abs() <= rtol * exact.abs() + 1e-5).all()
    amax = x.double().reshape(rows, -1, 32).abs().amax(-1)  # [rows, K/32]
    bound = (amax / (2 * QSCALE)) @ ref_w.double().abs().reshape(80, -1, 32).sum(-1).T
    assert ((y.double() - _ref_matmul(x, ref_w)).abs() <= bound * 1.01 + rtol * exact.abs() + 1e-5).all()


@needs_vnni
def test_int8dot_packing_and_dispatch():
    """Modules pack for the VNNI kernel where it applies: K a multiple of 64 and one layout;
    K = 96 keeps torch's int4 packing; more than max_rows rows take the dense weight; merged Q4
    shards of both formats share one kernel, and Q8_0 shards another."""
    blocks, ref_w = make_blocks("Q4_1", 48, 128)
    lin = QuantizedLinear.from_linear(Linear(128, 48, dtype=torch.bfloat16))
    lin.load_quantized(blocks)
    bound(lin)
    assert isinstance(lin.backend.qweight, VnniWeight) and lin.backend.qweight.max_rows == MAX_ROWS["vnni"]
    x = torch.randn(MAX_ROWS["vnni"] + 1, 128).bfloat16()
    assert torch.equal(lin(x, decode_only=True), F.linear(x, lin.weight))
    odd, _ = make_blocks("Q4_1", 48, 96)
    lin96 = QuantizedLinear.from_linear(Linear(96, 48, dtype=torch.bfloat16))
    lin96.load_quantized(odd)
    bound(lin96)
    assert isinstance(lin96.backend.qweight, PackedWeight)
    parts = [make_blocks("Q4_1", 64, 128, seed=7), make_blocks("Q4_0", 32, 128, seed=8)]
    merged = QuantizedMergedLinear(128, [64, 32], ["q", "k"], dtype=torch.bfloat16)
    for shard, (b, _) in zip("qk", parts):
        merged.load_shard("weight", shard, b)
    assert isinstance(bound(merged).backend.qweight, VnniWeight) and merged.backend.qweight.nibbles
    x = torch.randn(2, 128).bfloat16()
    _assert_close_to_ref(merged(x, decode_only=True), _ref_matmul(x, torch.cat([r for _, r in parts])),
                         torch.bfloat16)
    q8 = [make_blocks("Q8_0", 48, 128, seed=11), make_blocks("Q8_0", 48, 128, seed=12)]
    merged8 = QuantizedMergedLinear(128, [48, 48], ["gate", "up"], dtype=torch.bfloat16)
    for shard, (b, _) in zip(["gate", "up"], q8):
        merged8.load_shard("weight", shard, b)
    assert isinstance(bound(merged8).backend.qweight, VnniWeight) and not merged8.backend.qweight.nibbles
    _assert_close_to_ref(merged8(x, decode_only=True), _ref_matmul(x, torch.cat([r for _, r in q8])),
                         torch.bfloat16)
    w, bias = merged8.backend.qweight, torch.randn(96).bfloat16()  # a bias goes on after the product's rounding
    assert torch.equal(_OPS.qgemv(x, w.qw, w.d, w.m, w.nibbles, bias), w(x) + bias)
