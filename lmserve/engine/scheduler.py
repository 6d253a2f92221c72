"""Token-budget scheduler (vLLM v1's idea): every step each request is granted
``min(tokens it still needs, budget left)`` tokens, so one rule covers prefill,
chunked prefill, prefix-cache hits and decode, and one batch mixes them.

Invariants:
- a request is in exactly one of ``waiting`` or ``running`` until it finishes;
- the sum of granted tokens never exceeds ``max_num_batched_tokens`` and at most
  ``max_num_seqs`` requests run;
- a waiting prompt is split (chunked prefill) only when it is longer than a whole step's budget
  or nothing else runs this step: splitting one that fits a step of its own would not bring its
  first token sooner (its last piece still runs next step) but would make this step, and so
  everything else in it, slower; FCFS order is kept (it waits at the head of the queue);
- past ``memory_bound_tokens`` tokens in a step, no further new prompt joins it (the first new
  prompt of a step is limited by the budget alone): in a compute-bound step, two prompts together
  both get their first token when the pair is done, one after the other the first gets it a step
  sooner, for the same work; and prompts that arrive together then finish apart, so later
  arrivals spread over steps instead of piling into one (0, off, for pooling models, whose
  requests all end in the step that runs them);
- with LoRA, the running requests use at most ``max_loras`` distinct adapters (so every step
  does): a waiting request whose adapter would be one too many waits, in order, until a running
  adapter's last request finishes;
- when KV blocks run out, the lowest-priority running request (fcfs: the latest) is
  preempted: its blocks are freed and it returns to the front of ``waiting`` to be
  recomputed (its generated tokens are kept and become part of the recomputed prefix).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque

from lmserve.config import SchedulerConfig
from lmserve.engine.kv_cache import KVCacheManager
from lmserve.engine.request import Request, RequestStatus
from lmserve.engine.sched_output import ScheduledRequest, SchedulerOutput, SchedulerStats


class _WaitingQueue:
    """FCFS deque, or a heap on (priority, arrival, seq) for the priority policy.
    Preempted requests go back in front (fcfs) or by their key (priority)."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._deque: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._deque) + len(self._heap)

    def __iter__(self):
        return iter(list(self._deque) + [e[3] for e in self._heap])

    def add(self, req: Request, front: bool = False) -> None:
        if self.policy == "priority":
            heapq.heappush(self._heap, (req.priority, req.arrival_time, next(self._seq), req))
        elif front:
            self._deque.appendleft(req)
        else:
            self._deque.append(req)

    def peek(self) -> Request:
        return self._heap[0][3] if self.policy == "priority" else self._deque[0]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3] if self.policy == "priority" else self._deque.popleft()

    def remove(self, req: Request) -> None:
        if self.policy == "priority":
            self._heap = [e for e in self._heap if e[3] is not req]
            heapq.heapify(self._heap)
        else:
            self._deque.remove(req)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager, max_loras: int | None = None) -> None:
        self.config = config
        self.kv = kv_manager
        self.max_loras = max_loras  # None: LoRA disabled
        self.waiting = _WaitingQueue(config.policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions_total = 0

    # ------------------------------------------------------------------ membership
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if self.config.policy != "priority" and request.priority != 0:
            raise ValueError("priority scheduling is not enabled: a request's priority must be 0 "
                             "unless the server runs with --scheduling-policy priority")
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Ends a request (abort, stop string, ...) and frees its blocks. Idempotent."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req)
        return req

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.kv.usage,
                              self.num_preemptions_total, self.kv.stats.queries, self.kv.stats.hits)

    # ------------------------------------------------------------------ scheduling
    def _may_chunk(self, req: Request) -> bool:
        """Pooling requests need every prompt position's hidden state in one step."""
        return self.config.enable_chunked_prefill and not req.is_pooling

    def _tokens_wanted(self, req: Request, budget: int) -> int:
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        if not self._may_chunk(req) and n < req.num_tokens - req.num_computed_tokens:
            return 0  # a prefill must fit whole
        return n

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running, key=lambda r: r.sort_key())
        return self.running[-1]

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.add(req, front=True)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        grants: dict[str, int] = {}

        # 1. Running requests, oldest first; preempt (fcfs: from the back) when blocks run out.
        for req in list(self.running):
            if req.status != RequestStatus.RUNNING or budget <= 0:
                continue  # preempted earlier in this loop, or no budget left
            n = self._tokens_wanted(req, budget)
            if n == 0:
                continue
            while not self.kv.allocate_slots(req, n):
                victim = self._pick_victim()
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                budget += grants.pop(victim.request_id, 0)
                if victim is req:
                    break
            else:
                grants[req.request_id] = n
                budget -= n

        # 2. Waiting requests, unless this step had to preempt.
        if not out.preempted_ids:
            admitted = 0
            knee = self.config.memory_bound_tokens
            loras = {r.lora_id for r in self.running if r.lora_id is not None}
            while len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting.peek()
                if req.lora_id is not None and req.lora_id not in loras and len(loras) >= (self.max_loras or 0):
                    break  # one adapter too many for a step: it waits for a running adapter to finish
                hits, num_hit_tokens = ([], 0)
                if req.num_computed_tokens == 0:
                    hits, num_hit_tokens = self.kv.get_computed_blocks(req)
                need = req.num_tokens - req.num_computed_tokens - num_hit_tokens
                n = min(need, budget)
                if n < need and (not self._may_chunk(req) or (grants and need <= self.config.max_num_batched_tokens)):
                    break  # see the module docstring: a prompt that fits a step of its own is not split
                if admitted and knee and self.config.max_num_batched_tokens - budget + n > knee:
                    break  # a compute-bound step: the next prompt goes first in the next step
                if not self.kv.allocate_slots(req, n, hits):
                    break
                self.waiting.pop()
                req.num_computed_tokens += num_hit_tokens
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_hit_tokens
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = time.time()
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                if req.lora_id is not None:
                    loras.add(req.lora_id)
                grants[req.request_id] = n
                budget -= n
                admitted += 1

        for req in self.running:
            n = grants.get(req.request_id)
            if n:
                out.scheduled.append(ScheduledRequest(
                    req, n, self.kv.block_ids(req.request_id), req.num_computed_tokens,
                    req.num_computed_tokens + n == req.num_tokens))
                out.num_scheduled_tokens += n
        return out

    def update_after_step(self, scheduled: list[ScheduledRequest]) -> None:
        """Advances ``num_computed_tokens`` of everything that ran this step."""
        for s in scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
