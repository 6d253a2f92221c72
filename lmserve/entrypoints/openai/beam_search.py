"""``use_beam_search`` for the server, on the engine's own beam search
(``lmserve.engine.beam_search.run_beam_search``, one 1-token request per live beam per
step). That routine is synchronous, so it runs in a worker thread whose step function
submits the step's requests to the event loop and waits for them; the loop keeps serving
everyone else meanwhile.

Invariant: when the HTTP request goes away, the search stops at its next step (the
thread sees the flag) and the step in flight finishes within one token.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from lmserve.engine.beam_search import run_beam_search
from lmserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from lmserve.sampling_params import BeamSearchParams, SamplingParams


class _Stopped(Exception):
    pass


async def _step(engine: Any, prompts: list[list[int]], params: SamplingParams, base_id: str
                ) -> list[dict[int, Logprob]]:
    async def one(i: int, ids: list[int]) -> dict[int, Logprob]:
        last = None
        async for out in engine.generate({"prompt_token_ids": ids}, params, f"{base_id}-{i}"):
            last = out
        assert last is not None and last.outputs[0].logprobs, "a beam step returns one token's logprobs"
        return last.outputs[0].logprobs[0]

    return list(await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)]))


def _eos_token_id(engine: Any) -> int | None:
    inner = getattr(engine, "engine", None)
    eos = getattr(inner, "eos_token_id", None)
    if eos is None and engine.tokenizer is not None:
        eos = engine.tokenizer.eos_token_id
    return eos


async def beam_search_stream(engine: Any, prompt: Any, params: SamplingParams, request_id: str,
                             max_len: int) -> AsyncIterator[RequestOutput]:
    """Yields one final RequestOutput with ``params.n`` beams (best first)."""
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    steps = itertools.count()
    arrival = time.time()

    def step_fn(prompts: list[list[int]], step_params: SamplingParams) -> list[dict[int, Logprob]]:
        if stop.is_set():
            raise _Stopped()
        fut = asyncio.run_coroutine_threadsafe(
            _step(engine, prompts, step_params, f"{request_id}-beam{next(steps)}"), loop)
        return fut.result()

    bp = BeamSearchParams(beam_width=params.n, max_tokens=params.max_tokens or max_len, ignore_eos=params.ignore_eos,
                          temperature=params.temperature, length_penalty=params.length_penalty,
                          include_stop_str_in_output=params.include_stop_str_in_output)
    eos = _eos_token_id(engine)
    try:
        seqs = await asyncio.to_thread(run_beam_search, step_fn, list(prompt.token_ids), bp, eos, max_len)
    finally:
        stop.set()
    n_prompt = len(prompt.token_ids)
    tok = engine.tokenizer
    outputs = []
    for i, s in enumerate(seqs[: params.n]):
        out_ids = s.tokens[n_prompt:]
        shown = out_ids[:-1] if out_ids and out_ids[-1] == eos and not params.include_stop_str_in_output \
            else out_ids
        text = tok.decode(shown, skip_special_tokens=params.skip_special_tokens) if tok is not None else ""
        outputs.append(CompletionOutput(i, text, out_ids, s.cum_logprob,
                                        s.logprobs if params.logprobs is not None else None,
                                        s.finish_reason or "length"))
    yield RequestOutput(request_id, prompt.text, list(prompt.token_ids), None, outputs, True,
                       metrics=RequestMetrics(arrival_time=arrival))
