"""Tracing on demand: OpenTelemetry spans for a request's decode, queue, model and encode, off by default.

On only where the standard variable `OTEL_TRACES_EXPORTER` names an exporter (`otlp`: OTLP over HTTP, the
exporter installed with serving). The rest is the OpenTelemetry SDK's own handling of the `OTEL_*` variables,
not a copy of it: the exporter by name and `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` (unset: `http/protobuf`, the
OTLP specification's default), its endpoint, headers, timeout and compression (`OTEL_EXPORTER_OTLP_*`), the
sampler (`OTEL_TRACES_SAMPLER[_ARG]`, default parent-based always-on), the resource (`OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`; the service name defaults to the BentoML service's), the batch span processor
(`OTEL_BSP_*`) and `OTEL_SDK_DISABLED`.

One tracer provider per process, handed to BentoML in place of the one its own `tracing` configuration builds:
BentoML's OpenTelemetry ASGI middleware makes each request's span with it (a caller's W3C `traceparent`
continues the caller's trace), and its client to the model process (split topology) passes the context on, so
the model process's request span joins the trace. A request's parts become children of its request span once
the answer is rendered, from the times `RequestTiming` recorded (explicit start and end): no context travels
through the batcher, and with tracing off none of this runs (the inference routes then skip BentoML's
middleware too: serving/model_service.py). Span attributes are names and counts, never what the caller sent:
the request span loses the query string, user agent and client address the ASGI instrumentation records
(`CallerDetailsDropped`), as the access log keeps none of them either.
"""

from __future__ import annotations

import os
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

from serving.request_timing import RequestTiming

TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
# What the ASGI instrumentation records of the caller (old and new HTTP semantic conventions): left out; and the URLs
# whose query string is left out.
CALLER_DETAILS = ("http.user_agent", "user_agent.", "net.peer.", "client.", "url.query")
URLS = ("http.url", "url.full", "http.target")
# The ASGI instrumentation's spans of each ASGI message (three or more per request; BentoML passes it no
# `exclude_spans`): never recorded, as they hold nothing the request span lacks and cost as much as the parts.
MESSAGE_SPANS = (" http receive", " http send")
BATCH_PARTS = ("queue", "model")  # the parts whose span says the batch's rows
PROTOCOL_ENV = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


def enabled() -> bool:
    """Whether this process traces: OTEL_TRACES_EXPORTER names an exporter and the SDK is not disabled."""
    names = os.environ.get(TRACES_EXPORTER, "").strip().lower()
    return names not in ("", "none") and os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"


_provider: Any = None


def tracer_provider(service_name: str):
    """This process's tracer provider from the OTEL_* variables (made once), handed to BentoML; None when off."""
    global _provider
    if _provider is None and enabled():
        from bentoml._internal.configuration.containers import BentoMLContainer
        from opentelemetry.sdk._configuration import _get_exporter_names, _import_exporters
        from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

        if not any(os.environ.get(name) for name in PROTOCOL_ENV):  # the Python SDK's own default is gRPC
            os.environ[PROTOCOL_ENV[0]] = "http/protobuf"
        exporters, _, _ = _import_exporters(_get_exporter_names("traces"), [], [])
        # the variables win over the default name (Resource.create alone would let the default win)
        resource = Resource.create({SERVICE_NAME: service_name}).merge(OTELResourceDetector().detect())
        sampler = MessageSpansDropped(_get_from_env_or_default())  # OTEL_TRACES_SAMPLER[_ARG]'s
        _provider = TracerProvider(resource=resource, sampler=sampler)
        _provider.add_span_processor(CallerDetailsDropped())  # first: the exporters see the spans without them
        for exporter in exporters.values():
            _provider.add_span_processor(BatchSpanProcessor(exporter()))
        # BentoML's, not the global one: FastAPI (0.165+) traces on its own wherever a global provider is set, and
        # would add a second request span beside BentoML's
        BentoMLContainer.tracer_provider.set(_provider)
    return _provider


class MessageSpansDropped(Sampler):
    """The configured sampler's decision, except for the ASGI message spans (`MESSAGE_SPANS`): dropped."""

    def __init__(self, configured: Sampler) -> None:
        self.configured = configured

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):
        if name.endswith(MESSAGE_SPANS):
            return SamplingResult(Decision.DROP)
        return self.configured.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"MessageSpansDropped{{{self.configured.get_description()}}}"


def _without_caller_details(attributes) -> dict:
    return {key: value.split("?", 1)[0] if key in URLS and isinstance(value, str) else value
            for key, value in attributes.items() if not key.startswith(CALLER_DETAILS)}  # fmt: skip


class CallerDetailsDropped(SpanProcessor):
    """Leaves out of each ended span what the caller sent besides the path: OpenTelemetry's ASGI instrumentation
    (BentoML's middleware) has no switch for it. The processors after this one get the span as it leaves it."""

    def on_end(self, span: ReadableSpan) -> None:
        if any(key.startswith(CALLER_DETAILS) or key in URLS for key in span.attributes):
            span._attributes = _without_caller_details(span.attributes)  # the SDK's one ended copy of the span


class RequestSpans:
    """A replica's spans of its answered requests (made only where tracing is on)."""

    def __init__(self, provider, model_name: str, model_version: str) -> None:
        self.tracer = provider.get_tracer("servable.serving")
        self.model = {"servable.model.name": model_name, "servable.model.version": model_version}

    def record(self, timing: RequestTiming, items: int, units: int) -> None:
        """The request's parts as children of its request span (BentoML's), each over the interval it took."""
        request = trace.get_current_span()
        if not request.is_recording():  # not sampled, or no request span at all
            return
        attributes: dict[str, Any] = {**self.model, "servable.request.items": items, "servable.request.units": units}
        if timing.batch_rows is not None:
            attributes["servable.batch.rows"] = timing.batch_rows
        request.set_attributes(attributes)
        epoch_ns = time.time_ns() - time.perf_counter_ns()  # perf_counter() seconds -> epoch nanoseconds
        for name, seconds in timing.parts.items():
            start = epoch_ns + round(1e9 * timing.began[name])
            batch = {"servable.batch.rows": timing.batch_rows} if name in BATCH_PARTS and timing.batch_rows else None
            span = self.tracer.start_span(name, attributes=batch, start_time=start)  # a child of the current span
            span.end(end_time=start + round(1e9 * seconds))
