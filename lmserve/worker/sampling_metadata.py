"""Per-step sampling metadata: what the sampler needs about every row of the batch.

Built by ``InputBatch.make_sampling_metadata()``; row ``i`` of every per-row field is
the request ``InputBatch.req_ids[i]``. Fields that no row uses are None (the sampler
then skips that stage), so the common all-default batch costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmserve.worker.logits_processors.interface import LogitsProcessors


@dataclass
class SamplingMetadata:
    num_reqs: int
    # [B] float32; greedy rows hold 0.0. None when every row is greedy.
    temperature: torch.Tensor | None
    all_greedy: bool
    all_random: bool
    # [B] float32 in (0, 1]; None when no row uses top_p.
    top_p: torch.Tensor | None
    # [B] int64 in [1, vocab]; vocab means "off" for that row. None when no row uses top_k.
    top_k: torch.Tensor | None
    # [B] float32; informational: min_p is applied by ``MinPLogitsProcessor``. None if unused.
    min_p: torch.Tensor | None
    # row -> the request's own generator (seeded, non-greedy rows only).
    generators: dict[int, torch.Generator]
    # Largest logprobs count asked by any row (-1 = whole vocabulary); None if no row wants logprobs.
    max_num_logprobs: int | None
    no_penalties: bool
    # Rows with any non-neutral penalty (the only rows whose output tokens are counted).
    penalty_rows: list[int]
    # [B] float32 each; None when ``no_penalties``.
    presence_penalties: torch.Tensor | None
    frequency_penalties: torch.Tensor | None
    repetition_penalties: torch.Tensor | None
    # [B, V] bool, prompt tokens of rows with a repetition penalty; None if unused.
    prompt_token_mask: torch.Tensor | None
    # [B, V] bool, True where a token is NOT allowed; None when no row restricts tokens.
    allowed_token_ids_mask: torch.Tensor | None
    # row -> token-id sequences of its bad words (rows without bad words absent).
    bad_words_token_ids: dict[int, list[list[int]]]
    # Live per-row output token lists (read at sampling time; never copied).
    output_token_ids: list[list[int]]
    # Per-row prompt token ids (None where not given).
    prompt_token_ids: list[list[int] | None]
    logitsprocs: LogitsProcessors = field(default_factory=LogitsProcessors)
    # The largest top-k of the rows that want top-k logprobs (0 when only whole-vocabulary or
    # ``logprob_token_ids`` rows want logprobs); the sampler gathers this many for every row.
    topk_num_logprobs: int = 0
    # row -> the token ids whose logprobs that row wants (vLLM's ``logprob_token_ids``).
    logprob_token_ids: dict[int, list[int]] = field(default_factory=dict)
