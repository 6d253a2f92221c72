"""ctypes bindings of the two panel GEMMs on a prepacked weight (skinny M first, any M taken):
``sgemm.c``, fp32 on AVX2 + FMA CPUs, and ``sbgemm.c``, bf16 on AVX512-BF16 CPUs.

``get_sgemm_kernel()`` / ``get_sbgemm_kernel()`` compile and load the C source at first use
(``build.py``) and return a ``CpuPanelGemm``, or None where it does not apply: switched off
(``LMSERVE_DISABLE_CPU_KERNELS=1``), no compiler or a failed build (logged once), a CPU without the
instructions; for the fp32 kernel also a CPU with AVX-512 (oneDNN's AVX-512 kernels are used there;
that kernel was tuned and measured on AVX2 only). ctypes releases the GIL for each call.

Each call fills one of ``abi.py``'s argument structs (``lms_abi.h``); the library is refused at load
when its ABI differs (``abi.check_abi``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from lmserve.model.layers.cpu_kernels.abi import GemmArgs, PackArgs, bind, load_kernels
from lmserve.model.layers.cpu_kernels.build import KernelBuildError, kernels_disabled

logger = logging.getLogger(__name__)


class CpuPanelGemm:
    """A loaded panel kernel: ``pack`` a weight once, then ``matmul`` any number of rows by it.
    Panels are [ceil(N / panel), K / pair, panel, pair] in ``dtype``: ``panel`` output columns, each
    as consecutive groups of ``pair`` K-elements (fp32: 16 columns, pairs of 1; bf16: 64, pairs of 2,
    VDPBF16PS's operand layout), zero-padded past N. Where ``tile_k`` divides K (the AMX kernel:
    32), the weight is in AMX tiles instead (sbgemm_amx.c): [ceil(N / 32), K / 32, 2, 16, 16, 2] =
    (32-column block, K-step, 16-column tile, K-pair, column, pair element)."""

    def __init__(self, lib: ctypes.CDLL, name: str, prefix: str, dtype: torch.dtype, panel: int, pair: int,
                 tile_k: int = 0) -> None:
        self._lib, self.name = lib, name
        self.dtype, self.panel, self.pair, self.tile_k = dtype, panel, pair, tile_k
        self._pack = bind(lib, f"{prefix}_pack")
        self._gemm = bind(lib, prefix)

    def takes(self, weight: torch.Tensor) -> bool:
        """Whether ``pack`` takes this weight: 2-D, K a multiple of the pair size."""
        return weight.dim() == 2 and weight.shape[1] % self.pair == 0 and weight.shape[1] > 0

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [N, K] -> panels (see the class docstring)."""
        w = weight.detach().to(self.dtype).contiguous()
        n, k = w.shape
        if self._tiled(k):
            shape = (-(-n // 32), k // 32, 2, 16, 16, 2)
        else:
            shape = (-(-n // self.panel), k // self.pair, self.panel, self.pair)
        panels = torch.empty(shape, dtype=self.dtype)
        self._pack(PackArgs(weight=w.data_ptr(), packed=panels.data_ptr(), n=n, k=k,
                            num_threads=torch.get_num_threads()))
        return panels

    @staticmethod
    def unpack(panels: torch.Tensor, n: int) -> torch.Tensor:
        """The inverse of ``pack``: [N, K]."""
        if panels.dim() == 6:  # AMX tiles: W[32 b + 16 t + j, 32 s + 2 kp + e] = panels[b, s, t, kp, j, e]
            return panels.permute(0, 2, 4, 1, 3, 5).reshape(panels.shape[0] * 32, -1)[:n].contiguous()
        return panels.permute(0, 2, 1, 3).reshape(panels.shape[0] * panels.shape[2], -1)[:n].contiguous()

    def _tiled(self, k: int) -> bool:
        return bool(self.tile_k) and k % self.tile_k == 0

    def matmul(self, x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] in the kernel's dtype (rows dense, any row stride) @ W^T + bias -> [M, n];
        written into ``out`` when given ([M, n] in the kernel's dtype, unit column stride, any row
        stride: a column slice of a wider matrix)."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        m, k = x.shape
        if out is None:
            out = torch.empty(m, n, dtype=self.dtype)
        elif tuple(out.shape) != (m, n) or out.dtype != self.dtype or out.stride(-1) != 1:
            raise ValueError(f"{self.name}: out must be [{m}, {n}] {self.dtype} with unit column stride")
        if m == 0:
            return out
        bias = None if bias is None else bias.contiguous()  # held until the call returns
        rc = self._gemm(GemmArgs(x=x.data_ptr(), lda=x.stride(0), packed=panels.data_ptr(),
                                 bias=None if bias is None else bias.data_ptr(), out=out.data_ptr(), ldo=out.stride(0), m=m, n=n,
                                 k=k, num_threads=torch.get_num_threads()))
        if rc != 0:
            raise ValueError(f"{self.name} kernel rejected shapes x {tuple(x.shape)}, weight [{n}, {k}]")
        return out


class AmxBf16x3Gemm:
    """fp32 linears on AMX bf16 tiles as bf16x3 (``lms_sbgemm_amx_x3``): with hi(v) = bf16(v) and
    lo(v) = bf16(v - hi(v)), x W^T = hi(x) hi(W)^T + hi(x) lo(W)^T + lo(x) hi(W)^T, accumulated in
    fp32, + the fp32 bias, out in fp32. The dropped lo(x) lo(W) term and the split leave about 2^-16
    relative error per product against fp32's 2^-24, at the bf16 tiles' speed over three times the
    K (on a Sapphire Rapids about 2x oneDNN's fp32 matmul for prompt-sized M). The weight is packed
    once as the AMX layout of [hi(W) | lo(W) | hi(W)] ([N, 3K] bf16); rows do not depend on the batch."""

    name = "bf16x3_amx"
    dtype = torch.float32

    def __init__(self, amx: CpuPanelGemm) -> None:
        self._amx = amx
        self._gemm = bind(amx._lib, "lms_sbgemm_amx_x3")

    @staticmethod
    def takes(weight: torch.Tensor) -> bool:
        """2-D fp32 with K a multiple of 32 (the AMX tile step)."""
        return weight.dim() == 2 and weight.dtype == torch.float32 and weight.shape[1] > 0 and weight.shape[1] % 32 == 0

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().float().contiguous()
        hi = w.to(torch.bfloat16)
        lo = (w - hi.float()).to(torch.bfloat16)
        return self._amx.pack(torch.cat([hi, lo, hi], dim=1))

    def unpack(self, panels: torch.Tensor, n: int) -> torch.Tensor:
        """The weight back as fp32 hi + lo (equal to the packed weight up to its dropped bits)."""
        w3 = self._amx.unpack(panels, n).float()
        k = w3.shape[1] // 3
        return w3[:, :k] + w3[:, k:2 * k]

    def matmul(self, x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
        """x [M, K] fp32 (unit column stride) -> [M, n] fp32."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        m, k = x.shape
        out = torch.empty(m, n, dtype=torch.float32)
        if m == 0:
            return out
        bias = None if bias is None else bias.float().contiguous()
        rc = self._gemm(GemmArgs(x=x.data_ptr(), lda=x.stride(0), packed=panels.data_ptr(),
                                 bias=None if bias is None else bias.data_ptr(), out=out.data_ptr(), ldo=n, m=m, n=n,
                                 k=k, num_threads=torch.get_num_threads()))
        if rc != 0:
            raise ValueError(f"{self.name} kernel rejected shapes x {tuple(x.shape)}, weight [{n}, {k}] (code {rc})")
        return out


def get_bf16x3_kernel() -> AmxBf16x3Gemm | None:
    """bf16x3 on the AMX kernel, or None where that kernel does not load here."""
    amx = get_kernel("sbgemm_amx")
    return None if amx is None else AmxBf16x3Gemm(amx)


# name -> (C source, C prefix, dtype, panel columns, pair, K that take the AMX tile layout (0: none),
#          why info() != 1 keeps oneDNN)
_KERNELS = {"sgemm": ("sgemm.c", "lms_sgemm", torch.float32, 16, 1, 0, {0: "no AVX2 + FMA", 2: "AVX-512"}),
            "sbgemm": ("sbgemm.c", "lms_sbgemm", torch.bfloat16, 64, 2, 0, {0: "no AVX512-BF16"}),
            "sbgemm_amx": ("sbgemm.c", "lms_sbgemm_amx", torch.bfloat16, 64, 2, 32,
                           {0: "no AMX-BF16, or the OS did not grant the tile state"})}
PANEL_KERNELS = tuple(_KERNELS)


@functools.lru_cache(maxsize=None)
def _load(name: str, compiler: str | None, cache_dir: str | None) -> CpuPanelGemm | None:
    del compiler, cache_dir  # part of the cache key only (build.py reads them)
    source, prefix, dtype, panel, pair, tile_k, reasons = _KERNELS[name]
    try:
        lib = load_kernels(Path(__file__).with_name(source))
        info = bind(lib, f"{prefix}_info")()
    except (KernelBuildError, AttributeError) as e:
        logger.warning("CPU %s kernel unavailable, using oneDNN for %s linears: %s", name, dtype, e)
        return None
    if info != 1 and name == "sbgemm_amx":
        logger.debug("CPU sbgemm_amx kernel not used (%s)", reasons.get(info, info))
        return None
    if info != 1:
        logger.info("CPU %s kernel not used on this CPU (%s); %s linears use oneDNN", name,
                    reasons.get(info, info), dtype)
        return None
    return CpuPanelGemm(lib, name, prefix, dtype, panel, pair, tile_k)


def get_kernel(name: str) -> CpuPanelGemm | None:
    """The panel kernel ``name`` (one of ``PANEL_KERNELS``), or None where it does not apply."""
    if kernels_disabled():
        return None
    env = os.environ
    return _load(name, env.get("LMSERVE_KERNEL_CC"), env.get("LMSERVE_KERNEL_CACHE"))


def get_sgemm_kernel() -> CpuPanelGemm | None:
    """The fp32 kernel, or None (see the module docstring)."""
    return get_kernel("sgemm")


def get_sbgemm_kernel() -> CpuPanelGemm | None:
    """The bf16 kernel: its AMX variant where the CPU and the OS allow it, else the AVX-512 one, or None."""
    return get_kernel("sbgemm_amx") or get_kernel("sbgemm")


def get_panel_kernel(dtype: torch.dtype) -> CpuPanelGemm | None:
    """The panel kernel for weights of ``dtype``, or None."""
    return get_sgemm_kernel() if dtype == torch.float32 else get_sbgemm_kernel() if dtype == torch.bfloat16 else None
