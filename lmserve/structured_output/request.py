"""``GrammarState``: one sequence's position in its grammar (an ``xgrammar.GrammarMatcher``).

Invariant: the matcher has accepted exactly ``output_token_ids[:num_accepted]`` of its
sequence. The engine calls ``accept(token)`` for every token it appends to the sequence; before
a mask is computed, ``sync(output_token_ids)`` re-establishes the invariant should the tokens
have changed some other way (tokens dropped: the matcher rolls back, or resets and replays), so
a preempted and recomputed sequence masks exactly as it would have. Each sequence (each of a
request's n choices) owns its own state; the compiled grammar behind it is shared.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

# How many accepted tokens a matcher can roll back without a full reset and replay.
MAX_ROLLBACK_TOKENS = 8


class GrammarState:
    """A matcher over ``compiled`` (an ``xgrammar.CompiledGrammar``); ``stop_token_ids``: the
    tokens that end the sequence once the grammar is complete (None: the tokenizer's EOS)."""

    def __init__(self, compiled: Any, stop_token_ids: list[int] | None = None) -> None:
        import xgrammar as xgr

        self.compiled = compiled
        self._stop = list(stop_token_ids) if stop_token_ids else None
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=self._stop,
                                          max_rollback_tokens=MAX_ROLLBACK_TOKENS)
        self.accepted: list[int] = []  # the tokens the matcher has accepted, in order
        self.failed = False  # a token was refused: the sequence left its grammar (must not happen)

    @property
    def num_accepted(self) -> int:
        return len(self.accepted)

    def accept(self, token_id: int) -> bool:
        """Advances past ``token_id``; False if the grammar does not allow it (the state is then
        ``failed`` and stays as it was)."""
        if self.failed or self.matcher.is_terminated():
            self.failed = True
            return False
        if not self.matcher.accept_token(token_id):
            self.failed = True
            logger.warning("structured output: token %d is not allowed by the grammar here", token_id)
            return False
        self.accepted.append(token_id)
        return True

    def sync(self, output_token_ids: list[int]) -> None:
        """Make the matcher's accepted tokens equal ``output_token_ids`` (see the module contract)."""
        n = len(output_token_ids)
        if n == len(self.accepted) and (n == 0 or self.accepted[-1] == output_token_ids[-1]):
            return
        common = 0
        for a, b in zip(self.accepted, output_token_ids):
            if a != b:
                break
            common += 1
        drop = len(self.accepted) - common
        if 0 < drop <= MAX_ROLLBACK_TOKENS and drop <= len(self.accepted):
            self.matcher.rollback(drop)
            del self.accepted[common:]
        elif drop:
            self.matcher.reset()
            self.accepted.clear()
            common = 0
        self.failed = False
        for t in output_token_ids[common:]:
            if not self.accept(t):
                break

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the allowed next tokens into ``bitmask[row]`` (int32, 32 tokens a word)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted."""
        return self.matcher.is_terminated()

    def fork(self) -> "GrammarState":
        """A fresh state over the same grammar, at the start."""
        return GrammarState(self.compiled, self._stop)
