"""In-process adaptive batcher: the model runs as soon as it is free, on everything queued meanwhile.

No batching window: a lone caller's rows run at once (the latency of an unbatched server). While
a batch runs (in the model thread, outside the event loop, since ONNX Runtime releases the GIL),
new calls queue; when the model is free again, everything queued, up to `max_batch_size` rows,
runs as the next batch. So batches grow with load by themselves and never cost latency at low load.

Each call has a deadline. Admission is by predicted wait: a new call whose answer the batcher
predicts after its deadline (the batch running now, the batches queued ahead of it and its own,
each timed by `BatchCost`) is refused at once (`WouldBeLate`, a 429 with Retry-After) instead of
waiting to be refused late. When a batch forms, a call in it that waited for an earlier batch and
that this batch would answer after its deadline (the prediction at admission was wrong: the batches
ahead ran slower) is refused then (`QueueTimeout`, a 503), never run late, and its rows leave the
batch. A batch that raises fails only its own callers (`BatchFailed`); the next batch runs as usual.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

log = logging.getLogger("servable.batcher")

# Admit only a call predicted within this share of its time left: on a loaded machine a batch can run a
# fifth slower than the recent batches predicted (tests/test_reliability.py's overload test measured it).
HEADROOM = 0.8
# A running batch later than predicted says the machine may be slower now, so the queued batches' predictions are
# scaled by its lateness, up to this factor. A batch stalled for a moment (its thread waiting for the interpreter
# while the event loop parsed a large upload) was measured at 15 to 27 times its prediction; scaling the whole
# queue by that refused calls at 128 clients that the queue then answered well within their deadline. A lasting
# slowdown beyond the cap reaches the predictions through the cost model, which learns from every batch.
LATE_CAP = 2.0
# Why a batch left the queue: it took everything queued, or the next call would not fit.
Release = Literal["queue_empty", "full"]


class QueueTimeout(RuntimeError):
    """The call was still queued at its deadline."""


class BatchFailed(RuntimeError):
    """The batch holding this call raised; the cause is logged (type only), never the input."""


class WouldBeLate(RuntimeError):
    """Refused at submission: the predicted answer time is past the call's deadline."""

    def __init__(self, predicted_s: float, budget_s: float) -> None:
        super().__init__(f"predicted {1000 * predicted_s:.0f} ms, {1000 * max(budget_s, 0):.0f} ms left")
        self.predicted_s, self.budget_s = predicted_s, budget_s


class Batched(NamedTuple):
    """A call's output rows and what its batch cost it."""

    values: np.ndarray
    queue_s: float  # from submission to its batch's start
    model_s: float  # its batch's run
    batch_rows: int  # rows in its batch (its own and its batch-mates')
    started: float  # time.perf_counter() when its batch began to run


class BatchCost:
    """Seconds a batch of n units takes (a unit: a row, or a text's token), t(n) = a + b·n: a least-squares fit
    over the recent batches, each weighted down by the batches after it (`decay`) and by its age
    (`half_life_s`), over a prior of weight one made from the warm-up's batches (`seed`): the fit follows the
    machine's load, and returns to the unloaded one when no batch has run for a while."""

    def __init__(self, decay: float = 0.9, half_life_s: float = 30.0) -> None:
        self.decay, self.half_life_s = decay, half_life_s
        self._live = np.zeros(5)  # weighted sums: weight, n, n², t, n·t
        self._prior = np.zeros(5)
        self._aged_at = time.perf_counter()

    @staticmethod
    def _sums(n: float, seconds: float) -> np.ndarray:
        return np.array([1.0, n, n * n, seconds, n * seconds])

    def seed(self, timings: Sequence[tuple[float, float]]) -> None:
        """The prior: measured (units, seconds) batches (the warm-up's), together of weight one."""
        if timings:
            self._prior = sum((self._sums(n, t) for n, t in timings), np.zeros(5)) / len(timings)

    def observe(self, n: float, seconds: float) -> None:
        self._age(time.perf_counter())
        self._live = self.decay * self._live + self._sums(n, seconds)

    def _age(self, now: float) -> None:
        self._live *= 0.5 ** (max(now - self._aged_at, 0.0) / self.half_life_s)
        self._aged_at = now

    @staticmethod
    def _line(sums: np.ndarray) -> tuple[float, float]:
        """(a, b) of t(n) = a + b·n from the weighted sums."""
        w, sn, snn, st, snt = (float(x) for x in sums)
        if w == 0 or sn == 0:
            return 0.0, 0.0  # nothing measured yet: admit (the queue deadline still holds)
        spread = w * snn - sn**2
        if spread <= 1e-9 * w * snn:  # one batch size seen: time proportional to units
            return 0.0, st / sn
        per_unit = max((w * snt - sn * st) / spread, 0.0)
        return max((st - per_unit * sn) / w, 0.0), per_unit

    def line(self) -> tuple[float, float]:
        """(a, b) on the machine as the recent batches found it."""
        self._age(time.perf_counter())
        return self._line(self._live + self._prior)

    def predict(self, n: float) -> float:
        """A batch of n units on the machine as the recent batches found it."""
        fixed, per_unit = self.line()
        return fixed + per_unit * n

    def unloaded(self, n: float) -> float:
        """A batch of n units on the machine as the warm-up found it."""
        fixed, per_unit = self._line(self._prior)
        return fixed + per_unit * n


@dataclass
class _Call:
    rows: Sequence[Any]
    units: int  # the rows' cost units (BatchCost)
    future: asyncio.Future
    deadline: float  # time.perf_counter() by which the answer is due
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Concatenates the rows of concurrent calls into batches for `run` (rows -> array, one row per row)."""

    def __init__(self, run: Callable[[list[Any]], np.ndarray], max_batch_size: int, max_wait_s: float,
                 on_batch: Callable[[int, Release], None] | None = None,
                 units: Callable[[Any], int] = lambda row: 1) -> None:  # fmt: skip
        self.run, self.max_batch_size, self.max_wait_s = run, max_batch_size, max_wait_s
        self.on_batch = on_batch  # (rows, why it was released): metrics
        self.units = units  # a row's cost units (the adapter's: 1, or a text's tokens)
        self.cost = BatchCost()
        self._pending: collections.deque[_Call] = collections.deque()
        self._running: tuple[int, float] | None = None  # (units, start) of the batch in the model thread
        self._free_at = 0.0  # time.perf_counter() when the model last finished a batch
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        # One model thread: batches run one after another, the event loop keeps parsing requests.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model")

    def predicted_wait(self, rows: int, units: int, now: float) -> float:
        """Seconds until a call of `rows` rows (`units` cost units) submitted now would have its answer: the
        running batch's rest, then the queued calls packed into batches as `_next_batch` will pack them (by
        rows), each timed by its units, with this one last. On an idle model, its own batch as the warm-up
        timed it: a model that is not busy never refuses on the strength of its busy past."""
        if self._running is None and not self._pending:  # the model is idle: the call runs at once, alone
            return self.cost.unloaded(units)
        fixed, per_unit = self.cost.line()  # solved once: every batch ahead is timed by the same line
        wait, late = 0.0, 1.0
        if self._running is not None:  # a batch running past its prediction says the machine is slower now
            n, started = self._running
            elapsed, expected = now - started, fixed + per_unit * n
            late = min(max(elapsed / expected, 1.0), LATE_CAP) if expected > 0 else 1.0
            wait = max(expected * late - elapsed, 0.0)
        batch = batch_units = 0
        for call in self._pending:
            if call.future.done() or call.deadline < now:
                continue
            if batch and batch + len(call.rows) > self.max_batch_size:
                wait += (fixed + per_unit * batch_units) * late
                batch = batch_units = 0
            batch, batch_units = batch + len(call.rows), batch_units + call.units
        if batch and batch + rows > self.max_batch_size:
            wait += (fixed + per_unit * batch_units) * late
            batch_units = 0
        return wait + (fixed + per_unit * (batch_units + units)) * late

    def admit(self, rows: int, units: int, deadline: float) -> None:
        """Raises WouldBeLate when a call of `rows` rows and (at least) `units` units would be answered after
        `deadline`."""
        now = time.perf_counter()
        predicted = self.predicted_wait(rows, units, now)
        if now + predicted / HEADROOM > deadline:
            raise WouldBeLate(predicted, deadline - now)

    async def submit(self, rows: Sequence[Any], deadline: float | None = None) -> Batched:
        """Queue `rows` (one call's items), due by `deadline` (a time.perf_counter(); default: `max_wait_s`
        from now); their outputs, in order, once their batch has run. Raises WouldBeLate at once."""
        now = time.perf_counter()
        deadline = now + self.max_wait_s if deadline is None else deadline
        units = sum(self.units(r) for r in rows)
        self.admit(len(rows), units, deadline)
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        call = _Call(rows, units, asyncio.get_running_loop().create_future(), deadline, now)
        self._pending.append(call)
        self._wake.set()
        return await call.future

    def _next_batch(self) -> tuple[list[_Call], Release]:
        """Calls for the next batch, oldest first, up to max_batch_size rows (a larger call runs alone), less
        those it would answer late; empty only when nothing is queued."""
        while True:
            batch, why = self._take()
            kept = self._in_time(batch)
            if kept or not self._pending:
                return kept, why

    def _take(self) -> tuple[list[_Call], Release]:
        batch: list[_Call] = []
        rows, now = 0, time.perf_counter()
        while self._pending:
            call = self._pending[0]
            if call.future.done():  # the caller went away
                self._pending.popleft()
                continue
            if now > call.deadline:  # already late: refused before it takes a place in the batch
                self._pending.popleft()
                call.future.set_exception(QueueTimeout(f"still queued at its deadline ({now - call.queued_at:.3f} s)"))
                continue
            if batch and rows + len(call.rows) > self.max_batch_size:
                return batch, "full"
            batch.append(self._pending.popleft())
            rows += len(call.rows)
        return batch, "queue_empty"

    def _in_time(self, batch: list[_Call]) -> list[_Call]:
        """The calls this batch would answer by their deadlines, by the cost model; of those that waited for an
        earlier batch (their admission predicted that wait), the others are refused now rather than answered
        late. A call that found the model free runs now, as its admission judged. Dropping calls only shortens
        the batch, so the kept ones stay in time."""
        if not batch:
            return batch
        end, kept = time.perf_counter() + self.cost.predict(sum(call.units for call in batch)), []
        for call in batch:
            if call.queued_at < self._free_at and call.deadline < end:
                call.future.set_exception(QueueTimeout(f"its batch would answer it {end - call.deadline:.3f} s late"))
            else:
                kept.append(call)
        return kept

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (released := self._next_batch())[0]:
                batch, why = released
                rows = [r for call in batch for r in call.rows]
                units = sum(call.units for call in batch)
                if self.on_batch is not None:
                    self.on_batch(len(rows), why)
                start = time.perf_counter()
                self._running = (units, start)
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
                finally:
                    self._running, self._free_at = None, time.perf_counter()
                model_s = time.perf_counter() - start
                self.cost.observe(units, model_s)
                begin = 0
                for call in batch:
                    end = begin + len(call.rows)
                    if not call.future.done():
                        done = Batched(out[begin:end], start - call.queued_at, model_s, len(rows), start)
                        call.future.set_result(done)
                    begin = end

    def seed(self, timings: Sequence[tuple[int, float]]) -> None:
        """The cost model's prior: measured (units, seconds) batches, the warm-up's."""
        self.cost.seed(timings)


def retry_after_s(err: WouldBeLate) -> int:
    """Whole seconds (HTTP's Retry-After) until the queue ahead has probably drained."""
    return max(1, math.ceil(err.predicted_s))
