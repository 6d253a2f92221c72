"""RMSNorm matching Hugging Face's LlamaRMSNorm (fp32 statistics, cast back before the weight)."""

from __future__ import annotations

import torch
from torch import nn

from lmserve.model.backends.elementwise import NativeRMSNorm, TorchRMSNorm


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``, the normalization computed in fp32 and cast back
    to the input dtype before multiplying by ``weight`` (exactly HF's order of operations).

    ``forward(x, residual)`` fuses the pre-norm residual add: it returns
    ``(norm(x + residual), x + residual)``; with ``residual=None`` it returns ``norm(x)`` alone.
    ``backend`` computes it: the torch ops when built, the plan's choice once loaded (a native
    kernel computes the same ops with the same roundings).
    """

    backend: TorchRMSNorm | NativeRMSNorm

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.variance_epsilon = eps
        self.backend = TorchRMSNorm()

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, backend={self.backend.name}"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.backend.apply(self.weight, self.variance_epsilon, x, residual)
