"""What the scheduler hands to the worker each step, and its statistics: data only.

As vLLM's ``vllm/v1/core/sched/output.py``: the worker (``lmserve/worker/model_runner.py``)
imports this module, never ``lmserve.engine.scheduler``, so the worker does not depend on the
scheduling policy. This module holds dataclasses only and imports nothing from the scheduler.

Contract of one step's ``SchedulerOutput``:
- ``scheduled`` lists the requests that run this step, in the scheduler's ``running`` order;
  each is granted ``num_new_tokens >= 1`` tokens starting at ``num_computed_before``;
- ``num_scheduled_tokens == sum(s.num_new_tokens for s in scheduled)`` and never exceeds
  ``SchedulerConfig.max_num_batched_tokens``;
- ``preempted_ids`` are the requests preempted while planning this step: their blocks are freed,
  they are back in ``waiting`` and not in ``scheduled`` (the worker's persistent batch keeps only
  the requests that sample this step, so it drops them without reading this list).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmserve.engine.request import Request


@dataclass
class ScheduledRequest:
    """One request's share of a step: ``num_new_tokens`` tokens from position ``num_computed_before``."""

    request: Request
    num_new_tokens: int
    block_ids: list[int]  # the request's KV blocks after this step's allocation, in position order
    num_computed_before: int  # request.num_computed_tokens when the step was planned
    # True when this step reaches the end of the request's known tokens, so the
    # logits of its last token produce the next token (a partial prefill does not sample);
    # for a pooling request, always True: its whole prompt runs in this step and is pooled.
    samples: bool


@dataclass
class SchedulerOutput:
    """One step's plan (see the module docstring for its invariants)."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    num_scheduled_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    """A snapshot for ``LLMEngine.get_stats`` (read by ``/metrics`` at scrape time); counters are totals."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # used blocks / all blocks, 0..1
    num_preemptions_total: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
