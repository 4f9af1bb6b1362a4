"""Custom Prometheus metrics (through `bentoml.metrics`, so multi-process workers aggregate).

BentoML's own `bentoml_service_*` metrics (request count, latency, in-progress, adaptive batch
size) sit beside these on `/metrics`. Names and meaning are documented in docs/serving.md.
Every metric about the served model carries `model` and `version` (the served tag's version, e.g. `t1`),
so two versions side by side (a canary, a shadow) are told apart: `ServedModel.labels` gives both.
"""

from __future__ import annotations

import bentoml

_LATENCY = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]

PREPROCESS_SECONDS = bentoml.metrics.Histogram(
    name="servable_preprocess_seconds", documentation="Validation + decoding + pre-processing time per request",
    labelnames=["model", "version"], buckets=_LATENCY,
)  # fmt: skip
MODEL_CALL_SECONDS = bentoml.metrics.Histogram(
    name="servable_model_call_seconds",
    documentation="Time a request waits for the model service: batching queue + transport + model run",
    labelnames=["model", "version"], buckets=_LATENCY,
)  # fmt: skip
MODEL_CALL_RETRIES = bentoml.metrics.Counter(
    name="servable_model_call_retries_total",
    documentation="Model-service calls retried after a dropped connection or a stuck attempt (front -> model worker)",
    labelnames=["model", "version"],
)  # fmt: skip
MODEL_SECONDS = bentoml.metrics.Histogram(
    name="servable_model_seconds", documentation="ONNX Runtime run time of one batch actually executed",
    labelnames=["model", "version"], buckets=_LATENCY,
)  # fmt: skip
BATCH_SIZE = bentoml.metrics.Histogram(
    name="servable_batch_size", documentation="Items in each batch the model ran",
    labelnames=["model", "version"], buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256],
)  # fmt: skip
QUEUE_WAIT_SECONDS = bentoml.metrics.Histogram(
    name="servable_queue_wait_seconds",
    documentation="Time a request waited in the in-process batcher's queue before its batch ran",
    labelnames=["model", "version"], buckets=_LATENCY,
)  # fmt: skip
BATCH_RELEASES = bentoml.metrics.Counter(
    name="servable_batch_releases_total",
    documentation="Batches the in-process batcher released, by reason: queue_empty (it took everything queued "
    "when the model was free) or full (max_batch_size reached, calls left queued)",
    labelnames=["model", "version", "reason"],
)  # fmt: skip
PADDING_RATIO = bentoml.metrics.Histogram(
    name="servable_padding_ratio", documentation="Share of padded positions in a text batch run by the model",
    labelnames=["model", "version"], buckets=[0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9],
)  # fmt: skip
PREDICTIONS = bentoml.metrics.Counter(
    name="servable_predictions_total",
    documentation="Predictions by top label",
    labelnames=["model", "version", "label"],
)
CONFIDENCE = bentoml.metrics.Histogram(
    name="servable_confidence", documentation="Top-1 probability of each prediction",
    labelnames=["model", "version"], buckets=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0],
)  # fmt: skip
REGRESSION_VALUE = bentoml.metrics.Summary(
    name="servable_regression_value", documentation="Values a regressor predicted (sum / count: their mean, a drift "
    "signal)", labelnames=["model", "version"],
)  # fmt: skip
REJECTED = bentoml.metrics.Counter(
    name="servable_rejected_total", documentation="Requests refused before inference, by reason",
    labelnames=["model", "version", "reason"],
)  # fmt: skip
MODEL_INFO = bentoml.metrics.Gauge(
    name="servable_model_info", documentation="1 for the model version this replica serves",
    labelnames=["model", "version", "tag", "variant", "provider"], multiprocess_mode="max",
)  # fmt: skip
# Each HTTP worker's admission limit; summed over a replica's live workers it is the replica's capacity, which
# BentoML's in-flight gauge (also summed over the workers) is compared with (ServableReplicaSaturated).
CONCURRENCY_LIMIT = bentoml.metrics.Gauge(
    name="servable_concurrency_limit", documentation="Requests an HTTP worker admits at once (max_concurrency); a "
    "replica's /metrics shows the sum over its live workers", labelnames=["model", "version"],
    multiprocess_mode="livesum",
)  # fmt: skip
EXPLAIN_SECONDS = bentoml.metrics.Histogram(
    name="servable_explain_seconds", documentation="Time of one explanation: queue wait + its model rows + rendering",
    labelnames=["model", "version"], buckets=_LATENCY,
)  # fmt: skip

# Shadow scoring (serving/shadow.py): a candidate version's predictions of sampled live rows. Rows (items) are
# counted; `version` is the served (live) version, `candidate` the candidate's.
_SHADOW = ["model", "version", "candidate"]
SHADOW_SCORED = bentoml.metrics.Counter(
    name="servable_shadow_scored_total", documentation="Live rows the shadow candidate scored", labelnames=_SHADOW
)
SHADOW_AGREED = bentoml.metrics.Counter(
    name="servable_shadow_agreed_total",
    documentation="Shadow-scored rows whose candidate answer agrees with the live one (classifier: the top label; "
    "regressor: the value within shadow_tolerance of the live value)",
    labelnames=_SHADOW,
)  # fmt: skip
SHADOW_DROPPED = bentoml.metrics.Counter(
    name="servable_shadow_dropped_total",
    documentation="Sampled rows the candidate did not score: its queue was full (or its run failed)",
    labelnames=_SHADOW,
)  # fmt: skip
SHADOW_ABS_DIFF = bentoml.metrics.Histogram(
    name="servable_shadow_abs_diff",
    documentation="Per shadow-scored request, the mean absolute difference of the candidate's scores from the live "
    "ones (classifier: probabilities; regressor: the value, its error)",
    labelnames=_SHADOW, buckets=[0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5],
)  # fmt: skip
SHADOW_LATENCY_SECONDS = bentoml.metrics.Histogram(
    name="servable_shadow_latency_seconds", documentation="ONNX Runtime run time of one batch of the shadow candidate",
    labelnames=_SHADOW, buckets=_LATENCY,
)  # fmt: skip
SHADOW_CONFUSION = bentoml.metrics.Counter(
    name="servable_shadow_confusion_total", documentation="Shadow-scored rows of a classifier by (live, candidate) "
    "top label", labelnames=[*_SHADOW, "live_label", "candidate_label"],
)  # fmt: skip
# Input drift (serving/drift.py): per HTTP worker; a replica's /metrics shows the largest of its live workers'.
DRIFT_PSI = bentoml.metrics.Gauge(
    name="servable_drift_psi", documentation="Population-stability index of an input feature (or the predicted-class "
    "mix) over the worker's last DRIFT_WINDOW requests, against the training reference in the artifact",
    labelnames=["model", "version", "feature"], multiprocess_mode="livemax",
)  # fmt: skip
# The replica's own DRIFT_PSI_ALERT: ServableInputDrift compares the PSI with it, so a deployment that sets
# another threshold alerts on that one (not on the default the rules were rendered with).
DRIFT_PSI_ALERT = bentoml.metrics.Gauge(
    name="servable_drift_psi_alert", documentation="The PSI above which this replica counts a feature as drifted "
    "(DRIFT_PSI_ALERT); the input-drift alert's threshold", labelnames=["model", "version"],
    multiprocess_mode="livemax",
)  # fmt: skip
