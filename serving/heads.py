"""Task heads: what a model's raw outputs mean, over any input modality.

A head turns the model's raw output rows into the prediction once per batch (`finish`: softmax
for a classifier), then per request builds the REST answer, the V2 outputs, the metrics and what
the feedback hook needs, all from that one prediction. A new input type never touches a head; a
new task is a new head, not a change to the adapters or the core.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from servable.artifact import Calibration
from serving import metrics
from serving.io_spec import BATCH, Option, Tensor


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Comparison:
    """A shadow candidate's prediction of one request's rows against the live one (serving/shadow.py)."""

    agreed: np.ndarray  # per row: the candidate's answer agrees with the live answer
    abs_diff: float  # mean absolute difference of the scores, over the request's rows
    pairs: list[tuple[str, str]]  # per row (live, candidate) top label; empty for a task without labels


class Head(ABC):
    """The task of a model whose artifact lists `labels` (a regressor's name its outputs)."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels

    @abstractmethod
    def finish(self, raw: np.ndarray) -> np.ndarray:
        """The prediction of a batch (N rows) from the model's raw output rows (N rows)."""

    @abstractmethod
    def outputs(self) -> list[Tensor]:
        """The V2 output tensors."""

    @abstractmethod
    def output_data(self, values: np.ndarray) -> dict[str, np.ndarray | list[str]]:
        """Each V2 output's data for one request's prediction: an FP32 array or a list of strings."""

    @abstractmethod
    def encode(self, values: np.ndarray, options: dict[str, Any]) -> list[dict]:
        """The REST answer's `predictions`, one per row."""

    @abstractmethod
    def observe(self, labels: Mapping[str, str], values: np.ndarray) -> None:
        """The prediction metrics of one request; `labels`: the model's (`ServedModel.labels`: model, version)."""

    @abstractmethod
    def compare(self, live: np.ndarray, candidate_head: Head, candidate: np.ndarray, tolerance: float) -> Comparison:
        """How a shadow candidate's prediction of the same rows (`candidate`, from `candidate_head`) compares with
        this head's `live` one, by this head's own answer; `tolerance` is the setting `shadow_tolerance`."""

    def options(self) -> list[Option]:
        """Request options the head reads (merged with the adapter's)."""
        return []

    def confidence(self, values: np.ndarray) -> np.ndarray | None:
        """Per row, how sure the model is (0..1), for the low-confidence signal and the feedback queue;
        None where the task has no such measure (only flagged items are then queued)."""
        return None

    def summary(self, row: np.ndarray) -> str:
        """A one-word answer of one row (the feedback queue's `predicted_label`)."""
        return ""

    def calibrate(self, calibration: Calibration | None) -> None:
        """Take the artifact's calibration (None: an artifact without one); a head without probabilities
        ignores it."""
        return None

    def info(self) -> dict[str, Any]:
        return {"head": type(self).__name__}


class ClassifierHead(Head):
    """Softmax over the labels of the logits divided by the artifact's temperature; the answer's label,
    probability, top-k or scores, and whether it is below the abstention threshold; V2 `probabilities`,
    `label` and `below_threshold`; predictions counted by label and their top-1 probability observed."""

    def __init__(self, labels: list[str], default_top_k: int = 3, scores: bool = False) -> None:
        super().__init__(labels)
        self.default_top_k, self.scores = default_top_k, scores
        self.calibration = Calibration()  # temperature 1, no threshold: what an uncalibrated artifact serves

    def calibrate(self, calibration: Calibration | None) -> None:
        self.calibration = calibration or Calibration()

    def finish(self, raw: np.ndarray) -> np.ndarray:
        t = self.calibration.temperature
        return softmax(raw if t == 1.0 else raw / np.float32(t))

    def below_threshold(self, values: np.ndarray) -> np.ndarray:
        """Per row, whether the top-1 probability is under the abstention threshold (never, without one)."""
        threshold = self.calibration.abstain_below
        return np.zeros(len(values), bool) if threshold is None else values.max(1) < threshold

    def outputs(self) -> list[Tensor]:
        return [Tensor("probabilities", "FP32", (BATCH, len(self.labels))), Tensor("label", "BYTES", (BATCH,)),
                Tensor("below_threshold", "BOOL", (BATCH,))]  # fmt: skip

    def output_data(self, values: np.ndarray) -> dict[str, np.ndarray | list[str]]:
        return {"probabilities": values, "label": [self.labels[i] for i in values.argmax(1)],
                "below_threshold": self.below_threshold(values)}  # fmt: skip

    def options(self) -> list[Option]:
        if self.scores:  # every label's score is in the answer: no top-k to choose
            return []
        n = len(self.labels)
        return [
            Option(
                "top_k",
                "integer",
                min(self.default_top_k, n),
                "labels returned (beyond the model's labels: all of them)",
                1,
                n,
                clip=True,
            )
        ]

    def encode(self, values: np.ndarray, options: dict[str, Any]) -> list[dict]:
        labels, below = self.labels, self.below_threshold(values).tolist()
        if self.scores:
            return [{"label": labels[int(p.argmax())], "probability": round(float(p.max()), 6), "below_threshold": b,
                     "scores": {lab: round(float(v), 6) for lab, v in zip(labels, p, strict=True)}}
                    for p, b in zip(values, below, strict=True)]  # fmt: skip
        order = np.argsort(-values, axis=1)[:, : options.get("top_k", self.default_top_k)]
        return [{"label": labels[row[0]], "probability": round(float(p[row[0]]), 6), "below_threshold": b,
                 "top_k": [{"label": labels[j], "probability": round(float(p[j]), 6)} for j in row]}
                for row, p, b in zip(order, values, below, strict=True)]  # fmt: skip

    def observe(self, labels: Mapping[str, str], values: np.ndarray) -> None:
        top = values.argmax(1)
        confidence = metrics.CONFIDENCE.labels(**labels)
        for i, p in zip(top, values[np.arange(len(top)), top], strict=True):
            metrics.PREDICTIONS.labels(**labels, label=self.labels[i]).inc()
            confidence.observe(float(p))

    def confidence(self, values: np.ndarray) -> np.ndarray:
        return values.max(1)

    def compare(self, live: np.ndarray, candidate_head: Head, candidate: np.ndarray, tolerance: float) -> Comparison:
        """Agreement of the top label (by name: a candidate may order or extend its labels differently); the
        probabilities' mean absolute difference over the union of both label sets (a label one side lacks is 0
        there); `tolerance` is not used."""
        theirs = candidate_head.labels
        names = self.labels + [lab for lab in theirs if lab not in self.labels]
        column = {lab: j for j, lab in enumerate(names)}
        ours, other = np.zeros((len(live), len(names))), np.zeros((len(live), len(names)))
        ours[:, : len(self.labels)] = live
        other[:, [column[lab] for lab in theirs]] = candidate
        pairs = [(self.labels[i], theirs[j]) for i, j in zip(live.argmax(1), candidate.argmax(1), strict=True)]
        agreed = np.array([a == b for a, b in pairs], bool)
        return Comparison(agreed, float(np.abs(ours - other).mean()), pairs)

    def summary(self, row: np.ndarray) -> str:
        return self.labels[int(row.argmax())]

    def info(self) -> dict[str, Any]:
        c = self.calibration
        return {**super().info(), "calibration": {"temperature": c.temperature, "abstain_below": c.abstain_below,
                                                  "fitted_on": c.fitted_on if c.n else None}}  # fmt: skip


class RegressorHead(Head):
    """One value per row (the model's first output column), with an interval where the model gives a
    lower and upper bound as its second and third columns; V2 output `value` (and `interval`)."""

    def __init__(self, labels: list[str], interval: bool = False) -> None:
        super().__init__(labels)
        self.interval = interval

    def finish(self, raw: np.ndarray) -> np.ndarray:
        return raw.reshape(len(raw), -1).astype(np.float32, copy=False)

    def outputs(self) -> list[Tensor]:
        out = [Tensor("value", "FP32", (BATCH,))]
        return [*out, Tensor("interval", "FP32", (BATCH, 2))] if self.interval else out

    def output_data(self, values: np.ndarray) -> dict[str, np.ndarray | list[str]]:
        out: dict[str, np.ndarray | list[str]] = {"value": np.ascontiguousarray(values[:, 0])}
        if self.interval:
            out["interval"] = np.ascontiguousarray(values[:, 1:3])
        return out

    def encode(self, values: np.ndarray, options: dict[str, Any]) -> list[dict]:
        name = self.labels[0] if self.labels else "value"
        return [{"name": name, "value": round(float(v[0]), 6),
                 **({"interval": [round(float(v[1]), 6), round(float(v[2]), 6)]} if self.interval else {})}
                for v in values]  # fmt: skip

    def observe(self, labels: Mapping[str, str], values: np.ndarray) -> None:
        metrics.PREDICTIONS.labels(**labels, label="value").inc(len(values))
        summary = metrics.REGRESSION_VALUE.labels(**labels)
        for v in values[:, 0]:
            summary.observe(float(v))

    def summary(self, row: np.ndarray) -> str:
        return f"{float(row[0]):.6g}"

    def compare(self, live: np.ndarray, candidate_head: Head, candidate: np.ndarray, tolerance: float) -> Comparison:
        """The value's absolute error against the live value (its mean over the rows); a row agrees when that
        error is at most `tolerance` times the live value's size."""
        error = np.abs(candidate[:, 0].astype(np.float64) - live[:, 0])
        return Comparison(error <= tolerance * np.abs(live[:, 0]), float(error.mean()), [])
