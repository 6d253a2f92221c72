"""ctypes binding of ``cpu_ops.c``: fused RMSNorm, rotary embedding and (on AVX-512 CPUs)
SiLU-and-mul for CPU tensors in float32 or bfloat16, and (on CPUs with AVX-512 VNNI) the integer-dot GEMV on llama.cpp
block-quantized weights.

``get_cpu_ops()`` compiles and loads the C source at first use (``build.py``) and returns a
``CpuOps``, or None where it cannot be had (no compiler, a failed build: logged once) or is
switched off with ``LMSERVE_DISABLE_CPU_KERNELS=1``. Each method returns its result, or None when
the inputs are not ones the kernels take (another device or dtype, a strided last dimension): the
caller then runs its pure-torch reference, which is also the definition of what the kernels compute
(``cpu_ops.c`` states how close). ctypes releases the GIL for the duration of each call.

Each call fills one of ``abi.py``'s argument structs (``lms_abi.h``); the library is refused at load
when its ABI differs (``abi.check_abi``). The only state is the loaded library, held by the
``CpuOps`` and cached by the lru_cache'd loader; a call builds its own struct, so calls from several
threads are safe.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from lmserve.model.layers.cpu_kernels.abi import QgemvArgs, RmsNormArgs, RopeArgs, SiluMulArgs, bind, load_kernels
from lmserve.model.layers.cpu_kernels.build import UNIT_FLAGS, KernelBuildError, kernels_disabled

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_ops.c")
FLAGS = UNIT_FLAGS[SOURCE.name]  # -ffp-contract=off: no FMA the torch reference does not do (see cpu_ops.c)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
MAX_ROW = 16384  # LMS_MAX_ROW: the longest row (hidden size, head dim) the fused ops take
QGEMV_MAX_ROWS = 8  # LMS_QGEMV_MAX_ROWS
QGEMV_MAX_K = 16384  # LMS_QGEMV_MAX_K


def _rows_ok(x: torch.Tensor) -> bool:
    """A CPU tensor of a supported dtype viewed as rows: dense last dimension, one row stride."""
    return x.device.type == "cpu" and x.dtype in DTYPE_CODES and x.dim() == 2 and (x.stride(1) == 1 or x.shape[1] <= 1)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuOps:
    """The loaded kernels (see the module docstring for the None convention)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        """``lib``: the checked library of cpu_ops.c (``abi.load_kernels``)."""
        self._lib = lib
        self._rms = bind(lib, "lms_rms_norm")
        self._rope = bind(lib, "lms_rope_neox")
        self._qgemv = bind(lib, "lms_qgemv")
        self._silu = bind(lib, "lms_silu_mul")
        self.has_qgemv = bool(bind(lib, "lms_qgemv_available")())
        self.has_silu = bool(bind(lib, "lms_silu_available")())

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc != 0:
            raise ValueError(f"CPU kernel {what} rejected its arguments (rc {rc})")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``RMSNorm`` of x [T, H] (after ``x + residual`` when given) -> (normed, x + residual or None)."""
        if not _rows_ok(x) or x.shape[1] > MAX_ROW or weight.dtype != x.dtype or not weight.is_contiguous() or \
                (residual is not None and (not _rows_ok(residual) or residual.dtype != x.dtype
                                           or residual.shape != x.shape)):
            return None
        t, h = x.shape
        out = torch.empty(t, h, dtype=x.dtype)
        res_out = None if residual is None else torch.empty(t, h, dtype=x.dtype)
        self._check(self._rms(RmsNormArgs(
            x=x.data_ptr(), x_stride=x.stride(0), res=_ptr(residual),
            res_stride=0 if residual is None else residual.stride(0), weight=weight.data_ptr(), out=out.data_ptr(),
            res_out=_ptr(res_out), rows=t, hidden=h, eps=eps, dtype=DTYPE_CODES[x.dtype],
            num_threads=torch.get_num_threads())), "rms_norm")
        return out, res_out

    def rope_neox(self, q: torch.Tensor, k: torch.Tensor,
                  cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """q [T, Hq, D], k [T, Hkv, D] (heads dense, any token stride) rotated by cos_sin [T, D]
        (``cat(cos, sin)`` rows) -> new contiguous (q, k)."""
        if q.dim() != 3 or k.dim() != 3 or q.dtype != k.dtype or cos_sin.dtype != q.dtype:
            return None
        t, hq, d = q.shape
        heads_dense = all(x.device.type == "cpu" and x.stride(2) == 1 and x.stride(1) == d for x in (q, k))
        if not heads_dense or d > MAX_ROW or q.dtype not in DTYPE_CODES or k.shape[0] != t or k.shape[2] != d or \
                cos_sin.shape != (t, d) or not _rows_ok(cos_sin):
            return None
        q_out, k_out = torch.empty(t, hq, d, dtype=q.dtype), torch.empty(t, k.shape[1], d, dtype=q.dtype)
        self._check(self._rope(RopeArgs(
            q=q.data_ptr(), q_stride=q.stride(0), k=k.data_ptr(), k_stride=k.stride(0), cos_sin=cos_sin.data_ptr(),
            cs_stride=cos_sin.stride(0), q_out=q_out.data_ptr(), k_out=k_out.data_ptr(), rows=t, num_q_heads=hq,
            num_kv_heads=k.shape[1], head_dim=d, dtype=DTYPE_CODES[q.dtype],
            num_threads=torch.get_num_threads())), "rope_neox")
        return q_out, k_out

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [T, 2I] (gate | up) -> silu(gate) * up [T, I], rounded like torch's two ops (the exp
        differs from torch's in the last bit, rarely); None where the kernel is absent or declines."""
        if not self.has_silu or not _rows_ok(x) or x.shape[1] % 2 or x.shape[1] == 0:
            return None
        t, i = x.shape[0], x.shape[1] // 2
        out = torch.empty(t, i, dtype=x.dtype)
        self._check(self._silu(SiluMulArgs(
            x=x.data_ptr(), x_stride=x.stride(0), out=out.data_ptr(), rows=t, inter=i, dtype=DTYPE_CODES[x.dtype],
            num_threads=torch.get_num_threads())), "silu_mul")
        return out

    def qgemv(self, x: torch.Tensor, qw: torch.Tensor, d: torch.Tensor, m: torch.Tensor, nibbles: bool,
              bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """x [M, K] (M <= 8, K a multiple of 64 up to 16384) times a block-quantized weight [N, K] in
        ``cpu_ops.c``'s layout (qw uint8, d and m float16 [N, K/32]), x quantized to 15 bits per block
        of 32 -> [M, N] in x's dtype, ``bias`` [N] added after that rounding (the same as
        ``qgemv(x) + bias``); None where the kernel is absent or does not take the input."""
        if not self.has_qgemv or not _rows_ok(x) or not 1 <= x.shape[0] <= QGEMV_MAX_ROWS or \
                x.shape[1] % 64 or x.shape[1] > QGEMV_MAX_K or \
                (bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous())):
            return None
        rows, k = x.shape
        n = d.shape[0]
        out = torch.empty(rows, n, dtype=x.dtype)
        self._check(self._qgemv(QgemvArgs(
            x=x.data_ptr(), x_stride=x.stride(0), qw=qw.data_ptr(), d=d.data_ptr(), m=m.data_ptr(), bias=_ptr(bias),
            out=out.data_ptr(), out_stride=n, rows=rows, n=n, k=k, dtype=DTYPE_CODES[x.dtype], nibbles=int(nibbles),
            num_threads=torch.get_num_threads())), "qgemv")
        return out

@functools.lru_cache(maxsize=None)
def _load(compiler: str | None, cache_dir: str | None) -> CpuOps | None:
    del compiler, cache_dir  # part of the cache key only (build.py reads them)
    try:
        return CpuOps(load_kernels(SOURCE))
    except (KernelBuildError, AttributeError) as e:
        logger.warning("fused CPU ops unavailable, using the torch reference ops: %s", e)
        return None


def get_cpu_ops() -> CpuOps | None:
    """The kernels, or None (see the module docstring)."""
    if kernels_disabled():
        return None
    env = os.environ
    return _load(env.get("LMSERVE_KERNEL_CC"), env.get("LMSERVE_KERNEL_CACHE"))
