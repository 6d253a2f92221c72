"""Structured outputs: per-token overhead of constrained decoding and grammar compile time.

Runs the default model (SmolLM2-135M-Instruct, GGUF) offline (``LLM``) and, in the same process,
alternates unconstrained and constrained runs at batch 1 and 32 (``--repeats`` rounds; the median
is reported, so a run disturbed by other load on the machine does not decide the figure). Every
run decodes exactly ``--tokens`` tokens per sequence (``ignore_eos``; the constrained runs use a
JSON schema whose string field must be longer than that, so the grammar cannot end the sequence
first). Also times the mask work alone (filling the bitmask and applying it, per step) and the
compile of a large JSON schema (uncached, then from the cache).

    python benchmarks/structured_output.py --out benchmarks/results/2026-12-05-structured-outputs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmserve import LLM, SamplingParams  # noqa: E402
from lmserve.sampling_params import StructuredOutputsParams  # noqa: E402
from lmserve.structured_output import bitmask as bitmask_mod  # noqa: E402
from lmserve.worker import model_runner as runner_mod  # noqa: E402

LONG_STRING_SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}},
                      "required": ["story"]}


def large_schema(num_props: int = 120) -> dict:
    """A wide, nested schema: objects, arrays, enums, numbers with bounds, string patterns."""
    props: dict = {}
    for i in range(num_props):
        kind = i % 6
        if kind == 0:
            props[f"name_{i}"] = {"type": "string", "maxLength": 40}
        elif kind == 1:
            props[f"count_{i}"] = {"type": "integer", "minimum": 0, "maximum": 10000}
        elif kind == 2:
            props[f"level_{i}"] = {"enum": ["low", "medium", "high", f"custom_{i}"]}
        elif kind == 3:
            props[f"items_{i}"] = {"type": "array", "items": {"type": "object", "properties": {
                "id": {"type": "integer"}, "label": {"type": "string", "pattern": "^[a-z]{2,8}$"}},
                "required": ["id"]}, "maxItems": 5}
        elif kind == 4:
            props[f"flag_{i}"] = {"type": "boolean"}
        else:
            props[f"nested_{i}"] = {"type": "object", "properties": {
                "x": {"type": "number"}, "y": {"type": "number"}, "tag": {"type": "string", "format": "date"}},
                "required": ["x", "y"]}
    return {"type": "object", "properties": props, "required": sorted(props)[: num_props // 2]}


class MaskTimer:
    """Wall time spent in ModelRunner._grammar_mask (sync + fill) and StepGrammarMask.apply."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        self._fill = runner_mod.ModelRunner._grammar_mask
        self._apply = bitmask_mod.StepGrammarMask.apply
        timer = self

        def fill(runner, requests):
            t = time.perf_counter()
            out = timer._fill(runner, requests)
            timer.seconds += time.perf_counter() - t
            timer.steps += out is not None
            return out

        def apply(mask, logits):
            t = time.perf_counter()
            out = timer._apply(mask, logits)
            timer.seconds += time.perf_counter() - t
            return out

        runner_mod.ModelRunner._grammar_mask = fill
        bitmask_mod.StepGrammarMask.apply = apply

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.steps)
        self.seconds, self.steps = 0.0, 0
        return out


def run(llm: LLM, batch: int, tokens: int, constrained: bool, seed: int) -> float:
    so = StructuredOutputsParams(json=LONG_STRING_SCHEMA) if constrained else None
    params = SamplingParams(n=1, temperature=1.0, seed=seed, max_tokens=tokens, ignore_eos=True,
                            structured_outputs=so)
    prompts = [f"Write a long story number {i}:" for i in range(batch)]
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == tokens for o in outs), "a sequence ended early"
    return elapsed


def mask_micro(tokenizer, vocab_size: int, iters: int = 200) -> dict:
    """The mask work alone, without the model (robust on a busy machine): per step, filling the
    bitmask of B sequences inside LONG_STRING_SCHEMA's string and applying it to [B, V] logits."""
    import torch

    from lmserve.structured_output.bitmask import GrammarBitmask
    from lmserve.structured_output.config import StructuredOutputsConfig
    from lmserve.structured_output.manager import StructuredOutputManager

    manager = StructuredOutputManager(StructuredOutputsConfig(), tokenizer, vocab_size)
    compiled = manager.compile(StructuredOutputsParams(json=LONG_STRING_SCHEMA))
    out = {}
    for batch in (1, 32):
        states = [manager.new_state(compiled) for _ in range(batch)]
        for st in states:
            st.matcher.accept_string('{"story": "Once upon')
        buf = GrammarBitmask(batch, vocab_size)
        logits = torch.randn(batch, vocab_size)
        fill_t, apply_t = [], []
        for _ in range(iters):
            t = time.perf_counter()
            mask = buf.fill(list(enumerate(states)))
            t1 = time.perf_counter()
            mask.apply(logits)
            t2 = time.perf_counter()
            fill_t.append(t1 - t)
            apply_t.append(t2 - t1)
        out[batch] = {"fill_ms": 1000 * statistics.median(fill_t), "apply_ms": 1000 * statistics.median(apply_t)}
    manager.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--micro-only", action="store_true", help="only the mask work without the model "
                    "(writes micro.json)")
    args = ap.parse_args()

    if args.micro_only:
        from lmserve.tokenizer import get_tokenizer
        from lmserve.model.loader.resolve import default_model

        path = args.model or default_model()
        tok = get_tokenizer(os.path.dirname(path), gguf_file=os.path.basename(path)) if path.endswith(".gguf") \
            else get_tokenizer(path)
        micro = mask_micro(tok, 49152 if args.model is None else len(tok))
        print(json.dumps(micro, indent=1))
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "micro.json"), "w") as f:
                json.dump(micro, f, indent=1)
        return

    llm = LLM(args.model, kv_cache_memory=512 * 2**20, max_num_seqs=64)
    timer = MaskTimer()
    manager = llm.llm_engine.structured_outputs
    # Warm-up: the tokenizer table and the schema's compile, and one run of each kind.
    run(llm, 2, 8, True, 0)
    run(llm, 2, 8, False, 0)
    timer.take()

    results: dict = {"batches": {}, "tokens_per_sequence": args.tokens, "repeats": args.repeats}
    for batch in [int(b) for b in args.batches.split(",")]:
        free, cons, mask_ms = [], [], []
        for r in range(args.repeats):
            free.append(run(llm, batch, args.tokens, False, r))
            timer.take()
            cons.append(run(llm, batch, args.tokens, True, r))
            seconds, steps = timer.take()
            mask_ms.append(1000 * seconds / max(steps, 1))
        f, c = statistics.median(free), statistics.median(cons)
        results["batches"][batch] = {
            "unconstrained_s": free, "constrained_s": cons,
            "unconstrained_ms_per_step": 1000 * f / args.tokens, "constrained_ms_per_step": 1000 * c / args.tokens,
            "overhead_pct_end_to_end": 100 * (c - f) / f,
            "mask_ms_per_step": statistics.median(mask_ms),
            "mask_pct_of_unconstrained_step": 100 * statistics.median(mask_ms) / (1000 * f / args.tokens),
        }
        print(f"batch {batch}: {results['batches'][batch]}", flush=True)
        if args.out:  # partial results survive an interrupted run
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump(results, f, indent=1)

    schema = large_schema()
    params = StructuredOutputsParams(json=schema)
    t = time.perf_counter()
    manager.compile(params)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    manager.compile(params)
    warm = time.perf_counter() - t
    results["compile"] = {"schema_chars": len(json.dumps(schema)), "schema_properties": len(schema["properties"]),
                          "uncached_s": cold, "cached_s": warm}
    print(f"compile: {results['compile']}")
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "loadavg_at_end": os.getloadavg()}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table(results))
        print(table(results))


def table(results: dict) -> str:
    lines = ["| batch | unconstrained ms/step | constrained ms/step | end-to-end overhead | mask ms/step | "
             "mask / step |", "|---:|---:|---:|---:|---:|---:|"]
    for batch, r in results["batches"].items():
        lines.append(f"| {batch} | {r['unconstrained_ms_per_step']:.1f} | {r['constrained_ms_per_step']:.1f} | "
                     f"{r['overhead_pct_end_to_end']:+.1f}% | {r['mask_ms_per_step']:.3f} | "
                     f"{r['mask_pct_of_unconstrained_step']:.1f}% |")
    c = results["compile"]
    lines += ["", f"Large JSON schema ({c['schema_properties']} properties, {c['schema_chars']} characters): "
              f"compile {1000 * c['uncached_s']:.0f} ms uncached, {1000 * c['cached_s']:.2f} ms from the cache.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
