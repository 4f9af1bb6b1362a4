"""Split topology: explanation rows reach the model process by a lane below its predictions.

In the model process (serving/model_service.py::model_service) predictions are the batched `predict`
API; explanations' chunks are a separate, non-batched `explain` API that runs a chunk only while no
prediction is in flight in that process (arrived and not yet answered, queued for a batch included),
one chunk at a time. A prediction that arrives while a chunk runs waits for at most that one chunk
(`explain_chunk_rows` rows), never for an explanation's other rows: before the lane, chunks of
`max_batch_size` rows joined the predictions' batches, and a prediction could wait behind several.

Strict priority: under predictions that never leave the process idle, explanations wait until their
deadline (`explain_timeout_s`: a 503 `explain_timeout`) rather than slow a prediction. A chunk that
could not start within the wait it was given comes back with no rows; the worker asks again while
its deadline allows (serving/topology.py::Split.explain).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class ExplainLane:
    """One model process's count of predictions in flight, and the turn of explanation chunks."""

    def __init__(self) -> None:
        self.predicting = 0
        self._idle: asyncio.Event | None = None  # made on the server's event loop, on first use
        self._turn: asyncio.Lock | None = None

    def _events(self) -> tuple[asyncio.Event, asyncio.Lock]:
        if self._idle is None or self._turn is None:
            self._idle, self._turn = asyncio.Event(), asyncio.Lock()
            if not self.predicting:
                self._idle.set()
        return self._idle, self._turn

    def predict_started(self) -> None:
        self.predicting += 1
        self._events()[0].clear()

    def predict_finished(self) -> None:
        self.predicting -= 1
        if not self.predicting:
            self._events()[0].set()

    @contextlib.asynccontextmanager
    async def turn(self, wait_s: float) -> AsyncIterator[bool]:
        """Yields True once no prediction is in flight (holding the lane: one chunk at a time), False if
        that did not happen within `wait_s`."""
        idle, lock = self._events()
        held = False
        try:
            async with asyncio.timeout(wait_s):
                await lock.acquire()
                held = True
                while self.predicting:  # re-checked after each wake-up: another may have arrived
                    await idle.wait()
        except TimeoutError:
            if held:
                lock.release()
            yield False
            return
        try:
            yield True
        finally:
            lock.release()


class PredictionsInFlight:
    """ASGI middleware of the model process: counts its `/predict` calls from arrival to answer."""

    def __init__(self, app, lane: ExplainLane, path: str = "/predict") -> None:
        self.app, self.lane, self.path = app, lane, path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        self.lane.predict_started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.lane.predict_finished()
