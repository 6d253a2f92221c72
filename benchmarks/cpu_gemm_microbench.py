"""Dense CPU linears: ``F.linear`` (MKL sgemm) against oneDNN on a prepacked weight
(``lmserve.model.layers.cpu_gemm``), per row count, on the weight shapes of issue 4's
random Qwen2-365M model (QKV, O, gate|up, down, the tied 8192-row head).

Each call reads its weight from DRAM, as a decode step does: the script rotates over enough
copies of each weight (``--copies``, default about 256 MB per shape) that none stays in the caches.
Prints GFLOP/s for both and the ratio.

    python benchmarks/cpu_gemm_microbench.py [--dtype float32|bfloat16] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lmserve.model.layers.cpu_gemm import BATCH_HINT, pack_weight, packed_linear

SHAPES = {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864), "lm_head": (8192, 896)}
ROWS = (1, 4, 8, 16, 32, 64, 256, 1024)


def best_seconds(fn, calls: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        fn(0)
        t = time.perf_counter()
        for i in range(calls):
            fn(i)
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--pool-mb", type=int, default=256, help="bytes of weight copies per shape")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"oneDNN layout for {BATCH_HINT} rows; GFLOP/s, weights read from DRAM")
    print(f"| shape | N x K | M | F.linear | oneDNN packed | ratio |\n|---|---|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        copies = max(2, args.pool_mb * 2**20 // (n * k * dtype.itemsize))
        weights = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(copies)]
        packed = [pack_weight(w) for w in weights]
        for m in ROWS:
            x = torch.randn(m, k, generator=gen).to(dtype)
            calls = max(copies, 8)
            t_mkl = best_seconds(lambda i: F.linear(x, weights[i % copies]), calls)
            t_dnn = best_seconds(lambda i: packed_linear(x, packed[i % copies], None), calls)
            flops = 2 * m * n * k
            print(f"| {name} | {n} x {k} | {m} | {flops / t_mkl / 1e9:.1f} | {flops / t_dnn / 1e9:.1f} | "
                  f"{t_mkl / t_dnn:.2f}x |", flush=True)
        del weights, packed


if __name__ == "__main__":
    main()
