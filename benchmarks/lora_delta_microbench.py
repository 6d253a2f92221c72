"""Per-module LoRA delta timings: one step's rows over 4 random rank-16 adapters on SmolLM2-135M's
projection shapes, each form of ``lmserve/lora/batch.py`` (the torch masked form, the native kernel's
AVX-512 and AMX modes where they load), warm caches. Prints min / median of 15 x 30 calls in µs.

    python benchmarks/lora_delta_microbench.py

A benchmark, never a test: it asserts nothing about speed.
"""

from __future__ import annotations

import statistics
import time

import torch

from lmserve.lora.batch import LoRABatchBuilder
from lmserve.lora.checkpoint import LayerDelta, LoRAAdapter
from lmserve.model.layers.cpu_kernels.lora_gemm import get_lora_kernel

# module -> (in features, out features, B's shard blocks (row0, row1, col0, col1)) at rank 16
SHAPES = {"qkv": (576, 960, ((0, 16, 0, 576), (16, 32, 576, 768), (32, 48, 768, 960))),
          "o": (576, 576, ((0, 16, 0, 576),)),
          "gate_up": (576, 3072, ((0, 16, 0, 1536), (16, 32, 1536, 3072))),
          "down": (1536, 576, ((0, 16, 0, 576),))}


def timed(fn, n: int = 30, reps: int = 15) -> tuple[float, float]:
    fn()
    res = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        res.append((time.perf_counter() - t0) / n * 1e6)
    return min(res), statistics.median(res)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    adapters = []
    for i in range(4):
        deltas = {}
        for key, (k, n, blocks) in SHAPES.items():
            c = blocks[-1][1]
            b = torch.zeros(c, n)
            for r0, r1, c0, c1 in blocks:
                b[r0:r1, c0:c1] = torch.randn(r1 - r0, c1 - c0, generator=gen) * 0.01
            deltas[key] = LayerDelta((torch.randn(c, k, generator=gen) / k ** 0.5).bfloat16(), b.bfloat16(),
                                     blocks if len(blocks) > 1 else None)
        adapters.append(LoRAAdapter(i + 1, f"a{i}", "", 16, deltas))
    forms = {"masked": LoRABatchBuilder(native=False)}
    for name, amx in (("native-avx512", False), ("native-amx", True)):
        kernel = get_lora_kernel(amx=amx)
        if kernel is not None:
            forms[name] = LoRABatchBuilder(native=kernel)
    print(f"torch threads: {torch.get_num_threads()}; µs per call, min/median")
    for rows, prefill in ((32, 0), (83, 64), (14, 0)):  # decode; a 64-token prompt chunk + 19 decodes; few
        per_seq = [adapters[i % 4] for i in range(rows - prefill)] + ([adapters[0]] if prefill else [])
        qlens = [1] * (rows - prefill) + ([prefill] if prefill else [])
        for key, (k, n, _) in SHAPES.items():
            x, y = torch.randn(rows, k).bfloat16(), torch.randn(rows, n).bfloat16()
            cells = []
            for name, builder in forms.items():
                mapping = builder.build(per_seq, qlens, torch.device("cpu"))
                mapping.segmented = False  # the masked form on every step shape
                lo, med = timed(lambda: mapping.add_delta(key, x, y))
                cells.append(f"{name} {lo:.0f}/{med:.0f}")
            print(f"rows={rows:3d} {key:8s} " + "  ".join(cells))


if __name__ == "__main__":
    main()
