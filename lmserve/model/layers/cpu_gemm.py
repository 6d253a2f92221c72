"""Dense CPU linears on oneDNN with weights prepacked once after loading.

Why: a decode step of a batch is a handful of skinny matmuls (M = the batch, 1-64 rows) against
weights read from DRAM. ``F.linear`` calls MKL's sgemm, which packs the weight panel on every
call; oneDNN's matmul on a weight reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, the op torch's Inductor uses for frozen CPU
linears) skips that. Measured on the Qwen2-365M shapes, 2 threads of an AVX2 EPYC, fp32, weights
read from DRAM (``benchmarks/cpu_gemm_microbench.py``): M=32 70-82 GFLOP/s against MKL's 32-56,
M=4-16 1.4-3.4x, M>=256 1.1-1.7x, M=1 equal (both read ~10 GB/s) but for the 8192-row head (0.8x).
The layout is chosen for 32 rows (``BATCH_HINT``), which was best or close to it from 1 to 512 rows.

Invariants:
- only CPU weights in float32, or bfloat16 on a CPU with native bf16 (elsewhere oneDNN emulates
  bf16 at ~1 GFLOP/s), are packed; everything else keeps ``F.linear``;
- a packed module keeps its ``in_features``/``out_features`` but no longer owns a dense weight:
  its ``weight`` Parameter is replaced by an empty one, so the memory is not held twice (the tied
  lm_head is the exception: the embedding table stays for lookups and the head gets a packed copy);
- results equal ``F.linear`` up to fp32 summation order (|diff| ~1e-6 relative).
``LMSERVE_DISABLE_CPU_KERNELS=1`` leaves every module on ``F.linear`` (the reference path).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.config import cpu_has_fast_bf16

logger = logging.getLogger(__name__)

DISABLE_ENV = "LMSERVE_DISABLE_CPU_KERNELS"
# Rows the blocked layout is tuned for (oneDNN picks its blocking from it; any M still works).
BATCH_HINT = 32


def onednn_linear_supported(weight: torch.Tensor) -> bool:
    """Whether ``weight`` may be prepacked: a CPU float32 tensor, or bf16 with native bf16, and
    torch built with oneDNN, and the kernels not switched off."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return False
    if weight.device.type != "cpu" or weight.dim() != 2 or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and cpu_has_fast_bf16())


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> an opaque oneDNN tensor for ``packed_linear`` (same shape and dtype)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ weight.T + bias -> [..., N] in x's dtype; ``packed`` from ``pack_weight``."""
    if x.dtype != packed.dtype:
        return packed_linear(x.to(packed.dtype), packed, bias).to(x.dtype)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 packed: torch.Tensor | None) -> torch.Tensor:
    """The dense matmul of a linear module: oneDNN on ``packed`` when set, else ``F.linear``."""
    if packed is not None:
        return packed_linear(x, packed, bias)
    return F.linear(x, weight, bias)


def _free_dense(module: nn.Module) -> None:
    weight = module.weight
    module.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)


def prepack_model(model: nn.Module) -> int:
    """Prepack every dense matmul weight of ``model`` that ``onednn_linear_supported`` takes:
    each ``Linear`` (incl. merged and quantized ones, whose dense path it is), and the tied
    lm_head (a ``VocabEmbedding`` that is ``model.lm_head``: packed copy, table kept).
    Call once, after the weights are loaded and the model is on its device. Returns the count."""
    from lmserve.model.layers.linear import Linear, VocabEmbedding

    count = 0
    for module in model.modules():
        if isinstance(module, Linear) and module.packed_weight is None and onednn_linear_supported(module.weight):
            module.packed_weight = pack_weight(module.weight)
            _free_dense(module)
            count += 1
    head = getattr(model, "lm_head", None)
    if isinstance(head, VocabEmbedding) and head.packed_weight is None and onednn_linear_supported(head.weight):
        head.packed_weight = pack_weight(head.weight)
        count += 1
    if count:
        logger.info("Prepacked %d linear weights for oneDNN (%s)", count, DISABLE_ENV + "=1 turns this off")
    return count
