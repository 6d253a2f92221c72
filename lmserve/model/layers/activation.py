"""Gated activations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from lmserve.model.layers.cpu_kernels.cpu_ops import CpuOps


class SiluAndMul(nn.Module):
    """x [..., 2 * d] (gate | up, as a merged gate_up projection emits them) -> silu(gate) * up [..., d].

    ``cpu_ops`` (set by ``attach_cpu_ops`` after loading) runs 2-D CPU inputs as one vectorised
    kernel with torch's roundings (``cpu_kernels/lms_simd.h``); None: the torch ops."""

    cpu_ops: CpuOps | None

    def __init__(self) -> None:
        super().__init__()
        self.cpu_ops = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_ops is not None and x.dim() == 2:
            fused = self.cpu_ops.silu_and_mul(x)
            if fused is not None:
                return fused
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
