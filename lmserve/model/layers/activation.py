"""Activations: gated ones (``SiluAndMul`` with its backends, ``GeluAndMul``) and the plain
ones of GPT-2 / OPT / GPT-NeoX (``activation_fn``), each as transformers computes it."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
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


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # transformers' NewGELUActivation, op for op (GPT-2's "gelu_new")
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation transformers names ``name`` (``config.hidden_act`` / ``activation_function``);
    NotImplementedError naming the supported ones otherwise."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise NotImplementedError(f"activation {name!r} is not supported; supported: "
                                  f"{', '.join(sorted(_ACTIVATIONS))}") from None


class GeluAndMul(nn.Module):
    """x [..., 2 * d] (gate | up) -> act(gate) * up [..., d] for a GELU-family ``act`` (Gemma)."""

    def __init__(self, act: str) -> None:
        super().__init__()
        self.act = act
        self.fn = activation_fn(act)

    def extra_repr(self) -> str:
        return f"act={self.act}, backend=torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.fn(gate) * up
