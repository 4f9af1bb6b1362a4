"""In-process adaptive batcher: the model runs as soon as it is free, on everything queued meanwhile.

No batching window: a lone caller's rows run at once (the latency of an unbatched server). While
a batch runs (in the model thread, outside the event loop, since ONNX Runtime releases the GIL),
new calls queue; when the model is free again, everything queued, up to `max_batch_size` rows,
runs as the next batch. So batches grow with load by themselves and never cost latency at low load.

A call that waited longer than `max_wait_s` is refused (`QueueTimeout`, a 503) rather than run
late. A batch that raises fails only its own callers (`BatchFailed`); the next batch runs as usual.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("servable.batcher")


class QueueTimeout(RuntimeError):
    """The call waited in the queue longer than the batcher's bound."""


class BatchFailed(RuntimeError):
    """The batch holding this call raised; the cause is logged (type only), never the input."""


@dataclass
class _Call:
    rows: Sequence[Any]
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Concatenates the rows of concurrent calls into batches for `run` (rows -> array, one row per row)."""

    def __init__(self, run: Callable[[list[Any]], np.ndarray], max_batch_size: int, max_wait_s: float,
                 on_batch: Callable[[int, float], None] | None = None) -> None:  # fmt: skip
        self.run, self.max_batch_size, self.max_wait_s = run, max_batch_size, max_wait_s
        self.on_batch = on_batch  # (rows, queue wait of the oldest call in seconds): metrics
        self._pending: collections.deque[_Call] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        # One model thread: batches run one after another, the event loop keeps parsing requests.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model")

    async def submit(self, rows: Sequence[Any]) -> np.ndarray:
        """Queue `rows` (one call's items); their outputs, in order, once their batch has run."""
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        call = _Call(rows, asyncio.get_running_loop().create_future())
        self._pending.append(call)
        self._wake.set()
        return await call.future

    def _next_batch(self) -> list[_Call]:
        """Calls for the next batch, oldest first, up to max_batch_size rows (a larger call runs alone)."""
        batch: list[_Call] = []
        rows, now = 0, time.perf_counter()
        while self._pending:
            call = self._pending[0]
            if call.future.done():  # the caller went away
                self._pending.popleft()
                continue
            if now - call.queued_at > self.max_wait_s:
                self._pending.popleft()
                call.future.set_exception(QueueTimeout(f"waited over {self.max_wait_s:g} s for the model"))
                continue
            if batch and rows + len(call.rows) > self.max_batch_size:
                break
            batch.append(self._pending.popleft())
            rows += len(call.rows)
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while batch := self._next_batch():
                rows = [r for call in batch for r in call.rows]
                if self.on_batch is not None:
                    self.on_batch(len(rows), time.perf_counter() - batch[0].queued_at)
                try:
                    out = await loop.run_in_executor(self._executor, self.run, rows)
                    if len(out) != len(rows):
                        raise RuntimeError(f"the model returned {len(out)} rows for {len(rows)}")
                except Exception as exc:
                    log.error("batch of %d rows failed: %s", len(rows), type(exc).__name__)
                    for call in batch:
                        if not call.future.done():
                            call.future.set_exception(BatchFailed(type(exc).__name__))
                    continue
                start = 0
                for call in batch:
                    end = start + len(call.rows)
                    if not call.future.done():
                        call.future.set_result(out[start:end])
                    start = end
