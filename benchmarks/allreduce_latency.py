r"""All-reduce latency on this machine (torch.distributed, gloo), and what it implies for tensor
parallelism's scaling.

    python benchmarks/allreduce_latency.py [--world-size 2] [--hidden 896] [--layers 24] \
        [--rows 1,8,32,256] [--iters 300] [--out benchmarks/results/DATE-allreduce]

Spawns ``--world-size`` processes on this machine (one torch thread each), then times
``all_reduce`` (sum) of a ``[rows, hidden]`` activation, through gloo and through lmserve's
shared-memory all-reduce (``lmserve/distributed/shm_allreduce.py``), the collective a tensor-parallel decoder
runs twice per layer (after the attention output and the MLP down projections), for each row count
(the tokens of one step), in bf16 and fp32: per call, over runs of 20 back-to-back calls (after a
barrier), median and p90 over ``--iters / 20`` runs, on rank 0.

The estimate it writes (``estimate`` in results.json, and table.md): a decode step of a model whose
step is bound by streaming its weights (``weight_bytes`` at ``bandwidth`` GB/s) takes, at TP=t over
t machines (or sockets) each with its own memory bandwidth,

    step(t) = weight_bytes / (t * bandwidth) + 2 * layers * allreduce_t(rows)
    allreduce_t = allreduce_measured * (t - 1) / (world_size - 1)

(a ring all-reduce's latency grows with its 2(t-1) hops), so the speed-up is ``step(1) / step(t)``; on ONE machine the ranks share its bandwidth and the
first term does not shrink (TP then only adds the collectives). The all-reduce latency used is the
one measured here between processes on one host (shared memory through loopback TCP): across
machines, add the network's round trip per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, rows: list[int], hidden: int, iters: int,
            out_file: str, shm_name: str) -> None:
    from lmserve.distributed.shm_allreduce import ShmAllReduce

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    shm = ShmAllReduce(shm_name, rank, world, max_bytes=max(rows) * hidden * 4, create=rank == 0)
    dist.barrier()
    if rank == 0:
        shm.unlink()
    results = []
    for backend, reduce in (("gloo", dist.all_reduce), ("shm", shm.all_reduce)):
        for dtype in (torch.bfloat16, torch.float32):
            for r in rows:
                x = torch.randn(r, hidden).to(dtype)
                for _ in range(20):
                    reduce(x)
                times = []  # per call, over back-to-back runs of 20 calls (as a forward calls them)
                for _ in range(max(1, iters // 20)):
                    dist.barrier()
                    t0 = time.perf_counter()
                    for _ in range(20):
                        reduce(x)
                    times.append((time.perf_counter() - t0) / 20)
                results.append({"backend": backend, "dtype": str(dtype).removeprefix("torch."), "rows": r,
                                "hidden": hidden, "bytes": x.numel() * x.element_size(),
                                "median_us": statistics.median(times) * 1e6,
                                "p90_us": sorted(times)[int(0.9 * len(times))] * 1e6})
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def estimate(latencies: list[dict], weight_bytes: float, bandwidth_gbps: float, layers: int,
             world: list[int], measured_world: int = 2) -> list[dict]:
    """The model of the module docstring, for each backend, measured row count (bf16) and TP size."""
    rows = []
    for lat in (x for x in latencies if x["dtype"] == "bfloat16"):
        base = weight_bytes / (bandwidth_gbps * 1e9)
        for t in world:
            comm = 2 * layers * lat["median_us"] * 1e-6 * (t - 1) / max(1, measured_world - 1)
            step = base / t + comm
            rows.append({"backend": lat["backend"], "rows": lat["rows"], "tp": t, "step_ms": step * 1e3, "comm_ms": comm * 1e3,
                         "speedup": base / step, "same_machine_slowdown": (base + comm) / base})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--hidden", type=int, default=896, help="The 365M Qwen2's hidden size.")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--weight-mib", type=float, default=None,
                   help="Bytes a decode step streams (default: the 365M Qwen2 in bf16).")
    p.add_argument("--bandwidth-gbps", type=float, default=None,
                   help="Memory read bandwidth per machine (default: benchmarks/roofline.py's, measured now).")
    p.add_argument("--rows", default="1,8,32,256")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = [int(x) for x in args.rows.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        from lmserve.distributed.shm_allreduce import new_segment_name

        mp.spawn(_worker, args=(args.world_size, init_file, rows, args.hidden, args.iters, out_file,
                                new_segment_name()),
                 nprocs=args.world_size, join=True)
        with open(out_file) as f:
            latencies = json.load(f)
    weight_bytes = (args.weight_mib * 2**20) if args.weight_mib else 2 * 365e6
    bw = args.bandwidth_gbps
    if bw is None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from roofline import measure_bandwidth
        bw = measure_bandwidth()[0]
    est = estimate(latencies, weight_bytes, bw, args.layers, [1, 2, 4, 8], args.world_size)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   datetime.now().strftime("%Y-%m-%d") + "-allreduce")
    os.makedirs(out, exist_ok=True)
    result = {"date": datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count(),
              "world_size": args.world_size, "argv": sys.argv, "latencies": latencies,
              "weight_bytes": weight_bytes, "bandwidth_gbps": bw, "layers": args.layers, "estimate": est}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# all-reduce latency, {args.world_size} processes on one host (gloo), {result['date']}", "",
             "| backend | dtype | rows x hidden | bytes | median µs | p90 µs |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {x['backend']} | {x['dtype']} | {x['rows']} x {x['hidden']} | {x['bytes']:,} | {x['median_us']:.1f} | "
              f"{x['p90_us']:.1f} |" for x in latencies]
    lines += ["", f"Estimate: decode step of {weight_bytes / 2**20:,.0f} MiB of weights at {bw:.1f} GB/s per "
              f"machine, {args.layers} layers, 2 all-reduces per layer.", "",
              "| backend | rows | TP | step ms | of which all-reduce ms | speed-up over t machines | slowdown on one machine |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {e['backend']} | {e['rows']} | {e['tp']} | {e['step_ms']:.2f} | {e['comm_ms']:.2f} | {e['speedup']:.2f}x | "
              f"{e['same_machine_slowdown']:.2f}x |" for e in est]
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
