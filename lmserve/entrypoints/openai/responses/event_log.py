"""The events of background streamed responses (``background=true, stream=true``), kept so a
client can (re)attach: the creating request follows the log, and
``GET /v1/responses/{id}?stream=true&starting_after=N`` replays the events after sequence
number N, then follows the live ones.

Invariants: event ``i`` of a log has ``sequence_number`` i; a log is appended to by its one
background task only; at most ``max_logs`` logs are kept, the oldest finished ones dropped
first (a running one is never dropped), and finished ones are dropped too while all logs
together hold more than ``max_bytes`` (counted when a log is added; a running log is bounded
by its request's output length).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator


class EventLog:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.bytes = 0
        self.done = False
        self._changed = asyncio.Event()

    def append(self, event: str) -> None:
        self.events.append(event)
        self.bytes += len(event)
        self._changed.set()

    def close(self) -> None:
        self.done = True
        self._changed.set()

    async def follow(self, starting_after: int = -1) -> AsyncIterator[str]:
        """The events after ``starting_after``, then each new one until the log is closed."""
        i = max(starting_after + 1, 0)
        while True:
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.done:
                return
            self._changed.clear()
            if i < len(self.events) or self.done:
                continue
            await self._changed.wait()


class EventLogs:
    def __init__(self, max_logs: int, max_bytes: int) -> None:
        self.max_logs = max_logs
        self.max_bytes = max_bytes
        self._logs: OrderedDict[str, EventLog] = OrderedDict()

    def new(self, response_id: str) -> EventLog:
        log = self._logs[response_id] = EventLog()
        finished = [rid for rid, entry in self._logs.items() if entry.done]
        total = sum(entry.bytes for entry in self._logs.values())
        while finished and (len(self._logs) > self.max_logs or total > self.max_bytes):
            total -= self._logs.pop(finished.pop(0)).bytes
        return log

    def get(self, response_id: str) -> EventLog | None:
        return self._logs.get(response_id)
