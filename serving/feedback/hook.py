"""The service side of the feedback loop: decide per prediction, store only with the caller's consent.

Header `x-servable-feedback` carries comma-separated tokens: `opt-in` (the caller consents to its
input being stored for labelling) and `flag` (queue this prediction whatever its confidence, e.g.
because it looks wrong). An item is queued when the loop is enabled AND the caller opted in AND the
caller's API key is one the operator allows to store (`SERVABLE_FEEDBACK_FLAG_KEYS`: any other key
holder cannot make the service keep inputs) AND it has a reason: flagged, low-confidence (top-1
probability below the threshold), sampled (`SERVABLE_FEEDBACK_SAMPLE_SHARE`), or shadow-disagree (the
shadow lane's candidate answered otherwise: `observe_disagreement`). Anything else stores nothing.
The queue is bounded in items, in bytes and per item (`FeedbackStore.add`); an item over a bound is
dropped and counted, never a failed request.
Low-confidence predictions are counted either way (a drift signal without content).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import bentoml
import numpy as np

from servable.config import FeedbackSettings
from serving.feedback.store import FLAGGED, SAMPLED, SHADOW_DISAGREE, Dropped, FeedbackStore
from serving.feedback.store import LOW_CONFIDENCE as LOW_CONFIDENCE_REASON
from serving.heads import Head

log = logging.getLogger("servable.feedback")

HEADER = "x-servable-feedback"
PURGE_EVERY_S = 60.0  # retention is applied on write, at most this often (a purge reads every sidecar)

LOW_CONFIDENCE = bentoml.metrics.Counter(
    name="servable_low_confidence_total", documentation="Predictions whose top-1 probability is below the "
    "feedback confidence threshold (a drift signal)", labelnames=["model", "version"],
)  # fmt: skip
QUEUE_SIZE = bentoml.metrics.Gauge(
    name="servable_feedback_queue_size", documentation="Items in the labelling queue of a model",
    labelnames=["model", "version"], multiprocess_mode="livemax",
)  # fmt: skip
QUEUE_BYTES = bentoml.metrics.Gauge(
    name="servable_feedback_queue_bytes", documentation="Bytes of the whole labelling queue folder, as its "
    "writer last read it (bounded by SERVABLE_FEEDBACK_MAX_BYTES)", labelnames=["model", "version"],
    multiprocess_mode="livemax",
)  # fmt: skip
FEEDBACK_ITEMS = bentoml.metrics.Counter(
    name="servable_feedback_items_total",
    documentation="Feedback candidates by outcome: stored, no_consent, key_not_allowed, queue_full, bytes_full, "
    "too_large, error",
    labelnames=["model", "version", "outcome"],
)  # fmt: skip


def parse_header(value: str | None) -> tuple[bool, bool]:
    """(opted in, flagged) from the header value; unknown tokens are ignored."""
    tokens = {t.strip().lower() for t in (value or "").replace(";", ",").split(",")}
    return "opt-in" in tokens, "flag" in tokens


class FeedbackHook:
    def __init__(self, model: str, head: Head, content: Callable[[Any], Any],
                 settings: FeedbackSettings | None = None, *, version: str = "") -> None:  # fmt: skip
        """`head` says how sure a prediction is and what it answered; `content` makes a storable item what the
        queue keeps (text as it is, an image as PNG bytes); `version`: the served tag's (the metrics' label)."""
        self.model, self.head, self.content = model, head, content
        self.labels = {"model": model, "version": version}
        self.settings = settings or FeedbackSettings()
        self.store = FeedbackStore(self.settings)
        self._last_purge = 0.0
        self._lock = asyncio.Lock()  # one writer per process: the size check and purge stay consistent
        # Both series exist from the start (0), so the drift panel and alert have data, not silence.
        LOW_CONFIDENCE.labels(**self.labels)
        QUEUE_SIZE.labels(**self.labels).set(0)
        if self.settings.enabled:
            log.info("feedback loop ON for %s: queue %s, threshold %.2f, retention %g days (opt-in only)",
                     model, self.settings.dir, self.settings.confidence_threshold,
                     self.settings.retention_days)  # fmt: skip
            if not self.settings.flag_keys.strip():
                log.warning("feedback loop ON for %s but SERVABLE_FEEDBACK_FLAG_KEYS is empty: no caller may "
                            "store, nothing will be queued", model)  # fmt: skip
            with contextlib.suppress(OSError):  # an unreadable queue shows up on the first write
                QUEUE_SIZE.labels(**self.labels).set(self.store.count(model))

    def may_store(self, headers, key_name: str | None) -> bool:
        """Whether this caller's items could be queued at all (the loop on, the caller opted in, its key
        allowed): a shadow lane keeps a sampled request's items for a later offer only then."""
        consent = parse_header(headers.get(HEADER))[0]
        return self.settings.enabled and consent and self.settings.key_may_store(key_name)

    async def observe(self, headers, items: list, values: np.ndarray, model_tag: str,
                      key_name: str | None = None) -> list[str]:  # fmt: skip
        """After a successful prediction (`values`, the head's); `items` are the raw inputs (texts or image
        bytes), or None where there is no storable input; `key_name` is the caller's API-key name (None
        when auth is off). Returns the ids stored. Never raises: feedback must not fail a request that was
        answered."""
        confidence = self.head.confidence(values)  # None: the task has no such measure, only flags count
        low = self._low(confidence, len(values))
        if low.any():
            LOW_CONFIDENCE.labels(**self.labels).inc(int(low.sum()))
        if not self.settings.enabled:
            return []
        consent, flagged = parse_header(headers.get(HEADER))
        reasons = self._request_reasons(items, low, flagged, consent)
        return await self._queue(consent, key_name, reasons, items, values, confidence, model_tag)

    async def observe_disagreement(self, headers, items: list, values: np.ndarray, model_tag: str,
                                   key_name: str | None, rows: list[int]) -> list[str]:  # fmt: skip
        """The shadow lane's call, after it scored a request: `rows` are those whose candidate answered other
        than the live model (`values`, the live answer that was sent). Queued with reason `shadow-disagree`
        under the rules of `observe` (loop on, the caller's opt-in, a key allowed to store); a row the
        request already queued (low-confidence, flagged or sampled) is not queued twice. Never raises."""
        if not self.settings.enabled:
            return []
        consent, flagged = parse_header(headers.get(HEADER))
        confidence = self.head.confidence(values)
        queued = self._request_reasons(items, self._low(confidence, len(values)), flagged, consent)
        reasons = {i: SHADOW_DISAGREE for i in rows if i not in queued and 0 <= i < len(items) and items[i] is not None}
        return await self._queue(consent, key_name, reasons, items, values, confidence, model_tag)

    def _low(self, confidence: np.ndarray | None, n: int) -> np.ndarray:
        return np.zeros(n, bool) if confidence is None else confidence < self.settings.confidence_threshold

    def _request_reasons(self, items: list, low: np.ndarray, flagged: bool, consent: bool) -> dict[int, str]:
        """Row -> why the request path queues it: the caller's flag, else low confidence, else the sample (drawn
        from opted-in requests only: no input of another request is even hashed)."""
        share, out = (self.settings.sample_share if consent else 0.0), {}
        for i, item in enumerate(items):
            if item is None:
                continue
            if flagged or low[i]:
                out[i] = FLAGGED if flagged else LOW_CONFIDENCE_REASON
            elif share > 0 and sampled(item, share):
                out[i] = SAMPLED
        return out

    async def _queue(self, consent: bool, key_name: str | None, reasons: dict[int, str], items: list,
                     values: np.ndarray, confidence: np.ndarray | None, model_tag: str) -> list[str]:  # fmt: skip
        """Store the candidate rows `reasons` names, only with the caller's consent and an allowed key."""
        if not reasons:
            return []
        if not consent:
            FEEDBACK_ITEMS.labels(**self.labels, outcome="no_consent").inc(len(reasons))
            return []
        if not self.settings.key_may_store(key_name):  # the key's holder may not make us keep inputs
            FEEDBACK_ITEMS.labels(**self.labels, outcome="key_not_allowed").inc(len(reasons))
            return []
        async with self._lock:
            try:
                return await asyncio.to_thread(self._store, reasons, items, values, confidence, model_tag)
            except Exception as exc:  # disk full, permissions: logged by type only, never the content
                log.warning("feedback item not stored: %s", type(exc).__name__)
                FEEDBACK_ITEMS.labels(**self.labels, outcome="error").inc(len(reasons))
                return []

    def _store(self, reasons: dict[int, str], items: list, values: np.ndarray, confidence: np.ndarray | None,
               model_tag: str) -> list[str]:  # fmt: skip
        now = time.time()
        if now - self._last_purge >= PURGE_EVERY_S:
            self._last_purge = now
            if self.store.purge(now):
                log.info("feedback retention: old items of the queue deleted")
        # Re-read before each batch of writes: other workers and replicas may share the folder.
        size, used = self.store.usage(self.model)
        stored = []
        for i, reason in reasons.items():
            if size >= self.settings.max_items:
                FEEDBACK_ITEMS.labels(**self.labels, outcome="queue_full").inc()
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
                FEEDBACK_ITEMS.labels(**self.labels, outcome=exc.outcome).inc()
                continue
            stored.append(item.meta["id"])
            size, used = size + 1, used + item.size
        FEEDBACK_ITEMS.labels(**self.labels, outcome="stored").inc(len(stored))
        QUEUE_SIZE.labels(**self.labels).set(size)
        QUEUE_BYTES.labels(**self.labels).set(used)
        return stored


def sampled(item: str | bytes, share: float) -> bool:
    """Whether an input is in the `share` sample: by a hash of its content, so a resent input is always in or
    always out (no second chance of being stored) and the shadow lane can tell it was queued already."""
    data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") < share * 2**64
