"""The service side of the feedback loop: decide per prediction, store only with the caller's consent.

Header `x-servable-feedback` carries comma-separated tokens: `opt-in` (the caller consents to its
input being stored for labelling) and `flag` (queue this prediction whatever its confidence, e.g.
because it looks wrong). An item is queued when the loop is enabled AND the caller opted in AND
(its top-1 probability is below the threshold OR it is flagged) AND the caller's API key is one the
operator allows to store (`SERVABLE_FEEDBACK_FLAG_KEYS`: any other key holder cannot make the
service keep inputs). Anything else stores nothing. The queue is bounded in items, in bytes and per
item (`FeedbackStore.add`); an item over a bound is dropped and counted, never a failed request.
Low-confidence predictions are counted either way (a drift signal without content).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import bentoml
import numpy as np

from servable.config import FeedbackSettings
from serving.feedback.store import Dropped, FeedbackStore
from serving.heads import Head

log = logging.getLogger("servable.feedback")

HEADER = "x-servable-feedback"
PURGE_EVERY_S = 60.0  # retention is applied on write, at most this often (a purge reads every sidecar)

LOW_CONFIDENCE = bentoml.metrics.Counter(
    name="servable_low_confidence_total", documentation="Predictions whose top-1 probability is below the "
    "feedback confidence threshold (a drift signal)", labelnames=["model"],
)  # fmt: skip
QUEUE_SIZE = bentoml.metrics.Gauge(
    name="servable_feedback_queue_size", documentation="Items in the labelling queue of a model",
    labelnames=["model"], multiprocess_mode="livemax",
)  # fmt: skip
QUEUE_BYTES = bentoml.metrics.Gauge(
    name="servable_feedback_queue_bytes", documentation="Bytes of the whole labelling queue folder, as its "
    "writer last read it (bounded by SERVABLE_FEEDBACK_MAX_BYTES)", labelnames=["model"], multiprocess_mode="livemax",
)  # fmt: skip
FEEDBACK_ITEMS = bentoml.metrics.Counter(
    name="servable_feedback_items_total",
    documentation="Feedback candidates by outcome: stored, no_consent, key_not_allowed, queue_full, bytes_full, "
    "too_large, error",
    labelnames=["model", "outcome"],
)  # fmt: skip


def parse_header(value: str | None) -> tuple[bool, bool]:
    """(opted in, flagged) from the header value; unknown tokens are ignored."""
    tokens = {t.strip().lower() for t in (value or "").replace(";", ",").split(",")}
    return "opt-in" in tokens, "flag" in tokens


class FeedbackHook:
    def __init__(self, model: str, head: Head, content: Callable[[Any], Any],
                 settings: FeedbackSettings | None = None) -> None:  # fmt: skip
        """`head` says how sure a prediction is and what it answered; `content` makes a storable item what the
        queue keeps (text as it is, an image as PNG bytes)."""
        self.model, self.head, self.content = model, head, content
        self.settings = settings or FeedbackSettings()
        self.store = FeedbackStore(self.settings)
        self._last_purge = 0.0
        self._lock = asyncio.Lock()  # one writer per process: the size check and purge stay consistent
        # Both series exist from the start (0), so the drift panel and alert have data, not silence.
        LOW_CONFIDENCE.labels(model=model)
        QUEUE_SIZE.labels(model=model).set(0)
        if self.settings.enabled:
            log.info("feedback loop ON for %s: queue %s, threshold %.2f, retention %g days (opt-in only)",
                     model, self.settings.dir, self.settings.confidence_threshold,
                     self.settings.retention_days)  # fmt: skip
            if not self.settings.flag_keys.strip():
                log.warning("feedback loop ON for %s but SERVABLE_FEEDBACK_FLAG_KEYS is empty: no caller may "
                            "store, nothing will be queued", model)  # fmt: skip
            with contextlib.suppress(OSError):  # an unreadable queue shows up on the first write
                QUEUE_SIZE.labels(model=model).set(self.store.count(model))

    def may_store(self, headers, key_name: str | None) -> bool:
        """Whether this caller's items could be queued at all (the loop on, the caller opted in, its key
        allowed): a shadow lane keeps a sampled request's items for a later offer only then."""
        consent = parse_header(headers.get(HEADER))[0]
        return self.settings.enabled and consent and self.settings.key_may_store(key_name)

    async def observe(self, headers, items: list, values: np.ndarray, model_tag: str,
                      key_name: str | None = None, reason: str | None = None) -> list[str]:  # fmt: skip
        """After a successful prediction (`values`, the head's); `items` are the raw inputs (texts or image
        bytes), or None where there is no storable input; `key_name` is the caller's API-key name (None
        when auth is off). `reason` (e.g. `shadow-disagree`, serving/shadow.py): every item is offered for
        that reason, with the same consent and key checks, and is not counted as a prediction again.
        Returns the ids stored. Never raises: feedback must not fail a request that was answered."""
        confidence = self.head.confidence(values)  # None: the task has no such measure, only flags count
        low = np.zeros(len(values), bool) if confidence is None else confidence < self.settings.confidence_threshold
        if low.any() and reason is None:
            LOW_CONFIDENCE.labels(model=self.model).inc(int(low.sum()))
        if not self.settings.enabled:
            return []
        consent, flagged = parse_header(headers.get(HEADER))
        wanted = [i for i in range(len(values)) if (reason or low[i] or flagged) and items[i] is not None]
        if not wanted:
            return []
        if not consent:
            FEEDBACK_ITEMS.labels(model=self.model, outcome="no_consent").inc(len(wanted))
            return []
        if not self.settings.key_may_store(key_name):  # the key's holder may not make us keep inputs
            FEEDBACK_ITEMS.labels(model=self.model, outcome="key_not_allowed").inc(len(wanted))
            return []
        async with self._lock:
            try:
                why = reason or ("flagged" if flagged else "low_confidence")
                return await asyncio.to_thread(self._store, wanted, items, values, confidence, model_tag, why)
            except Exception as exc:  # disk full, permissions: logged by type only, never the content
                log.warning("feedback item not stored: %s", type(exc).__name__)
                FEEDBACK_ITEMS.labels(model=self.model, outcome="error").inc(len(wanted))
                return []

    def _store(self, wanted: list[int], items: list, values: np.ndarray, confidence: np.ndarray | None,
               model_tag: str, reason: str) -> list[str]:  # fmt: skip
        now = time.time()
        if now - self._last_purge >= PURGE_EVERY_S:
            self._last_purge = now
            if self.store.purge(now):
                log.info("feedback retention: old items of the queue deleted")
        # Re-read before each batch of writes: other workers and replicas may share the folder.
        size, used = self.store.usage(self.model)
        stored = []
        for i in wanted:
            if size >= self.settings.max_items:
                FEEDBACK_ITEMS.labels(model=self.model, outcome="queue_full").inc()
                continue
            content = self.content(items[i])
            try:
                item = self.store.add(
                    model=self.model, model_tag=model_tag, kind="text" if isinstance(content, str) else "image",
                    content=content, predicted_label=self.head.summary(values[i]),
                    confidence=0.0 if confidence is None else float(confidence[i]),
                    reason=reason, now=now, room=self.settings.max_bytes - used,
                )  # fmt: skip
            except Dropped as exc:
                FEEDBACK_ITEMS.labels(model=self.model, outcome=exc.outcome).inc()
                continue
            stored.append(item.meta["id"])
            size, used = size + 1, used + item.size
        FEEDBACK_ITEMS.labels(model=self.model, outcome="stored").inc(len(stored))
        QUEUE_SIZE.labels(model=self.model).set(size)
        QUEUE_BYTES.labels(model=self.model).set(used)
        return stored
