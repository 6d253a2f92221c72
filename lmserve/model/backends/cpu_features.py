"""The CPU's instruction-set features, and which native kernels a feature set gives.

``native_kernels_for(features)`` mirrors the compile-time conditions of the C sources in
``model/layers/cpu_kernels`` (each is built with ``-march=native``), so backend selection can be
tested for any CPU by simulating its features; ``plan.loaded_native_kernels()`` asks the built
libraries themselves on this machine, and a test holds the two equal here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

# Every native kernel a backend can run, by name.
NATIVE_KERNELS = ("rms_norm", "rope", "silu_mul", "qgemv", "sgemm", "sbgemm", "sbgemm_amx", "bf16x3_amx",
                  "paged_attention", "paged_attention_amx", "decode_step")


@dataclass(frozen=True)
class CpuFeatures:
    """The features the kernels are conditioned on. ``avx512`` means AVX-512 F, BW and VL;
    ``amx_bf16`` means AMX-TILE and AMX-BF16 with the tile state granted by the OS."""

    avx2_fma: bool = False
    avx512: bool = False
    avx512_vnni: bool = False
    avx512_bf16: bool = False
    amx_bf16: bool = False

    @classmethod
    def from_flags(cls, flags: Iterable[str], amx_granted: bool = True) -> "CpuFeatures":
        """From /proc/cpuinfo-style flag names (``avx2``, ``fma``, ``avx512f``, ``avx512bw``,
        ``avx512vl``, ``avx512_vnni``, ``avx512_bf16``, ``amx_tile``, ``amx_bf16``)."""
        f = set(flags)
        avx512 = {"avx512f", "avx512bw", "avx512vl"} <= f
        return cls(avx2_fma={"avx2", "fma"} <= f, avx512=avx512,
                   avx512_vnni=avx512 and "avx512_vnni" in f,
                   avx512_bf16=avx512 and "avx512_bf16" in f,
                   amx_bf16=amx_granted and {"amx_tile", "amx_bf16"} <= f and avx512 and "avx512_bf16" in f)

    @classmethod
    def detect(cls) -> "CpuFeatures":
        """This machine's features (no flags found, e.g. not Linux/x86: none)."""
        flags: list[str] = []
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = line.split(":", 1)[1].split()
                        break
        except OSError:
            pass
        granted = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        return cls.from_flags(flags, amx_granted=granted)

    def describe(self) -> str:
        names = [n for n, on in (("AVX2+FMA", self.avx2_fma), ("AVX-512", self.avx512),
                                  ("VNNI", self.avx512_vnni), ("BF16", self.avx512_bf16),
                                  ("AMX-BF16", self.amx_bf16)) if on]
        return ", ".join(names) or "no AVX2"


def native_kernels_for(features: CpuFeatures) -> frozenset[str]:
    """The native kernels a build on a CPU with ``features`` provides (a C compiler assumed).
    The rules are the C sources' ``#if`` conditions and ``*_info()`` answers:
    norm, rope and paged attention have portable C paths; SiLU-and-mul needs AVX-512; the VNNI
    GEMV and the one-call decode step need AVX-512 VNNI; the fp32 panel GEMM runs on AVX2 + FMA
    CPUs without AVX-512 (oneDNN's AVX-512 kernels are preferred there); the bf16 panel GEMM
    needs AVX512-BF16, and its AMX variant (with its bf16x3 fp32 entry) and the AMX attention need AMX-BF16."""
    kernels = {"rms_norm", "rope", "paged_attention"}
    if features.avx512:
        kernels.add("silu_mul")
    if features.avx512_vnni:
        kernels.update(("qgemv", "decode_step"))
    if features.avx2_fma and not features.avx512:
        kernels.add("sgemm")
    if features.avx512_bf16:
        kernels.add("sbgemm")
    if features.amx_bf16:
        kernels.update(("sbgemm_amx", "bf16x3_amx", "paged_attention_amx"))
    return frozenset(kernels)
