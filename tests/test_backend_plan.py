"""The backend plan: which backend each layer gets, per CPU feature set (simulated), dtype and
setting; the simulation agrees with the kernels that load on this machine; get_model logs the
choices as one table."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from transformers import Qwen2Config

from lmserve.model.backends.cpu_features import CpuFeatures, native_kernels_for
from lmserve.model.backends.plan import BackendPlan, KernelSettings, NativeKernels
from lmserve.model.loader import get_model
from lmserve.model.loader.binding import bind_backends
from lmserve.model.models.llama import LlamaForCausalLM
from tests.model_utils import make_hf_model
from tests.test_model_llama import _model_config

ZEN3 = CpuFeatures(avx2_fma=True)
ZEN4 = CpuFeatures(avx2_fma=True, avx512=True, avx512_vnni=True, avx512_bf16=True)
SAPPHIRE_RAPIDS = CpuFeatures(avx2_fma=True, avx512=True, avx512_vnni=True, avx512_bf16=True, amx_bf16=True)
NO_AVX2 = CpuFeatures()


def _model(dtype: torch.dtype, **overrides) -> LlamaForCausalLM:
    cfg = Qwen2Config(vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, **overrides)
    return LlamaForCausalLM(cfg, dtype)


def _table(features: CpuFeatures, dtype: torch.dtype, **settings) -> dict[str, set[str]]:
    plan = BackendPlan.simulated(features, dtype, KernelSettings(**settings))
    table = bind_backends(_model(dtype), plan, apply=False)
    return {op: table.backends(op) for op in ("linear", "lm_head", "rms_norm", "rope", "silu_and_mul", "attention",
                                              "decode_step")}


# (features, dtype) -> expected backend per op
EXPECTED = {
    (ZEN3, torch.float32): dict(linear={"sgemm"}, lm_head={"sgemm"}, rms_norm={"native"}, rope={"native"},
                                silu_and_mul={"torch"}, attention={"native"}, decode_step={"eager"}),
    (ZEN3, torch.bfloat16): dict(linear={"torch"}, lm_head={"torch"}, rms_norm={"native"}, rope={"native"},
                                 silu_and_mul={"torch"}, attention={"native"}, decode_step={"eager"}),
    (ZEN4, torch.float32): dict(linear={"onednn"}, lm_head={"onednn"}, rms_norm={"native"}, rope={"native"},
                                silu_and_mul={"native"}, attention={"native"}, decode_step={"eager"}),
    (ZEN4, torch.bfloat16): dict(linear={"sbgemm"}, lm_head={"sbgemm"}, rms_norm={"native"}, rope={"native"},
                                 silu_and_mul={"native"}, attention={"native"}, decode_step={"native"}),
    (SAPPHIRE_RAPIDS, torch.bfloat16): dict(linear={"sbgemm_amx"}, lm_head={"sbgemm_amx"}, rms_norm={"native"},
                                            rope={"native"}, silu_and_mul={"native"},
                                            attention={"native + AMX chunks"}, decode_step={"native"}),
    (SAPPHIRE_RAPIDS, torch.float32): dict(linear={"onednn"}, lm_head={"onednn"}, rms_norm={"native"},
                                           rope={"native"}, silu_and_mul={"native"}, attention={"native"},
                                           decode_step={"eager"}),
    (NO_AVX2, torch.float32): dict(linear={"onednn"}, lm_head={"onednn"}, rms_norm={"native"}, rope={"native"},
                                   silu_and_mul={"torch"}, attention={"native"}, decode_step={"eager"}),
}


@pytest.mark.parametrize("features,dtype", list(EXPECTED), ids=lambda v: getattr(v, "__name__", str(v)))
def test_choice_per_cpu_feature_set(features, dtype):
    assert _table(features, dtype) == EXPECTED[(features, dtype)]


def test_settings_switch_backends():
    """Kernels off: every layer on torch; a named GEMM where it applies, torch where it does not;
    no decode step when switched off."""
    off = _table(SAPPHIRE_RAPIDS, torch.bfloat16, native=False)
    assert all(b <= {"torch", "eager"} for b in off.values()), off
    assert _table(SAPPHIRE_RAPIDS, torch.bfloat16, gemm="onednn")["linear"] == {"onednn"}
    assert _table(SAPPHIRE_RAPIDS, torch.bfloat16, gemm="onednn")["decode_step"] == {"eager"}
    assert _table(SAPPHIRE_RAPIDS, torch.bfloat16, gemm="sbgemm")["linear"] == {"sbgemm"}
    assert _table(ZEN4, torch.bfloat16, gemm="sbgemm_amx")["linear"] == {"torch"}  # no AMX there
    assert _table(ZEN4, torch.bfloat16, decode_step=False)["decode_step"] == {"eager"}
    with pytest.raises(ValueError, match="LMSERVE_CPU_GEMM"):
        KernelSettings(gemm="mkl")
    env = KernelSettings.from_env({"LMSERVE_DISABLE_CPU_KERNELS": "1", "LMSERVE_CPU_GEMM": "onednn",
                                   "LMSERVE_DECODE_STEP": "0"})
    assert env == KernelSettings(native=False, gemm="onednn", decode_step=False)
    assert KernelSettings.from_env({}) == KernelSettings()


def test_shape_limits_are_part_of_the_choice():
    """A kernel is not chosen for a shape it does not take: odd K for the bf16 panels, AMX attention
    for head dims not a multiple of 64 or with a sliding window, rows past the fused kernels' limit,
    the VNNI GEMV for K not a multiple of 64."""
    plan = BackendPlan.simulated(SAPPHIRE_RAPIDS, torch.bfloat16)
    assert plan.linear(torch.bfloat16, 33).backend == "onednn"
    assert plan.linear(torch.bfloat16, 98).backend == "sbgemm_amx" and "AVX-512" in plan.linear(torch.bfloat16, 98).reason
    assert plan.attention(torch.bfloat16, 80, None).backend == "native"
    assert plan.attention(torch.bfloat16, 64, 4096).backend == "native"
    assert plan.attention(torch.float16, 64, None).backend == "torch"
    assert plan.rms_norm(torch.bfloat16, 16385).backend == "torch"
    assert plan.block_quant(vnni_takes=False).backend == "int4"
    assert plan.block_quant(vnni_takes=True).backend == "vnni"
    assert BackendPlan.simulated(ZEN3, torch.float32).block_quant(vnni_takes=True).backend == "int4"
    window = _model(torch.bfloat16, use_sliding_window=True, sliding_window=64, max_window_layers=0)
    table = bind_backends(window, plan, apply=False)
    assert table.backends("attention") == {"native"}


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler: no native kernel loads")
def test_simulation_matches_the_kernels_that_load_here(monkeypatch):
    monkeypatch.delenv("LMSERVE_DISABLE_CPU_KERNELS", raising=False)
    assert native_kernels_for(CpuFeatures.detect()) == NativeKernels.load().names()


def test_get_model_logs_one_table(tmp_path, caplog):
    make_hf_model(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
                  seed=1).save_pretrained(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="lmserve.model.loader"):
        model = get_model(_model_config(str(tmp_path)), "cpu")
    tables = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compute backends")]
    assert len(tables) == 1
    plan = BackendPlan.for_device("cpu", torch.float32)
    expected = plan.linear(torch.float32, 64).backend
    assert f"linear" in tables[0] and expected in tables[0] and "lm_head (tied)" in tables[0]
    assert model.model.layers[0].mlp.down_proj.backend.name == plan.linear(torch.float32, 96).backend
    assert f"backend={expected}" in repr(model.model.layers[0].self_attn.o_proj)  # reading a layer says what runs
