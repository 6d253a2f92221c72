"""Which data-parallel replica runs a request: load balancing with prefix-cache affinity.

The load score of a replica is vLLM 0.32's (``DPLBAsyncMPClient.get_core_engine_for_request``):
``max(in-flight, waiting + running) + waiting * 6 * max(0, kv_cache_usage - 0.5)``, where
``in-flight`` is the front's exact count of sequences it routed there and has not seen finish, and
waiting / running / KV-cache usage are the replica's last report (a report can lag; the in-flight
floor cannot, so a burst spreads round-robin). Ties go to the replica after the last one chosen.

Prefix-cache affinity (not in vLLM's in-process balancer; what its router and llm-d do): the
prompt's leading full KV blocks are hashed as a chain (block 1, blocks 1-2, ... up to
``AFFINITY_BLOCKS``); the replica that last ran the longest known prefix gets the request, so a
shared system prompt or a multi-turn conversation keeps hitting the cache that holds it, unless
that replica's score exceeds the least-loaded one's by more than ``margin`` scaled by the share of
``AFFINITY_BLOCKS`` matched (a one-block match, such as a chat template's header, only breaks ties:
it saves too little prefill to be worth a queue). Prompts shorter than
one block have no affinity (there is nothing to reuse).

Invariants: ``choose`` and ``finished`` run on the event loop only (no locks); the affinity table
is bounded (LRU, ``max_entries``); nothing here touches a replica.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

AFFINITY_BLOCKS = 8
DEFAULT_AFFINITY_MARGIN = 4.0
DEFAULT_MAX_ENTRIES = 16384


@dataclass
class ReplicaLoad:
    """What the front knows of one replica's load."""

    in_flight: int = 0  # sequences routed there and not finished (exact, kept by the front)
    waiting: int = 0  # from the replica's last report
    running: int = 0
    kv_cache_usage: float = 0.0

    def score(self) -> float:
        s = float(max(self.in_flight, self.waiting + self.running))
        if self.waiting:
            s += self.waiting * 6.0 * max(0.0, self.kv_cache_usage - 0.5)
        return s


def prefix_keys(token_ids: Sequence[int], block_size: int, salt: object = None) -> list[bytes]:
    """Chained hashes of the first 1, 2, ... (at most AFFINITY_BLOCKS) full blocks of the prompt,
    shortest first. ``salt`` (cache_salt, LoRA adapter id) separates caches that cannot be shared."""
    keys: list[bytes] = []
    h = hashlib.blake2b(repr(salt).encode(), digest_size=16).digest()
    for b in range(min(len(token_ids) // block_size, AFFINITY_BLOCKS)):
        block = token_ids[b * block_size:(b + 1) * block_size]
        h = hashlib.blake2b(h + b"".join(int(t).to_bytes(4, "little", signed=True) for t in block),
                            digest_size=16).digest()
        keys.append(h)
    return keys


class DPRouter:
    """Chooses a replica per request and keeps the in-flight counts."""

    def __init__(self, num_replicas: int, margin: float = DEFAULT_AFFINITY_MARGIN,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.loads = [ReplicaLoad() for _ in range(num_replicas)]
        self.margin = margin
        self.max_entries = max_entries
        self._affinity: OrderedDict[bytes, int] = OrderedDict()
        self._start = 0

    def choose(self, keys: Sequence[bytes], num_seqs: int = 1) -> int:
        """The replica for a request with prefix ``keys`` (from ``prefix_keys``) and ``num_seqs``
        sequences (n); counts them in flight there and records the prefix."""
        n = len(self.loads)
        best, best_score = 0, float("inf")
        for i in range(n):
            idx = (self._start + i) % n
            s = self.loads[idx].score()
            if s < best_score:
                best, best_score = idx, s
        self._start = (self._start + 1) % n
        chosen = best
        for matched in range(len(keys), 0, -1):  # the longest known prefix wins
            idx = self._affinity.get(keys[matched - 1])
            if idx is not None:
                if self.loads[idx].score() <= best_score + self.margin * matched / AFFINITY_BLOCKS:
                    chosen = idx
                break
        for key in keys:
            self._affinity[key] = chosen
            self._affinity.move_to_end(key)
        while len(self._affinity) > self.max_entries:
            self._affinity.popitem(last=False)
        self.loads[chosen].in_flight += num_seqs
        return chosen

    def finished(self, idx: int, num_seqs: int = 1) -> None:
        load = self.loads[idx]
        load.in_flight = max(0, load.in_flight - num_seqs)

    def report(self, idx: int, waiting: int, running: int, kv_cache_usage: float) -> None:
        load = self.loads[idx]
        load.waiting, load.running, load.kv_cache_usage = waiting, running, kv_cache_usage

    def forget(self) -> None:
        """Drops the affinity table (the replicas' prefix caches were reset)."""
        self._affinity.clear()
