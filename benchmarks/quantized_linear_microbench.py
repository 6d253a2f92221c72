"""The int4 CPU kernel against a dense matmul, per row count: where ``backends.quantized.MAX_ROWS``
comes from.

For each of SmolLM2-135M's weight shapes (QKV, O, gate|up, down, the 49152-row tied head) and
each row count M, times ``PackedWeight`` (Q4_1 as one int4 matmul, Q8_0 as the doubled-K int4
matmul) and ``F.linear`` on the dequantized weight in the activation dtype. ``--cold`` rotates
over enough copies of each weight (about 256 MB) that every call reads its weight from DRAM, as
a model's decode step does (a single hot copy of a small matrix sits in the L2/L3 caches and
flatters the dense path). The last column is the largest M at which the int kernel still wins.

``--token`` instead times one decode token's 121 int-path matmuls of SmolLM2-135M (30 layers x
QKV, O, gate|up, down as Q4_1, then the Q8_0 head; distinct weights, 96 MB, so from DRAM) at M = 1
with torch's int4 kernel and with lmserve's VNNI GEMV (``VnniWeight``, where the CPU has it),
interleaved, best and median of 30 tokens each.

    python benchmarks/quantized_linear_microbench.py [--dtype bfloat16|float32] [--cold] [--threads N] [--token]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from lmserve.model.layers.cpu_kernels.cpu_ops import get_cpu_ops
from lmserve.model.backends.block_formats import BLOCK_BYTES, GROUP, BlockQuantizedWeight
from lmserve.model.backends.quantized import PackedWeight, VnniWeight

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
ROWS = (1, 2, 4, 8, 16, 32)


def random_blocks(qtype: str, n: int, k: int, seed: int) -> BlockQuantizedWeight:
    """Random blocks of a valid layout (fp16 scales in a sane range, random packed values)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, k // GROUP, BLOCK_BYTES[qtype]), dtype=np.uint8)
    d = (rng.random((n, k // GROUP)) * 0.01 + 0.001).astype(np.float16)
    raw[..., 0:2] = d.view(np.uint8).reshape(n, k // GROUP, 2)
    if qtype == "Q4_1":
        raw[..., 2:4] = (-8 * d).astype(np.float16).view(np.uint8).reshape(n, k // GROUP, 2)
    return BlockQuantizedWeight(qtype, torch.from_numpy(raw))


def time_us(fn, calls: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        fn(0)
        t = time.perf_counter()
        for i in range(calls):
            fn(i)
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def token_matmuls(dtype: torch.dtype, tokens: int = 30) -> None:
    """One decode token's int-path matmuls per kernel (see the module docstring)."""
    ops = get_cpu_ops()
    blocks = [random_blocks("Q4_1", n, k, seed=i) for i in range(30)
              for n, k in (SHAPES["qkv"], SHAPES["o"], SHAPES["gate_up"], SHAPES["down"])]
    blocks.append(random_blocks("Q8_0", *SHAPES["lm_head"], seed=99))
    kernels = {"torch int4": [PackedWeight.from_blocks([b], torch.bfloat16) for b in blocks]}
    if ops is not None and ops.has_qgemv:
        kernels["lmserve VNNI"] = [VnniWeight.from_blocks([b], ops) for b in blocks]
    xs = {k: torch.randn(1, k).to(dtype) for k in (576, 1536)}
    mb = sum(b.blocks.numel() for b in blocks) / 1e6
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(tokens):
        for name, weights in kernels.items():
            t = time.perf_counter()
            for w, b in zip(weights, blocks):
                w(xs[b.shape[1]])
            times[name].append((time.perf_counter() - t) * 1e3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, activations {dtype}; one token's "
          f"{len(blocks)} matmuls ({mb:.0f} MB of GGUF blocks), ms")
    print("| kernel | best | median | GB/s at best |\n|---|---:|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {min(ts):.2f} | {statistics.median(ts):.2f} | {mb / min(ts):.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--cold", action="store_true", help="read every weight from DRAM (rotate over copies)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--token", action="store_true", help="one decode token's matmuls, torch int4 vs VNNI")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.token:
        token_matmuls(dtype)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, activations {args.dtype}, "
          f"{'cold (DRAM)' if args.cold else 'hot (cached)'} weights; microseconds per call")
    print(f"| qtype | shape | {' | '.join(f'M={m} int / dense' for m in ROWS)} | int wins up to M |")
    print("|---|---|" + "---:|" * (len(ROWS) + 1))
    for qtype in ("Q4_1", "Q8_0"):
        for name, (n, k) in SHAPES.items():
            copies = max(1, int(256e6 // (n * k * dtype.itemsize))) if args.cold else 1
            blocks = random_blocks(qtype, n, k, seed=0)
            packed = [PackedWeight.from_blocks([blocks], torch.bfloat16) for _ in range(copies)]
            dense = [blocks.dequantize().to(dtype) for _ in range(copies)]
            calls = max(copies, 20 if n > 10000 else 100)
            cells, wins, winning = [], 0, True
            for m in ROWS:
                x = torch.randn(m, k).to(dtype)
                t_int = time_us(lambda i: packed[i % copies](x), calls)
                t_dense = time_us(lambda i: F.linear(x, dense[i % copies]), calls)
                cells.append(f"{t_int:.0f} / {t_dense:.0f}")
                winning = winning and t_int < t_dense
                wins = m if winning else wins
            print(f"| {qtype} | {name} {n}x{k} | {' | '.join(cells)} | {wins or '-'} |")


if __name__ == "__main__":
    main()
