"""Decode step time of a Mixtral-shaped MoE against the dense model of equal active parameters, in one
process, offline ``LLMEngine``, random (dummy) weights.

MoE: hidden 512, 4 layers, 8 query / 2 KV heads of 64, 8 experts of intermediate 1792 (Mixtral's
3.5 x hidden), top-2, vocab 8192. Dense: the same with one MLP of intermediate 3584 (2 x the expert's),
so a token runs the same number of multiply-adds in both; the MoE holds 4x the MLP weights.

Per batch size B (``--batches``) and per variant, interleaved round by round (so a noisy machine
disturbs all alike): B requests of 32 prompt tokens, ``--max-tokens`` greedy tokens each
(ignore_eos); the wall time of every decode step (``LLMEngine.step`` after the prefill: scheduler,
model, sampler). Variants:
- ``dense``: the dense model as lmserve runs it (its native decode step where the plan gives one);
- ``dense-eager``: the same engine with the decode step switched off (layer by layer, as the MoE runs);
- ``moe``: the MoE as lmserve runs it (experts packed per expert for the plan's dense backend,
  grouped dispatch).
Then the feed-forward layer alone (``--layer-iters`` calls per variant, interleaved; min and median),
on T rows of one layer's weights: the dense MLP and the MoE on the plan's packed backend, and the
MoE on torch's stacked weights by its grouped path and by its gathered (bmm) path.
Writes ``results.json`` and ``table.md`` to ``--out``.

    python benchmarks/moe_decode.py [--dtype bfloat16|float32] [--batches 1,4,32] [--max-tokens 32] \
        [--rounds 3] [--out benchmarks/results/2026-12-05-moe]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

import torch

from lmserve.engine.arg_utils import EngineArgs
from lmserve.engine.llm_engine import LLMEngine
from lmserve.model.backends.plan import BackendPlan
from lmserve.model.layers.fused_moe import FusedMoE
from lmserve.model.loader.binding import bind_backends
from lmserve.model.models.llama import LlamaMLP
from lmserve.sampling_params import SamplingParams

GEOMETRY = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)
EXPERTS, TOP_K, EXPERT_INTER = 8, 2, 1792


def write_configs(root: str) -> dict[str, str]:
    from transformers import LlamaConfig, MixtralConfig

    dirs = {"moe": os.path.join(root, "moe"), "dense": os.path.join(root, "dense")}
    MixtralConfig(intermediate_size=EXPERT_INTER, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
                  **GEOMETRY).save_pretrained(dirs["moe"])
    LlamaConfig(intermediate_size=TOP_K * EXPERT_INTER, **GEOMETRY).save_pretrained(dirs["dense"])
    return dirs


def make_engine(path: str, dtype: str) -> LLMEngine:
    args = EngineArgs(model=path, dtype=dtype, load_format="dummy", skip_tokenizer_init=True, max_model_len=1024,
                      max_num_seqs=64, max_num_batched_tokens=4096, kv_cache_memory=256 * 2**20)
    return LLMEngine.from_engine_args(args)


def layer_bench(dtype: torch.dtype, rows: list[int], iters: int) -> list[dict]:
    """The feed-forward layer alone (see the module docstring): per T, min and median ms per variant."""
    from transformers import LlamaConfig

    gen = torch.Generator().manual_seed(0)

    def init(module: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        return module

    hidden = GEOMETRY["hidden_size"]
    dense_cfg = LlamaConfig(hidden_size=hidden, intermediate_size=TOP_K * EXPERT_INTER)
    plan = BackendPlan.for_device("cpu", dtype)
    dense = init(LlamaMLP(dense_cfg, dtype))
    bind_backends(dense, plan)
    torch_moe = init(FusedMoE(hidden, EXPERT_INTER, EXPERTS, TOP_K, True, dtype))
    packed_moe = FusedMoE(hidden, EXPERT_INTER, EXPERTS, TOP_K, True, dtype)
    packed_moe.load_state_dict(torch_moe.state_dict())
    bind_backends(packed_moe, plan)
    chosen = packed_moe.packed_experts is not None
    if not chosen:  # the plan keeps these experts on torch (oneDNN); pack them anyway, to show why
        from lmserve.model.loader.binding import dense_backend

        packed_moe.set_packed_experts([
            (dense_backend(plan, torch_moe.experts.gate_up_proj[e], hidden)[0].packed,
             dense_backend(plan, torch_moe.experts.down_proj[e], EXPERT_INTER)[0].packed) for e in range(EXPERTS)])
    packed_name = packed_moe.packed_experts[0][0].backend
    out = []
    for t in rows:
        x = torch.randn(t, hidden, generator=gen).to(dtype)
        variants = {"dense MLP (" + dense.down_proj.backend.name + ")": lambda: dense(x),
                    f"MoE packed ({packed_name}){' *' if chosen else ''}": lambda: packed_moe(x)}

        def stacked(gather_rows: int):
            def call():
                torch_moe.gather_max_rows = gather_rows
                return torch_moe(x)
            return call
        variants[f"MoE torch grouped{'' if chosen else ' *'}"] = stacked(0)
        variants["MoE torch gathered"] = stacked(1 << 30)
        times: dict[str, list[float]] = {v: [] for v in variants}
        for fn in variants.values():
            fn()
        for _ in range(iters):
            for v, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[v].append(time.perf_counter() - t0)
        for v, ts in times.items():
            out.append({"rows": t, "variant": v, "min_ms": min(ts) * 1e3, "median_ms": statistics.median(ts) * 1e3})
            print(f"  layer T={t:>3} {v:<28} min {min(ts) * 1e3:8.3f} ms  median {statistics.median(ts) * 1e3:8.3f} ms")
    return out


def busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds all processes used, CPU seconds this process used) so far; their deltas give the
    CPU that other processes took during a run (the machine is shared)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    tick = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (sum(fields[:8]) - idle) / tick, own.user + own.system


def decode_steps(engine: LLMEngine, batch: int, tag: str, max_tokens: int) -> tuple[list[float], list[list[int]]]:
    """Wall times (s) of one batch's decode steps, and the requests' tokens."""
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0, detokenize=False)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": [(37 * i + 11 * j) % 8000 + 100 for j in range(32)]},
                           sp)
    tokens: dict[str, list[int]] = {}
    engine.step()  # the prefill
    times = []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
        times.append(time.perf_counter() - t)
    return times, [tokens[f"{tag}-{i}"] for i in range(batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,4,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layer-rows", default="1,2,4,32")
    ap.add_argument("--layer-iters", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        dirs = write_configs(root)
        engines = {k: make_engine(p, args.dtype) for k, p in dirs.items()}
    dense_model = engines["dense"].core.runner.model
    native_step = dense_model.decode_step
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, CPU: {cpu}, "
              f"commit {commit}; dense decode step: {'native' if native_step is not None else 'none (eager)'}")
    print(header)
    results = {"dtype": args.dtype, "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "commit": commit, "geometry": dict(GEOMETRY, experts=EXPERTS, top_k=TOP_K, expert_inter=EXPERT_INTER,
                                                  dense_inter=TOP_K * EXPERT_INTER),
               "max_tokens": args.max_tokens, "rounds": args.rounds, "batches": {}}
    rows = []
    start_busy, start_load = busy_cpu_s(), os.getloadavg()[0]
    for batch in (int(b) for b in args.batches.split(",")):
        variants = ["dense", "dense-eager", "moe"]
        if native_step is None:
            variants.remove("dense")
        times: dict[str, list[float]] = {v: [] for v in variants}
        tokens: dict[str, list[list[int]]] = {}
        for engine in engines.values():
            decode_steps(engine, batch, f"warm{batch}", 4)
        for r in range(args.rounds):
            for v in variants:
                engine = engines["moe" if v == "moe" else "dense"]
                dense_model.decode_step = native_step if v == "dense" else None
                t, toks = decode_steps(engine, batch, f"{v}-{batch}-{r}", args.max_tokens)
                times[v] += t
                tokens.setdefault(v, toks)
        dense_model.decode_step = native_step
        med = {v: statistics.median(ts) * 1e3 for v, ts in times.items()}
        p10 = {v: statistics.quantiles(ts, n=10)[0] * 1e3 for v, ts in times.items()}
        results["batches"][str(batch)] = {"median_ms": med, "p10_ms": p10,
                                          "steps": {v: len(t) for v, t in times.items()}}
        for v in variants:
            rows.append((batch, v, med[v], p10[v], med[v] / med["dense-eager"]))
            print(f"  batch {batch:>3} {v:<13} median {med[v]:8.2f} ms  p10 {p10[v]:8.2f} ms  "
                  f"/ dense-eager {med[v] / med['dense-eager']:.2f}")
    table = [header, "", "| batch | variant | step median ms | step p10 ms | median / dense-eager |",
             "|---:|---|---:|---:|---:|"]
    table += [f"| {b} | {v} | {m:.2f} | {p:.2f} | {x:.2f} |" for b, v, m, p, x in rows]
    end_busy = busy_cpu_s()
    other = (end_busy[0] - start_busy[0]) - (end_busy[1] - start_busy[1])
    results["other_cpu_s_during_decode_runs"] = other
    table += ["", f"CPU used by other processes during the decode runs: {other:.1f} s (1-minute load average "
              f"{start_load:.1f} at their start, {os.getloadavg()[0]:.1f} at their end)."]
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    layer = layer_bench(dtype, [int(r) for r in args.layer_rows.split(",")], args.layer_iters)
    results["layer"] = layer
    table += ["", "Feed-forward layer alone (one layer's weights, calls interleaved; * = what lmserve runs):", "",
              "| rows T | variant | min ms | median ms |", "|---:|---|---:|---:|"]
    table += [f"| {r['rows']} | {r['variant']} | {r['min_ms']:.3f} | {r['median_ms']:.3f} |" for r in layer]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        suffix = "" if args.dtype == "bfloat16" else f"-{args.dtype}"
        with open(os.path.join(args.out, f"results{suffix}.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, f"table{suffix}.md"), "w", encoding="utf-8") as f:
            f.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
