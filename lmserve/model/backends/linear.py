"""Backends of the dense linear layers (``Linear``, ``MergedLinear``, a tied lm_head).

A ``LinearBackend`` computes ``y = x @ W^T + b`` for one layer. It is chosen once per layer by
``BackendPlan.linear`` and installed by ``bind_backends``; ``Linear.forward`` calls
``backend.apply(layer, x, decode_only)`` and nothing else. The backends:
- ``TorchLinear``: ``F.linear`` on the layer's ``weight`` (the reference; any device, any dtype);
- ``PrepackedLinear``: the weight held once in a CPU kernel's layout (``OnednnWeight``: oneDNN's
  blocked layout via ``torch.ops.mkldnn``; ``PanelWeight``: lmserve's panel GEMMs ``sgemm``,
  ``sbgemm``, ``sbgemm_amx``). The layer's dense ``weight`` is then freed (an empty Parameter),
  except for a tied lm_head, whose table stays for lookups;
- ``quantized.BlockQuantLinear``: llama.cpp block formats (GGUF), an integer kernel for few rows.

Invariants: results equal ``F.linear`` up to fp32 summation order; the panel kernels' rows do not
depend on the batch they are in. The seam for LoRA (a delta added around ``apply``) and for
tensor parallelism (a layer holding a shard of the weight, a collective after ``apply``) is the
layer, not the backend: a backend only ever sees the weight it was given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.layers.cpu_kernels.sgemm import CpuPanelGemm

# Rows oneDNN's blocked layout is tuned for (it picks its blocking from it; any M still works).
ONEDNN_BATCH_HINT = 32


class LinearBackend:
    """Computes one layer's matmul. ``name`` is what the start-up table shows."""

    name = ""

    def apply(self, layer: nn.Module, x: torch.Tensor, decode_only: bool = False) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] with ``layer.bias`` added. ``decode_only``:
        the step has no prompt token (only a quantized backend reads it)."""
        raise NotImplementedError

    def apply_gelu(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``F.gelu(apply(layer, x))`` (erf GELU); a backend may fuse it into its matmul, with the
        same result."""
        return F.gelu(self.apply(layer, x))

    def dense_weight(self, layer: nn.Module) -> torch.Tensor:
        """The weight [out_features, in_features] as a plain tensor (a copy when packed)."""
        return layer.weight


class TorchLinear(LinearBackend):
    """``F.linear`` on ``layer.weight``: the reference every other backend agrees with."""

    name = "torch"

    def apply(self, layer: nn.Module, x: torch.Tensor, decode_only: bool = False) -> torch.Tensor:
        return F.linear(x, layer.weight, getattr(layer, "bias", None))


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
    """oneDNN's matmul on a weight reordered once into its blocked layout
    (``torch.ops.mkldnn._reorder_linear_weight``, the op torch's Inductor uses for frozen CPU linears)."""

    backend = "onednn"

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(tuple(weight.shape), weight.dtype)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), ONEDNN_BATCH_HINT)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, bias, "none", [], "")

    def linear_gelu(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.gelu(linear(x, bias))`` with the erf GELU as oneDNN's post-op (one pass over the
        output instead of two; bit-equal to the unfused ops in the tests)."""
        if x.dtype != self.dtype:
            return F.gelu(self.linear(x, bias))
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), self.packed, bias,
                                               "gelu", [], "none")
        return y.reshape(*lead, self.shape[0])

    def to_dense(self) -> torch.Tensor:
        return self.packed.to_dense()


class PanelWeight(PrepackedWeight):
    """A weight in one of lmserve's panel kernels' layouts (``CpuPanelGemm``)."""

    def __init__(self, weight: torch.Tensor, kernel: CpuPanelGemm) -> None:
        super().__init__(tuple(weight.shape), kernel.dtype)
        self.backend = kernel.name
        self.kernel = kernel
        self.panels = kernel.pack(weight)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernel.matmul(x, self.panels, self.shape[0], bias)

    def to_dense(self) -> torch.Tensor:
        return self.kernel.unpack(self.panels, self.shape[0])


class PrepackedLinear(LinearBackend):
    """A layer whose weight lives only in ``packed`` (see the module docstring)."""

    def __init__(self, packed: PrepackedWeight) -> None:
        self.packed = packed
        self.name = packed.backend

    def apply(self, layer: nn.Module, x: torch.Tensor, decode_only: bool = False) -> torch.Tensor:
        return self.packed.linear(x, getattr(layer, "bias", None))

    def apply_gelu(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.packed, OnednnWeight):
            return self.packed.linear_gelu(x, getattr(layer, "bias", None))
        return super().apply_gelu(layer, x)

    def dense_weight(self, layer: nn.Module) -> torch.Tensor:
        return self.packed.to_dense()


def pack_dense(weight: torch.Tensor, backend: str, panel_kernel: CpuPanelGemm | None) -> PrepackedWeight:
    """``weight`` [N, K] in the layout of ``backend`` ("onednn", or the panel kernel's name, for
    which ``panel_kernel`` is that kernel). The plan has checked the kernel takes the weight."""
    if backend == "onednn":
        return OnednnWeight(weight)
    if panel_kernel is None or panel_kernel.name != backend or not panel_kernel.takes(weight):
        raise ValueError(f"linear backend {backend!r} cannot pack a {tuple(weight.shape)} {weight.dtype} weight")
    return PanelWeight(weight, panel_kernel)
