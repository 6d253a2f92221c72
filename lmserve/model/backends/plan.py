"""Which backend each layer gets: ``BackendPlan``, built once per model from the device, the
dtype, the CPU's native kernels and the kernel settings, then asked once per layer.

The selection rules are pure functions of those inputs and the layer's shape, so they can be
tested for any CPU by simulating its features (``BackendPlan.simulated``). A native kernel is
chosen only for layers whose dtype and shape it takes; the chosen backend then gets every call
(``model/backends/__init__.py``). ``KernelSettings`` holds the switches, read once from the
environment (``KernelSettings.from_env``) when the plan is built:
- ``LMSERVE_DISABLE_CPU_KERNELS=1``: every layer on its torch reference backend;
- ``LMSERVE_CPU_GEMM=auto|torch|onednn|sgemm|sbgemm|sbgemm_amx|bf16x3_amx``: the dense linear
  backend (A/B measurements); a named kernel that does not take a weight leaves it on torch.
  ``bf16x3_amx`` runs fp32 weights as three bf16 AMX products (``sgemm.AmxBf16x3Gemm``, ~2^-16
  relative error); "auto" never picks it: in the MiniLM embeddings benchmark it was ~10 % slower
  end to end than oneDNN's fp32 matmul (benchmarks/README.md, "Embeddings throughput");
- ``LMSERVE_DECODE_STEP=0``: no native one-call decode step (decodes run layer by layer).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lmserve.config import cpu_has_fast_bf16
from lmserve.model.backends.cpu_features import CpuFeatures, native_kernels_for
from lmserve.model.layers.cpu_kernels.build import DISABLE_ENV, kernels_disabled
from lmserve.model.layers.cpu_kernels.cpu_ops import MAX_ROW, CpuOps, get_cpu_ops
from lmserve.model.layers.cpu_kernels.decode_step import decode_step_library
from lmserve.model.layers.cpu_kernels.paged_attention import CpuPagedAttention, get_paged_attention_kernel
from lmserve.model.layers.cpu_kernels.sgemm import PANEL_KERNELS, AmxBf16x3Gemm, CpuPanelGemm, get_kernel

GEMM_ENV = "LMSERVE_CPU_GEMM"
DECODE_STEP_ENV = "LMSERVE_DECODE_STEP"
BF16X3 = "bf16x3_amx"
GEMM_CHOICES = ("auto", "torch", "onednn") + PANEL_KERNELS + (BF16X3,)
# panel kernel -> (weight dtype, K must be a multiple of)
_PANEL_SHAPES = {"sgemm": (torch.float32, 1), "sbgemm": (torch.bfloat16, 2), "sbgemm_amx": (torch.bfloat16, 2)}
_FUSED_DTYPES = (torch.float32, torch.bfloat16)  # the fused elementwise kernels' dtypes
_ATTENTION_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class KernelSettings:
    """The kernel switches (module docstring)."""

    native: bool = True
    gemm: str = "auto"
    decode_step: bool = True

    def __post_init__(self) -> None:
        if self.gemm not in GEMM_CHOICES:
            raise ValueError(f"{GEMM_ENV}={self.gemm!r} is not a linear backend; choose from {', '.join(GEMM_CHOICES)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "KernelSettings":
        env = os.environ if environ is None else environ
        native = env.get(DISABLE_ENV, "") in ("", "0") if environ is not None else not kernels_disabled()
        return cls(native=native, gemm=env.get(GEMM_ENV, "") or "auto", decode_step=env.get(DECODE_STEP_ENV, "1") != "0")

    def describe(self) -> str:
        if not self.native:
            return f"{DISABLE_ENV}=1"
        parts = [f"{GEMM_ENV}={self.gemm}"] if self.gemm != "auto" else []
        parts += [] if self.decode_step else [f"{DECODE_STEP_ENV}=0"]
        return ", ".join(parts) or "defaults"


@dataclass(frozen=True)
class Choice:
    """One layer's backend and why (both go into the start-up table)."""

    backend: str
    reason: str


@dataclass(frozen=True)
class NativeKernels:
    """The native kernels loaded on this machine (each None / absent where it cannot be had:
    no compiler, a failed build, or a CPU without the instructions)."""

    ops: CpuOps | None = None
    panels: Mapping[str, CpuPanelGemm | AmxBf16x3Gemm] = field(default_factory=dict)
    attention: CpuPagedAttention | None = None
    decode_step: bool = False

    @classmethod
    def load(cls) -> "NativeKernels":
        """Build (first use) and load every kernel library; honours ``LMSERVE_DISABLE_CPU_KERNELS``."""
        if kernels_disabled():
            return cls()
        panels: dict[str, CpuPanelGemm | AmxBf16x3Gemm] = {
            name: k for name in PANEL_KERNELS if (k := get_kernel(name)) is not None}
        if "sbgemm_amx" in panels:
            panels[BF16X3] = AmxBf16x3Gemm(panels["sbgemm_amx"])
        ops = get_cpu_ops()
        return cls(ops=ops, panels=panels, attention=get_paged_attention_kernel(),
                   decode_step=ops is not None and ops.has_qgemv and decode_step_library() is not None)

    def names(self) -> frozenset[str]:
        """The names (``cpu_features.NATIVE_KERNELS``) of what is loaded."""
        names = set(self.panels)
        if self.ops is not None:
            names.update(("rms_norm", "rope"))
            names.update(n for n, on in (("silu_mul", self.ops.has_silu), ("qgemv", self.ops.has_qgemv)) if on)
        if self.attention is not None:
            names.add("paged_attention")
            if self.attention.amx:
                names.add("paged_attention_amx")
        if self.decode_step:
            names.add("decode_step")
        return frozenset(names)


def _onednn_dtypes(fast_bf16: bool) -> frozenset[torch.dtype]:
    """Dtypes oneDNN's prepacked linear runs at native speed (bf16 is emulated without AVX-512)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return frozenset()
    return frozenset((torch.float32, torch.bfloat16) if fast_bf16 else (torch.float32,))


@dataclass(frozen=True)
class BackendPlan:
    """The inputs of every layer's choice; ``native`` holds the loaded kernels (None when the plan
    is simulated: its choices can be read but not instantiated)."""

    device_type: str
    dtype: torch.dtype
    kernels: frozenset[str]
    onednn_dtypes: frozenset[torch.dtype]
    sdpa_on_amx: bool
    settings: KernelSettings = KernelSettings()
    cpu: str = ""
    native: NativeKernels | None = None

    @classmethod
    def for_device(cls, device: torch.device | str, dtype: torch.dtype,
                   settings: KernelSettings | None = None) -> "BackendPlan":
        """The plan of this machine: on CPU, the kernels that load here."""
        device_type = torch.device(device).type
        settings = settings or KernelSettings.from_env()
        if device_type != "cpu":
            return cls(device_type, dtype, frozenset(), frozenset(), False, settings, device_type, NativeKernels())
        native = NativeKernels.load() if settings.native else NativeKernels()
        onednn = _onednn_dtypes(cpu_has_fast_bf16()) if settings.native else frozenset()
        sdpa_amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        return cls("cpu", dtype, native.names(), onednn, sdpa_amx, settings, CpuFeatures.detect().describe(), native)

    @classmethod
    def simulated(cls, features: CpuFeatures, dtype: torch.dtype, settings: KernelSettings | None = None,
                  onednn: bool = True) -> "BackendPlan":
        """The plan a CPU with ``features`` would get (a compiler and, if ``onednn``, torch with oneDNN)."""
        settings = settings or KernelSettings()
        kernels = native_kernels_for(features) if settings.native else frozenset()
        onednn_dtypes = _onednn_dtypes(features.avx512) if onednn and settings.native else frozenset()
        return cls("cpu", dtype, kernels, onednn_dtypes, features.amx_bf16, settings, features.describe())

    # -- the rules -------------------------------------------------------------------------------
    def _off(self) -> Choice | None:
        """Why no native backend applies to any layer, or None."""
        if self.device_type != "cpu":
            return Choice("torch", f"{self.device_type} device")
        if not self.settings.native:
            return Choice("torch", f"{DISABLE_ENV}=1")
        return None

    def linear(self, weight_dtype: torch.dtype, in_features: int) -> Choice:
        """A dense weight [N, K=in_features]: a panel kernel for its dtype where one is loaded and
        takes K (fp32: ``sgemm``; bf16: ``sbgemm_amx``, else ``sbgemm``; ``bf16x3_amx`` for fp32
        only when named), else oneDNN's prepacked matmul for dtypes it runs natively, else ``F.linear``."""
        if (off := self._off()) is not None:
            return off
        if weight_dtype not in self.onednn_dtypes:
            return Choice("torch", f"no packed kernel for {weight_dtype} on this CPU")
        gemm = self.settings.gemm
        if gemm == "torch":
            return Choice("torch", f"{GEMM_ENV}=torch")
        if gemm == BF16X3:
            if BF16X3 in self.kernels and weight_dtype == torch.float32 and in_features % 32 == 0:
                return Choice(BF16X3, "fp32 as three bf16 products on AMX tiles, fp32 sums")
            return Choice("torch", f"{GEMM_ENV}={gemm} takes fp32 weights with K % 32 == 0 on AMX CPUs, "
                                   f"not {weight_dtype} K={in_features}")
        if gemm != "onednn":
            panel = gemm if gemm != "auto" else self._panel_for(weight_dtype)
            if panel in self.kernels and _PANEL_SHAPES[panel][0] == weight_dtype and \
                    in_features > 0 and in_features % _PANEL_SHAPES[panel][1] == 0:
                tiles = "AMX tiles" if in_features % 32 == 0 else "K % 32 != 0: its AVX-512 micro-kernel"
                return Choice(panel, tiles if panel == "sbgemm_amx" else "panel GEMM on a weight packed once")
            if gemm != "auto":
                return Choice("torch", f"{GEMM_ENV}={gemm} does not take a {weight_dtype} weight with K={in_features}")
        return Choice("onednn", "oneDNN matmul on a weight reordered once")

    def _panel_for(self, dtype: torch.dtype) -> str | None:
        if dtype == torch.float32:
            return "sgemm"
        if dtype == torch.bfloat16:
            return "sbgemm_amx" if "sbgemm_amx" in self.kernels else "sbgemm"
        return None

    def block_quant(self, vnni_takes: bool) -> Choice:
        """A GGUF block-quantized weight kept quantized: its integer kernel (the dense path of the
        same layer is ``linear``'s choice for the model dtype)."""
        if "qgemv" in self.kernels and vnni_takes:
            return Choice("vnni", "AVX-512 VNNI integer GEMV")
        why = "no AVX-512 VNNI GEMV here" if "qgemv" not in self.kernels else "K not a multiple of 64 or too large"
        return Choice("int4", f"torch's int4 CPU kernel ({why})")

    def _fused(self, kernel: str, dtype: torch.dtype, width: int) -> Choice:
        if (off := self._off()) is not None:
            return off
        if kernel not in self.kernels:
            return Choice("torch", f"no native {kernel} kernel on this CPU")
        if dtype not in _FUSED_DTYPES or width > MAX_ROW:
            return Choice("torch", f"native {kernel} takes fp32/bf16 rows up to {MAX_ROW}")
        return Choice("native", "fused kernel, torch's roundings")

    def rms_norm(self, dtype: torch.dtype, hidden_size: int) -> Choice:
        return self._fused("rms_norm", dtype, hidden_size)

    def rope(self, dtype: torch.dtype, head_dim: int) -> Choice:
        return self._fused("rope", dtype, head_dim)

    def silu_and_mul(self, dtype: torch.dtype) -> Choice:
        return self._fused("silu_mul", dtype, 0)

    def attention(self, dtype: torch.dtype, head_dim: int, sliding_window: int | None,
                  logits_soft_cap: float | None = None) -> Choice:
        """Native paged attention for fp32/bf16; its AMX chunk kernel for bf16 with head dim % 64 == 0
        and no sliding window (backend ``native + AMX chunks``). Soft-capped scores (Gemma 2): the
        torch reference, which alone caps them."""
        if (off := self._off()) is not None:
            return off
        if logits_soft_cap is not None:
            return Choice("torch", "attention logit soft-capping (the native kernels do not cap)")
        if "paged_attention" not in self.kernels or dtype not in _ATTENTION_DTYPES:
            return Choice("torch", "no native paged attention for this dtype here")
        if "paged_attention_amx" in self.kernels and dtype == torch.bfloat16 and head_dim % 64 == 0 \
                and sliding_window is None:
            return Choice("native + AMX chunks", "paged kernels; prefill chunks on AMX tiles")
        return Choice("native", "paged kernels; prefill chunks by the qlen policy")

    def decode_step(self) -> Choice:
        """Whether the model-level native decode step may be built (the model's layers decide the rest)."""
        if (off := self._off()) is not None:
            return Choice("eager", off.reason)
        if not self.settings.decode_step:
            return Choice("eager", f"{DECODE_STEP_ENV}=0")
        if "decode_step" not in self.kernels:
            return Choice("eager", "the native decode step needs AVX-512 VNNI")
        return Choice("native", "")
