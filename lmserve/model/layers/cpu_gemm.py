"""Dense CPU linears on weights prepacked once after loading.

Why: a decode step of a batch is a handful of skinny matmuls (M = the batch, 1-64 rows) against
weights read from DRAM. ``F.linear`` calls MKL's sgemm, which packs the weight panel on every call.
Three kernels take a weight packed once instead (``pack_weight`` picks one per weight):
- ``sgemm``: lmserve's AVX2 fp32 kernel (``cpu_kernels/sgemm.c``), on CPUs with AVX2 + FMA and no
  AVX-512, for float32 weights;
- ``sbgemm_amx`` / ``sbgemm``: lmserve's bf16 kernel (``cpu_kernels/sbgemm.c``), for bf16 weights
  (K even) on CPUs with AVX512-BF16: on AMX tiles where the CPU has AMX-BF16 and the OS grants the
  tile state (``sbgemm_amx.h``; K % 32 != 0 runs the AVX-512 micro-kernel), else on VDPBF16PS;
- ``onednn``: oneDNN's matmul on a weight reordered into its blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``, the op torch's Inductor uses for frozen CPU
  linears), for float32 elsewhere and for bf16 on a CPU with native bf16 but no AVX512-BF16.
Measured on the Qwen2-365M shapes, weights read from DRAM (``benchmarks/cpu_gemm_microbench.py``):
- 2 threads of an AVX2 EPYC (Zen 3), fp32, GFLOP/s for F.linear / oneDNN / sgemm: M=32 32-56 /
  60-86 / 92-101; M=1 4-6 / 5-7 / 8-11; M=256 74-114 / 113-133 / 125-145;
- 2 threads of an AVX-512 EPYC (Zen 4), bf16, oneDNN / sbgemm (``--dtype bfloat16 --repeats 5``): M=32 211-315 / 291-349;
  M=16 148-257 / 216-299; M=256 379-392 / 396-410 (the peak measured is ~400);
- 2 threads of a Sapphire Rapids Xeon (AMX), bf16, oneDNN (on AMX) / sbgemm / sbgemm_amx
  (``--dtype bfloat16 --repeats 5``): M=16 167-284 / 115-135 / 194-350; M=32 286-502 / 114-143 /
  307-527; M=64 560-760 / 118-144 / 447-910; M=256 562-1461 / 130-148 / 502-1399 (noisy VM);
  offline W2-like run (32 x 32 in / 128 out): 285-307 output tok/s with sbgemm_amx, 214-229 with
  oneDNN, 111 with sbgemm (``LMSERVE_CPU_GEMM=... benchmarks/offline_throughput.py``). The AMX
  tile layout (sbgemm_amx.h) against the earlier AMX kernel on 64-column AVX-512 panels, runs
  interleaved (``offline_throughput.py --model random-qwen2-365m --num-prompts 64 --input-len 32
  --output-len 256 --engine-args '{"max_num_seqs": 32}'``): 268.9 / 283.7 against 246.9 / 247.8
  output tok/s.

Invariants:
- only CPU weights in float32, or bfloat16 on a CPU with native bf16 (elsewhere oneDNN emulates
  bf16 at ~1 GFLOP/s), are packed; everything else keeps ``F.linear``;
- a packed module keeps its ``in_features``/``out_features`` but no longer owns a dense weight:
  its ``weight`` Parameter is replaced by an empty one, so the memory is not held twice (the tied
  lm_head is the exception: the embedding table stays for lookups and the head gets a packed copy);
- results equal ``F.linear`` up to fp32 summation order; the sgemm and sbgemm kernels' rows are also
  independent of the batch they are in (one sequential sum per output).
``LMSERVE_DISABLE_CPU_KERNELS=1`` leaves every module on ``F.linear`` (the reference path).
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.config import cpu_has_fast_bf16
from lmserve.model.layers.cpu_kernels.build import DISABLE_ENV, kernels_disabled
from lmserve.model.layers.cpu_kernels.sgemm import CpuPanelGemm, get_kernel, get_panel_kernel

logger = logging.getLogger(__name__)

# Names the packed backend prepack_model uses (pack_weight's ``backend``): auto, onednn or a panel kernel.
BACKEND_ENV = "LMSERVE_CPU_GEMM"

# Rows oneDNN's blocked layout is tuned for (it picks its blocking from it; any M still works).
BATCH_HINT = 32


class PrepackedWeight:
    """A dense weight [N, K] held in a CPU kernel's layout. ``linear(x, bias)`` is
    ``F.linear(x, weight, bias)``; ``to_dense()`` gives the weight back."""

    backend = ""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype != self.dtype:
            return self.linear(x.to(self.dtype), bias).to(x.dtype)
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, x.shape[-1]), bias)
        return y.reshape(*lead, self.shape[0])

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        raise NotImplementedError


class OnednnWeight(PrepackedWeight):
    backend = "onednn"

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(tuple(weight.shape), weight.dtype)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_HINT)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, bias, "none", [], "")

    def to_dense(self) -> torch.Tensor:
        return self.packed.to_dense()


class PanelWeight(PrepackedWeight):
    """A weight in one of lmserve's panel kernels' layouts (fp32 ``sgemm`` or bf16 ``sbgemm``)."""

    def __init__(self, weight: torch.Tensor, kernel: CpuPanelGemm) -> None:
        super().__init__(tuple(weight.shape), kernel.dtype)
        self.backend = kernel.name
        self.kernel = kernel
        self.panels = kernel.pack(weight)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernel.matmul(x, self.panels, self.shape[0], bias)

    def to_dense(self) -> torch.Tensor:
        return self.kernel.unpack(self.panels, self.shape[0])


def prepack_supported(weight: torch.Tensor) -> bool:
    """Whether ``weight`` may be prepacked: a 2-D CPU float32 tensor, or bf16 with native bf16,
    torch built with oneDNN (the backend every packable weight can fall back to), and the kernels
    not switched off."""
    if kernels_disabled() or weight.device.type != "cpu" or weight.dim() != 2 or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and cpu_has_fast_bf16())


def pack_weight(weight: torch.Tensor, backend: str = "auto") -> PrepackedWeight | None:
    """weight [N, K] in a kernel's layout, or None when no kernel takes it (``prepack_supported``).
    ``backend``: "auto" (lmserve's panel kernel for the weight's dtype where it loads and takes the
    shape: sgemm for float32, sbgemm_amx or sbgemm for bf16; else oneDNN), "onednn", or a panel
    kernel's name (``PANEL_KERNELS``: None where that kernel does not apply)."""
    if not prepack_supported(weight):
        return None
    if backend != "onednn":
        kernel = get_panel_kernel(weight.dtype) if backend == "auto" else get_kernel(backend)
        if kernel is not None and kernel.dtype == weight.dtype and kernel.takes(weight):
            return PanelWeight(weight, kernel)
        if backend != "auto":
            return None
    return OnednnWeight(weight)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 packed: PrepackedWeight | None) -> torch.Tensor:
    """The dense matmul of a linear module: the packed kernel when set, else ``F.linear``."""
    if packed is not None:
        return packed.linear(x, bias)
    return F.linear(x, weight, bias)


def _free_dense(module: nn.Module) -> None:
    weight = module.weight
    module.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)


def prepack_model(model: nn.Module) -> int:
    """Pack every dense matmul weight of ``model`` that a kernel takes (``pack_weight``): each
    ``Linear`` (incl. merged and quantized ones, whose dense path it is), and the tied lm_head
    (a ``VocabEmbedding`` that is ``model.lm_head``: packed copy, table kept). Call once, after
    the weights are loaded and the model is on its device. ``$LMSERVE_CPU_GEMM`` names the backend
    (``pack_weight``'s ``backend``; default "auto"), for A/B measurements. Returns the number packed."""
    from lmserve.model.layers.linear import Linear, VocabEmbedding

    backend = os.environ.get(BACKEND_ENV, "") or "auto"
    backends: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, Linear) and module.packed_weight is None:
            module.packed_weight = pack_weight(module.weight, backend)
            if module.packed_weight is not None:
                _free_dense(module)
                backends[module.packed_weight.backend] += 1
    head = getattr(model, "lm_head", None)
    if isinstance(head, VocabEmbedding) and head.packed_weight is None:
        head.packed_weight = pack_weight(head.weight, backend)
        if head.packed_weight is not None:
            backends[head.packed_weight.backend] += 1
    if backends:
        logger.info("Prepacked linear weights: %s (%s=1 turns this off)", dict(backends), DISABLE_ENV)
    return sum(backends.values())
