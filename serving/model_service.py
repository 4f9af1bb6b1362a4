"""The serving core: the base of every model's BentoML service, and its routes.

A model's module declares one visible class over `ModelService` and hands it to `serve`:

    class ImageClassifier(ModelService):
        adapter = ImageAdapter
        settings = ImageServeSettings()

    ImageClassifier, ImageModel = serve(ImageClassifier)

Per request, in the HTTP worker: the route reads and decodes the request with the adapter (validation
and pre-processing, before any batch), the worker's topology (serving/topology.py, chosen once)
scores its rows, the head (serving/heads.py) makes the prediction into the answer, the metrics and
the feedback candidate. Every refusal is a `ServingError` turned into JSON by one handler. The routes
reach the worker's service instance through BentoML (`bentoml.get_current_service`).
"""

from __future__ import annotations

import asyncio
import gc
import importlib.resources
import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

import bentoml
import numpy as np
from fastapi import FastAPI, Request
from starlette.formparsers import MultiPartParser
from starlette.responses import JSONResponse, Response

from servable.config import AuthSettings, ServeCommon
from servable.setting_names import warn_unknown
from serving import audit, metrics, path_labels, schemas, tracing, v2
from serving.accept_balance import AllWorkersUp
from serving.access_log import AccessLogMiddleware, configure_json_logging
from serving.adapters.base import Adapter, Parsed
from serving.adapters.explains import Explains
from serving.auth import OPEN_PATHS, ApiKeyMiddleware
from serving.decoding import DecodePool
from serving.drift import DriftMonitor
from serving.errors import ClientError, JsonRouterErrors, ServingError
from serving.explain_lane import ExplainLane, PredictionsInFlight
from serving.explain_queue import ExplainBusy, ExplainQueue, ExplainTimeout
from serving.feedback.hook import FeedbackHook
from serving.graceful_shutdown import draining, install_graceful_shutdown
from serving.http_guard import BodyLimitMiddleware, install_protocol_limits
from serving.io_spec import parse_options
from serving.loading import load_model
from serving.path_labels import RestorePath, known_paths
from serving.playground import playground_routes
from serving.request_timing import RequestTiming
from serving.shadow import Shadow, ShadowRefused
from serving.topology import InProcess, Split
from serving.tracing import RequestSpans

log = logging.getLogger("servable.service")

ERRORS = (400, 401, 413, 415, 422, 429, 503, 504)
V2_ERRORS = (400, 401, 404, 413, 415, 422, 429, 503, 504)
PROBES = ("/readyz", "/livez", "/healthz", "/metrics")


def service_config(settings: ServeCommon, routes: list[str]) -> dict:
    """BentoML service options from the typed settings (BentoML's plain access log is replaced)."""
    config: dict[str, Any] = {
        "traffic": {"timeout": settings.timeout_s, "max_concurrency": settings.max_concurrency},
        "logging": {"access": {"enabled": False}},
    }
    # OpenTelemetry's ASGI middleware (BentoML's) skips these paths (a regex search on the URL): the probes always,
    # the inference routes unless tracing is on (serving/tracing.py)
    config["tracing"] = {"excluded_urls": [*PROBES] if tracing.enabled() else [*routes, "/v2/", *PROBES]}
    return config


def install_middleware(service, settings: ServeCommon, name: str) -> None:
    configure_json_logging()
    warn_unknown(log)  # a misspelt SERVABLE_* variable would otherwise leave a default in force silently
    audit.configure()
    # Uploads stay in memory (never spooled to a temp file): the body limit bounds their size.
    MultiPartParser.spool_max_size = settings.max_body_bytes + 1
    # Outermost first. The key is checked before the body is read: a client without one makes the
    # replica buffer nothing and holds its concurrency slot for no longer than the check.
    service.add_asgi_middleware(RestorePath)  # the real path of a request whose metrics label is UNKNOWN
    service.add_asgi_middleware(AccessLogMiddleware, service=name, on_finish=audit.record)
    service.add_asgi_middleware(ApiKeyMiddleware, settings=AuthSettings())
    service.add_asgi_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    install_protocol_limits()  # header size, count and read-time limits below the app (BentoML starts uvicorn)
    install_graceful_shutdown()  # on SIGTERM: answer what reached the worker, refuse the rest (not reset it)
    service.add_asgi_middleware(JsonRouterErrors)


# ---------------------------------------------------------------- split topology: the model process


def model_service(adapter_cls: type[Adapter], settings: ServeCommon):
    """The batching model process of the split topology (BentoML's adaptive batching)."""

    class Model:
        def __init__(self) -> None:
            self.adapter, self.model, self.run = load_model(adapter_cls, settings, with_session=True)
            gc.freeze()  # as in Replica: long-lived start-up objects out of the collector's walks

        def __is_ready__(self) -> bool:
            return self.model.ready

        @bentoml.api
        def runtime(self) -> dict:
            """The execution provider this process really uses (CUDA can fall back to CPU)."""
            return self.model.runtime()

    def predict(self, rows):
        if not self.model.ready:
            raise bentoml.exceptions.ServiceUnavailable(f"model not ready: {self.model.error}")
        return self.run(rows)

    predict.__annotations__ = {"rows": adapter_cls.wire_type, "return": np.ndarray}
    batch = {"batchable": True, "max_batch_size": settings.max_batch_size, "max_latency_ms": settings.max_latency_ms}
    Model.predict = bentoml.api(**(batch if settings.batching_enabled() else {}))(predict)

    # Explanations' rows: a lane below the predictions, not their batches (serving/explain_lane.py).
    lane = ExplainLane()

    async def explain(self, rows, wait_s: float):
        """One chunk of an explanation's rows, scored only while no prediction is in flight here (at most
        `wait_s` of waiting for that, else no rows)."""
        if not self.model.ready:
            raise bentoml.exceptions.ServiceUnavailable(f"model not ready: {self.model.error}")
        async with lane.turn(min(wait_s, settings.explain_timeout_s)) as ours:
            if not ours:
                return np.empty((0, 0), np.float32)
            return await asyncio.to_thread(self.run, rows)  # beside the predict thread, not in its queue

    explain.__annotations__ = {"rows": adapter_cls.wire_type, "wait_s": float, "return": np.ndarray}
    Model.explain = bentoml.api(explain)
    Model.__name__ = Model.__qualname__ = f"{adapter_cls.entry.kind.capitalize()}Model"
    # One process per GPU, each pinned to its device; on CPU, model_workers processes.
    n = settings.model_workers
    workers: Any = [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(n)] if settings.on_gpu() and n > 1 else n
    config = service_config(settings, ["/predict", "/explain"])
    config["runner_connection"] = {"max_requests": settings.runner_max_requests,
                                   "max_age": float(settings.runner_max_age_s)}  # fmt: skip
    service = bentoml.service(name=adapter_cls.entry.model_service_name, workers=workers, **config)(Model)
    service.add_asgi_middleware(PredictionsInFlight, lane=lane)
    return service


# ---------------------------------------------------------------- what one HTTP worker holds


class Replica:
    """The verified artifact, the adapter over its head, the topology (in-process or split), the explain
    queue, the feedback hook and the shadow candidate (where one is set) of one HTTP worker."""

    def __init__(self, adapter_cls: type[Adapter], settings: ServeCommon, model_client=None) -> None:
        self.settings = settings
        self.adapter, self.model, run = load_model(adapter_cls, settings, with_session=model_client is None)
        self.name = self.model.name
        self.topology: InProcess | Split | None = None
        self.decoding = DecodePool(settings.decode_threads, settings.decode_timeout_s)
        self.explain_queue = ExplainQueue(settings.explain_max_concurrency, settings.explain_max_queue,
                                          settings.explain_timeout_s)  # fmt: skip
        self.shadow: Shadow | None = None
        if self.model.ready and settings.shadow_on():  # a candidate scored beside the model (serving/shadow.py)
            try:
                self.shadow = Shadow(adapter_cls, settings, self.adapter, self.model)
            except ShadowRefused as exc:  # never serves without the shadow it was told to run
                self.model.error = str(exc)
                log.error("replica stays un-ready: %s", exc)
        if self.model.ready:
            # The requests' options, made once the artifact is read (top_k's bound is the label count)
            self.options = self.adapter.options()
            self.explain_options = self.adapter.explain_options() if isinstance(self.adapter, Explains) else []
            self.feedback = FeedbackHook(
                self.name, self.adapter.head, self.adapter.feedback_content, version=self.model.version
            )
            # None: the artifact has no reference
            self.drift = DriftMonitor.of(self.model.manifest, settings, self.adapter.drift_statistics)
            metrics.CONCURRENCY_LIMIT.labels(**self.model.labels).set(settings.max_concurrency)
            self.topology = (Split(self.adapter, self.model, model_client, settings) if model_client is not None
                             else InProcess(self.adapter, self.model, run, settings))  # fmt: skip
            if self.shadow is not None:  # share 0: predict stays the method below, untouched
                self.predict = self.shadow.around(self.predict, self.feedback)  # type: ignore[method-assign]
        provider = tracing.tracer_provider(adapter_cls.entry.service_name)
        manifest = self.model.manifest if self.model.ready else None
        self.spans = None if provider is None or manifest is None else RequestSpans(provider, manifest.name,
                                                                                  manifest.version)  # fmt: skip
        entry = adapter_cls.entry
        audit.set_model_tag(entry.service_name, self.model.art.tag if self.model.art else settings.model_tag)
        # Everything loaded so far (BentoML, FastAPI, the model, the tokenizer) lives as long as the
        # worker: out of the collector's sight, a full collection no longer walks it. Without this,
        # gen-2 collections paused a worker for ~100 ms about once a second at 1,000+ req/s.
        gc.freeze()

    @property
    def ready(self) -> bool:
        return self.model.ready

    def check_ready(self) -> None:
        if not self.ready:
            raise ServingError(503, "not_ready", f"model not ready: {self.model.error or 'loading'}",
                               {"Retry-After": "5"})  # fmt: skip

    async def rows(self, name: str, items: Any, options: dict[str, Any] | None = None) -> Parsed:
        """The adapter's decode of one request's items: on the event loop when the adapter says they are cheap,
        else in this worker's decode pool, under the request's decode deadline."""
        if self.adapter.inline(name, items):
            decoded = self.adapter.decode(name, items)
        else:
            decoded = await self.decoding.run(self.adapter.decode, name, items)
        rows, stored, *drift = decoded  # an adapter's drift input, where its artifact has a reference
        return Parsed(rows, stored, options or {}, drift[0] if drift else None)

    def clock(self, request: Request) -> RequestTiming:
        """The request's deadline (serving/request_timing.py) and the record of where its time goes."""
        return RequestTiming.begin(request.headers, self.settings.max_latency_ms, 1000 * self.settings.timeout_s)

    def admit(self, items: Any, timing: RequestTiming) -> None:
        """Admission by predicted wait before decoding (serving/batcher.py), where the topology has it."""
        assert self.topology is not None
        if isinstance(items, list | tuple | np.ndarray) and len(items):  # too many: decoding's 413, not a 429
            self.topology.admit(min(len(items), self.settings.max_items), timing.deadline)

    def decoded(self, timing: RequestTiming) -> None:
        seconds = time.perf_counter() - timing.start
        timing.part("decode", timing.start, seconds)
        metrics.PREPROCESS_SECONDS.labels(**self.model.labels).observe(seconds)

    async def decode(self, request: Request, timing: RequestTiming) -> Parsed:
        """One REST request's rows and options, validated (per request, before any batch)."""
        options = self.options
        name, items, given = await self.adapter.read(request, tuple(o.name for o in options))
        self.admit(items, timing)
        parsed_options = parse_options(options, given)
        parsed = await self.rows(name, items, parsed_options)
        self.decoded(timing)
        return parsed

    async def predict(self, request: Request, parsed: Parsed, timing: RequestTiming) -> np.ndarray:
        """The head's prediction of the request's rows, computed once: its metrics and the opt-in feedback
        candidate come from it, and so does the answer (REST or V2)."""
        assert self.topology is not None
        start = time.perf_counter()
        scored = await self.topology.score(parsed.rows, timing.deadline)
        metrics.MODEL_CALL_SECONDS.labels(**self.model.labels).observe(time.perf_counter() - start)
        for name, (began, seconds) in scored.parts.items():
            timing.part(name, began, seconds)
        timing.batch_rows, values = scored.batch_rows, scored.values
        self.adapter.head.observe(self.model.labels, values)
        if self.drift is not None:
            self.drift.observe(parsed.drift, values)
        key_name = request.scope.get("state", {}).get("key_name")  # None when auth is off
        await self.feedback.observe(request.headers, parsed.items, values, self.model.art.tag, key_name)  # opt-in
        return values

    async def explain(self, request: Request) -> dict:
        """One explanation, admitted by this worker's explain queue (never by the predict batcher's)."""
        assert self.topology is not None and isinstance(self.adapter, Explains)
        start = time.perf_counter()
        try:
            async with self.explain_queue.slot() as deadline:
                options = self.explain_options
                name, items, given = await self.adapter.read(request, tuple(o.name for o in options))
                chosen = parse_options(options, given)
                parsed = await self.decoding.run(self.adapter.explain_decode, name, items, chosen)
                found = await self.topology.explain(parsed, deadline)
        except ExplainBusy:
            raise ClientError(
                429, "explain_busy", "too many explanations in progress; retry later", {"Retry-After": "1"}
            ) from None
        except ExplainTimeout:
            raise ServingError(
                503,
                "explain_timeout",
                f"the explanation did not finish within {self.settings.explain_timeout_s:g} s; retry later",
                {"Retry-After": "2"},
            ) from None
        metrics.EXPLAIN_SECONDS.labels(**self.model.labels).observe(time.perf_counter() - start)
        return {"model": self.model.art.tag, "variant": self.model.variant, **found}

    def answer(self, values: np.ndarray, parsed: Parsed) -> dict:
        return {"model": self.model.art.tag, "variant": self.model.variant,
                "predictions": self.adapter.encode(values, parsed)}  # fmt: skip

    def respond(self, response: Response, timing: RequestTiming, since: float, parsed: Parsed) -> Response:
        """The answer, with its timing headers (serving/request_timing.py) unless turned off, and its spans where
        tracing is on (serving/tracing.py)."""
        if self.spans is None:
            return timing.attach(response, since) if self.settings.server_timing else response
        timing.encoded(since)
        if self.settings.server_timing:
            response.headers.update(timing.headers())
        self.spans.record(timing, len(parsed.rows), sum(self.adapter.cost_units(r) for r in parsed.rows))
        return response

    def stop(self) -> None:
        if self.topology is not None:
            self.topology.stop()
        if self.shadow is not None:
            self.shadow.stop()
        self.decoding.close()
        self.adapter.close()


# ---------------------------------------------------------------- the service base


class ModelService:
    """The base of a model's public service; a subclass names its adapter and settings."""

    adapter: ClassVar[type[Adapter]]
    settings: ClassVar[ServeCommon]
    known_path: ClassVar[Callable[[str], bool]]  # set by `serve`

    def __init__(self) -> None:
        client = getattr(self, "model_service", None)  # split topology: BentoML's client of the model process
        self.replica = Replica(self.adapter, self.settings, client)
        path_labels.activate(self.known_path)  # made-up paths: one metrics label (serving/path_labels.py)
        self.all_workers_up = AllWorkersUp.for_this_worker(self.settings.http_workers())

    def __is_ready__(self) -> bool:
        return self.replica.ready and not draining() and self.all_workers_up()

    @bentoml.on_shutdown
    async def stop_explanations(self) -> None:
        """The worker's explain process stops with it (a running explanation finishes first)."""
        await asyncio.to_thread(self.replica.stop)


def _replica() -> Replica:
    """This worker's replica, through BentoML's instance of the service (a plain call: cheaper per request
    than a FastAPI dependency)."""
    return bentoml.get_current_service().replica


# What BentoML serves itself besides the probes: its schema and the files of its index page.
_BENTOML_STATIC = importlib.resources.files("bentoml._internal.server").joinpath("static_content")
BENTOML_PATHS = {"/schema.json", *(f"/static_content/{f.name}" for f in _BENTOML_STATIC.iterdir())}


def path_known(app: FastAPI) -> Callable[[str], bool]:
    """Whether a path is one of this service's own (serving/path_labels.py): its fixed paths, and its V2
    paths naming the served model once the replica has loaded it."""
    route_paths = [path for r in app.routes if isinstance(path := getattr(r, "path", None), str)]
    fixed = known_paths(route_paths, {*OPEN_PATHS, *PROBES, *BENTOML_PATHS}, None, None)
    loaded: set[str] = set()

    def known(path: str) -> bool:
        if path in fixed or path in loaded:
            return True
        if not loaded and path.startswith("/v2/models/"):
            try:
                rep = _replica()
            except bentoml.exceptions.BentoMLException:  # still starting
                return False
            if rep.ready:
                manifest = rep.model.manifest
                loaded.update(known_paths(route_paths, fixed, manifest.name, manifest.version))
                return path in loaded
        return False

    return known


def routes(app: FastAPI, adapter_cls: type[Adapter], settings: ServeCommon) -> None:
    """REST predict (and explain, where the adapter explains), /info, the playground and the V2 routes."""
    entry, docs = adapter_cls.entry, adapter_cls.docs
    doc = adapter_cls(settings)  # not loaded: for the OpenAPI document only

    @app.exception_handler(ServingError)
    async def refused(request: Request, err: ServingError) -> JSONResponse:
        if isinstance(err, ClientError):
            metrics.REJECTED.labels(**_replica().model.labels, reason=err.reason).inc()
        return err.response()

    @app.post(entry.route, tags=[entry.kind], summary=docs.summary, description=docs.doc,
              **schemas.timed(doc.openapi_body(), schemas.responses(docs.response_model, *ERRORS)))  # fmt: skip
    async def predict(request: Request):
        rep = _replica()
        rep.check_ready()
        timing = rep.clock(request)
        parsed = await rep.decode(request, timing)
        values = await rep.predict(request, parsed, timing)
        since = time.perf_counter()
        return rep.respond(JSONResponse(rep.answer(values, parsed)), timing, since, parsed)

    if isinstance(doc, Explains):
        explain_docs = doc.explain_docs

        @app.post(entry.route + "/explain", tags=[entry.kind], summary=explain_docs.summary,
                  description=explain_docs.doc, openapi_extra=doc.openapi_explain_body(),
                  responses=schemas.responses(explain_docs.response_model, *ERRORS))  # fmt: skip
        async def explain(request: Request):
            rep = _replica()
            rep.check_ready()
            return JSONResponse(await rep.explain(request))

    playground_routes(app, entry.kind)

    @app.get("/info", tags=[entry.kind], summary="Info",
             responses={401: {"description": "missing or invalid API key", "model": schemas.ErrorBody}})  # fmt: skip
    async def info() -> dict:
        """Model tag, labels, provider in use, variant, topology and batching settings."""
        rep = _replica()
        out = {**rep.model.info(), "service": entry.service_name}
        if rep.ready and rep.topology is not None:
            out |= {"preprocessing": rep.adapter.preprocessing(), **rep.adapter.head.info(),
                    **await rep.topology.runtime(), **rep.adapter.info()}  # fmt: skip
        else:
            out |= {"provider": "none", "providers": []}
        return out

    def known(rep: Replica, name: str, version: str | None) -> None:
        """Raises unless this replica is ready and serves `name` (and `version`)."""
        rep.check_ready()
        v2.check_model(rep.model.manifest, name, version)

    @app.get("/v2/health/live", tags=["v2"], summary="V2 Live")
    async def v2_live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"], summary="V2 Ready", responses={503: {"description": "not ready"}})
    async def v2_ready():
        service = bentoml.get_current_service()  # /readyz's answer, and the split topology's model process
        rep = service.replica
        ready = service.__is_ready__() and rep.topology is not None and await rep.topology.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/v2", tags=["v2"], summary="V2 Server Metadata",
             responses=schemas.responses(schemas.V2ServerMetadata, 401))  # fmt: skip
    async def v2_server() -> dict:
        """Server name, version and the protocol extensions it supports."""
        return v2.server_metadata()

    # Each model route also under /versions/{version} (the version this service serves; another is a 404).
    def model_metadata(rep: Replica, name: str, version: str | None = None) -> dict:
        known(rep, name, version)
        adapter = rep.adapter
        return v2.metadata(rep.model.manifest, rep.model.art.tag, adapter.inputs(), adapter.head.outputs(),
                           adapter.preprocessing())  # fmt: skip

    def model_ready(rep: Replica, name: str, version: str | None = None) -> dict:
        known(rep, name, version)
        return {"name": name, "ready": True}

    async def infer(rep: Replica, request: Request, name: str, version: str | None = None):
        known(rep, name, version)
        timing, adapter = rep.clock(request), rep.adapter
        req = await v2.read_request(request, adapter.inputs(), adapter.head.outputs(), settings.max_items)
        rep.admit(req.data, timing)
        parsed = await rep.rows(req.name, req.data)
        rep.decoded(timing)
        values = await rep.predict(request, parsed, timing)
        since = time.perf_counter()
        answer = v2.response(rep.model.manifest, adapter.head.output_data(values), req)
        return rep.respond(answer, timing, since, parsed)

    meta = {"tags": ["v2"], "responses": schemas.responses(schemas.V2ModelMetadata, *V2_ERRORS)}
    ready = {"tags": ["v2"], "responses": schemas.responses(schemas.V2ModelReady, *V2_ERRORS)}
    infer_doc = {"tags": ["v2"], "description": docs.v2_doc,
                 **schemas.timed(schemas.v2_infer_body(doc.inputs(), doc.head.outputs()),
                                 schemas.v2_infer_responses(*V2_ERRORS))}  # fmt: skip

    @app.get("/v2/models/{name}", summary="V2 Model", **meta)
    async def v2_model(name: str):
        rep = _replica()
        return model_metadata(rep, name)

    @app.get("/v2/models/{name}/versions/{version}", summary="V2 Model Version", **meta)
    async def v2_model_version(name: str, version: str):
        rep = _replica()
        return model_metadata(rep, name, version)

    @app.get("/v2/models/{name}/ready", summary="V2 Model Ready", **ready)
    async def v2_model_ready(name: str):
        rep = _replica()
        return model_ready(rep, name)

    @app.get("/v2/models/{name}/versions/{version}/ready", summary="V2 Model Version Ready", **ready)
    async def v2_model_version_ready(name: str, version: str):
        rep = _replica()
        return model_ready(rep, name, version)

    @app.post("/v2/models/{name}/infer", summary="V2 Infer", **infer_doc)
    async def v2_infer(name: str, request: Request):
        rep = _replica()
        return await infer(rep, request, name)

    @app.post("/v2/models/{name}/versions/{version}/infer", summary="V2 Version Infer", **infer_doc)
    async def v2_version_infer(name: str, version: str, request: Request):
        rep = _replica()
        return await infer(rep, request, name, version)


def serve(cls: type[ModelService]) -> tuple[Any, Any]:
    """(public service, model service or None): `cls` made a BentoML service with its FastAPI app and
    middleware; in the split topology, with its model process as a BentoML dependency."""
    adapter_cls, settings = cls.adapter, cls.settings
    entry = adapter_cls.entry
    tracing.tracer_provider(entry.service_name)  # before BentoML builds its middleware (None: tracing is off)
    model = None
    if settings.resolved_topology() == "split":
        model = model_service(adapter_cls, settings)
        cls.model_service = bentoml.depends(model)  # type: ignore[attr-defined]
    app = FastAPI(title=adapter_cls.docs.title, description=adapter_cls.docs.description)
    routes(app, adapter_cls, settings)
    public = bentoml.asgi_app(app)(cls)
    public = bentoml.service(name=entry.service_name, workers=settings.http_workers(),
                             **service_config(settings, [entry.route]))(public)  # fmt: skip
    install_middleware(public, settings, entry.service_name)
    cls.known_path = staticmethod(path_known(app))
    return public, model
