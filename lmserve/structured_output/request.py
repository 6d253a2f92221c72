"""``GrammarState``: one sequence's position in its grammar (an ``xgrammar.GrammarMatcher``),
gated by the end of the sequence's reasoning when the server has a reasoning parser.

Invariants:
- ``grammar_start`` is the output index the grammar constrains from: 0 without a reasoning gate
  (no ``--reasoning-parser``, or ``enable_in_reasoning``) or when the PROMPT already ended the
  reasoning (a template with thinking off puts ``<think></think>`` into it); the index just after
  the end marker once the output closed the reasoning; None while the reasoning is open (no
  mask: those tokens are free).
- the matcher has accepted exactly ``output_token_ids[grammar_start:][:num_accepted]``.

``sync(output_token_ids)`` re-establishes both after the sequence grew (the engine calls it for
every appended token; the model runner before it fills a mask). Its common case, tokens
appended, costs O(new tokens): the end marker is looked for in the new tokens only
(``ReasoningParser.is_reasoning_end_streaming``) and only they go to the matcher. Should the
tokens have changed some other way (tokens dropped), the matcher rolls back, or resets and
replays, and a reasoning end that no longer stands is searched for again, so the state is a
function of the token ids alone: a preempted and recomputed sequence masks exactly as it
would have. Each sequence (each of a request's n choices) owns its own state; the compiled
grammar behind it is shared.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

# How many accepted tokens a matcher can roll back without a full reset and replay.
MAX_ROLLBACK_TOKENS = 8


class GrammarState:
    """A matcher over ``compiled`` (an ``xgrammar.CompiledGrammar``); ``stop_token_ids``: the
    tokens that end the sequence once the grammar is complete (None: the tokenizer's EOS).
    ``reasoner``: the request's ReasoningParser (None: the grammar holds from the first token);
    ``prompt_token_ids``: where the reasoning may already have ended."""

    def __init__(self, compiled: Any, stop_token_ids: list[int] | None = None, reasoner: Any = None,
                 prompt_token_ids: Sequence[int] = ()) -> None:
        import xgrammar as xgr

        self.compiled = compiled
        self._stop = list(stop_token_ids) if stop_token_ids else None
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=self._stop,
                                          max_rollback_tokens=MAX_ROLLBACK_TOKENS)
        self.accepted: list[int] = []  # the tokens the matcher has accepted, in order
        self.failed = False  # a token was refused: the sequence left its grammar (must not happen)
        # the reasoning gate: None when the grammar holds from the first output token
        self.reasoner = reasoner if reasoner is not None and not reasoner.is_reasoning_end(prompt_token_ids) \
            else None
        self.grammar_start: int | None = None if self.reasoner is not None else 0
        self._scanned = 0  # output tokens searched for the reasoning's end (while it is open)
        self._tail: int | None = None  # out[_scanned - 1]: the last token searched (or that ended it)

    @property
    def num_accepted(self) -> int:
        return len(self.accepted)

    @property
    def in_reasoning(self) -> bool:
        """The reasoning is still open: the next token is not constrained."""
        return self.grammar_start is None

    def accept(self, token_id: int) -> bool:
        """Advances the matcher past ``token_id``; False if the grammar does not allow it (the
        state is then ``failed`` and stays as it was). Low level: the engine uses ``sync``."""
        if self.failed or self.matcher.is_terminated():
            self.failed = True
            return False
        if not self.matcher.accept_token(token_id):
            self.failed = True
            logger.warning("structured output: token %d is not allowed by the grammar here", token_id)
            return False
        self.accepted.append(token_id)
        return True

    def sync(self, output_token_ids: Sequence[int]) -> bool:
        """Brings the state in line with ``output_token_ids`` (see the module contract); False if
        a token after the reasoning is not allowed by the grammar."""
        out = output_token_ids
        if self.reasoner is not None:
            self._sync_reasoning(out)
            if self.grammar_start is None:
                return True
        start = self.grammar_start or 0
        n = len(out) - start
        k = len(self.accepted)
        if k == n and (n == 0 or self.accepted[-1] == out[-1]):
            return not self.failed
        if k < n and (k == 0 or out[start + k - 1] == self.accepted[-1]):  # appended (the common case)
            for i in range(start + k, len(out)):
                if not self.accept(out[i]):
                    return False
            return True
        common = 0
        for a, b in zip(self.accepted, out[start:]):
            if a != b:
                break
            common += 1
        drop = k - common
        if 0 < drop <= MAX_ROLLBACK_TOKENS:
            self.matcher.rollback(drop)
            del self.accepted[common:]
        elif drop:
            self.matcher.reset()
            self.accepted.clear()
            common = 0
        self.failed = False
        for i in range(start + common, len(out)):
            if not self.accept(out[i]):
                return False
        return True

    def _sync_reasoning(self, out: Sequence[int]) -> None:
        """Finds where the output closes the reasoning, looking at tokens not yet searched. Like
        the matcher's sync, a change is noticed by the last token looked at: the token that
        closed the reasoning, or the last one searched while it is open."""
        if self.grammar_start is not None:
            if len(out) >= self.grammar_start and out[self.grammar_start - 1] == self._tail:
                return
            self._reopen()  # the tokens that closed the reasoning were dropped or changed
        if self._scanned > len(out) or (self._scanned and out[self._scanned - 1] != self._tail):
            self._scanned = 0  # tokens dropped or changed: search again
        if self._scanned == len(out):
            return
        new = out[self._scanned:]
        if not self.reasoner.is_reasoning_end_streaming(out, new):
            self._scanned, self._tail = len(out), out[-1]
            return
        end = len(out)
        if len(new) > 1:  # several new tokens (a replay): the first prefix that ends it
            end = next((i for i in range(self._scanned + 1, len(out) + 1)
                        if self.reasoner.is_reasoning_end_streaming(out[:i], out[i - 1:i])), end)
        self.grammar_start = self._scanned = end
        self._tail = out[end - 1]

    def _reopen(self) -> None:
        self.grammar_start = None
        self._scanned = 0
        self.matcher.reset()
        self.accepted.clear()
        self.failed = False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the allowed next tokens into ``bitmask[row]`` (int32, 32 tokens a word). Only
        for a state that is not ``in_reasoning``."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted."""
        return self.matcher.is_terminated()

    def fork(self) -> "GrammarState":
        """A fresh state over the same grammar and reasoning gate, at the start."""
        state = GrammarState(self.compiled, self._stop)
        state.reasoner = self.reasoner
        state.grammar_start = None if self.reasoner is not None else 0
        return state
