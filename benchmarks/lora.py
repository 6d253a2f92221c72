"""LoRA throughput: output tokens/s of one batch of N requests spread evenly over A adapters,
against the same N requests on the base model alone, in one process and one engine (so the same
weights, kernels and KV cache), alternating the two runs R times.

The adapters are random PEFT checkpoints (``adapter_config.json`` + ``adapter_model.safetensors``,
rank ``--rank``, on every projection q/k/v/o/gate/up/down, random non-zero A and B) written for
the model's geometry into a temporary directory. The workload: N prompts of I random token ids,
each producing exactly O tokens (``ignore_eos``), all submitted at once. Each timed run is
preceded by a warm-up on other prompts, and the prefix cache is off, so neither run reads the
other's blocks.

    python benchmarks/lora.py --num-prompts 32 --num-adapters 4 --rank 16 --input-len 128 \\
        --output-len 64 [--model PATH] [--out benchmarks/results/RUN]

``--model`` left out: the SmolLM2-135M-Instruct GGUF (its Q4_1 matrices kept quantized, bf16
activations). A benchmark, never a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_throughput import OtherCpu  # noqa: E402

from lmserve import LLM, SamplingParams  # noqa: E402
from lmserve.lora.request import LoRARequest  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapter(path: str, hf_config: Any, rank: int, seed: int) -> str:
    """A PEFT LoRA checkpoint on every projection of a Llama-family ``hf_config``."""
    from safetensors.torch import save_file

    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    inter = hf_config.intermediate_size
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
              "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for proj, (fan_in, fan_out) in shapes.items():
            kind = "self_attn" if proj in TARGETS[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{kind}.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
                   "bias": "none"}, f)
    return path


def timed_run(llm: LLM, prompts: list[list[int]], params: SamplingParams, loras: list[LoRARequest | None]
              ) -> dict[str, float]:
    """Wall time, and this process's CPU time: on a machine shared with other work, output tokens
    per CPU second of this process are the steadier figure (the wall time counts the others too)."""
    other = OtherCpu()
    other.start()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall_s": wall, "cpu_s": cpu, "output_tokens": tokens, "output_tok_s": tokens / wall,
            "output_tok_per_cpu_s": tokens / cpu, "other_cpu_s": other.stop()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--num-adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="directory for results.json and table.md")
    args = ap.parse_args(argv)

    llm = LLM(args.model, dtype=args.dtype, enable_lora=True, max_loras=args.num_adapters, max_lora_rank=args.rank,
              enable_prefix_caching=False, max_num_seqs=max(64, args.num_prompts))
    mc = llm.llm_engine.model_config
    tmp = tempfile.mkdtemp(prefix="lmserve-lora-bench-")
    adapters = [LoRARequest(f"bench-{i}", i + 1, write_random_adapter(os.path.join(tmp, f"a{i}"), mc.hf_config,
                                                                      args.rank, seed=i))
                for i in range(args.num_adapters)]
    gen = torch.Generator().manual_seed(0)
    vocab = mc.vocab_size

    def prompts() -> list[list[int]]:  # new random prompts on each call
        return [torch.randint(10, vocab - 10, (args.input_len,), generator=gen).tolist()
                for _ in range(args.num_prompts)]

    params = SamplingParams(temperature=0, max_tokens=args.output_len, min_tokens=args.output_len, ignore_eos=True,
                            detokenize=False)
    spread = [adapters[i % len(adapters)] for i in range(args.num_prompts)]
    base_only: list[LoRARequest | None] = [None] * args.num_prompts
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, detokenize=False)
    model = llm.llm_engine.core.runner.model
    native_step = model.decode_step
    runs: dict[str, list[dict[str, float]]] = {"base": [], "base-layered": [], "lora": []}
    for _ in range(args.repeats):
        for name, loras in (("base", base_only), ("base-layered", base_only), ("lora", spread)):
            if name == "base-layered" and native_step is None:
                continue
            # base-layered: the base model without the native decode step, the path LoRA steps take
            model.decode_step = None if name == "base-layered" else native_step
            llm.generate([{"prompt_token_ids": p} for p in prompts()], warm, lora_request=loras)
            runs[name].append(timed_run(llm, prompts(), params, loras))
    model.decode_step = native_step
    runs = {k: v for k, v in runs.items() if v}
    med = {k: statistics.median(r["output_tok_s"] for r in v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(r["output_tok_per_cpu_s"] for r in v) for k, v in runs.items()}
    # the machine's speed drifts between repeats (a shared VM): each repeat's own base / LoRA ratio,
    # its runs seconds apart, is the steadier figure; their median is reported beside the medians'
    paired = sorted(b["output_tok_s"] / lo["output_tok_s"] for b, lo in zip(runs["base"], runs["lora"]))
    result = {
        "benchmark": "lora", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "model": mc.model, "dtype": str(mc.dtype).replace("torch.", ""),
        "quantization": mc.quantization, "args": vars(args), "runs": runs,
        "median_output_tok_s": med, "median_output_tok_per_cpu_s": med_cpu,
        "slowdown_lora_vs_base": med["base"] / med["lora"],
        "paired_slowdowns": paired, "median_paired_slowdown": statistics.median(paired),
        "cpu_slowdown_lora_vs_base": med_cpu["base"] / med_cpu["lora"],
        "slowdown_lora_vs_base_layered": med["base-layered"] / med["lora"] if "base-layered" in med else None,
    }
    table = ["| run | output tok/s (median of %d) | output tok per CPU-s of this process | runs (tok/s) | "
             "other processes' CPU s per run |" % args.repeats, "|---|---|---|---|---|"]
    for k, label in (("base", "base model alone"),
                     ("base-layered", "base model alone, layer by layer (no native decode step)"),
                     ("lora", f"{args.num_adapters} adapters (rank {args.rank}), {args.num_prompts // args.num_adapters}"
                              " requests each")):
        if k not in runs:
            continue
        speeds = ", ".join(f"{r['output_tok_s']:.1f}" for r in runs[k])
        others = ", ".join(f"{r['other_cpu_s']:.1f}" for r in runs[k])
        table.append(f"| {label} | {med[k]:.1f} | {med_cpu[k]:.1f} | {speeds} | {others} |")
    table.append(f"\nslowdown (base tok/s / LoRA tok/s): **{result['slowdown_lora_vs_base']:.2f}x** wall, "
                 f"**{result['cpu_slowdown_lora_vs_base']:.2f}x** per CPU second")
    table.append(f"median of each repeat's own slowdown: **{result['median_paired_slowdown']:.2f}x** "
                 f"({', '.join(f'{r:.2f}' for r in paired)})")
    if result["slowdown_lora_vs_base_layered"] is not None:
        table.append(f"slowdown against the base model on the same layer-by-layer path: "
                     f"**{result['slowdown_lora_vs_base_layered']:.2f}x**")
    print("\n".join(table))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write("\n".join(table) + "\n")
    return result


if __name__ == "__main__":
    main()
