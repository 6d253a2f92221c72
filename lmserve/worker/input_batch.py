"""The persistent batch: which request owns which row of the sampler's logits.

Rows persist across steps so logits processors can keep per-row state. A step is:

    for req_id in finished / preempted / not sampling this step: batch.remove_request(req_id)
    for each new or resumed request that samples this step:      batch.add_request(...)
    batch.refresh()                          # condense, notify processors, rebuild tensors
    logits = ...                             # [batch.num_reqs, vocab], row i = batch.req_ids[i]
    out = sampler(logits, batch.make_sampling_metadata())

Invariants after ``refresh()``:
- rows are dense: ``req_ids`` has ``num_reqs`` entries, row i belongs to ``req_ids[i]``;
- every processor received exactly one ``update_state`` call for this refresh (None when
  membership did not change) describing the changes since the previous refresh;
- the sampling metadata matches ``req_ids``; per-row tensors are rebuilt only when
  membership changed (output token lists are live references, never copied).
Only requests that sample a token this step may be in the batch (a chunked prefill
that does not reach the end of its prompt must not be), because every row draws from
its generator: a seeded request's sequence then depends only on its own tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lmserve.sampling_params import SamplingParams, SamplingType
from lmserve.worker.logits_processors.interface import (
    BatchUpdateBuilder,
    LogitsProcessors,
    MoveDirectionality,
)
from lmserve.worker.sampling_metadata import SamplingMetadata

logger = logging.getLogger(__name__)


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request generator of a seeded, non-greedy request (None otherwise).
    Create it once per request and pass it to every ``add_request`` of that request."""
    if params.sampling_type != SamplingType.RANDOM_SEED:
        return None
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(params.seed)  # type: ignore[arg-type]
    return gen


@dataclass
class _Row:
    req_id: str
    params: SamplingParams
    prompt_token_ids: list[int] | None
    output_token_ids: list[int]  # live: the request's own list, appended to by the engine
    generator: torch.Generator | None


class InputBatch:
    """Rows of the requests that sample this step, and their sampling tensors."""

    def __init__(self, max_num_reqs: int, vocab_size: int, device: torch.device | str,
                 logitsprocs: LogitsProcessors | None = None, pin_memory: bool = False) -> None:
        """``vocab_size`` must equal the width of the logits given to the sampler;
        ``logitsprocs=None`` means the built-in processors only."""
        if logitsprocs is None:
            from lmserve.worker.logits_processors.loading import build_logitsprocs
            logitsprocs = build_logitsprocs(None, device, custom=(), is_pin_memory=pin_memory)
        self.max_num_reqs = max_num_reqs
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.logitsprocs = logitsprocs
        self._rows: list[_Row | None] = []
        self._index: dict[str, int] = {}
        self._builder = BatchUpdateBuilder()
        self._pending_swaps = False
        self._metadata: SamplingMetadata | None = None

    # ------------------------------------------------------------------ membership
    @property
    def num_reqs(self) -> int:
        return len(self._index)

    @property
    def req_ids(self) -> list[str]:
        """Request ids in row order (dense and row-aligned after ``refresh()``;
        between calls, holes left by removals are skipped)."""
        return [r.req_id for r in self._rows if r is not None]

    @property
    def req_id_to_index(self) -> dict[str, int]:
        return dict(self._index)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._index

    def get_generator(self, req_id: str) -> torch.Generator | None:
        row = self._rows[self._index[req_id]]
        return row.generator if row is not None else None

    def add_request(self, req_id: str, params: SamplingParams, prompt_token_ids: list[int] | None,
                    output_token_ids: list[int], generator: torch.Generator | None = None) -> int:
        """Add a request; returns its (provisional) row. ``output_token_ids`` must be the
        request's live list. ``generator`` should be the request's own generator (see
        ``make_generator``); a seeded request without one gets a fresh generator here,
        which restarts its random sequence each time it is re-added."""
        if req_id in self._index:
            raise ValueError(f"request {req_id!r} is already in the batch")
        if self.num_reqs >= self.max_num_reqs:
            raise RuntimeError(f"the batch is full ({self.max_num_reqs} requests)")
        if self._pending_swaps:
            self.refresh()
        if generator is None and params.sampling_type == SamplingType.RANDOM_SEED:
            generator = make_generator(params, self.device)
        index = self._builder.pop_removed()
        if index is None:
            index = len(self._rows)
            self._rows.append(None)
        self._rows[index] = _Row(req_id, params, prompt_token_ids, output_token_ids, generator)
        self._index[req_id] = index
        self._builder.added.append((index, params, prompt_token_ids, output_token_ids))
        return index

    def remove_request(self, req_id: str) -> int | None:
        """Remove a request; returns its former row, or None if it was not in the batch."""
        index = self._index.pop(req_id, None)
        if index is None:
            return None
        if self._pending_swaps:
            self._index[req_id] = index
            self.refresh()
            index = self._index.pop(req_id)
        self._rows[index] = None
        # A request added since the last refresh is simply forgotten: processors never
        # see it, and the slot it took counts as freed by the earlier removal again.
        self._builder.added = [a for a in self._builder.added if a[0] != index]
        self._builder.removed_append(index)
        return index

    def swap(self, i1: int, i2: int) -> None:
        """Exchange two live rows (emitted as a SWAP move at the next refresh).

        Moves are applied after adds and removes, so an add/remove that follows a swap
        first flushes it with an extra ``refresh()``: reorder rows last in a step."""
        r1, r2 = self._rows[i1], self._rows[i2]
        if r1 is None or r2 is None:
            raise ValueError(f"cannot swap rows {i1} and {i2}: both must hold a request")
        if i1 == i2:
            return
        self._rows[i1], self._rows[i2] = r2, r1
        self._index[r2.req_id], self._index[r1.req_id] = i1, i2
        self._builder.moved.append((i1, i2, MoveDirectionality.SWAP))
        self._pending_swaps = True

    # ------------------------------------------------------------------ per step
    def _condense(self) -> None:
        """Fill holes with rows taken from the tail (UNIDIRECTIONAL moves)."""
        holes = sorted(i for i, r in enumerate(self._rows) if r is None)
        for hole in holes:
            while self._rows and self._rows[-1] is None:
                self._rows.pop()
            if hole >= len(self._rows):
                break
            last = len(self._rows) - 1
            row = self._rows.pop()
            assert row is not None
            self._rows[hole] = row
            self._index[row.req_id] = hole
            self._builder.moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
        while self._rows and self._rows[-1] is None:
            self._rows.pop()

    def refresh(self) -> None:
        """Condense, send one ``BatchUpdate`` (or None) to every processor, rebuild
        the sampling tensors if membership changed. Call once per step, after the
        step's adds/removes and after the previous step's tokens were appended."""
        self._condense()
        self._pending_swaps = False
        update = self._builder.get_and_reset(len(self._rows))
        for lp in self.logitsprocs.all:
            lp.update_state(update)
        if update is not None or self._metadata is None:
            self._metadata = self._build_metadata()

    def make_sampling_metadata(self) -> SamplingMetadata:
        """The metadata of the rows as of the last ``refresh()``."""
        if self._metadata is None:
            self.refresh()
        assert self._metadata is not None
        return self._metadata

    # ------------------------------------------------------------------ tensors
    def _token_mask(self, rows: list[int], token_lists: list[list[int]]) -> torch.Tensor:
        """[B, V] bool, True at each (rows[j], t) for t in token_lists[j] (ids outside
        the vocabulary are ignored)."""
        num, vocab = len(self._rows), self.vocab_size
        mask = torch.zeros((num, vocab), dtype=torch.bool)
        r_idx = [r for r, toks in zip(rows, token_lists) for t in toks if 0 <= t < vocab]
        t_idx = [t for toks in token_lists for t in toks if 0 <= t < vocab]
        if r_idx:
            mask[torch.tensor(r_idx), torch.tensor(t_idx)] = True
        return mask.to(self.device)

    def _build_metadata(self) -> SamplingMetadata:
        rows = [r for r in self._rows if r is not None]
        assert len(rows) == len(self._rows), "refresh() condenses before building metadata"
        params = [r.params for r in rows]
        dev, vocab = self.device, self.vocab_size

        def f32(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=dev)

        greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        all_greedy = all(greedy)
        temperature = None if all_greedy else f32(
            [0.0 if g else p.temperature for p, g in zip(params, greedy)])
        top_p = f32([p.top_p for p in params]) if any(p.top_p < 1.0 for p in params) else None
        top_k = None
        if any(0 < p.top_k < vocab for p in params):
            top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params],
                                 dtype=torch.long, device=dev)
        min_p = f32([p.min_p for p in params]) if any(p.min_p > 0 for p in params) else None
        generators = {i: r.generator for i, r in enumerate(rows)
                      if r.generator is not None and r.params.sampling_type == SamplingType.RANDOM_SEED}

        wanted = [p.num_logprobs for p in params if p.num_logprobs is not None]
        max_num_logprobs = None if not wanted else (-1 if -1 in wanted else max(wanted))
        logprob_token_ids = {i: list(p.logprob_token_ids) for i, p in enumerate(params) if p.logprob_token_ids}
        topk_num_logprobs = max((p.logprobs for i, p in enumerate(params)
                                 if p.logprobs is not None and p.logprobs >= 0 and i not in logprob_token_ids),
                                default=0)

        pen_rows = [i for i, p in enumerate(params) if p.presence_penalty != 0.0
                    or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0]
        no_penalties = not pen_rows
        presence = frequency = repetition = prompt_mask = None
        if not no_penalties:
            presence = f32([p.presence_penalty for p in params])
            frequency = f32([p.frequency_penalty for p in params])
            repetition = f32([p.repetition_penalty for p in params])
            rep_rows = [i for i in pen_rows if params[i].repetition_penalty != 1.0]
            if rep_rows:
                prompt_mask = self._token_mask(rep_rows, [rows[i].prompt_token_ids or [] for i in rep_rows])

        allowed_rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
        allowed_mask = None
        if allowed_rows:
            allowed = self._token_mask(allowed_rows, [list(params[i].allowed_token_ids or ())
                                                      for i in allowed_rows])
            restricted = torch.zeros((len(rows), 1), dtype=torch.bool, device=dev)
            restricted[allowed_rows] = True
            allowed_mask = restricted & ~allowed  # [B, V] True = banned
        bad_words = {i: [list(w) for w in p.bad_words_token_ids if w]
                     for i, p in enumerate(params) if p.bad_words_token_ids}
        if any(p.bad_words and p.bad_words_token_ids is None for p in params):
            logger.warning("bad_words given but not tokenized (SamplingParams.update_from_tokenizer "
                           "was not called); they are ignored")

        return SamplingMetadata(
            num_reqs=len(rows), temperature=temperature, all_greedy=all_greedy, all_random=not any(greedy),
            top_p=top_p, top_k=top_k, min_p=min_p, generators=generators,
            max_num_logprobs=max_num_logprobs, no_penalties=no_penalties,
            presence_penalties=presence, frequency_penalties=frequency, repetition_penalties=repetition,
            penalty_rows=pen_rows, prompt_token_mask=prompt_mask, allowed_token_ids_mask=allowed_mask,
            bad_words_token_ids=bad_words, output_token_ids=[r.output_token_ids for r in rows],
            prompt_token_ids=[r.prompt_token_ids for r in rows], logitsprocs=self.logitsprocs,
            topk_num_logprobs=topk_num_logprobs, logprob_token_ids=logprob_token_ids)
