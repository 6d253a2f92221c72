"""Embeddings per second: lmserve's ``LLM.embed`` against sentence-transformers' ``encode``
on the same MiniLM files, in one process, one after the other, with the machine's matmul
roofline measured in the same run.

The workload is N sentences of varied length (a seeded mix of 4 to 120 words drawn from a
fixed vocabulary, so every run embeds the same texts). Both sides embed all N once to warm
up, then again timed; the figure is N / wall seconds. sentence-transformers runs with its
defaults (batch_size 32, length-sorted batches, float32); lmserve with its defaults
(continuous batching under a 2,048-token budget, float32 for this float32 checkpoint).
The report also gives the agreement (min cosine between the two sides' embeddings) and
the FLOP rate each side reached against the measured float32 matmul peak (2 x encoder
params x tokens, plus attention, per pass).

Usage: ``python benchmarks/embeddings_throughput.py [--num-sentences 1000] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_throughput import OtherCpu  # noqa: E402
from roofline import measure_matmul  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be has had "
         "model server request token batch kernel memory cache latency throughput vector embedding query "
         "document paris france capital river mountain history science music language computer network "
         "bridge winter summer garden ocean library market engine station ancient modern quickly slowly "
         "because although however therefore meanwhile elephant violin harbor telescope algorithm").split()


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.choice([rng.randint(4, 16)] * 3 + [rng.randint(17, 60), rng.randint(61, 120)])
        words = [rng.choice(WORDS) for _ in range(length)]
        out.append(" ".join(words).capitalize() + ".")
    return out


def minilm_path() -> str:
    from lmserve.model.loader.resolve import default_embedding_model
    return default_embedding_model()


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(best wall seconds, other processes' CPU seconds during that run, result)."""
    best, other_best, result = float("inf"), 0.0, None
    for _ in range(repeats):
        probe = OtherCpu()
        probe.start()
        t0 = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
        other = probe.stop()
        if wall < best:
            best, other_best = wall, other
    return best, other_best, result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-sentences", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from sentence_transformers import SentenceTransformer

    from lmserve import LLM

    path = minilm_path()
    sentences = make_sentences(args.num_sentences)
    st = SentenceTransformer(path, device="cpu")
    llm = LLM(path)
    tok = llm.get_tokenizer()
    max_len = llm.llm_engine.model_config.max_model_len
    num_tokens = sum(len(ids) for ids in tok(sentences, truncation=True, max_length=max_len)["input_ids"])

    def run_st():
        return torch.as_tensor(st.encode(sentences, convert_to_numpy=True))

    def run_lmserve():
        outs = llm.embed(sentences, truncate_prompt_tokens=-1)
        return torch.tensor([o.outputs.embedding for o in outs])

    run_st(), run_lmserve()  # warm-up: allocator, thread pools, first-call paths
    peak = measure_matmul(1024, torch.float32, 3)
    st_s, st_other, st_emb = timed(run_st, args.repeats)
    lm_s, lm_other, lm_emb = timed(run_lmserve, args.repeats)
    cos = torch.nn.functional.cosine_similarity(st_emb, lm_emb, dim=-1)

    cfg = llm.llm_engine.model_config.hf_config
    params = sum(p.numel() for n, p in llm.llm_engine.core.runner.model.named_parameters()
                 if "embeddings" not in n)
    flops = 2 * params * num_tokens  # attention adds < 5% at these lengths
    print(f"MiniLM-L6 ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}), {args.num_sentences} sentences, "
          f"{num_tokens} tokens (mean {num_tokens / args.num_sentences:.1f}), threads {torch.get_num_threads()}, "
          f"best of {args.repeats}")
    print(f"float32 matmul peak measured in this run: {peak:.0f} GFLOP/s")
    print("| engine | wall s | embeddings/s | tokens/s | GFLOP/s (% of peak) | other CPU s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, wall, other in (("sentence-transformers", st_s, st_other), ("lmserve LLM.embed", lm_s, lm_other)):
        gf = flops / wall / 1e9
        print(f"| {name} | {wall:.2f} | {args.num_sentences / wall:.0f} | {num_tokens / wall:.0f} | "
              f"{gf:.0f} ({100 * gf / peak:.0f}%) | {other:.2f} |")
    print(f"ratio lmserve / sentence-transformers: {st_s / lm_s:.2f}x; "
          f"cosine agreement min {cos.min().item():.6f}, mean {cos.mean().item():.6f}")
    if max(st_other, lm_other) > 0.2 * min(st_s, lm_s):
        print("WARNING: other processes used the CPU during a timed run; the figures are not clean.")


if __name__ == "__main__":
    main()
