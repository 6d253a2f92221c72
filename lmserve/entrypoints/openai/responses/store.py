"""The bounded in-memory store behind ``previous_response_id``, GET /v1/responses/{id} and
POST /v1/responses/{id}/cancel.

vLLM keeps stored responses in unbounded dicts (opt-in with VLLM_ENABLE_RESPONSES_API_STORE);
this store is on by default and bounded instead: at most ``max_entries`` responses and
``max_bytes`` bytes of JSON (the response plus the conversation kept for the next turn),
evicting the least recently used first. An entry larger than ``max_bytes`` on its own is not
stored. ``max_entries == 0`` turns the store off (``store`` is then treated as false, as vLLM
does without its environment variable).

Invariant: ``bytes_used`` is the sum of the sizes of the entries held, and never exceeds
``max_bytes`` after a ``put`` returns. Only the event loop touches a store (no locking).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_ENTRIES = 1000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the response body as served
    conversation: list[dict[str, Any]]  # chat messages of every turn so far, this one's output included
    size: int


class ResponseStore:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("the response store's limits must be 0 or more")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self.bytes_used = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, response_id: str) -> bool:
        return response_id in self._entries

    def get(self, response_id: str) -> StoredResponse | None:
        """The entry (now the most recently used), or None."""
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def put(self, response_id: str, response: dict[str, Any], conversation: list[dict[str, Any]]) -> bool:
        """Stores (or replaces) an entry; returns False when it alone exceeds ``max_bytes``."""
        self.discard(response_id)
        if not self.enabled:
            return False
        size = len(json.dumps(response, ensure_ascii=False)) + len(json.dumps(conversation, ensure_ascii=False))
        if size > self.max_bytes:
            return False
        self._entries[response_id] = StoredResponse(response, conversation, size)
        self.bytes_used += size
        while len(self._entries) > self.max_entries or self.bytes_used > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes_used -= old.size
        return True

    def discard(self, response_id: str) -> None:
        old = self._entries.pop(response_id, None)
        if old is not None:
            self.bytes_used -= old.size
