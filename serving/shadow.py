"""Shadow scoring: a candidate version scores a share of the live requests' rows, off the request path.

With `shadow_share` > 0 (servable/config.py) the replica loads `shadow_tag` beside the served model the
one way it loads any artifact (serving/loading.py: model store, checksums, variant, a warm-up), and
stays un-ready unless the candidate declares the same inputs and pre-processing: it scores the rows
the live adapter already decoded. `Shadow.around` wraps the replica's predict: after the live
prediction, a sampled request's rows and that prediction are put in a bounded queue without waiting
(full: the rows are dropped and counted). One thread per worker, at the lowest CPU priority, takes
what is queued, runs the candidate over it as one batch and compares each request's predictions by
the head's own answer (`Head.compare`). The caller's answer is built from the live prediction alone,
before and whatever the candidate does. With a share of 0 nothing is loaded and nothing wrapped:
the request path is the code it is without this module.

Only the in-process topology: the split topology's HTTP workers hold no model, and settings that
ask for a shadow there are refused at start (`ServeCommon._shadow_is_servable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from servable.config import ServeCommon
from serving import metrics
from serving.feedback.hook import HEADER, FeedbackHook
from serving.loading import ServedModel, load_model

if TYPE_CHECKING:
    from serving.adapters.base import Adapter

log = logging.getLogger("servable.shadow")


class ShadowRefused(RuntimeError):
    """The candidate cannot shadow the served model: not loadable, or it takes other rows."""


@dataclass
class _Offer:
    """What the feedback hook needs to queue a disagreeing row later: only kept for a caller whose items
    the hook may store (opt-in, allowed key)."""

    loop: asyncio.AbstractEventLoop
    headers: dict[str, str]
    items: list
    key_name: str | None


@dataclass
class _Sampled:
    rows: list
    live: np.ndarray
    offer: _Offer | None


class Shadow:
    def __init__(self, adapter_cls: type[Adapter], settings: ServeCommon, live_adapter: Adapter,
                 live: ServedModel) -> None:  # fmt: skip
        tag = settings.shadow_tag
        candidate_settings = settings.model_copy(update={"model_tag": tag})
        # One warm-up shape: the candidate checks it runs and gives finite outputs; other shapes' first runs are
        # the lane's, off the request path.
        self.adapter, self.model, _ = load_model(adapter_cls, candidate_settings, with_session=True,
                                                 warmup_sizes=[1], serves=False)  # fmt: skip
        if not self.model.ready:
            raise ShadowRefused(f"shadow candidate {tag} not loaded: {self.model.error}")
        ours = (live_adapter.inputs(), live_adapter.preprocessing())
        theirs = (self.adapter.inputs(), self.adapter.preprocessing())
        if ours != theirs:
            raise ShadowRefused(
                f"shadow candidate {self.model.art.tag} declares other inputs than the served {live.art.tag} "
                f"(inputs {[(t.name, t.datatype, t.shape) for t in theirs[0]]} vs "
                f"{[(t.name, t.datatype, t.shape) for t in ours[0]]}; pre-processing {theirs[1]} vs {ours[1]}): "
                "it cannot score the rows the served model's decoding makes"
            )
        self.live_head, self.tolerance, self.share = live_adapter.head, settings.shadow_tolerance, settings.shadow_share
        self.max_rows = settings.max_batch_size
        self.tag = live.art.tag
        self.labels = {"model": live.name, "version": live.manifest.version, "candidate": self.model.manifest.version}
        # Every series from the start (0): the dashboard and the agreement rule see the shadow before its first row.
        self.scored = metrics.SHADOW_SCORED.labels(**self.labels)
        self.agreed = metrics.SHADOW_AGREED.labels(**self.labels)
        self.dropped = metrics.SHADOW_DROPPED.labels(**self.labels)
        self.abs_diff = metrics.SHADOW_ABS_DIFF.labels(**self.labels)
        self.latency = metrics.SHADOW_LATENCY_SECONDS.labels(**self.labels)
        self.queue: queue.Queue[_Sampled | None] = queue.Queue(settings.shadow_queue)
        self.feedback: FeedbackHook | None = None
        self.thread = threading.Thread(target=self._lane, name="shadow-lane", daemon=True)
        self.thread.start()
        log.info("shadow scoring ON: %s scores %g of %s's requests (queue %d)", self.model.art.tag,
                 self.share, self.tag, settings.shadow_queue)  # fmt: skip

    # ------------------------------------------------------------ on the request path
    def around(self, predict: Callable[..., Awaitable[np.ndarray]], feedback: FeedbackHook):
        """`predict` (the replica's), then a sampled request offered to the lane: no await, no wait."""
        self.feedback = feedback
        share = self.share

        async def predict_then_offer(request, parsed, timing) -> np.ndarray:
            values = await predict(request, parsed, timing)
            if random.random() < share:
                self.offer(request, parsed.rows, parsed.items, values)
            return values

        return predict_then_offer

    def offer(self, request, rows: list, items: list, values: np.ndarray) -> None:
        offer = None
        key_name = request.scope.get("state", {}).get("key_name")
        if self.feedback is not None and self.feedback.may_store(request.headers, key_name):
            offer = _Offer(asyncio.get_running_loop(), {HEADER: request.headers.get(HEADER, "")}, items, key_name)
        try:
            self.queue.put_nowait(_Sampled(rows, values, offer))
        except queue.Full:
            self.dropped.inc(len(rows))

    # ------------------------------------------------------------ the lane (its own thread)
    def _lane(self) -> None:
        _lower_priority()
        while True:
            taken = [self.queue.get()]
            rows = len(taken[0].rows) if taken[0] is not None else 0
            while taken[-1] is not None and rows < self.max_rows:  # what else is queued, up to one batch
                try:
                    taken.append(self.queue.get_nowait())
                except queue.Empty:
                    break
                rows += len(taken[-1].rows) if taken[-1] is not None else 0
            sampled = [s for s in taken if s is not None]
            if sampled:
                self._score(sampled)
            if len(sampled) < len(taken):
                return

    def _score(self, sampled: list[_Sampled]) -> None:
        rows = [r for s in sampled for r in s.rows]
        start = time.perf_counter()
        try:
            values = self.adapter.run(self.model.session, rows)
        except Exception as exc:  # the candidate's failure is counted, never the caller's
            log.warning("shadow candidate %s failed a batch: %s", self.model.art.tag, type(exc).__name__)
            self.dropped.inc(len(rows))
            return
        self.latency.observe(time.perf_counter() - start)
        at = 0
        for s in sampled:
            mine, at = values[at : at + len(s.rows)], at + len(s.rows)
            found = self.live_head.compare(s.live, self.adapter.head, mine, self.tolerance)
            self.scored.inc(len(mine))
            self.agreed.inc(int(found.agreed.sum()))
            self.abs_diff.observe(found.abs_diff)
            for (ours, theirs), n in Counter(found.pairs).items():
                metrics.SHADOW_CONFUSION.labels(**self.labels, live_label=ours, candidate_label=theirs).inc(n)
            if s.offer is not None and not found.agreed.all():
                self._offer_disagreement(s, np.flatnonzero(~found.agreed))

    def _offer_disagreement(self, s: _Sampled, rows: np.ndarray) -> None:
        """The disagreeing rows to the feedback hook, on the worker's event loop (its one writer)."""
        assert s.offer is not None and self.feedback is not None
        o = s.offer
        # queued with reason shadow-disagree, unless the request path already queued the row for another
        ask = self.feedback.observe_disagreement(o.headers, o.items, s.live, self.tag, o.key_name, rows.tolist())
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is stopping
            asyncio.run_coroutine_threadsafe(ask, o.loop)

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):  # a full queue: the daemon thread ends with the worker
            self.queue.put_nowait(None)


def _lower_priority() -> None:
    """This thread (Linux nice is per thread) to nice 19: the request path's threads get the CPU first. Not
    SCHED_IDLE as the explain process: this thread shares the worker's interpreter lock, and one that holds
    it must not wait for an idle CPU while the event loop waits for the lock."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError as exc:
        log.warning("could not lower the shadow lane's priority: %s", exc)
