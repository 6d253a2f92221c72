"""Offline throughput: lmserve's ``LLM.generate`` against Hugging Face ``generate``, side by
side in one process on the same machine, with the machine's roofline measured in the same run.

The workload is vLLM's ``benchmark_throughput`` random dataset: N prompts of I random token
ids (fixed seed), each producing exactly O tokens (``min_tokens=O, ignore_eos=True`` /
``min_new_tokens=O``). lmserve gets all N at once (continuous batching); HF runs them in
batches of ``--hf-batch-size`` (default: all N), left padded with an attention mask. Each
engine is timed after a warm-up call on different prompts (N prompts, a few tokens), so no
prefix-cache hit and no first-call cost is in the timed run.

    python benchmarks/offline_throughput.py --num-prompts 32 --input-len 128 --output-len 128 \\
        --dtype bfloat16 [--model PATH | random-qwen2-365m] [--hf-batch-size B] [--json out.json]

``--model`` left out: the SmolLM2-135M-Instruct GGUF (HF loads it dequantized to ``--dtype``,
the same weights lmserve dequantizes). ``random-qwen2-365m``: a random-weight Qwen2 (hidden 896,
24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 8192, tied), made once and cached
under /tmp. A benchmark, never a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from roofline import (MachineRoofline, ModelShape, WorkloadBounds, measure_machine,  # noqa: E402
                      model_shape, workload_bounds)

RANDOM_QWEN2 = "random-qwen2-365m"
RANDOM_QWEN2_DIR = os.path.join(os.environ.get("LMSERVE_BENCH_CACHE", "/tmp/lmserve-bench"), RANDOM_QWEN2)
WARMUP_TOKENS = 8


class OtherCpu:
    """CPU seconds that other processes used between ``start()`` and ``stop()``: the
    machine's busy time (/proc/stat) less this process's (getrusage). A quiet machine gives
    ~0; anything near the wall time means another process shared the cores."""

    def _busy(self) -> float:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return float("nan")
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def _own(self) -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def start(self) -> None:
        self._b0, self._o0 = self._busy(), self._own()

    def stop(self) -> float:
        return max(0.0, (self._busy() - self._b0) - (self._own() - self._o0))


# ---------------------------------------------------------------------- models
def make_random_qwen2(path: str = RANDOM_QWEN2_DIR, seed: int = 0) -> str:
    """A random-weight Qwen2 of ~365M parameters in bf16, saved with ``save_pretrained``
    (made once; later calls reuse the directory)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=8192, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = f"{path}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.replace(tmp, path)
    return path


def resolve_model(model: str | None) -> tuple[str, bool]:
    """(path for lmserve and HF, whether it has a tokenizer)."""
    if model is None:
        from lmserve.model.loader.resolve import default_model

        return default_model(), True
    if model == RANDOM_QWEN2:
        return make_random_qwen2(), False
    has_tok = model.endswith(".gguf") or any(
        os.path.isfile(os.path.join(model, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    return model, has_tok


def load_hf(path: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        kwargs: dict[str, Any] = {"gguf_file": os.path.basename(path)}
        try:  # dense weights in `dtype`, as lmserve runs them (not GGUF blocks behind a kernel)
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), dtype=dtype, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval()


# ---------------------------------------------------------------------- workload
@dataclass
class Workload:
    prompts: list[list[int]]
    warmup_prompts: list[list[int]]
    output_len: int
    temperature: float
    seed: int

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return self.num_prompts * self.output_len


def make_workload(vocab_size: int, n: int, input_len: int, output_len: int, temperature: float,
                  seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    draw = lambda: rng.integers(0, vocab_size, size=(n, input_len)).tolist()  # noqa: E731
    return Workload(prompts=draw(), warmup_prompts=draw(), output_len=output_len,
                    temperature=temperature, seed=seed)


@dataclass
class Result:
    engine: str
    wall_s: float
    num_requests: int
    input_tokens: int
    output_tokens: int  # counted from the outputs, not assumed
    load_s: float
    warmup_s: float
    other_cpu_s: float = 0.0  # CPU time other processes used during the timed run

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tok_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.wall_s

    @property
    def req_s(self) -> float:
        return self.num_requests / self.wall_s


# ---------------------------------------------------------------------- engines
def run_lmserve(path: str, has_tokenizer: bool, dtype: str, wl: Workload,
                engine_args: dict[str, Any]) -> tuple[Result, list[list[int]]]:
    from lmserve.entrypoints.llm import LLM
    from lmserve.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(path, dtype=dtype, skip_tokenizer_init=not has_tokenizer, seed=wl.seed, **engine_args)
    load_s = time.perf_counter() - t0

    def params(max_tokens: int) -> list[SamplingParams]:
        return [SamplingParams(temperature=wl.temperature, max_tokens=max_tokens, min_tokens=max_tokens,
                               ignore_eos=True, seed=(wl.seed + i) if wl.temperature > 0 else None,
                               detokenize=has_tokenizer)
                for i in range(wl.num_prompts)]

    def as_prompts(ids: list[list[int]]) -> list[dict]:
        return [{"prompt_token_ids": p} for p in ids]

    warm = min(WARMUP_TOKENS, wl.output_len)
    t0 = time.perf_counter()
    llm.generate(as_prompts(wl.warmup_prompts), params(warm))
    warmup_s = time.perf_counter() - t0

    other = OtherCpu()
    other.start()
    t0 = time.perf_counter()
    outs = llm.generate(as_prompts(wl.prompts), params(wl.output_len))
    wall = time.perf_counter() - t0
    other_s = other.stop()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    gc.collect()
    return Result("lmserve", wall, wl.num_prompts, wl.input_tokens, sum(map(len, tokens)), load_s,
                  warmup_s, other_s), tokens


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def run_hf(model: torch.nn.Module, wl: Workload, batch_size: int,
           load_s: float) -> tuple[Result, list[list[int]]]:
    from transformers import GenerationConfig

    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    eos = 0 if eos is None else eos
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos
    sample = wl.temperature > 0

    def generate(prompts: list[list[int]], new_tokens: int, seed_offset: int) -> list[list[int]]:
        gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=sample,
                               temperature=wl.temperature if sample else None,
                               top_k=0 if sample else None, top_p=1.0 if sample else None,
                               pad_token_id=pad, eos_token_id=eos, use_cache=True)
        ids, mask = _left_pad(prompts, pad)
        if sample:
            torch.manual_seed(wl.seed + seed_offset)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        return out[:, ids.shape[1]:].tolist()

    warm = min(WARMUP_TOKENS, wl.output_len)
    t0 = time.perf_counter()
    generate(wl.warmup_prompts[:batch_size], warm, 0)
    warmup_s = time.perf_counter() - t0

    tokens: list[list[int]] = []
    other = OtherCpu()
    other.start()
    t0 = time.perf_counter()
    for start in range(0, wl.num_prompts, batch_size):
        tokens += generate(wl.prompts[start:start + batch_size], wl.output_len, start)
    wall = time.perf_counter() - t0
    other_s = other.stop()
    return Result("hf-transformers", wall, wl.num_prompts, wl.input_tokens, sum(map(len, tokens)), load_s,
                  warmup_s, other_s), tokens


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """How many requests produced identical tokens, and the mean common prefix length."""
    prefixes = []
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefixes.append(k)
    return {"identical": sum(int(x == y) for x, y in zip(a, b)), "requests": len(a),
            "mean_common_prefix": float(np.mean(prefixes)) if prefixes else 0.0}


# ---------------------------------------------------------------------- report
def report(args: argparse.Namespace, machine: MachineRoofline, shape: ModelShape, bounds: WorkloadBounds,
           results: list[Result], agree: dict[str, float] | None, dtype: torch.dtype) -> str:
    peak = machine.matmul_gflops(dtype)
    lines = [
        f"model: {args.model_label} | dtype {args.dtype} | N={args.num_prompts} I={args.input_len} "
        f"O={args.output_len} | temperature {args.temperature} | HF batch {args.hf_batch_size} | "
        f"torch {torch.__version__}, {machine.threads} threads",
        "",
        "Roofline (measured in this run):",
        f"- memory bandwidth: {machine.read_gbps:.1f} GB/s read (sum of {machine.buffer_mib} MiB), "
        f"{machine.copy_gbps:.1f} GB/s copy (read + write)",
        f"- matmul {machine.matmul_n}x{machine.matmul_n}: {machine.matmul_gflops_fp32:.0f} GFLOP/s fp32, "
        f"{machine.matmul_gflops_bf16:.0f} GFLOP/s bf16",
        f"- model: {shape.unique_params / 1e6:.1f}M params ({shape.matmul_params / 1e6:.1f}M in matmuls, "
        f"LM head {'tied' if shape.tied else 'untied'}), {shape.step_weight_bytes / 1e6:.0f} MB of weights "
        f"read per step, KV {shape.kv_bytes_per_token / 1024:.1f} KiB/token",
        f"- decode bound (weights / bandwidth): {bounds.decode_step_memory_ms:.2f} ms/step -> "
        f"{bounds.decode_tok_s_memory_bound:.0f} output tok/s at batch {args.num_prompts}",
        f"- FLOP bound (2 x params x tokens at {peak:.0f} GFLOP/s): {bounds.tok_s_flop_bound:.0f} tok/s",
        f"- this workload: {bounds.total_flops / 1e12:.2f} TFLOP, {bounds.total_bytes / 1e9:.1f} GB moved -> "
        f"FLOP floor {bounds.flop_bound_s:.2f} s, memory floor {bounds.memory_bound_s:.2f} s, roofline "
        f"{bounds.roofline_s:.2f} s ({bounds.output_tok_s_bound:.0f} output tok/s)",
        "",
        "| engine | output tok/s | total tok/s | req/s | wall s | GFLOP/s (% of matmul peak) "
        "| % of roofline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        gflops = bounds.total_flops / r.wall_s / 1e9
        lines.append(f"| {r.engine} | {r.output_tok_s:.1f} | {r.total_tok_s:.1f} | {r.req_s:.3f} | "
                     f"{r.wall_s:.2f} | {gflops:.1f} ({100 * gflops / peak:.0f}%) | "
                     f"{100 * bounds.roofline_s / r.wall_s:.1f}% |")
    by = {r.engine: r for r in results}
    if "lmserve" in by and "hf-transformers" in by:
        ratio = by["lmserve"].output_tok_s / by["hf-transformers"].output_tok_s
        lines += ["", f"lmserve / HF throughput: **{ratio:.2f}x**"]
    if agree is not None:
        lines.append(f"greedy outputs identical: {agree['identical']}/{agree['requests']} requests "
                     f"(mean common prefix {agree['mean_common_prefix']:.1f} of {args.output_len} tokens)")
    lines.append("load / warm-up s: " + ", ".join(f"{r.engine} {r.load_s:.1f} / {r.warmup_s:.1f}"
                                                 for r in results))
    lines.append("CPU used by other processes during the timed run: " + ", ".join(
        f"{r.engine} {r.other_cpu_s:.1f} s ({100 * r.other_cpu_s / r.wall_s:.0f}% of one core)" for r in results))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help=f"a directory, a .gguf file, or '{RANDOM_QWEN2}'; default: SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--hf-batch-size", type=int, default=None, help="default: all prompts in one batch")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: seeded sampling")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", default="lmserve,hf", help="comma-separated subset of lmserve,hf")
    ap.add_argument("--engine-args", type=json.loads, default={},
                    help='extra LLM(**kwargs) as JSON, e.g. \'{"max_num_batched_tokens": 4096}\'')
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    args.hf_batch_size = args.hf_batch_size or args.num_prompts
    args.model_label = args.model or "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    engines = {e.strip() for e in args.engines.split(",")}
    dtype = getattr(torch, args.dtype)
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.2f}: other work on this machine skews the figures",
              file=sys.stderr)
    path, has_tok = resolve_model(args.model)

    machine = measure_machine()
    # HF first only for its shape: the same weights lmserve loads, counted once.
    t0 = time.perf_counter()
    hf_model = load_hf(path, dtype)
    hf_load_s = time.perf_counter() - t0
    shape = model_shape(hf_model)
    bounds = workload_bounds(shape, machine, args.num_prompts, args.input_len, args.output_len, dtype)
    wl = make_workload(hf_model.config.vocab_size, args.num_prompts, args.input_len, args.output_len,
                       args.temperature, args.seed)

    results: list[Result] = []
    tokens: dict[str, list[list[int]]] = {}
    if "hf" in engines:
        r, tokens["hf"] = run_hf(hf_model, wl, args.hf_batch_size, hf_load_s)
        results.append(r)
    del hf_model
    gc.collect()
    if "lmserve" in engines:
        r, tokens["lmserve"] = run_lmserve(path, has_tok, args.dtype, wl, args.engine_args)
        results.insert(0, r)
    agree = agreement(tokens["lmserve"], tokens["hf"]) \
        if args.temperature == 0 and len(tokens) == 2 else None

    text = report(args, machine, shape, bounds, results, agree, dtype)
    print(text)
    print(f"load average (1 min) at start: {load_before:.2f}")
    for r in results:
        if r.other_cpu_s > 0.1 * r.wall_s:
            print(f"warning: other processes used {r.other_cpu_s:.1f} CPU s during {r.engine}'s "
                  f"{r.wall_s:.1f} s: its figure is not clean, run again on a quiet machine", file=sys.stderr)
    data = {"args": {k: v for k, v in vars(args).items()}, "model_path": path,
            "platform": platform.platform(), "torch": torch.__version__, "machine": asdict(machine),
            "model_shape": asdict(shape), "bounds": asdict(bounds),
            "results": [dict(asdict(r), output_tok_s=r.output_tok_s, total_tok_s=r.total_tok_s, req_s=r.req_s,
                             pct_roofline=100 * bounds.roofline_s / r.wall_s) for r in results],
            "greedy_agreement": agree, "loadavg_at_start": load_before}
    if len(results) == 2:
        data["ratio_lmserve_over_hf"] = results[0].output_tok_s / results[1].output_tok_s
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
    return data


if __name__ == "__main__":
    main()
