"""``thinking_token_budget``: end a request's thinking section after that many tokens.

A request takes part when its params carry a budget >= 0 and the thinking markers' token ids
(``SamplingParams._thinking_token_ids = (start ids, forced end ids)``, set by the API server from
--reasoning-parser / --reasoning-config). The section opens at the start ids (or at the start
of the output when the prompt's tail opened it, as DeepSeek R1's and Qwen3's templates may) and
closes at the end ids. Once ``budget`` tokens were generated inside an open section, every
following step allows only the next token of the end ids, until they are all out; the model then
goes on with its answer. Budget 0 closes the section right after it opens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmserve.sampling_params import SamplingParams
from lmserve.worker.logits_processors.interface import BatchUpdate, LogitsProcessor, process_dict_updates

if TYPE_CHECKING:
    from lmserve.config import EngineConfig


def _ends_with(seq: Sequence[int], tail: list[int], upto: int | None = None) -> bool:
    """Whether ``seq[:upto]`` ends with ``tail`` (without copying ``seq``)."""
    n = len(seq) if upto is None else upto
    return bool(tail) and n >= len(tail) and all(seq[n - len(tail) + k] == t for k, t in enumerate(tail))


@dataclass
class _Budget:
    budget: int
    start: list[int]
    end: list[int]
    output: Sequence[int]  # the live output list
    inside: bool  # a thinking section is open
    used: int = 0  # tokens generated inside the open section
    seen: int = 0  # output tokens already accounted for
    forcing: int = -1  # index into ``end`` of the next forced token; -1: not forcing

    def advance(self) -> None:
        out = self.output
        while self.seen < len(out):
            self.seen += 1
            if self.forcing >= 0:
                self.forcing += 1
                if self.forcing >= len(self.end):
                    self.forcing, self.inside = -1, False
                continue
            if _ends_with(out, self.end, self.seen):
                self.inside = False
            elif _ends_with(out, self.start, self.seen):
                self.inside, self.used = True, 0
            elif self.inside:
                self.used += 1
        if self.inside and self.forcing < 0 and self.used >= self.budget:
            # Resume a partly written end sequence rather than starting it over.
            done = max((k for k in range(len(self.end), 0, -1) if _ends_with(out, self.end[:k])), default=0)
            self.forcing = done if done < len(self.end) else -1

    def forced(self) -> int | None:
        return self.end[self.forcing] if self.forcing >= 0 else None


class ThinkingBudgetLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config: "EngineConfig | None", device: torch.device, is_pin_memory: bool) -> None:
        self.device = torch.device(device)
        self.states: dict[int, _Budget] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        budget = sampling_params.thinking_token_budget
        if budget is None or budget == -1:
            return
        if budget < -1:
            raise ValueError("thinking_token_budget must be -1 (unlimited) or at least 0")
        if sampling_params._thinking_token_ids is None:
            raise ValueError("thinking_token_budget is set but no reasoning markers are configured: start the "
                             "server with --reasoning-parser and/or --reasoning-config")

    def is_argmax_invariant(self) -> bool:
        return False

    @staticmethod
    def _new(params: SamplingParams, prompt: list[int] | None, output: list[int]) -> _Budget | None:
        budget = params.thinking_token_budget
        ids = params._thinking_token_ids
        if budget is None or budget < 0 or ids is None:
            return None
        start, end = list(ids[0]), list(ids[1])
        p = list(prompt or [])
        inside = False  # the prompt's tail may have opened the section
        for i in range(len(p), 0, -1):
            if _ends_with(p, end, i):
                break
            if _ends_with(p, start, i):
                inside = True
                break
        state = _Budget(budget, start, end, output, inside)
        state.advance()
        return state

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.states, batch_update, self._new)
        for state in self.states.values():
            state.advance()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, state in self.states.items():
            token = state.forced()
            if token is None:
                continue
            keep = logits[index, token].clone()
            logits[index].fill_(float("-inf"))
            logits[index, token] = keep if torch.isfinite(keep) else 0.0
        return logits
