"""bf16x3 fp32 linears on AMX (sgemm.AmxBf16x3Gemm, sbgemm_amx.c's lms_sbgemm_amx_x3): accuracy
against a float64 reference (far closer than one bf16 product, within the stated 2^-16 class),
batch invariance, the plan's rule (only when named by LMSERVE_CPU_GEMM=bf16x3_amx, fp32 weights with
K % 32 == 0 on an AMX CPU) and a BERT encoder on it against HF and the fp32 path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig

from lmserve.model.backends.cpu_features import CpuFeatures
from lmserve.model.backends.plan import BackendPlan, KernelSettings
from lmserve.model.layers.cpu_kernels.sgemm import get_bf16x3_kernel
from tests.model_utils import randomize_parameters

SPR = CpuFeatures(avx2_fma=True, avx512=True, avx512_vnni=True, avx512_bf16=True, amx_bf16=True)
ZEN4 = CpuFeatures(avx2_fma=True, avx512=True, avx512_vnni=True, avx512_bf16=True, amx_bf16=False)
KERNEL = get_bf16x3_kernel()
needs_amx = pytest.mark.skipif(KERNEL is None, reason="no AMX-BF16 kernel on this machine")


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@needs_amx
@pytest.mark.parametrize("rows,n,k", [(1, 64, 32), (17, 100, 384), (33, 384, 1536), (300, 1152, 384)])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16x3_close_to_fp64_and_far_better_than_bf16(rows, n, k, bias):
    gen = torch.Generator().manual_seed(rows + n)
    w = torch.randn(n, k, generator=gen) * 0.05
    x = torch.randn(rows, k + 16, generator=gen)[:, 3:3 + k]  # row stride > K
    b = torch.randn(n, generator=gen) if bias else None
    y = KERNEL.matmul(x, KERNEL.pack(w), n, b)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    bf16 = F.linear(x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16())
    assert _rel_err(y, ref) < 2 ** -16
    assert _rel_err(y, ref) < _rel_err(bf16, ref) / 50
    torch.testing.assert_close(KERNEL.unpack(KERNEL.pack(w), n), w, atol=1e-6, rtol=2 ** -15)


@needs_amx
def test_bf16x3_rows_do_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(200, 64, generator=gen), torch.randn(70, 64, generator=gen)
    packed = KERNEL.pack(w)
    whole = KERNEL.matmul(x, packed, 200, None)
    for lo, hi in ((0, 1), (5, 38), (40, 70)):
        assert torch.equal(KERNEL.matmul(x[lo:hi], packed, 200, None), whole[lo:hi])


def test_plan_rule():
    named = BackendPlan.simulated(SPR, torch.float32, KernelSettings(gemm="bf16x3_amx"))
    assert named.linear(torch.float32, 384).backend == "bf16x3_amx"
    assert named.linear(torch.bfloat16, 384).backend == "torch"
    assert "K % 32" in named.linear(torch.float32, 48).reason
    assert BackendPlan.simulated(ZEN4, torch.float32, KernelSettings(gemm="bf16x3_amx")).linear(
        torch.float32, 384).backend == "torch"  # no AMX
    assert BackendPlan.simulated(SPR, torch.float32).linear(torch.float32, 384).backend == "onednn"  # never auto


@needs_amx
def test_bert_encoder_on_bf16x3_matches_hf(tmp_path, monkeypatch):
    """hidden 64 (K % 32 == 0) under LMSERVE_CPU_GEMM=bf16x3_amx: every BERT linear on bf16x3, last
    hidden states within 1e-4 of HF (the default fp32 path, oneDNN: 1e-5)."""
    from transformers import BertModel as HFBertModel

    from lmserve.model.loader import get_model
    from tests.test_model_bert import _pooling_config, whole_prompts_batch
    from lmserve.model.models.bert import BertModel

    config = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, type_vocab_size=2,
                        architectures=["BertModel"])
    torch.manual_seed(0)
    hf = HFBertModel(config).eval()
    randomize_parameters(hf, seed=0, std=0.1)
    hf.save_pretrained(str(tmp_path))
    prompts = [[1, 2, 3, 4, 5, 6, 7], list(range(10, 40)), [9]]
    ids, pos, meta = whole_prompts_batch(prompts)
    outputs = {}
    for gemm in ("bf16x3_amx", "auto"):
        monkeypatch.setenv("LMSERVE_CPU_GEMM", gemm)
        model = get_model(_pooling_config(str(tmp_path), BertModel), "cpu")
        names = {m.backend.name for m in model.modules() if hasattr(m, "backend")}
        assert names == ({"bf16x3_amx"} if gemm == "bf16x3_amx" else {"onednn"})
        outputs[gemm] = model(ids, pos, [], meta)
    start = 0
    for p in prompts:
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([p])).last_hidden_state[0]
        torch.testing.assert_close(outputs["auto"][start:start + len(p)], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs["bf16x3_amx"][start:start + len(p)], ref, atol=1e-4, rtol=1e-4)
        start += len(p)
