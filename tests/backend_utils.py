"""Test helpers around the backend plan: a layer's backend as the plan would choose it on this
machine (optionally under other kernel settings), without building a whole model."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lmserve.model.backends.linear import PrepackedLinear, PrepackedWeight
from lmserve.model.backends.plan import BackendPlan, KernelSettings
from lmserve.model.loader.binding import BackendTable, bind_backends, dense_backend


def cpu_plan(dtype: torch.dtype = torch.float32, **settings) -> BackendPlan:
    """This machine's plan for ``dtype``: the settings of the environment, with ``settings`` replaced."""
    return BackendPlan.for_device("cpu", dtype, dataclasses.replace(KernelSettings.from_env(), **settings))


def pack_weight(weight: torch.Tensor, gemm: str = "auto") -> PrepackedWeight | None:
    """``weight`` packed as the plan with ``LMSERVE_CPU_GEMM=gemm`` packs it, or None where that
    plan leaves it on ``F.linear``."""
    backend, _ = dense_backend(cpu_plan(weight.dtype, gemm=gemm), weight, weight.shape[1])
    return backend.packed if isinstance(backend, PrepackedLinear) else None


def bind(module: nn.Module, dtype: torch.dtype | None = None, **settings) -> BackendTable:
    """Bind ``module``'s layers as ``get_model`` would on this machine (dtype: the first parameter's)."""
    if dtype is None:
        dtype = next(module.parameters()).dtype
    return bind_backends(module, cpu_plan(dtype, **settings))
