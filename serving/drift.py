"""Input drift in a replica: each request's statistics in a rolling window per HTTP worker, and each feature's
population-stability index (PSI) against the reference the artifact carries (servable/drift_reference.py).

The statistics come from what the request's decode already made (an image's normalised rows and its declared
size; a text and its token ids) and from its prediction; per request the window costs one bin lookup per
feature and a count update, and the PSI (a few dozen bins) is recomputed every `stride` requests once the
window holds DRIFT_WINDOW requests: a partly filled window is too noisy to export. The gauge
`servable_drift_psi{model, version, feature}` is per worker; a replica's /metrics shows the largest of its live
workers' (`livemax`) and the recording rule `servable:drift_psi:max` the largest across replicas.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np

from servable import drift_reference
from servable.artifact import ModelManifest
from servable.config import ServeCommon
from serving import metrics

log = logging.getLogger("servable.drift")


class DriftMonitor:
    """One worker's window of request statistics and the PSI of each feature the reference has."""

    def __init__(self, reference: drift_reference.DriftReference, model: str, version: str, window: int,
                 alert: float) -> None:  # fmt: skip
        self.names = list(reference.features)
        self.edges = [None if f.edges is None else np.asarray(f.edges) for f in reference.features.values()]
        sizes = [len(f.counts) for f in reference.features.values()]
        self.offsets = np.cumsum([0, *sizes])  # feature i's bins are [offsets[i], offsets[i + 1]) of one flat vector
        self.expected = np.concatenate([np.asarray(f.counts, np.float64) for f in reference.features.values()])
        self.counts = np.zeros(len(self.expected), np.int64)
        self.window: deque[np.ndarray] = deque()  # each request's flat bin indices
        self.size, self.alert = window, alert
        self.stride = max(1, window // 10)
        self.requests = 0
        self.model, self.version, self.over = model, version, set[str]()
        self.classes = drift_reference.PREDICTED_CLASS in reference.features
        metrics.DRIFT_PSI_ALERT.labels(model=model, version=version).set(alert)

    @classmethod
    def of(cls, manifest: ModelManifest, settings: ServeCommon) -> DriftMonitor | None:
        """The monitor of a served artifact; None for one without a reference (an older artifact: no drift)."""
        ref = manifest.drift_reference
        if ref is None or not ref.features:
            return None
        return cls(ref, manifest.name, manifest.version, settings.drift_window, settings.drift_psi_alert)

    def observe(self, stats: dict[str, np.ndarray], values: np.ndarray) -> None:
        """Count one request: its inputs' statistics (from decode) and its prediction (`values`, the head's)."""
        if self.classes:
            stats = stats | drift_reference.class_statistics(values)
        parts = [
            drift_reference.bin_index(edges, stats[name]) + offset
            for name, edges, offset in zip(self.names, self.edges, self.offsets, strict=False)
            if name in stats
        ]
        idx = np.concatenate(parts) if parts else np.empty(0, np.int64)  # fmt: skip
        n = len(self.counts)
        self.counts += np.bincount(idx, minlength=n)
        self.window.append(idx)
        if len(self.window) > self.size:
            self.counts -= np.bincount(self.window.popleft(), minlength=n)
        self.requests += 1
        if len(self.window) == self.size and self.requests % self.stride == 0:
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
