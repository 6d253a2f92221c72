"""Random prompts and arrival times for `lmserve bench serve`, generated exactly as vLLM's random dataset."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from lmserve.benchmarks.metrics import SampleRequest

DEFAULT_RANDOM_VOCAB_SIZE = 32000  # token-id prompts without a tokenizer: ids in [256, this)
_NO_TOKENIZER_ID_FLOOR = 256  # low ids are special/byte tokens in most vocabularies


# ----------------------------------------------------------------------------- dataset
def _decode_to_target_len(tokenizer: Any, token_ids: list[int], target_len: int, rng: np.random.Generator,
                          max_retry: int = 10) -> tuple[str, list[int]]:
    """Decode, re-encode, and pad (random ids) or truncate until the text encodes to
    ``target_len`` tokens, at most ``max_retry`` rounds (vLLM's ``gen_prompt_decode_to_target_len``)."""
    remaining = max_retry
    while True:
        prompt = tokenizer.decode(token_ids)
        token_ids = tokenizer.encode(prompt, add_special_tokens=False)
        if remaining <= 0 or len(token_ids) == target_len:
            return prompt, token_ids
        if len(token_ids) < target_len:
            token_ids.extend(rng.integers(0, tokenizer.vocab_size, size=target_len - len(token_ids)).tolist())
        else:
            token_ids = token_ids[:target_len]
        remaining -= 1


def parse_range_ratio(value: str | float) -> tuple[float, float]:
    """``--random-range-ratio``: one float for input and output, or JSON ``{"input": a, "output": b}``."""
    if isinstance(value, str) and value.strip().startswith("{"):
        d = json.loads(value)
        return float(d["input"]), float(d["output"])
    return float(value), float(value)


def sample_random_requests(num_requests: int, input_len: int, output_len: int, prefix_len: int = 0,
                           range_ratio: str | float = 0.0, seed: int = 0, tokenizer: Any = None,
                           use_token_ids: bool = False, vocab_size: int = DEFAULT_RANDOM_VOCAB_SIZE,
                           request_id_prefix: str = "") -> list[SampleRequest]:
    """vLLM's random dataset (same RNG stream for the same tokenizer and seed).

    Lengths are uniform integers in ``[floor(L*(1-r)), ceil(L*(1+r))]`` (input lengths after
    subtracting the tokenizer's special tokens; output lengths at least 1). Each prompt is the shared
    prefix then ``allowed[(offset + i + arange(len)) % len(allowed)]``. Text prompts are decoded and
    re-encoded to length; token-id prompts (``use_token_ids`` or no tokenizer) are sent as ids.
    """
    rng = np.random.default_rng(seed)
    in_ratio, out_ratio = parse_range_ratio(range_ratio)
    if not (0.0 <= in_ratio < 1.0 and 0.0 <= out_ratio < 1.0):
        raise ValueError("--random-range-ratio must be in [0, 1).")
    if tokenizer is not None:
        num_special = int(tokenizer.num_special_tokens_to_add())
        vocab = int(tokenizer.vocab_size)
        allowed = np.array(sorted(set(range(vocab)) - set(tokenizer.all_special_ids)))
    else:
        num_special, vocab = 0, int(vocab_size)
        allowed = np.arange(min(_NO_TOKENIZER_ID_FLOOR, vocab // 2), vocab)
    real_input_len = max(0, int(input_len) - num_special)
    in_lo, in_hi = math.floor(real_input_len * (1 - in_ratio)), math.ceil(real_input_len * (1 + in_ratio))
    out_lo = max(math.floor(output_len * (1 - out_ratio)), 1)
    out_hi = max(math.ceil(output_len * (1 + out_ratio)), 1)
    if prefix_len + in_lo < 1:
        raise ValueError("--random-input-len is too small: every prompt needs at least one token.")
    input_lens = rng.integers(in_lo, in_hi + 1, size=num_requests)
    output_lens = rng.integers(out_lo, out_hi + 1, size=num_requests)
    offsets = rng.integers(0, vocab, size=num_requests)
    as_text = tokenizer is not None and not use_token_ids
    prefix: list[int] = []
    if prefix_len > 0:
        prefix = allowed[rng.integers(0, len(allowed), size=prefix_len)].tolist()
        if as_text:
            _, prefix = _decode_to_target_len(tokenizer, prefix, prefix_len, rng)
    requests = []
    for i in range(num_requests):
        inner = allowed[(int(offsets[i]) + i + np.arange(int(input_lens[i]))) % len(allowed)].tolist()
        ids = prefix + inner
        prompt: str | list[int] = ids
        if as_text:
            prompt, ids = _decode_to_target_len(tokenizer, ids, len(prefix) + int(input_lens[i]), rng)
        requests.append(SampleRequest(prompt=prompt, prompt_len=len(ids),
                                      expected_output_len=int(output_lens[i]),
                                      request_id=f"{request_id_prefix}{i}"))
    return requests


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float = 1.0,
                    rng: np.random.Generator | None = None) -> list[float]:
    """Send times (s after the start) for each request, as vLLM's ``get_request``: all 0 for an
    infinite rate; else gamma-distributed gaps (shape ``burstiness``; 1 = Poisson) rescaled so the
    last request goes out at exactly ``num_requests / request_rate``."""
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be positive, got {burstiness}.")
    if request_rate <= 0:
        raise ValueError(f"--request-rate must be positive, got {request_rate}.")
    if math.isinf(request_rate) or num_requests == 0:
        return [0.0] * num_requests
    if math.isinf(burstiness):
        gaps = np.full(num_requests, 1.0 / request_rate)
    else:
        rng = rng if rng is not None else np.random.default_rng(0)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
    times = np.cumsum(gaps)
    if times[-1] != 0:
        times *= (num_requests / request_rate) / times[-1]
    return times.tolist()


