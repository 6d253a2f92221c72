"""Backends of the elementwise layers: RMSNorm, rotary embedding (neox style), SiLU-and-mul.

Each layer gets one backend when the model is built (``BackendPlan``): the torch ops, which define
the result, or lmserve's fused CPU kernel (``cpu_kernels/cpu_ops.c``), which computes the same
ops with the same roundings (bit-identical; SiLU's exp may differ from torch's in the last bit,
rarely). A native backend is chosen only for a dtype and row length it takes, and it is given
every call: it flattens leading dimensions and makes rows dense itself, and a call it cannot run is
a bug (ValueError), never a silent switch to the torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmserve.model.layers.cpu_kernels.cpu_ops import CpuOps


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., H] as 2-D rows with a dense last dimension (a view where possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] <= 1 else x2.contiguous()


def _declined(what: str, x: torch.Tensor) -> ValueError:
    return ValueError(f"native {what} kernel declined {tuple(x.shape)} {x.dtype} on {x.device}: "
                      "the backend plan chose it for a layer it does not take")


# -- RMSNorm ----------------------------------------------------------------------------------------
class TorchRMSNorm:
    """HF's LlamaRMSNorm: statistics in fp32, cast back to the input dtype before the weight."""

    name = "torch"

    def apply(self, weight: torch.Tensor, eps: float, x: torch.Tensor,
              residual: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        normed = weight * h.to(x.dtype)
        return normed if residual is None else (normed, x)


class NativeRMSNorm:
    """``cpu_ops.rms_norm``: the residual add and the norm in one pass."""

    name = "native"

    def __init__(self, ops: CpuOps) -> None:
        self.ops = ops

    def apply(self, weight: torch.Tensor, eps: float, x: torch.Tensor,
              residual: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x2 = _rows(x)
        r2 = None if residual is None else _rows(residual)
        fused = self.ops.rms_norm(x2, weight, eps, r2)
        if fused is None:
            raise _declined("rms_norm", x)
        normed, summed = fused
        if residual is None:
            return normed.view(shape)
        return normed.view(shape), summed.view(shape)


# -- rotary embedding -------------------------------------------------------------------------------
def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by cos/sin [T, 1, D/2]; the same elementwise ops as HF's
    ``x * cos + rotate_half(x) * sin``, so bit-identical in 16-bit dtypes too."""
    x1, x2 = x.chunk(2, dim=-1)  # [T, H, D/2] each
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class TorchRope:
    name = "torch"

    def apply(self, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D], cos_sin [T, D] (``cat(cos, sin)``) -> rotated (q, k)."""
        cos, sin = cos_sin.chunk(2, dim=-1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return rotate_neox(q, cos, sin), rotate_neox(k, cos, sin)


def _heads_dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


class NativeRope:
    """``cpu_ops.rope_neox``: q and k rotated in one pass into new contiguous tensors."""

    name = "native"

    def __init__(self, ops: CpuOps) -> None:
        self.ops = ops

    def apply(self, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.ops.rope_neox(_heads_dense(q), _heads_dense(k), cos_sin)
        if fused is None:
            raise _declined("rope", q)
        return fused


# -- SiLU and mul -----------------------------------------------------------------------------------
class TorchSiluAndMul:
    name = "torch"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., 2I] (gate | up) -> silu(gate) * up [..., I]."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class NativeSiluAndMul:
    """``cpu_ops.silu_and_mul`` (AVX-512), vectorised with torch's roundings."""

    name = "native"

    def __init__(self, ops: CpuOps) -> None:
        self.ops = ops

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ops.silu_and_mul(_rows(x))
        if out is None:
            raise _declined("silu_mul", x)
        return out.view(*x.shape[:-1], x.shape[-1] // 2)
