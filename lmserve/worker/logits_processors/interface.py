"""The batch-level logits-processor interface, name for name as vLLM v1's.

A logits processor sees the whole persistent batch: ``apply`` receives logits of shape
``[num_reqs, vocab_size]`` whose row ``i`` belongs to the request at batch index ``i``.
Before every sampling step the persistent batch calls ``update_state`` on every
processor, with a ``BatchUpdate`` describing how batch indices changed since the last
call, or ``None`` when membership did not change (new output tokens may still exist:
processors that read the live output lists re-check them there).

``BatchUpdate`` contract (what ``lmserve.worker.input_batch.InputBatch`` guarantees):
- apply ``added`` first, then ``removed``, then ``moved`` in list order;
- an added index may reuse a slot freed by a removal in this same update; such a slot
  is not listed in ``removed`` (so ``added`` simply replaces what was there);
- ``moved`` entries ``(a, b, UNIDIRECTIONAL)`` move a's state to b (b's old state, if
  any, is dropped and a becomes empty); ``(a, b, SWAP)`` exchanges a and b;
- after all three, the live indices are exactly ``0 .. batch_size - 1``.
- the output-token list in each ``added`` tuple is the request's live list: it grows
  in place as tokens are generated.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from functools import partial
from itertools import chain
from typing import TYPE_CHECKING, Any, TypeVar, Union

import torch

from lmserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from lmserve.config import EngineConfig

T = TypeVar("T")


class MoveDirectionality(Enum):
    # One-way i1 -> i2 move of a request within the batch.
    UNIDIRECTIONAL = auto()
    # Two-way i1 <-> i2 swap of requests within the batch.
    SWAP = auto()


# Batch index of a removed request.
RemovedRequest = int
# (index, params, prompt token ids, live output token ids) of an added request.
AddedRequest = tuple[int, SamplingParams, Union[list[int], None], list[int]]
# (index 1, index 2, directionality).
MovedRequest = tuple[int, int, MoveDirectionality]

# A per-request logits processor (vLLM's ``vllm.logits_process.LogitsProcessor``):
# ``(output_token_ids, logits_row) -> logits_row`` or
# ``(prompt_token_ids, output_token_ids, logits_row) -> logits_row``; logits_row is [vocab].
RequestLogitsProcessor = Union[
    Callable[[list[int], torch.Tensor], torch.Tensor],
    Callable[[list[int], list[int], torch.Tensor], torch.Tensor],
]


@dataclass(frozen=True)
class BatchUpdate:
    """How the persistent batch changed since the previous ``update_state`` call.

    Apply ``added``, then ``removed``, then ``moved`` (see the module docstring).
    """

    batch_size: int  # number of requests in the batch after the update
    removed: Sequence[RemovedRequest]
    added: Sequence[AddedRequest]
    moved: Sequence[MovedRequest]


class LogitsProcessor(ABC):
    """A batch-level logits processor (vLLM v1 interface).

    Instances are built once per engine with ``(vllm_config, device, is_pin_memory)``;
    ``validate_params`` runs on every request before it is queued.
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Raise ``ValueError`` if the request's params (typically ``extra_args``)
        are invalid for this processor. The default accepts everything."""
        return None

    @abstractmethod
    def __init__(self, vllm_config: "EngineConfig", device: torch.device, is_pin_memory: bool) -> None:
        raise NotImplementedError

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Transform ``logits`` [num_reqs, vocab]; may modify in place; returns the result."""
        raise NotImplementedError

    @abstractmethod
    def is_argmax_invariant(self) -> bool:
        """True if this processor never changes the argmax (then it is skipped for
        greedy rows and applied after temperature)."""
        raise NotImplementedError

    @abstractmethod
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Called once before every sampling step; ``batch_update`` is None iff the
        batch membership did not change."""
        raise NotImplementedError


def process_dict_updates(
    req_entries: dict[int, T],
    batch_update: BatchUpdate | None,
    new_state: Callable[[SamplingParams, list[int] | None, list[int]], T | None],
) -> bool:
    """Keep a sparse ``batch index -> state`` dict in step with a ``BatchUpdate``.

    ``new_state(params, prompt_token_ids, output_token_ids)`` returns the state of an
    added request, or None when the processor does not apply to it (any stale entry
    at that index is then dropped). Returns True if ``req_entries`` changed.
    """
    if not batch_update:
        return False

    updated = False
    for index, params, prompt_tok_ids, output_tok_ids in batch_update.added:
        state = new_state(params, prompt_tok_ids, output_tok_ids)
        if state is not None:
            req_entries[index] = state
            updated = True
        elif req_entries.pop(index, None) is not None:
            updated = True

    if req_entries:
        for index in batch_update.removed:
            if req_entries.pop(index, None) is not None:
                updated = True
        for a_index, b_index, direct in batch_update.moved:
            a_entry = req_entries.pop(a_index, None)
            b_entry = req_entries.pop(b_index, None)
            if a_entry is not None:
                req_entries[b_index] = a_entry
                updated = True
            if b_entry is not None:
                updated = True
                if direct == MoveDirectionality.SWAP:
                    req_entries[a_index] = b_entry
    return updated


class AdapterLogitsProcessor(LogitsProcessor):
    """Wraps a per-request logits processor (a callable on one row) as a batch one.

    Subclass it, implement ``is_argmax_invariant`` and ``new_req_logits_processor``.
    A subclass overriding ``__init__`` must call ``super().__init__(...)``.
    The stored partials hold live references to the output list, so each call sees
    the request's tokens as they are now.
    """

    def __init__(self, vllm_config: "EngineConfig", device: torch.device, is_pin_memory: bool) -> None:
        # batch index -> the request's processor with its token-id arguments bound
        self.req_info: dict[int, partial[torch.Tensor]] = {}

    @abstractmethod
    def new_req_logits_processor(self, params: SamplingParams) -> RequestLogitsProcessor | None:
        """Return the per-request processor for a new request, or None if it does not apply."""
        raise NotImplementedError

    def _new_state(self, params: SamplingParams, prompt_ids: list[int] | None,
                   output_ids: list[int]) -> partial[torch.Tensor] | None:
        req_lp = self.new_req_logits_processor(params)
        if req_lp is None:
            return None
        # Arity decides whether the prompt ids are passed (as vLLM).
        args = [prompt_ids, output_ids] if len(inspect.signature(req_lp).parameters) == 3 else [output_ids]
        return partial(req_lp, *args)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.req_info, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for req_idx, req_lp in self.req_info.items():
            row = logits[req_idx]  # [vocab], a view
            new_row = req_lp(row)
            if new_row is not row:
                logits[req_idx] = new_row
        return logits


class BatchUpdateBuilder:
    """Collects one step's adds, removes and moves of the persistent batch.

    Removals and additions may be registered in any order. ``pop_removed`` hands out
    the lowest freed slot for reuse; a reused slot leaves ``removed`` (the added entry
    replaces it), which keeps ``removed`` and the reused ``added`` indices disjoint.
    """

    def __init__(self) -> None:
        self._removed: list[RemovedRequest] = []
        self.added: list[AddedRequest] = []
        self.moved: list[MovedRequest] = []

    @property
    def removed(self) -> list[RemovedRequest]:
        return self._removed

    def removed_append(self, index: int) -> None:
        self._removed.append(index)

    def has_removed(self) -> bool:
        return bool(self._removed)

    def peek_removed(self) -> int | None:
        return min(self._removed) if self._removed else None

    def pop_removed(self) -> int | None:
        """Remove and return the lowest freed slot, or None."""
        if not self._removed:
            return None
        low = min(self._removed)
        self._removed.remove(low)
        return low

    def get_and_reset(self, batch_size: int) -> BatchUpdate | None:
        """The accumulated update (None if nothing happened); clears the builder."""
        if not (self._removed or self.added or self.moved):
            return None
        update = BatchUpdate(batch_size=batch_size, removed=sorted(self._removed, reverse=True),
                             moved=self.moved, added=self.added)
        self._removed, self.added, self.moved = [], [], []
        return update


class LogitsProcessors:
    """The engine's processor instances, split by argmax invariance."""

    def __init__(self, logitsprocs: Iterable[LogitsProcessor] | None = None) -> None:
        self.argmax_invariant: list[LogitsProcessor] = []
        self.non_argmax_invariant: list[LogitsProcessor] = []
        for lp in logitsprocs or ():
            (self.argmax_invariant if lp.is_argmax_invariant() else self.non_argmax_invariant).append(lp)

    @property
    def all(self) -> Iterator[LogitsProcessor]:
        return chain(self.argmax_invariant, self.non_argmax_invariant)

    def get(self, cls: type[Any]) -> LogitsProcessor | None:
        """The first instance of ``cls`` (for tests and introspection)."""
        return next((lp for lp in self.all if isinstance(lp, cls)), None)
