"""Same-run A/B of two source trees of lmserve on the offline engine: W2-like (decode-heavy batch,
random Qwen2-365M in bf16, 64 prompts of 32 tokens, 256 output tokens each, 32 at a time) and
W3-like (one stream on the SmolLM2-135M GGUF, its Q4_1 weights kept quantized, 64 prompt tokens,
256 output tokens). Each measurement is a fresh process that imports lmserve from one tree; the
trees alternate (A, B, A, B, ...) so drift on a shared machine hits both alike.

    git worktree add /tmp/lmserve-base <base-commit>
    python benchmarks/tree_ab.py --a /tmp/lmserve-base --b . --rounds 3 --out benchmarks/results/RUN

Writes ``table.md`` (median and every run per tree, the ratio B / A) and ``results.json``. A
benchmark, never a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

WORKLOADS = {
    "W2": dict(model="random-qwen2-365m", num_prompts=64, input_len=32, output_len=256,
               engine_args={"max_num_seqs": 32}),
    "W3": dict(model=None, num_prompts=1, input_len=64, output_len=256, engine_args={}),
}


def worker(name: str) -> None:
    """Run one workload with the lmserve found first on sys.path; print one JSON line."""
    sys.path.insert(0, HERE)
    import lmserve
    import torch
    from offline_throughput import make_workload, resolve_model, run_lmserve

    w = WORKLOADS[name]
    path, has_tok = resolve_model(w["model"])
    vocab = 8192 if w["model"] else 49152
    wl = make_workload(vocab, w["num_prompts"], w["input_len"], w["output_len"], 0.0, 0)
    result, _ = run_lmserve(path, has_tok, "bfloat16", wl, w["engine_args"])
    print(json.dumps({"lmserve": os.path.dirname(lmserve.__file__), "torch_threads": torch.get_num_threads(),
                      "output_tok_s": result.output_tok_s, "wall_s": result.wall_s,
                      "other_cpu_s": result.other_cpu_s}))


def measure(tree: str, name: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name], env=env,
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if os.path.realpath(result["lmserve"]) != os.path.realpath(os.path.join(tree, "lmserve")):
        raise SystemExit(f"{tree}: imported lmserve from {result['lmserve']} (check PYTHONPATH / the editable install)")
    return result


def git_rev(tree: str) -> str:
    return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--a", help="the baseline tree (a git worktree of the commit before)")
    ap.add_argument("--b", default=".", help="the tree under test")
    ap.add_argument("--workloads", default="W2,W3")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=False)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    trees = {"A": args.a, "B": args.b}
    runs: dict[str, dict[str, list[dict]]] = {}
    for name in args.workloads.split(","):
        runs[name] = {"A": [], "B": []}
        for r in range(args.rounds):
            for label in ("A", "B") if r % 2 == 0 else ("B", "A"):
                res = measure(trees[label], name)
                runs[name][label].append(res)
                print(f"{name} round {r} {label}: {res['output_tok_s']:.1f} output tok/s "
                      f"(other CPU {res['other_cpu_s']:.1f} s)", flush=True)
    revs = {k: git_rev(v) for k, v in trees.items()}
    lines = [f"Same-run A/B, offline engine (`benchmarks/tree_ab.py --rounds {args.rounds}`); CPU: {cpu_name()}, "
             f"{os.cpu_count()} cores; A = {revs['A']}, B = {revs['B']}.", "",
             "| workload | A median tok/s | B median tok/s | B / A | A runs | B runs |", "|---|---:|---:|---:|---|---|"]
    for name, by in runs.items():
        med = {k: statistics.median(x["output_tok_s"] for x in v) for k, v in by.items()}
        each = {k: ", ".join(f"{x['output_tok_s']:.1f}" for x in v) for k, v in by.items()}
        lines.append(f"| {name} | {med['A']:.1f} | {med['B']:.1f} | {med['B'] / med['A']:.3f} | {each['A']} | {each['B']} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"revisions": revs, "cpu": cpu_name(), "workloads": WORKLOADS, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
