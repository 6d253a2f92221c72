"""Beam search as vLLM does it: one engine step per generated token, each live beam a
1-token request asking for the top 2*width logprobs; the prefix cache makes the
repeated prompts cheap. Beams are ranked by cumulative logprob while running and,
once complete, by ``cum_logprob / len(tokens) ** length_penalty`` (prompt included,
a final EOS not counted).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from lmserve.outputs import CompletionOutput, Logprob, RequestOutput
from lmserve.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams


@dataclass
class BeamSearchSequence:
    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]


_MAX_EXP = 700.0  # math.exp overflows past ~709.78


def beam_score(seq: BeamSearchSequence, eos_token_id: int | None, length_penalty: float) -> float:
    """``cum_logprob / n ** length_penalty``, computed as ``cum_logprob * exp(-length_penalty * ln n)``
    with the exponent clamped to +-700, so that any finite ``length_penalty`` (1e308, -1e308)
    gives a finite score or +-inf, never ZeroDivisionError or OverflowError. A NaN penalty
    counts as 0 (no length normalisation)."""
    n = len(seq.tokens)
    if eos_token_id is not None and seq.tokens and seq.tokens[-1] == eos_token_id:
        n -= 1
    n = max(n, 1)
    if seq.cum_logprob == 0.0 or n == 1 or length_penalty != length_penalty:
        return seq.cum_logprob
    exponent = min(max(-length_penalty * math.log(n), -_MAX_EXP), _MAX_EXP)
    return seq.cum_logprob * math.exp(exponent)


# step_fn: list of token-id prompts -> for each, the {token: Logprob} of the next position
StepFn = Callable[[list[list[int]], SamplingParams], list[dict[int, Logprob]]]


def run_beam_search(step_fn: StepFn, prompt_ids: list[int], params: BeamSearchParams,
                    eos_token_id: int | None, max_len: int) -> list[BeamSearchSequence]:
    width = params.beam_width
    step_params = SamplingParams(max_tokens=1, logprobs=2 * width, temperature=params.temperature,
                                 ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    beams = [BeamSearchSequence(list(prompt_ids))]
    completed: list[BeamSearchSequence] = []
    for _ in range(params.max_tokens):
        if not beams:
            break
        if len(beams[0].tokens) >= max_len:
            break
        next_lps = step_fn([b.tokens for b in beams], step_params)
        candidates: list[BeamSearchSequence] = []
        for beam, lps in zip(beams, next_lps):
            for tok, lp in lps.items():
                new = BeamSearchSequence(beam.tokens + [tok], beam.logprobs + [lps],
                                         beam.cum_logprob + lp.logprob)
                if tok == eos_token_id and not params.ignore_eos:
                    new.finish_reason = "stop"
                    completed.append(new)
                else:
                    candidates.append(new)
        candidates.sort(key=lambda b: b.cum_logprob, reverse=True)
        beams = candidates[:width]
    for b in beams:
        b.finish_reason = b.finish_reason or "length"
    completed.extend(beams)
    completed.sort(key=lambda b: beam_score(b, eos_token_id, params.length_penalty), reverse=True)
    return completed[:width]


def _sync_step_fn(engine) -> StepFn:
    counter = itertools.count()

    def step(prompts: list[list[int]], params: SamplingParams) -> list[dict[int, Logprob]]:
        ids = []
        for p in prompts:
            rid = f"beam-{next(counter)}"
            engine.add_request(rid, {"prompt_token_ids": p}, params)
            ids.append(rid)
        done: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid].outputs[0].logprobs[0] for rid in ids]

    return step


def beam_search(engine, prompt, params: BeamSearchParams) -> BeamSearchOutput:
    """Offline beam search over a synchronous ``LLMEngine``."""
    _, ids = engine.process_prompt(prompt)
    seqs = run_beam_search(_sync_step_fn(engine), ids, params, engine.eos_token_id,
                           engine.core.max_seq_len)
    tok = engine.tokenizer
    for s in seqs:
        if tok is not None:
            out_ids = s.tokens[len(ids):]
            if out_ids and out_ids[-1] == engine.eos_token_id and not params.include_stop_str_in_output:
                out_ids = out_ids[:-1]
            s.text = tok.decode(out_ids, skip_special_tokens=True)
    return BeamSearchOutput(seqs)


def beam_search_request_output(engine, prompt, sp: SamplingParams) -> RequestOutput:
    """``generate(..., SamplingParams(use_beam_search=True, n=width))`` as a RequestOutput."""
    text, ids = engine.process_prompt(prompt)
    max_tokens = sp.max_tokens or (engine.core.max_seq_len - len(ids))
    bp = BeamSearchParams(beam_width=sp.n, max_tokens=max_tokens, ignore_eos=sp.ignore_eos,
                          length_penalty=sp.length_penalty,
                          include_stop_str_in_output=sp.include_stop_str_in_output)
    result = beam_search(engine, prompt, bp)
    outputs = []
    for i, s in enumerate(result.sequences[: sp.n]):
        out_ids = s.tokens[len(ids):]
        outputs.append(CompletionOutput(i, s.text or "", out_ids, s.cum_logprob,
                                        s.logprobs if sp.logprobs is not None else None, s.finish_reason))
    return RequestOutput(request_id="beam", prompt=text, prompt_token_ids=ids, prompt_logprobs=None,
                         outputs=outputs, finished=True)
