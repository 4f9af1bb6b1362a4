"""Tracing on demand (serving/tracing.py): real replicas export their spans over OTLP/HTTP to a receiver on
127.0.0.1 that decodes them with opentelemetry-proto, as a collector (Jaeger, Tempo, the OpenTelemetry
Collector) would. Off unless OTEL_TRACES_EXPORTER names an exporter."""

from __future__ import annotations

import http.server
import itertools
import os
import secrets
import threading
import time

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from servable.preprocessing import preprocess_image
from tests.conftest import API_KEY, SECRET_SENTENCE, UNTHROTTLED_AUTH
from tests.polling import wait_for
from tests.test_serving import _server_timing, test_images

KEY = {"x-api-key": API_KEY}
PARTS = {"inprocess": ["decode", "queue", "model", "encode"], "split": ["decode", "model_call", "encode"]}


class Receiver:
    """An OTLP/HTTP trace receiver (POST /v1/traces, protobuf) on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.exports: list[ExportTraceServiceRequest] = []
        self.bodies: list[bytes] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.bodies.append(body)
                receiver.exports.append(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[dict, object]]:
        """(resource attributes, span) of every span received."""
        out = []
        for export in list(self.exports):
            for rs in export.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                out.extend((resource, span) for ss in rs.scope_spans for span in ss.spans)
        return out

    def close(self) -> None:
        self.server.shutdown()


def attrs(span) -> dict:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


@pytest.fixture(scope="module")
def traced(image_run, tmp_path_factory):
    """Three image replicas started together: traced in-process, traced split, and one given every OTLP variable
    but OTEL_TRACES_EXPORTER (so not traced), each exporting (or not) to its own receiver."""
    from deploy import launch

    assert not [k for k in os.environ if k.startswith("OTEL_")], "the test sets the OTEL_* variables itself"
    receivers = {name: Receiver() for name in ("inprocess", "split", "off")}
    base = {"SERVABLE_IMAGE_SERVE_MODEL_TAG": image_run.tag, "SERVABLE_AUTH_KEYS": f"tester:{API_KEY}",
            "SERVABLE_IMAGE_SERVE_VARIANT": "fp32", "SERVABLE_IMAGE_SERVE_MAX_LATENCY_MS": "5000",
            **UNTHROTTLED_AUTH, "OTEL_BSP_SCHEDULE_DELAY": "100"}  # fmt: skip
    envs = {
        # the protocol left to its default (http/protobuf), the service name to the BentoML service's
        "inprocess": {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receivers["inprocess"].endpoint},
        "split": {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                  "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receivers["split"].endpoint + "/v1/traces",
                  "OTEL_SERVICE_NAME": "images-split", "SERVABLE_IMAGE_SERVE_TOPOLOGY": "split"},
        "off": {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "images-off",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receivers["off"].endpoint},
    }  # fmt: skip
    servers = {}
    try:
        for name, env in envs.items():
            log = tmp_path_factory.mktemp(f"traced-{name}") / "server.log"
            servers[name] = launch.start(launch.SERVICES["image"], base | env, log_path=log)
        for name, server in servers.items():
            assert launch.wait_until(server, timeout_s=240), f"{name} did not become ready:\n{server.log()[-3000:]}"
        yield servers, receivers
    finally:
        for server in servers.values():
            server.stop()
        for receiver in receivers.values():
            receiver.close()


def _calls(server, image_run) -> list[tuple[requests.Response, str | None]]:
    """REST and V2 calls, two continuing a caller's trace (W3C traceparent), one starting its own; each with
    the secret sentence where a careless span would carry it (file name, form field, query string, user agent)."""
    blob = test_images(image_run, 1)[0]
    name = image_run.tag.split(":")[0]
    pixels = preprocess_image(blob, image_run.preprocessing)[None]
    v2 = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(pixels.shape),
                      "data": pixels.ravel().tolist()}]}  # fmt: skip
    secret = {"user-agent": SECRET_SENTENCE, **KEY}
    out = []
    for kind in ("rest", "v2", "rest"):
        trace_id = secrets.token_hex(16) if len(out) < 2 else None
        headers = secret | ({"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"} if trace_id else {})
        if kind == "rest":
            r = requests.post(server.url + "/classify?note=" + SECRET_SENTENCE.replace(" ", "+"), headers=headers,
                              files={"image": (SECRET_SENTENCE + ".png", blob)}, data={"note": SECRET_SENTENCE},
                              timeout=60)  # fmt: skip
        else:
            r = requests.post(f"{server.url}/v2/models/{name}/infer", json=v2, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        out.append((r, headers.get("traceparent")))
    return out


def _check_traces(receiver: Receiver, calls, parts: list[str], service: str, model: str, version: str) -> None:
    """Per answer: one request span (the caller's trace continued where it sent one), the parts as its children in
    order, each as long as the answer's Server-Timing says, within the request span; names and counts only."""
    found = wait_for(lambda: len({s.trace_id for _, s in receiver.spans() if s.name == "encode"}) >= len(calls),
                     timeout_s=30)  # fmt: skip
    assert found, [s.name for _, s in receiver.spans()]
    spans = receiver.spans()
    assert {res["service.name"] for res, _ in spans} == {service}
    assert not [s.name for _, s in spans if s.name.endswith((" http send", " http receive"))]  # not recorded
    by_trace: dict[bytes, list] = {}
    for _, span in spans:
        by_trace.setdefault(span.trace_id, []).append(span)
    own_traces = [t for t, ss in by_trace.items() if any(s.name == "decode" for s in ss)]
    assert len(own_traces) == len(calls), by_trace.keys()
    given = {bytes.fromhex(tp.split("-")[1]): bytes.fromhex(tp.split("-")[2]) for _, tp in calls if tp}
    for response, traceparent in calls:
        if traceparent:
            trace_id = bytes.fromhex(traceparent.split("-")[1])
        else:
            (trace_id,) = [t for t in own_traces if t not in given]
        trace = by_trace[trace_id]
        ids = {s.span_id for s in trace}  # the request span: the server span not under another of this trace
        (request,) = [s for s in trace if s.kind == s.SPAN_KIND_SERVER and s.parent_span_id not in ids]
        assert request.parent_span_id == given.get(trace_id, b""), "the caller's span is the request span's parent"
        children = sorted((s for s in trace if s.parent_span_id == request.span_id and s.name in parts),
                          key=lambda s: s.start_time_unix_nano)  # fmt: skip
        assert [s.name for s in children] == parts
        timing = _server_timing(response)
        for span in children:
            ms = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
            assert abs(ms - timing[span.name]) <= 0.006, (span.name, ms, timing)
            assert request.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano
            assert span.end_time_unix_nano <= request.end_time_unix_nano
            rows = attrs(span).get("servable.batch.rows")  # on the queue and model spans
            assert rows == (int(response.headers["x-batch-size"]) if span.name in ("queue", "model") else None)
        for earlier, later in itertools.pairwise(children):
            assert earlier.end_time_unix_nano <= later.start_time_unix_nano
        request_attrs = attrs(request)
        assert request_attrs["servable.model.name"] == model and request_attrs["servable.model.version"] == version
        assert request_attrs["servable.request.items"] == 1 and request_attrs["servable.request.units"] == 1
        batch = response.headers.get("x-batch-size")  # none in the split topology
        assert request_attrs.get("servable.batch.rows") == (int(batch) if batch else None)
        assert request_attrs.get("http.target", request_attrs.get("url.path")).startswith(("/classify", "/v2/"))
    for body in receiver.bodies:  # nothing the caller sent, in any span of any route
        assert b"PURPLE-ELEPHANT" not in body and b"X1234567" not in body and b"passport" not in body


def test_tracing_on_demand_spans_each_part_of_each_answer(traced, image_run):
    """With OTEL_TRACES_EXPORTER=otlp: decode, queue, model and encode (split topology: decode, model_call, encode)
    as children of each request's span, REST and V2, a caller's traceparent continued; the model process's own
    request span joins the split topology's trace. Without OTEL_TRACES_EXPORTER nothing is exported, though the
    endpoint is set."""
    servers, receivers = traced
    model, version = image_run.tag.split(":")
    calls = {name: _calls(servers[name], image_run) for name in servers}
    _check_traces(receivers["inprocess"], calls["inprocess"], PARTS["inprocess"], "image_classifier", model, version)
    _check_traces(receivers["split"], calls["split"], PARTS["split"], "images-split", model, version)

    # split: BentoML's client passed the context on; the model process's request span is a child of the front's
    def model_calls() -> list:
        """The model process's request spans under the front's (its own batch processor exports them)."""
        spans = [s for _, s in receivers["split"].spans() if s.kind == s.SPAN_KIND_SERVER]
        fronts = {s.span_id: s.trace_id for s in spans if "servable.model.name" in attrs(s)}
        return [s for s in spans if fronts.get(s.parent_span_id) == s.trace_id]

    assert wait_for(lambda: len(model_calls()) == len(calls["split"]), timeout_s=30), model_calls()
    time.sleep(1)  # ten times the batch processor's delay
    servers["off"].stop()  # a stopping process flushes what it holds
    assert receivers["off"].exports == []
