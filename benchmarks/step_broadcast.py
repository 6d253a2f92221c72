"""What the driver pays per step to hand the ``StepInputs`` to its worker ranks.

    PYTHONPATH=. python3 benchmarks/step_broadcast.py [--world-size 2] [--iters 200]
        [--out benchmarks/results/DATE-step-broadcast]

Spawns ``--world-size`` processes (one torch thread each) in one gloo group, as the ``mp`` executor
does, and times ``broadcast_object_list`` of a real ``StepInputs`` (``lmserve/worker/step_inputs.py``)
for typical step shapes: decode batches of 1-256 sequences with 2k-token contexts (block size 16),
and prefill chunks of 512-2048 tokens. Reported on rank 0 (the sender): median and p90 over
``--iters`` calls after a warm-up, and the pickled size.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = [("decode", 1, 1), ("decode", 32, 1), ("decode", 256, 1), ("prefill", 1, 512), ("prefill", 1, 2048),
          ("mixed", 31, 1)]  # (kind, sequences, tokens per sequence); "mixed": 31 decodes + one 480-token chunk


def make_step(kind: str, seqs: int, qlen: int):
    from lmserve.model.layers.attention_metadata import AttentionMetadata
    from lmserve.worker.step_inputs import StepInputs

    context, bs = 2048, 16
    qlens = [qlen] * seqs + ([480] if kind == "mixed" else [])
    slens = [context] * len(qlens)
    n = len(qlens)
    t = sum(qlens)
    qsl = torch.tensor([0] + [sum(qlens[:i + 1]) for i in range(n)], dtype=torch.int32)
    meta = AttentionMetadata(num_decodes=seqs if qlen == 1 else 0, query_start_loc=qsl,
                             seq_lens=torch.tensor(slens, dtype=torch.int32),
                             block_tables=torch.arange(n * context // bs, dtype=torch.int32).view(n, -1),
                             slot_mapping=torch.arange(t), block_size=bs, query_lens_cpu=qlens, seq_lens_cpu=slens,
                             max_query_len=max(qlens), max_seq_len=context, decode_only=kind == "decode")
    last = [int(qsl[i + 1]) - 1 for i in range(n)]
    return StepInputs(torch.arange(t), torch.arange(t), meta, [last])


def _worker(rank: int, world: int, init_file: str, iters: int, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = []
    for kind, seqs, qlen in SHAPES:
        step = make_step(kind, seqs, qlen)
        times = []
        for i in range(iters + 20):
            dist.barrier()
            box = [("step", step)] if rank == 0 else [None]
            t0 = time.perf_counter()
            dist.broadcast_object_list(box, src=0)
            if i >= 20:
                times.append(time.perf_counter() - t0)
        results.append({"step": kind, "sequences": seqs + (kind == "mixed"), "tokens": step.num_tokens,
                        "pickled_bytes": len(pickle.dumps(("step", step))),
                        "median_us": statistics.median(times) * 1e6, "p90_us": sorted(times)[int(0.9 * len(times))] * 1e6})
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "results.json")
        mp.spawn(_worker, args=(args.world_size, os.path.join(tmp, "init"), args.iters, out_file),
                 nprocs=args.world_size)
        with open(out_file) as f:
            results = json.load(f)
    lines = ["| step | sequences | tokens | pickled KiB | median us | p90 us |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['sequences']} | {r['tokens']} | {r['pickled_bytes'] / 1024:.1f} | "
              f"{r['median_us']:.0f} | {r['p90_us']:.0f} |" for r in results]
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"world_size": args.world_size, "iters": args.iters, "results": results}, f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
