"""One batched sampler over per-request parameters (vLLM v1's order of operations).

``Sampler.forward(logits [B, V], metadata)``:
 1. raw logprobs (log_softmax of the model's logits) if any row wants logprobs;
 1b. the structured-output grammar bitmask of the constrained rows (banned tokens -> -inf);
 2. allowed_token_ids mask; 3. bad words; 4. non-argmax-invariant processors
    (min_tokens, logit_bias, custom); 5. penalties (repetition, frequency, presence);
 6. greedy rows: argmax; 7. temperature; 8. argmax-invariant processors (min_p);
 9. top_k / top_p; 10. sample by the exponential race ``argmax(probs / q)``, with q of a
    seeded row drawn from that request's generator and the rest from a shared one.
``logits`` is modified in place (converted to float32 first if needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING

import torch
from torch import nn

from lmserve.worker.sampling_metadata import SamplingMetadata

if TYPE_CHECKING:
    from lmserve.structured_output.bitmask import StepGrammarMask

_SAMPLING_EPS = 1e-5


@dataclass
class LogprobsTensors:
    """Column 0: the chosen token and its logprob; columns 1..k: the top-k tokens
    (descending). ``ranks[i]`` = 1 + number of tokens with a strictly larger logprob
    than row i's chosen token."""

    token_ids: torch.Tensor  # [N, k + 1] int64
    logprobs: torch.Tensor  # [N, k + 1] float32
    ranks: torch.Tensor  # [N] int64


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs
    # [B, V] raw logprobs, kept only when a row wants the whole vocabulary or logprob_token_ids
    # (the runner reads those rows from it; the top-k of the others is in ``logprobs``).
    raw_logprobs: torch.Tensor | None = None


def compute_logprobs_tensors(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """Gather the chosen tokens' logprobs, their ranks and the top-k of each row.

    ``logprobs`` [N, V] (already log-softmaxed), ``token_ids`` [N]; ``k = -1`` means
    the whole vocabulary, ``k = 0`` only the chosen token.
    """
    vocab = logprobs.shape[-1]
    k = vocab if k == -1 else min(k, vocab)
    token_ids = token_ids.to(device=logprobs.device, dtype=torch.long).view(-1, 1)  # [N, 1]
    token_lp = logprobs.gather(-1, token_ids)  # [N, 1]
    ranks = (logprobs > token_lp).sum(-1) + 1  # [N]
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=-1)  # [N, k]
        token_ids = torch.cat((token_ids, top_ids), dim=1)
        token_lp = torch.cat((token_lp, top_lp), dim=1)
    return LogprobsTensors(token_ids, token_lp.float(), ranks)


# ---------------------------------------------------------------------- logits stages
def apply_bad_words(logits: torch.Tensor, bad_words: dict[int, list[list[int]]],
                    output_token_ids: list[list[int]]) -> torch.Tensor:
    """Ban a bad word's last token where the output ends with the word's other tokens."""
    vocab = logits.shape[-1]
    rows: list[int] = []
    cols: list[int] = []
    for i, words in bad_words.items():
        past = output_token_ids[i]
        for word in words:
            prefix = len(word) - 1
            if prefix > len(past) or not 0 <= word[-1] < vocab:
                continue
            if prefix == 0 or past[-prefix:] == word[:-1]:
                rows.append(i)
                cols.append(word[-1])
    if rows:
        logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")
    return logits


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition penalty (HF/vLLM: divide positive logits, multiply negative ones, for
    tokens seen in prompt or output); frequency (x output count) and presence (x seen
    in output) subtracted."""
    batch, vocab = logits.shape
    rows: list[int] = []
    toks: list[int] = []
    for i in md.penalty_rows:
        out = md.output_token_ids[i]
        rows.extend(repeat(i, len(out)))
        toks.extend(out)
    counts = torch.zeros((batch, vocab), dtype=torch.float32, device=logits.device)  # [B, V]
    if toks:
        idx = (torch.tensor(rows, device=logits.device), torch.tensor(toks, device=logits.device))
        counts.index_put_(idx, torch.ones(len(toks), device=logits.device), accumulate=True)
    seen_out = counts > 0  # [B, V]
    assert md.frequency_penalties is not None and md.presence_penalties is not None
    if md.prompt_token_mask is not None and md.repetition_penalties is not None:
        seen = seen_out | md.prompt_token_mask
        pen = torch.where(seen, md.repetition_penalties.unsqueeze(1), 1.0)  # [B, V]
        logits = torch.where(logits > 0, logits / pen, logits * pen)
    logits -= md.frequency_penalties.unsqueeze(1) * counts
    logits -= md.presence_penalties.unsqueeze(1) * seen_out
    return logits


def apply_top_k_only(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (ties with the k-th kept); k == V means off."""
    vocab = logits.shape[-1]
    off = k >= vocab  # [B]
    k = k.masked_fill(off, 1)
    k_max = int(k.max())
    top = logits.topk(k_max, dim=-1).values  # [B, k_max], descending
    thresh = top.gather(1, (k - 1).unsqueeze(1))  # [B, 1]
    thresh.masked_fill_(off.unsqueeze(1), float("-inf"))
    return logits.masked_fill_(logits < thresh, float("-inf"))


def _top_k_top_p_sorted(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    """Reference path: one full sort per row (exact for any k and p)."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # [B, V] ascending
    if k is not None:
        thresh = sorted_logits.gather(1, (vocab - k).unsqueeze(1))  # [B, 1] the k-th largest
        sorted_logits.masked_fill_(sorted_logits < thresh, float("-inf"))
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    drop = cum <= (1.0 - p).unsqueeze(1)
    drop[:, -1] = False  # the top token always survives
    sorted_logits.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, order, sorted_logits)


def _top_k_top_p_candidates(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor,
                            num_candidates: int) -> torch.Tensor | None:
    """Fast path: decide top-k/top-p among each row's ``num_candidates`` largest logits.

    Exact whenever every top_p row's candidates hold at least mass p and no row has
    num_candidates < top_k < V; returns None otherwise (the caller then sorts).
    """
    vocab = logits.shape[-1]
    m = num_candidates
    if k is not None and bool(((k > m) & (k < vocab)).any()):
        return None
    vals, idx = logits.topk(m, dim=-1)  # [B, m] descending
    k_on = torch.zeros_like(p, dtype=torch.bool) if k is None else k < vocab  # [B]
    if k is not None:
        thresh = vals.gather(1, (k.clamp(max=m) - 1).unsqueeze(1))  # [B, 1]
        vals.masked_fill_((vals < thresh) & k_on.unsqueeze(1), float("-inf"))
    # Normaliser of each row's top-k distribution: its candidates when top_k is on, else everything.
    lse = torch.where(k_on, torch.logsumexp(vals, dim=-1), torch.logsumexp(logits, dim=-1))  # [B]
    probs = (vals - lse.unsqueeze(1)).exp()  # [B, m]
    cum = probs.cumsum(dim=-1)
    p_on = p < 1.0
    if bool((p_on & (cum[:, -1] < p)).any()):
        return None
    keep = torch.where(p_on.unsqueeze(1), (cum - probs) < p.unsqueeze(1), vals > float("-inf"))  # [B, m]
    filtered = torch.full_like(logits, float("-inf")).scatter_(1, idx, vals.masked_fill_(~keep, float("-inf")))
    return torch.where((p_on | k_on).unsqueeze(1), filtered, logits)


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None,
                      num_candidates: int = 1024) -> torch.Tensor:
    """top_k then top_p (keep the smallest set of top tokens whose mass reaches p).

    With top_p, the decision is first tried among each row's ``num_candidates``
    largest logits (a partial top-k instead of a full sort); the full sort runs only
    when that would not be exact.
    """
    if p is None:
        return logits if k is None else apply_top_k_only(logits, k)
    if num_candidates < logits.shape[-1]:
        out = _top_k_top_p_candidates(logits, k, p, num_candidates)
        if out is not None:
            return out
    return _top_k_top_p_sorted(logits, k, p)


class Sampler(nn.Module):
    """Samples one token per row. ``generator`` is the shared generator of unseeded
    rows (None: torch's default generator of the logits' device)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata,
                grammar_mask: StepGrammarMask | None = None) -> SamplerOutput:
        """``grammar_mask``: this step's structured-output bitmask (None: no row is constrained);
        applied before every other stage, after the raw logprobs are taken."""
        md = metadata
        if logits.dim() != 2 or logits.shape[0] != md.num_reqs:
            raise ValueError(f"logits must be [num_reqs={md.num_reqs}, vocab], got {tuple(logits.shape)}")
        logits = logits.to(torch.float32)  # [B, V]
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # [B, V], a new tensor
        if grammar_mask is not None:
            logits = grammar_mask.apply(logits)
        logits = self.apply_logits_processors(logits, md)
        sampled = self.sample(logits, md)  # [B] int64
        lp = None
        if raw_logprobs is not None:
            # Top-k only as wide as the top-k rows need: whole-vocabulary and logprob_token_ids
            # rows are read from ``raw_logprobs`` by the runner (one sort or gather of their row).
            lp = compute_logprobs_tensors(raw_logprobs, sampled, md.topk_num_logprobs)
        keep_raw = md.max_num_logprobs == -1 or bool(md.logprob_token_ids)
        return SamplerOutput(sampled, lp, raw_logprobs if keep_raw else None)

    @staticmethod
    def apply_logits_processors(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Everything that may change the argmax, in vLLM's order."""
        if md.allowed_token_ids_mask is not None:
            logits.masked_fill_(md.allowed_token_ids_mask, float("-inf"))
        if md.bad_words_token_ids:
            logits = apply_bad_words(logits, md.bad_words_token_ids, md.output_token_ids)
        for lp in md.logitsprocs.non_argmax_invariant:
            logits = lp.apply(logits)
        if not md.no_penalties:
            logits = apply_penalties(logits, md)
        return logits

    def sample(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        greedy = None if md.all_random else logits.argmax(dim=-1)  # [B]
        if md.all_greedy:
            assert greedy is not None
            return greedy
        assert md.temperature is not None
        is_greedy = md.temperature < _SAMPLING_EPS  # [B]
        temp = md.temperature.masked_fill(is_greedy, 1.0)
        logits = logits.div_(temp.unsqueeze(1))
        for lp in md.logitsprocs.argmax_invariant:
            logits = lp.apply(logits)
        logits = apply_top_k_top_p(logits, md.top_k, md.top_p)
        probs = logits.softmax(dim=-1)  # [B, V]
        sampled = self._exponential_race(probs, md.generators)
        return sampled if greedy is None else torch.where(is_greedy, greedy, sampled)

    def _exponential_race(self, probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
        """argmax(probs / q), q ~ Exp(1) i.i.d.: a draw from ``probs`` per row.

        q = -log(u), u ~ U[0, 1) (several times faster than ``exponential_()`` on CPU), and
        argmax(probs / q) = argmin(probs / log u): log u is clamped into [-1e30, -tiny] so that
        neither a zero nor an infinite q can exist (u = 1 happens on CUDA, u = 0 on CPU).
        """
        u = torch.empty_like(probs)  # [B, V]
        if len(generators) != probs.shape[0]:
            u.uniform_(generator=self.generator)
        for i, gen in generators.items():
            if gen.device == u.device:
                u[i].uniform_(generator=gen)
            else:  # e.g. a CPU generator with CUDA logits: draw where the generator lives
                u[i].copy_(torch.empty(u.shape[1], device=gen.device).uniform_(generator=gen))
        log_u = u.log_().clamp_(min=-1e30, max=-torch.finfo(u.dtype).tiny)  # [B, V], = -q
        return probs.div_(log_u).argmin(dim=-1)
