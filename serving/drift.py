"""Input drift in a replica: each request's statistics in a rolling window per HTTP worker, and each feature's
population-stability index (PSI) against the reference the artifact carries (servable/drift_reference.py).
A request hands over what its decode already made (an image's normalised rows and its declared size; a
text and its token ids) and its prediction. They wait in a chunk of at most `stride` requests (and
CHUNK_ITEMS items): the adapter's `drift_statistics` computes the chunk's statistics in one vectorised
pass, one bin lookup per feature and one count update follow, so a request pays a fraction of what the
same numpy calls cost one request at a time. The window holds the last DRIFT_WINDOW requests (up to a
chunk more), and the PSI (a few dozen bins) is recomputed after each chunk once it is full: a partly filled
window is too noisy to export. The gauge `servable_drift_psi{model, version, feature}` is per worker; a
replica's /metrics shows the largest of its live workers' (`livemax`) and the recording rule
`servable:drift_psi:max` the largest across replicas.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from servable import drift_reference
from servable.artifact import ModelManifest
from servable.config import ServeCommon
from serving import metrics

log = logging.getLogger("servable.drift")


CHUNK_ITEMS = 64  # items (an image's rows: 48 KiB each at 64 px) held before a chunk is counted


class DriftMonitor:
    """One worker's window of request statistics and the PSI of each feature the reference has."""

    def __init__(self, reference: drift_reference.DriftReference, model: str, version: str, window: int,
                 alert: float, statistics: Callable[[list[Any]], dict[str, np.ndarray]]) -> None:  # fmt: skip
        self.names = list(reference.features)
        self.edges = [None if f.edges is None else np.asarray(f.edges) for f in reference.features.values()]
        sizes = [len(f.counts) for f in reference.features.values()]
        self.offsets = np.cumsum([0, *sizes])  # feature i's bins are [offsets[i], offsets[i + 1]) of one flat vector
        self.expected = np.concatenate([np.asarray(f.counts, np.float64) for f in reference.features.values()])
        self.counts = np.zeros(len(self.expected), np.int64)
        self.window: deque[tuple[int, np.ndarray]] = deque()  # (requests, bin counts) of each chunk counted
        self.in_window = 0  # requests
        self.pending: list[tuple[Any, np.ndarray]] = []  # (drift input, prediction) of requests not yet counted
        self.pending_items = 0
        self.statistics = statistics
        self.size, self.alert = window, alert
        self.stride = max(1, window // 10)
        self.model, self.version, self.over = model, version, set[str]()
        self.classes = drift_reference.PREDICTED_CLASS in reference.features
        metrics.DRIFT_PSI_ALERT.labels(model=model, version=version).set(alert)

    @classmethod
    def of(cls, manifest: ModelManifest, settings: ServeCommon,
           statistics: Callable[[list[Any]], dict[str, np.ndarray]]) -> DriftMonitor | None:  # fmt: skip
        """The monitor of a served artifact (`statistics`: its adapter's `drift_statistics`); None for one without
        a reference (an older artifact: no drift)."""
        ref = manifest.drift_reference
        if ref is None or not ref.features:
            return None
        return cls(ref, manifest.name, manifest.version, settings.drift_window, settings.drift_psi_alert, statistics)

    def observe(self, drift_input: Any, values: np.ndarray) -> None:
        """Take one request: its drift input (from decode) and its prediction (`values`, the head's)."""
        self.pending.append((drift_input, values))
        self.pending_items += len(values)
        if len(self.pending) >= self.stride or self.pending_items >= CHUNK_ITEMS:
            self.count()

    def count(self) -> None:
        """Count the pending requests as one chunk; publish when the window is full."""
        chunk, self.pending, self.pending_items = self.pending, [], 0
        stats = self.statistics([d for d, _ in chunk])
        if self.classes:
            stats |= drift_reference.class_statistics(np.concatenate([v for _, v in chunk]))
        parts = [
            drift_reference.bin_index(edges, stats[name]) + offset
            for name, edges, offset in zip(self.names, self.edges, self.offsets, strict=False)
            if name in stats
        ]
        idx = np.concatenate(parts) if parts else np.empty(0, np.int64)  # fmt: skip
        counted = np.bincount(idx, minlength=len(self.counts))
        self.counts += counted
        self.window.append((len(chunk), counted))
        self.in_window += len(chunk)
        while self.in_window - self.window[0][0] >= self.size:  # the oldest chunk is beyond the last `size`
            requests, old = self.window.popleft()
            self.counts -= old
            self.in_window -= requests
        if self.in_window >= self.size:
            self.publish()

    def psi(self) -> dict[str, float]:
        """Each feature's PSI over the window (features without a value in it left out)."""
        out = {}
        for i, name in enumerate(self.names):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            if self.counts[lo:hi].any():
                out[name] = drift_reference.psi(self.expected[lo:hi], self.counts[lo:hi])
        return out

    def publish(self) -> None:
        """Set the gauges; log a warning line when a feature crosses DRIFT_PSI_ALERT (and when it is back under)."""
        for name, value in self.psi().items():
            # the series appears with the first full window (a gauge made earlier would export a 0 meanwhile)
            metrics.DRIFT_PSI.labels(model=self.model, version=self.version, feature=name).set(value)
            if (value > self.alert) != (name in self.over):
                self.over ^= {name}
                log.warning("input drift: %s %s PSI %.3f is %s DRIFT_PSI_ALERT %g over the last %d requests",
                            self.model, name, value, "above" if value > self.alert else "back under", self.alert,
                            self.size)  # fmt: skip
