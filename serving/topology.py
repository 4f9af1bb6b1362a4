"""Where a worker's model runs, chosen once per worker: `InProcess` or `Split`.

Both offer the same three things: `score(rows)` (the head's prediction of one request's rows),
`explain(parsed, deadline)` (an explanation's answer) and `ready()`. Failures are exceptions the
service's one handler turns into answers (serving/errors.py): `Overloaded`, `ModelUnavailable`.
- InProcess (CPU default): this worker's ONNX Runtime session behind its adaptive batcher
  (serving/batcher.py); explanations in a low-priority child process (serving/explain_process.py).
- Split (GPU default): one batching model process per GPU, called through BentoML's dependency
  client (serving/model_call.py: per-attempt deadline, retries); explanations' rows are built and
  rendered in a thread and scored by the model process in small chunks through its explain lane,
  below its predictions (serving/explain_lane.py).
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from servable.config import ServeCommon
from serving import metrics
from serving.adapters.base import Adapter
from serving.batcher import Batcher, BatchFailed, QueueTimeout, WouldBeLate, retry_after_s
from serving.errors import ClientError, ServingError
from serving.explain_process import ExplainCrashed, ExplainProcess
from serving.explain_queue import ExplainTimeout
from serving.loading import ServedModel
from serving.model_call import ModelUnavailable, call_model


class Overloaded(ServingError):
    def __init__(self) -> None:
        super().__init__(503, "overloaded", "waited too long for the model; retry later", {"Retry-After": "1"})


class Unavailable(ServingError):
    def __init__(self) -> None:
        super().__init__(503, "model_unavailable", "the model could not answer; retry later", {"Retry-After": "1"})


class WouldMissDeadline(ClientError):
    def __init__(self, err: WouldBeLate) -> None:
        super().__init__(429, "would_miss_deadline", f"the model's queue would answer too late ({err}); retry later",
                         {"Retry-After": str(retry_after_s(err))})  # fmt: skip


@dataclass(frozen=True)
class Scored:
    """One request's prediction, and where its time went (serving/request_timing.py)."""

    values: np.ndarray
    parts: dict[str, tuple[float, float]]  # (start, seconds): queue and model (in-process), or model_call (split)
    batch_rows: int | None = None  # the batch it rode in, where this worker knows it


class InProcess:
    def __init__(self, adapter: Adapter, model: ServedModel, run, settings: ServeCommon) -> None:
        size = settings.max_batch_size if settings.batching_enabled() else 1
        labels = model.labels
        released = metrics.BATCH_RELEASES
        self.queue_wait = metrics.QUEUE_WAIT_SECONDS.labels(**labels)
        self.batcher = Batcher(run, size, settings.max_latency_ms / 1000, units=adapter.cost_units,
                               on_batch=lambda _, why: released.labels(**labels, reason=why).inc())  # fmt: skip
        self.batcher.seed(model.warmup_timings)  # admission's first predictions: the warm-up's batches
        self.model = model
        # Explanations get a child process of their own (serving/explain_process.py says when it starts).
        self.explainer = ExplainProcess(type(adapter), settings, model.art.tag, model.variant)
        self.explainer.start()

    def admit(self, items: int, deadline: float) -> None:
        """Before decoding: refuse at once a request the batcher would answer late even at one cost unit per item
        (a lower bound), so that overload does not spend the CPU its batches need on decoding refusals."""
        try:
            self.batcher.admit(items, items, deadline)
        except WouldBeLate as err:
            raise WouldMissDeadline(err) from None

    async def score(self, rows: list, deadline: float) -> Scored:
        try:
            done = await self.batcher.submit(rows, deadline)
        except WouldBeLate as err:
            raise WouldMissDeadline(err) from None
        except QueueTimeout:
            raise Overloaded from None
        except BatchFailed:
            raise Unavailable from None
        self.queue_wait.observe(done.queue_s)
        parts = {"queue": (done.started - done.queue_s, done.queue_s), "model": (done.started, done.model_s)}
        return Scored(done.values, parts, done.batch_rows)

    async def explain(self, parsed, deadline: float) -> dict:
        try:
            return await self.explainer.explain(parsed, deadline)
        except (BatchFailed, ExplainCrashed):
            raise Unavailable from None

    async def ready(self) -> bool:
        return True

    async def runtime(self) -> dict:
        return self.model.runtime()

    def stop(self) -> None:
        self.explainer.stop()


class Split:
    def __init__(self, adapter: Adapter, model: ServedModel, client: Any, settings: ServeCommon) -> None:
        self.adapter, self.labels, self.client, self.settings = adapter, model.labels, client, settings

    async def _call(self, rows: list) -> np.ndarray:
        wire = self.adapter.to_wire(rows)
        try:
            return await call_model(self.labels, self.settings.model_call_timeout_s,
                                    lambda: self.client.to_async.predict(wire))  # fmt: skip
        except ModelUnavailable:
            raise Unavailable from None

    def admit(self, items: int, deadline: float) -> None:
        """No admission by predicted wait here: the batching is the model process's (BentoML's)."""

    async def score(self, rows: list, deadline: float) -> Scored:
        """The model process's prediction (its batching and its `max_latency_ms` bound are BentoML's: the front
        worker neither sees its queue nor admits by predicted wait; `deadline` is not used here)."""
        start = time.perf_counter()
        values = await self._call(rows)
        return Scored(values, {"model_call": (start, time.perf_counter() - start)})

    async def _explain_chunk(self, rows: list, deadline: float) -> np.ndarray:
        """One chunk scored by the model process's explain lane (serving/explain_lane.py): it waits there while
        predictions are in flight, each ask at most half a model call's deadline; ExplainTimeout at `deadline`."""
        wire = self.adapter.to_wire(rows)
        while (left := deadline - time.monotonic()) > 0:
            wait_s = min(left, self.settings.model_call_timeout_s / 2)
            try:
                ask = functools.partial(self.client.to_async.explain, rows=wire, wait_s=wait_s)
                values = await call_model(self.labels, self.settings.model_call_timeout_s, ask)
            except ModelUnavailable:
                raise Unavailable from None
            if len(values) == len(rows):
                return values  # else no rows: predictions kept the lane busy for wait_s; ask again
        raise ExplainTimeout

    async def explain(self, parsed, deadline: float) -> dict:
        rows = await asyncio.to_thread(self.adapter.explain_rows, parsed)
        # Small chunks: a prediction arriving while one runs in the model process shares the CPU (GPU) with that
        # one only. Measured on a loaded 2-core CPU (tests/test_explain.py::test_split_explain_lane_keeps_predict_p99):
        # chunks of 32 in the batches: p99 x6-20 with some 503s; lane with 8 rows: x2-6, 4: x2, 2: x2.3 but twice
        # the calls per explanation. 4 by default (explain_chunk_rows); on a GPU a chunk is about a millisecond.
        out, step = [], self.settings.explain_chunk_rows
        for i in range(0, len(rows), step):
            out.append(await self._explain_chunk(rows[i : i + step], deadline))
        return await asyncio.to_thread(self.adapter.explanation, parsed, np.concatenate(out))

    async def ready(self) -> bool:
        return bool(await self.client.is_ready(5))

    async def runtime(self) -> dict:
        try:
            return await self.client.to_async.runtime()
        except Exception as exc:  # reported, not hidden: the info call still answers
            return {"provider": "unknown", "runtime_error": type(exc).__name__}

    def stop(self) -> None:
        pass
