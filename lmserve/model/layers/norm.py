"""RMSNorm matching Hugging Face's LlamaRMSNorm (fp32 statistics, cast back before the weight)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lmserve.model.layers.cpu_kernels.cpu_ops import CpuOps


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``, the normalization computed in fp32 and cast back
    to the input dtype before multiplying by ``weight`` (exactly HF's order of operations).

    ``forward(x, residual)`` fuses the pre-norm residual add: it returns
    ``(norm(x + residual), x + residual)``; with ``residual=None`` it returns ``norm(x)`` alone.
    ``cpu_ops`` (set by ``attach_cpu_ops`` after loading) runs 2-D CPU inputs as one fused kernel
    that computes the same ops with the same roundings (``cpu_ops.c``); None: the torch ops.
    """

    cpu_ops: CpuOps | None

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.variance_epsilon = eps
        self.cpu_ops = None

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(input_dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.cpu_ops is not None and x.dim() == 2:
            fused = self.cpu_ops.rms_norm(x, self.weight, self.variance_epsilon, residual)
            if fused is not None:
                return fused[0] if residual is None else fused
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
