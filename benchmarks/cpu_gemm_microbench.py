"""Dense CPU linears: ``F.linear`` against the prepacked backends of ``lmserve.model.backends.linear``
(oneDNN, and lmserve's panel kernel for the dtype where it applies: AVX2 sgemm for fp32, AVX512-BF16
sbgemm for bf16), per row count, on the weight shapes of issue 4's
random Qwen2-365M model (QKV, O, gate|up, down, the tied 8192-row head).

Each call reads its weight from DRAM, as a decode step does: the script rotates over enough
copies of each weight (``--copies``, default about 256 MB per shape) that none stays in the caches.
Prints GFLOP/s for each (the best of ``--repeats`` timed passes) and the best packed backend's ratio
to F.linear.

    python benchmarks/cpu_gemm_microbench.py [--dtype float32|bfloat16] [--threads N] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lmserve.model.backends.linear import ONEDNN_BATCH_HINT as BATCH_HINT
from lmserve.model.backends.linear import pack_dense
from lmserve.model.layers.cpu_kernels.sgemm import PANEL_KERNELS, get_kernel
from quantized_linear_microbench import time_us  # the sibling script's timer

SHAPES = {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864), "lm_head": (8192, 896)}
ROWS = (1, 4, 8, 16, 32, 64, 256, 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--pool-mb", type=int, default=256, help="bytes of weight copies per shape")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per figure; the best is printed")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"oneDNN layout for {BATCH_HINT} rows; GFLOP/s, weights read from DRAM")
    backends = ["onednn"] + [name for name in PANEL_KERNELS
                             if (kernel := get_kernel(name)) is not None and kernel.dtype == dtype]
    print(f"| shape | N x K | M | F.linear | {' | '.join(backends)} | best / F.linear |\n"
          f"|---|---|---:|---:|{'---:|' * len(backends)}---:|")
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        copies = max(2, args.pool_mb * 2**20 // (n * k * dtype.itemsize))
        weights = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(copies)]
        packed = {b: [pack_dense(w, b, get_kernel(b) if b != "onednn" else None) for w in weights] for b in backends}
        for m in ROWS:
            x = torch.randn(m, k, generator=gen).to(dtype)
            calls = max(copies, 8)
            t_mkl = time_us(lambda i: F.linear(x, weights[i % copies]), calls, args.repeats)
            times = [time_us(lambda i: packed[b][i % copies].linear(x, None), calls, args.repeats) for b in backends]
            flops = 2 * m * n * k  # per microsecond: flops / t / 1e3 GFLOP/s
            cols = " | ".join(f"{flops / t / 1e3:.1f}" for t in times)
            print(f"| {name} | {n} x {k} | {m} | {flops / t_mkl / 1e3:.1f} | {cols} | {t_mkl / min(times):.2f}x |",
                  flush=True)
        del weights, packed


if __name__ == "__main__":
    main()
