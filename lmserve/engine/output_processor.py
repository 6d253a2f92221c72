"""Turns ``CoreOutput``s into ``RequestOutput``s: detokenizes incrementally, checks stop
strings, collects logprobs, fans n child requests back into one parent output, and
reports per ``RequestOutputKind`` (cumulative, delta or final only).

Invariants: every request added here is removed exactly once, when its parent's last
child finishes; a child's ``token_ids`` always equal what the engine generated for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from lmserve.engine.core import CoreOutput
from lmserve.engine.request import RequestStatus
from lmserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, VocabLogprobs
from lmserve.sampling_params import RequestOutputKind, SamplingParams
from lmserve.worker.model_runner import LogprobsRow, VocabLogprobsRow


def make_logprob_dict(row: LogprobsRow, decode, vocab_texts=None) -> dict[int, Logprob]:
    """{token: Logprob} with the chosen token first (with its true rank), then the top-k (or
    the asked-for ids, ranked by position as vLLM does). A whole-vocabulary row becomes a
    ``VocabLogprobs`` over its arrays; ``vocab_texts()`` gives the decoded-token table."""
    if isinstance(row, VocabLogprobsRow):
        return VocabLogprobs(row.ids, row.lps, row.chosen, row.rank,  # type: ignore[return-value]
                             vocab_texts(len(row.ids)) if vocab_texts is not None else None)
    ids, lps, rank = row
    out: dict[int, Logprob] = {ids[0]: Logprob(lps[0], rank, decode(ids[0]))}
    for i, (tid, lp) in enumerate(zip(ids[1:], lps[1:])):
        if tid not in out:
            out[tid] = Logprob(lp, i + 1, decode(tid))
    return out


@dataclass
class _Child:
    request_id: str
    index: int
    params: SamplingParams
    detokenizer: Any | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0
    num_sent_logprobs: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    kind: RequestOutputKind
    children: list[_Child]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_sent: bool = False
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.child_to_parent: dict[str, str] = {}
        self._vocab_texts: list[str] | None = None

    def vocab_texts(self, size: int) -> list[str] | None:
        """Every token id below ``size`` decoded alone (as in logprobs), made once on the
        first whole-vocabulary logprobs request; None without a tokenizer."""
        if self.tokenizer is None:
            return None
        if self._vocab_texts is None or len(self._vocab_texts) < size:
            from lmserve.engine.detokenizer import decode_logprob_token
            self._vocab_texts = [decode_logprob_token(self.tokenizer, i, False) for i in range(size)]
        return self._vocab_texts

    def _decode_token(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        from lmserve.engine.detokenizer import decode_logprob_token
        return decode_logprob_token(self.tokenizer, token_id, False)

    def add_request(self, parent_id: str, prompt: str | None, prompt_token_ids: list[int],
                    children: list[tuple[str, SamplingParams]], arrival_time: float) -> None:
        from lmserve.engine.detokenizer import IncrementalDetokenizer

        kids = []
        for index, (child_id, params) in enumerate(children):
            detok = None
            if self.tokenizer is not None and params.detokenize:
                detok = IncrementalDetokenizer(self.tokenizer, params, prompt_token_ids)
            kids.append(_Child(child_id, index, params, detok,
                               logprobs=[] if params.num_logprobs is not None else None,
                               cumulative_logprob=0.0 if params.num_logprobs is not None else None))
            self.child_to_parent[child_id] = parent_id
        first = children[0][1]
        prompt_lps = [None] if first.prompt_logprobs is not None else None
        self.parents[parent_id] = _Parent(parent_id, prompt, prompt_token_ids, first.output_kind, kids,
                                          RequestMetrics(arrival_time), prompt_lps)

    def has(self, parent_id: str) -> bool:
        return parent_id in self.parents

    def child_ids(self, parent_id: str) -> list[str]:
        p = self.parents.get(parent_id)
        return [c.request_id for c in p.children] if p else []

    def abort(self, parent_id: str) -> RequestOutput | None:
        """Marks every unfinished child aborted and drops the request; returns a final output."""
        p = self.parents.get(parent_id)
        if p is None:
            return None
        for c in p.children:
            if not c.finished:
                c.finish_reason = "abort"
        out = self._make_output(p, [c for c in p.children], force=True)
        self._drop(p)
        return out

    def _drop(self, p: _Parent) -> None:
        self.parents.pop(p.request_id, None)
        for c in p.children:
            self.child_to_parent.pop(c.request_id, None)

    # ------------------------------------------------------------------ processing
    def process(self, outputs: list[CoreOutput]) -> tuple[list[RequestOutput], list[tuple[str, str]]]:
        """Returns the RequestOutputs to deliver and the (child id, stop string) pairs that
        the engine must finish because a stop string matched."""
        now = time.time()
        touched: dict[str, list[_Child]] = {}
        to_stop: list[tuple[str, str]] = []
        for co in outputs:
            parent_id = self.child_to_parent.get(co.request_id)
            if parent_id is None:
                continue
            p = self.parents[parent_id]
            child = next(c for c in p.children if c.request_id == co.request_id)
            p.num_cached_tokens = co.num_cached_tokens
            if p.metrics.first_scheduled_time is None:
                p.metrics.first_scheduled_time = co.first_scheduled_time
            if co.prompt_logprobs is not None and child.index == 0 and p.prompt_logprobs is not None:
                start, rows = co.prompt_logprobs
                assert len(p.prompt_logprobs) == start, "prompt logprobs chunks arrive in order"
                p.prompt_logprobs.extend(make_logprob_dict(r, self._decode_token, self.vocab_texts) for r in rows)
            if not co.new_token_ids and not co.finished:
                continue
            if p.metrics.first_token_time is None and co.new_token_ids:
                p.metrics.first_token_time = now
            p.metrics.last_token_time = now
            child.token_ids.extend(co.new_token_ids)
            if co.new_logprobs and child.logprobs is not None:
                for row in co.new_logprobs:
                    entry = make_logprob_dict(row, self._decode_token, self.vocab_texts)
                    child.logprobs.append(entry)
                    chosen = row.chosen if isinstance(row, VocabLogprobsRow) else row[0][0]
                    child.cumulative_logprob += entry[chosen].logprob
            stop_terminated = co.status == RequestStatus.FINISHED_STOPPED
            if child.detokenizer is not None and co.new_token_ids:
                stop_str = child.detokenizer.update(co.new_token_ids, stop_terminated)
                if stop_str is not None and not co.finished:
                    child.finish_reason, child.stop_reason = "stop", stop_str
                    to_stop.append((child.request_id, stop_str))
                elif stop_str is not None:
                    child.finish_reason, child.stop_reason = "stop", stop_str
            if co.finished and not child.finished:
                child.finish_reason = co.status.finish_reason
                child.stop_reason = co.stop_reason
            touched.setdefault(parent_id, []).append(child)

        results = []
        for parent_id, kids in touched.items():
            p = self.parents[parent_id]
            out = self._make_output(p, kids)
            if out is not None:
                results.append(out)
            if p.finished:
                p.metrics.finished_time = now
                self._drop(p)
        return results, to_stop

    def _make_output(self, p: _Parent, touched: list[_Child], force: bool = False) -> RequestOutput | None:
        finished = p.finished
        if p.kind == RequestOutputKind.FINAL_ONLY and not finished and not force:
            return None
        delta = p.kind == RequestOutputKind.DELTA
        kids = touched if delta else p.children
        completions = [self._completion(c, delta, finished=c.finished) for c in kids]
        prompt_lps = p.prompt_logprobs
        if delta:
            if p.prompt_logprobs_sent:
                prompt_lps = None
            p.prompt_logprobs_sent = True
        return RequestOutput(request_id=p.request_id, prompt=p.prompt, prompt_token_ids=p.prompt_token_ids,
                             prompt_logprobs=prompt_lps, outputs=completions, finished=finished,
                             num_cached_tokens=p.num_cached_tokens, metrics=p.metrics)

    def _completion(self, c: _Child, delta: bool, finished: bool) -> CompletionOutput:
        text = ""
        if c.detokenizer is not None:
            text = c.detokenizer.get_next_output_text(finished, delta)
        if delta:
            token_ids = c.token_ids[c.num_sent_tokens:]
            logprobs = c.logprobs[c.num_sent_logprobs:] if c.logprobs is not None else None
        else:
            token_ids = list(c.token_ids)
            logprobs = list(c.logprobs) if c.logprobs is not None else None
        c.num_sent_tokens = len(c.token_ids)
        c.num_sent_logprobs = len(c.logprobs) if c.logprobs is not None else 0
        return CompletionOutput(index=c.index, text=text, token_ids=token_ids,
                                cumulative_logprob=c.cumulative_logprob, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)
