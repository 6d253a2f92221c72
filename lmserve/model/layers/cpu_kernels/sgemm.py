"""ctypes binding of ``sgemm.c``: the fp32 skinny-M GEMM on a prepacked weight (AVX2 + FMA CPUs).

``get_sgemm_kernel()`` compiles and loads the C source at first use (``build.py``) and returns a
``CpuSgemm``, or None where it does not apply: switched off (``LMSERVE_DISABLE_CPU_KERNELS=1``),
no compiler or a failed build (logged once), a CPU without AVX2 + FMA, or one with AVX-512 (oneDNN's
AVX-512 kernels are used there; this kernel was tuned and measured on AVX2 only). ctypes releases
the GIL for the duration of each call.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from lmserve.model.layers.cpu_kernels.build import KernelBuildError, kernels_disabled, load_library

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("sgemm.c")
PANEL = 16  # output columns per packed panel (NR in sgemm.c)

_p, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class CpuSgemm:
    """The loaded kernel: ``pack`` a weight once, then ``matmul`` any number of rows by it."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._pack = lib.lms_sgemm_pack
        self._pack.argtypes = [_p, _p, _i64, _i64, _i32]
        self._pack.restype = None
        self._gemm = lib.lms_sgemm
        self._gemm.argtypes = [_p, _i64, _p, _p, _p, _i64, _i64, _i64, _i64, _i32]
        self._gemm.restype = ctypes.c_int

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [N, K] float32 -> panels float32 [ceil(N / 16), K, 16] (zero-padded columns)."""
        w = weight.detach().to(torch.float32).contiguous()
        n, k = w.shape
        panels = torch.empty(-(-n // PANEL), k, PANEL, dtype=torch.float32)
        self._pack(w.data_ptr(), panels.data_ptr(), n, k, torch.get_num_threads())
        return panels

    @staticmethod
    def unpack(panels: torch.Tensor, n: int) -> torch.Tensor:
        """The inverse of ``pack``: [N, K]."""
        return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:n].contiguous()

    def matmul(self, x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
        """x [M, K] float32 (rows dense, any row stride) @ W^T + bias -> [M, n] float32."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        m, k = x.shape
        out = torch.empty(m, n, dtype=torch.float32)
        if m == 0:
            return out
        b = 0 if bias is None else bias.contiguous().data_ptr()
        rc = self._gemm(x.data_ptr(), x.stride(0), panels.data_ptr(), b, out.data_ptr(), n, m, n, k,
                        torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"sgemm kernel rejected shapes x {tuple(x.shape)}, weight [{n}, {k}]")
        return out


@functools.lru_cache(maxsize=None)
def _load(compiler: str | None, cache_dir: str | None) -> CpuSgemm | None:
    del compiler, cache_dir  # part of the cache key only (build.py reads them)
    try:
        lib = load_library(SOURCE)
        info = lib.lms_sgemm_info()
    except (KernelBuildError, AttributeError) as e:
        logger.warning("CPU sgemm kernel unavailable, using oneDNN for fp32 linears: %s", e)
        return None
    if info != 1:
        logger.info("CPU sgemm kernel not used on this CPU (%s); fp32 linears use oneDNN",
                    "AVX-512" if info == 2 else "no AVX2 + FMA")
        return None
    return CpuSgemm(lib)


def get_sgemm_kernel() -> CpuSgemm | None:
    """The kernel, or None (see the module docstring)."""
    if kernels_disabled():
        return None
    env = os.environ
    return _load(env.get("LMSERVE_KERNEL_CC"), env.get("LMSERVE_KERNEL_CACHE"))
