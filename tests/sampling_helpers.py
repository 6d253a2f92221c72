"""Helpers shared by the sampler / logits-processor / input-batch tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats

from lmserve.sampling_params import SamplingParams
from lmserve.worker.input_batch import InputBatch
from lmserve.worker.logits_processors.loading import build_logitsprocs
from lmserve.worker.sampler import Sampler, SamplerOutput


def make_batch(params: Sequence[SamplingParams], vocab: int, custom: Sequence[type | str] = (),
               prompts: Sequence[list[int] | None] | None = None,
               outputs: Sequence[list[int]] | None = None) -> tuple[InputBatch, list[list[int]]]:
    """A refreshed batch with one request per params (ids "r0", "r1", ...)."""
    procs = build_logitsprocs(None, "cpu", custom=custom)
    batch = InputBatch(max(len(params), 1), vocab, "cpu", procs)
    outs = [list(o) for o in outputs] if outputs is not None else [[] for _ in params]
    for i, p in enumerate(params):
        prompt = prompts[i] if prompts is not None else [0]
        batch.add_request(f"r{i}", p, prompt, outs[i])
    batch.refresh()
    return batch, outs


def sample(batch: InputBatch, logits: torch.Tensor, sampler: Sampler | None = None) -> SamplerOutput:
    sampler = sampler or Sampler(torch.Generator().manual_seed(0))
    return sampler(logits.clone(), batch.make_sampling_metadata())


def processed_logits(batch: InputBatch, logits: torch.Tensor) -> torch.Tensor:
    """Logits after the argmax-changing stages (mask, bad words, processors, penalties)."""
    return Sampler.apply_logits_processors(logits.clone(), batch.make_sampling_metadata())


def draw(params: SamplingParams, logits_row: torch.Tensor, n: int, seed: int = 0,
         custom: Sequence[type | str] = ()) -> np.ndarray:
    """Counts over the vocabulary of ``n`` draws of one request configuration."""
    vocab = logits_row.shape[-1]
    rows = min(n, 4000)
    batch, _ = make_batch([params] * rows, vocab, custom=custom)
    sampler = Sampler(torch.Generator().manual_seed(seed))
    counts = np.zeros(vocab, dtype=np.int64)
    done = 0
    while done < n:
        out = sampler(logits_row.expand(rows, vocab).clone(), batch.make_sampling_metadata())
        counts += np.bincount(out.sampled_token_ids.numpy(), minlength=vocab)
        done += rows
    return counts


def chisquare_pvalue(counts: np.ndarray, probs: torch.Tensor | np.ndarray) -> float:
    """p-value of ``counts`` under ``probs`` (zero-probability cells must have zero counts)."""
    probs = np.asarray(probs, dtype=np.float64)
    support = probs > 0
    assert counts[~support].sum() == 0, f"draws outside the support: {np.nonzero(counts * ~support)}"
    expected = probs[support] / probs[support].sum() * counts.sum()
    return float(stats.chisquare(counts[support], expected).pvalue)
