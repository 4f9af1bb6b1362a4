"""Explanations are admitted apart from predictions, so a burst of them cannot slow predictions.

An explanation is at most `explain_max_rows` model rows (65 by default): tens of predictions' worth
of work. Each worker
admits `explain_max_concurrency` at once and queues `explain_max_queue` more (beyond that: 429 at
once); a call that cannot finish within `explain_timeout_s` (wait plus its rows) gets a 503. The
predict batcher's queue and limits are never used by explanations.

Where admitted explanations run: in the in-process topology, in a low-priority child process of
the worker (serving/explain_process.py: no interpreter lock shared with the predict path); in the
split topology, in chunks of `explain_chunk_rows` through the model process's explain lane, below
its predictions (serving/explain_lane.py). Either way the deadline is checked between chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator


class ExplainBusy(RuntimeError):
    """Every slot is taken and the queue is full: a 429."""


class ExplainTimeout(RuntimeError):
    """The explanation could not finish within its deadline: a 503."""


class ExplainQueue:
    def __init__(self, max_concurrency: int, max_queue: int, timeout_s: float) -> None:
        self.max_concurrency, self.max_queue, self.timeout_s = max_concurrency, max_queue, timeout_s
        self.running = self.waiting = 0
        self._slots: asyncio.Semaphore | None = None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold one of the worker's explanation slots; yields the deadline (time.monotonic)."""
        deadline = time.monotonic() + self.timeout_s
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise ExplainBusy
        self.waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
        except TimeoutError as exc:
            raise ExplainTimeout from exc
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield deadline
        finally:
            self.running -= 1
            self._slots.release()
