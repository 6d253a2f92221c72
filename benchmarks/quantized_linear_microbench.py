"""The int4 CPU kernel against a dense matmul, per row count: where ``quantized_linear.MAX_ROWS``
comes from.

For each of SmolLM2-135M's weight shapes (QKV, O, gate|up, down, the 49152-row tied head) and
each row count M, times ``PackedWeight`` (Q4_1 as one int4 matmul, Q8_0 as the doubled-K int4
matmul) and ``F.linear`` on the dequantized weight in the activation dtype. ``--cold`` rotates
over enough copies of each weight (about 256 MB) that every call reads its weight from DRAM, as
a model's decode step does (a single hot copy of a small matrix sits in the L2/L3 caches and
flatters the dense path). The last column is the largest M at which the int kernel still wins.

    python benchmarks/quantized_linear_microbench.py [--dtype bfloat16|float32] [--cold] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from lmserve.model.layers.quantized_linear import BLOCK_BYTES, GROUP, BlockQuantizedWeight, PackedWeight

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--cold", action="store_true", help="read every weight from DRAM (rotate over copies)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
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
