"""Explanations are admitted and run apart from predictions, so a burst of them cannot slow predictions.

An explanation is one to two hundred model rows: tens of predictions' worth of work. Each worker
admits `explain_max_concurrency` at once and queues `explain_max_queue` more (beyond that: 429 at
once); a call that cannot finish within `explain_timeout_s` (wait plus its rows) gets a 503.
Admitted explanations run in a thread of their own whose OS priority is lowered by `explain_nice`:
the predict path's threads (event loop, batcher) get the CPU first whenever both want it, and
explanations use what is left. The rows run in chunks of `max_batch_size`, and the deadline is
checked between chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("servable.explain")


class ExplainBusy(RuntimeError):
    """Every slot is taken and the queue is full: a 429."""


class ExplainTimeout(RuntimeError):
    """The explanation could not finish within its deadline: a 503."""


def _lower_priority(increment: int) -> None:
    """Raise this thread's nice value (Linux: per thread). Never fatal: the limits still hold."""
    if not increment:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: run at the worker's priority
        log.warning("could not lower the explain thread's priority: %s", exc)


class ExplainQueue:
    def __init__(self, max_concurrency: int, max_queue: int, timeout_s: float, nice: int) -> None:
        self.max_concurrency, self.max_queue, self.timeout_s = max_concurrency, max_queue, timeout_s
        self.running = self.waiting = 0
        self._slots: asyncio.Semaphore | None = None
        self.executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="explain",
                                           initializer=_lower_priority, initargs=(nice,))  # fmt: skip

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

    async def run(self, fn, *args):
        """`fn(*args)` in the low-priority explain thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
