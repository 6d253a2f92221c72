"""Gated activations."""

from __future__ import annotations

import torch
from torch import nn

from lmserve.model.backends.elementwise import NativeSiluAndMul, TorchSiluAndMul


class SiluAndMul(nn.Module):
    """x [..., 2 * d] (gate | up, as a merged gate_up projection emits them) -> silu(gate) * up [..., d].
    ``backend`` computes it: the torch ops when built, the plan's choice once loaded."""

    backend: TorchSiluAndMul | NativeSiluAndMul

    def __init__(self) -> None:
        super().__init__()
        self.backend = TorchSiluAndMul()

    def extra_repr(self) -> str:
        return f"backend={self.backend.name}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.apply(x)
