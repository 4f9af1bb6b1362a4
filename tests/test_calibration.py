"""Calibration: the temperature fit recovers a known over-confidence, the measures are right on known data, and
the classifier head applies the artifact's temperature and threshold (the served path: tests/test_serving.py)."""

from __future__ import annotations

import numpy as np
import pytest

from servable.artifact import Calibration
from serving.heads import ClassifierHead, softmax
from training import calibration


def _overconfident(n: int, factor: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), and logits `factor` x z: a model `factor` times too sure of itself."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 3))
    p = softmax(z)
    y = np.array([rng.choice(3, p=row) for row in p])
    return factor * z, y


def test_the_temperature_fit_recovers_a_known_overconfidence_and_lowers_ece():
    logits, y = _overconfident(20_000, 2.0)
    t = calibration.fit_temperature(logits, y)
    assert t == pytest.approx(2.0, rel=0.05)
    raw, scaled = softmax(logits), softmax(logits / t)
    assert calibration.ece(raw, y) > 0.05 > 0.02 > calibration.ece(scaled, y)
    assert calibration.nll(logits, y, t) < calibration.nll(logits, y)
    cal = calibration.fit(logits, y, coverage=0.8)
    assert cal.temperature == pytest.approx(t, abs=1e-3) and cal.coverage == pytest.approx(0.8, abs=0.01)
    assert (scaled.max(1) >= cal.abstain_below).mean() == pytest.approx(0.8, abs=0.01)


def test_selective_accuracy_and_reliability_on_known_answers():
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.6, 0.4], [0.55, 0.45]])
    y = np.array([0, 0, 1, 0])  # the surest two are right, the third wrong, the fourth right
    assert calibration.selective_accuracy(probs, y, 0.5) == 1.0
    assert calibration.selective_accuracy(probs, y, 1.0) == 0.75
    rows = calibration.reliability(probs, y, bins=2)
    assert [(r["n"], r["accuracy"]) for r in rows] == [(4, 0.75)]  # every confidence is in the upper half
    assert calibration.ece(probs, y, bins=2) == pytest.approx(abs(0.75 - probs.max(1).mean()))


def test_the_classifier_head_applies_the_artifacts_temperature_and_threshold():
    head = ClassifierHead(["a", "b"], scores=True)
    raw = np.array([[2.0, 0.0], [0.2, 0.0]], np.float32)
    assert np.allclose(head.finish(raw), softmax(raw))  # no calibration: temperature 1
    assert [p["below_threshold"] for p in head.encode(head.finish(raw), {})] == [False, False]
    head.calibrate(Calibration(temperature=2.0, abstain_below=0.6, n=10))
    values = head.finish(raw)
    assert np.allclose(values, softmax(raw / 2))
    answers = head.encode(values, {})
    assert [p["below_threshold"] for p in answers] == [False, True]  # 0.73 and 0.52 against 0.6
    flags = head.output_data(values)["below_threshold"]
    assert flags.dtype == np.bool_ and flags.tolist() == [False, True]
    assert head.info()["calibration"] == {"temperature": 2.0, "abstain_below": 0.6, "fitted_on": "validation"}
    head.calibrate(None)  # an artifact without one serves as before
    assert np.allclose(head.finish(raw), softmax(raw)) and not head.below_threshold(head.finish(raw)).any()
