"""The serving core: one BentoML service per model, built from a task adapter and its settings.

Topologies (`topology` setting, auto by device):
- inprocess (CPU default): each HTTP worker (one per core) verifies the artifact, owns an ONNX
  Runtime session and an in-process adaptive batcher (serving/batcher.py). A request is read,
  validated and pre-processed in the worker, its rows join the next batch, the answer is built
  from its own output rows: no hop, no serialisation. Explanations are computed in a low-priority
  child process of the worker (serving/explain_process.py), never on the predict path.
- split (GPU default): the HTTP workers do the same per-request work and call one batching model
  process per GPU through BentoML's dependency call (its own adaptive batching); the model
  process owns the device.

Validation and decoding happen per request, before any batch, so a bad request never reaches a
batch; a batch that fails answers 503 to its own callers only.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

import bentoml
import numpy as np
from fastapi import FastAPI, Request
from starlette.formparsers import MultiPartParser
from starlette.responses import JSONResponse

from servable.config import AuthSettings, ServeCommon
from serving import audit, metrics, schemas, v2
from serving.access_log import AccessLogMiddleware, configure_json_logging
from serving.adapters.base import Parsed, TaskAdapter
from serving.auth import ApiKeyMiddleware
from serving.batcher import Batcher, BatchFailed, QueueTimeout
from serving.errors import ClientError, JsonRouterErrors, error_response
from serving.explain_process import ExplainCrashed, ExplainProcess
from serving.explain_queue import ExplainBusy, ExplainQueue, ExplainTimeout
from serving.feedback.hook import FeedbackHook
from serving.graceful_shutdown import draining, install_graceful_shutdown
from serving.http_guard import BodyLimitMiddleware, install_protocol_limits
from serving.loading import load_model
from serving.model_call import ModelUnavailable, call_model
from serving.playground import playground_routes

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
    if not settings.tracing:  # OpenTelemetry's ASGI middleware skips these paths (regex search on the URL)
        config["tracing"] = {"excluded_urls": [*routes, "/v2/", *PROBES]}
    return config


def install_middleware(service, settings: ServeCommon, name: str) -> None:
    configure_json_logging()
    audit.configure()
    # Uploads stay in memory (never spooled to a temp file): the body limit bounds their size.
    MultiPartParser.spool_max_size = settings.max_body_bytes + 1
    service.add_asgi_middleware(AccessLogMiddleware, service=name, on_finish=audit.record)
    service.add_asgi_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    install_protocol_limits()  # header size, count and read-time limits below the app (BentoML starts uvicorn)
    install_graceful_shutdown()  # on SIGTERM: answer what reached the worker, refuse the rest (not reset it)
    service.add_asgi_middleware(ApiKeyMiddleware, settings=AuthSettings())
    service.add_asgi_middleware(JsonRouterErrors)


# ---------------------------------------------------------------- split topology: the model process


def model_service(adapter_cls: type[TaskAdapter], settings: ServeCommon):
    """The batching model process of the split topology (BentoML's adaptive batching)."""

    class Model:
        def __init__(self) -> None:
            self.adapter, self.model, self.run = load_model(adapter_cls, settings, with_session=True)
            gc.freeze()  # as in _Replica: long-lived start-up objects out of the collector's walks

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
    Model.__name__ = Model.__qualname__ = f"{adapter_cls.kind.capitalize()}Model"
    # One process per GPU, each pinned to its device; on CPU, model_workers processes.
    n = settings.model_workers
    workers: Any = [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(n)] if settings.on_gpu() and n > 1 else n
    config = service_config(settings, [])
    config["runner_connection"] = {"max_requests": settings.runner_max_requests,
                                   "max_age": float(settings.runner_max_age_s)}  # fmt: skip
    return bentoml.service(name=adapter_cls.model_service_name, workers=workers, **config)(Model)


# ---------------------------------------------------------------- the public service


class _Replica:
    """What one HTTP worker holds: the artifact, the adapter, and the in-process model or the client."""

    def __init__(self, adapter_cls: type[TaskAdapter], settings: ServeCommon, model_client=None) -> None:
        self.settings, self.client = settings, model_client
        self.adapter, self.front, run = load_model(adapter_cls, settings, with_session=model_client is None)
        self.batcher: Batcher | None = None
        self.explain_queue = ExplainQueue(settings.explain_max_concurrency, settings.explain_max_queue,
                                          settings.explain_timeout_s)  # fmt: skip
        self.explain_process: ExplainProcess | None = None
        if self.front.ready:
            self.feedback = FeedbackHook(self.front.name, self.adapter.labels, adapter_cls.kind,
                                         **self.adapter.feedback_kwargs())  # fmt: skip
            if run is not None:
                size = settings.max_batch_size if settings.batching_enabled() else 1
                self.batcher = Batcher(run, size, settings.max_latency_ms / 1000)
                # Explanations get a child process of their own, started now (in the background).
                self.explain_process = ExplainProcess(adapter_cls, settings, self.front.art.tag, self.front.variant)
                self.explain_process.start()
        audit.set_model_tag(adapter_cls.service_name, self.front.art.tag if self.front.art else settings.model_tag)
        # Everything loaded so far (BentoML, FastAPI, the model, the tokenizer) lives as long as the
        # worker: out of the collector's sight, a full collection no longer walks it. Without this,
        # gen-2 collections paused a worker for ~100 ms about once a second at 1,000+ req/s.
        gc.freeze()

    @property
    def ready(self) -> bool:
        return self.front.ready

    async def dependency_ready(self) -> bool:
        return self.client is None or bool(await self.client.is_ready(5))

    async def runtime(self) -> dict:
        if self.client is None:
            return self.front.runtime()
        try:
            return await self.client.to_async.runtime()
        except Exception as exc:  # reported, not hidden: the info call still answers
            return {"provider": "unknown", "runtime_error": type(exc).__name__}

    async def infer(self, rows: list) -> np.ndarray | JSONResponse:
        """Probabilities for `rows`, or the 503 that says why there are none."""
        start, name = time.perf_counter(), self.front.name
        try:
            if self.batcher is not None:
                probs = await self.batcher.submit(rows)
            else:
                wire = self.adapter.to_wire(rows)
                probs = await call_model(name, self.settings.model_call_timeout_s,
                                         lambda: self.client.to_async.predict(wire))  # fmt: skip
        except QueueTimeout:
            return error_response(503, "overloaded", "waited too long for the model; retry later", {"Retry-After": "1"})
        except (BatchFailed, ModelUnavailable):
            return error_response(503, "model_unavailable", "the model could not answer; retry later",
                                  {"Retry-After": "1"})  # fmt: skip
        metrics.MODEL_CALL_SECONDS.labels(model=name).observe(time.perf_counter() - start)
        return probs

    async def predicted(self, request: Request, parsed: Parsed) -> np.ndarray | JSONResponse:
        probs = await self.infer(parsed.rows)
        if isinstance(probs, np.ndarray):
            top = probs.argmax(1)
            labels = self.adapter.labels
            for i, p in zip(top, probs[np.arange(len(top)), top], strict=True):
                metrics.PREDICTIONS.labels(model=self.front.name, label=labels[i]).inc()
                metrics.CONFIDENCE.labels(model=self.front.name).observe(float(p))
            await self.feedback.observe(request.headers, parsed.items, probs, self.front.art.tag)  # opt-in only
        return probs

    async def _explain(self, parsed: Parsed, deadline: float) -> dict:
        """The `prediction` and `explanation` of the answer: in-process, all of it in the explain process;
        split, the rows built and the answer rendered in a thread, the rows scored by the model process."""
        if self.explain_process is not None:
            return await self.explain_process.explain(parsed, deadline)
        rows = await asyncio.to_thread(self.adapter.explain_rows, parsed)
        out, step = [], self.settings.max_batch_size  # chunks join the model process's batches
        for i in range(0, len(rows), step):
            if time.monotonic() > deadline:
                raise ExplainTimeout
            wire = self.adapter.to_wire(rows[i : i + step])
            out.append(await call_model(self.front.name, self.settings.model_call_timeout_s,
                                        lambda wire=wire: self.client.to_async.predict(wire)))  # fmt: skip
        return await asyncio.to_thread(self.adapter.explanation, parsed, np.concatenate(out))

    async def explained(self, request: Request) -> JSONResponse:
        """One explanation, admitted by this worker's explain queue (never by the predict batcher's)."""
        start, name = time.perf_counter(), self.front.name
        try:
            async with self.explain_queue.slot() as deadline:
                try:
                    parsed = await self.adapter.parse_explain(request)
                except ClientError as err:
                    return self.rejected(err)
                found = await self._explain(parsed, deadline)
        except ExplainBusy:
            metrics.REJECTED.labels(model=name, reason="explain_busy").inc()
            return error_response(429, "explain_busy", "too many explanations in progress; retry later",
                                  {"Retry-After": "1"})  # fmt: skip
        except ExplainTimeout:
            limit = self.settings.explain_timeout_s
            return error_response(503, "explain_timeout", f"the explanation did not finish within {limit:g} s; "
                                  "retry later", {"Retry-After": "2"})  # fmt: skip
        except (BatchFailed, ModelUnavailable, ExplainCrashed):
            return error_response(503, "model_unavailable", "the model could not answer; retry later",
                                  {"Retry-After": "1"})  # fmt: skip
        metrics.EXPLAIN_SECONDS.labels(model=name).observe(time.perf_counter() - start)
        return JSONResponse({"model": self.front.art.tag, "variant": self.front.variant, **found})

    def stop(self) -> None:
        if self.explain_process is not None:
            self.explain_process.stop()

    def not_ready(self) -> JSONResponse:
        return error_response(503, "not_ready", f"model not ready: {self.front.error or 'loading'}",
                              {"Retry-After": "5"})  # fmt: skip

    def rejected(self, err: ClientError) -> JSONResponse:
        metrics.REJECTED.labels(model=self.front.name, reason=err.reason).inc()
        return error_response(err.status, err.reason, err.message)


def _routes(app: FastAPI, adapter_cls: type[TaskAdapter], settings: ServeCommon, current) -> None:
    """REST predict, /info and the V2 routes; `current()` is this worker's _Replica."""
    doc = adapter_cls(settings)  # for the OpenAPI document only

    @app.post(adapter_cls.route, tags=[adapter_cls.kind], summary=adapter_cls.summary, description=adapter_cls.doc,
              openapi_extra=doc.openapi_body(),
              responses=schemas.responses(adapter_cls.response_model, *ERRORS))  # fmt: skip
    async def predict(request: Request):
        rep = current()
        if not rep.ready:
            return rep.not_ready()
        start = time.perf_counter()
        try:
            parsed = await rep.adapter.parse(request)
        except ClientError as err:
            return rep.rejected(err)
        metrics.PREPROCESS_SECONDS.labels(model=rep.front.name).observe(time.perf_counter() - start)
        probs = await rep.predicted(request, parsed)
        if not isinstance(probs, np.ndarray):
            return probs
        return JSONResponse({"model": rep.front.art.tag, "variant": rep.front.variant,
                             "predictions": rep.adapter.answer(probs, parsed)})  # fmt: skip

    @app.post(adapter_cls.route + "/explain", tags=[adapter_cls.kind], summary=adapter_cls.explain_summary,
              description=adapter_cls.explain_doc, openapi_extra=doc.openapi_explain_body(),
              responses=schemas.responses(adapter_cls.explain_model, *ERRORS))  # fmt: skip
    async def explain(request: Request):
        rep = current()
        if not rep.ready:
            return rep.not_ready()
        return await rep.explained(request)

    playground_routes(app, adapter_cls.kind)

    @app.get("/info", tags=[adapter_cls.kind], summary="Info")
    async def info() -> dict:
        """Model tag, labels, provider in use, variant, topology and batching settings."""
        rep = current()
        return {**rep.front.info(), **await rep.runtime(), "service": adapter_cls.service_name, **rep.adapter.info()}

    def known(name: str, version: str | None) -> JSONResponse | None:
        """The answer for a V2 call naming `name` (and `version`): None when this replica serves it and is ready."""
        rep = current()
        if not rep.ready:
            return rep.not_ready()
        return v2.unknown_model(rep.front.manifest, name, version)

    @app.get("/v2/health/live", tags=["v2"], summary="V2 Live")
    async def v2_live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"], summary="V2 Ready", responses={503: {"description": "not ready"}})
    async def v2_ready():
        rep = current()
        ready = rep is not None and rep.ready and not draining() and await rep.dependency_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/v2", tags=["v2"], summary="V2 Server Metadata",
             responses=schemas.responses(schemas.V2ServerMetadata, 401))  # fmt: skip
    async def v2_server() -> dict:
        """Server name, version and the protocol extensions it supports."""
        return v2.server_metadata()

    # Each model route also under /versions/{version} (the version this service serves; another is a 404).
    async def model_metadata(name: str, version: str | None = None):
        if (err := known(name, version)) is not None:
            return err
        rep = current()
        return v2.metadata(rep.front.manifest, rep.front.art.tag, rep.adapter.v2_inputs())

    async def model_ready(name: str, version: str | None = None):
        return known(name, version) or {"name": name, "ready": True}

    async def infer(request: Request, name: str, version: str | None = None):
        if (err := known(name, version)) is not None:
            return err
        rep = current()
        start = time.perf_counter()
        try:
            req = await v2.read_request(request, rep.adapter.v2_inputs(), settings.max_items)
            parsed = rep.adapter.parse_v2(req.name, req.shape, req.data)
        except ClientError as err:
            return rep.rejected(err)
        metrics.PREPROCESS_SECONDS.labels(model=rep.front.name).observe(time.perf_counter() - start)
        probs = await rep.predicted(request, parsed)
        if not isinstance(probs, np.ndarray):
            return probs
        return v2.response(rep.front.manifest, probs, req)

    meta = {"tags": ["v2"], "responses": schemas.responses(schemas.V2ModelMetadata, *V2_ERRORS)}
    ready = {"tags": ["v2"], "responses": schemas.responses(schemas.V2ModelReady, *V2_ERRORS)}
    infer_doc = {"tags": ["v2"], "description": adapter_cls.v2_doc, "responses": schemas.v2_infer_responses(*V2_ERRORS),
                 "openapi_extra": schemas.v2_infer_body(doc.v2_input_body(), v2.OUTPUTS)}  # fmt: skip

    @app.get("/v2/models/{name}", summary="V2 Model", **meta)
    async def v2_model(name: str):
        return await model_metadata(name)

    @app.get("/v2/models/{name}/versions/{version}", summary="V2 Model Version", **meta)
    async def v2_model_version(name: str, version: str):
        return await model_metadata(name, version)

    @app.get("/v2/models/{name}/ready", summary="V2 Model Ready", **ready)
    async def v2_model_ready(name: str):
        return await model_ready(name)

    @app.get("/v2/models/{name}/versions/{version}/ready", summary="V2 Model Version Ready", **ready)
    async def v2_model_version_ready(name: str, version: str):
        return await model_ready(name, version)

    @app.post("/v2/models/{name}/infer", summary="V2 Infer", **infer_doc)
    async def v2_infer(name: str, request: Request):
        return await infer(request, name)

    @app.post("/v2/models/{name}/versions/{version}/infer", summary="V2 Version Infer", **infer_doc)
    async def v2_version_infer(name: str, version: str, request: Request):
        return await infer(request, name, version)


def build(adapter_cls: type[TaskAdapter], settings: ServeCommon):
    """(public service, model service or None): what `bentoml serve module:Public` starts."""
    app = FastAPI(title=adapter_cls.title, description=adapter_cls.description)
    split = settings.resolved_topology() == "split"
    model = model_service(adapter_cls, settings) if split else None
    holder: dict[str, _Replica] = {}

    def __init__(self) -> None:
        holder["replica"] = _Replica(adapter_cls, settings, self.model_service if split else None)

    def __is_ready__(self) -> bool:
        return holder["replica"].ready and not draining()

    @bentoml.on_shutdown
    async def stop_explanations(self) -> None:
        """The worker's explain process stops with it (a running explanation finishes first)."""
        if (replica := holder.get("replica")) is not None:
            await asyncio.to_thread(replica.stop)

    topology = "split" if split else "inprocess"
    namespace: dict[str, Any] = {"__init__": __init__, "__is_ready__": __is_ready__,
                                 "stop_explanations": stop_explanations,
                                 "__doc__": f"{adapter_cls.title} ({topology} topology)"}  # fmt: skip
    if split:
        namespace["model_service"] = bentoml.depends(model)
    name = "".join(part.capitalize() for part in adapter_cls.service_name.split("_"))
    public = type(name, (), namespace)
    _routes(app, adapter_cls, settings, lambda: holder.get("replica"))
    public = bentoml.asgi_app(app)(public)
    workers = settings.http_workers()
    public = bentoml.service(name=adapter_cls.service_name, workers=workers,
                             **service_config(settings, [adapter_cls.route]))(public)  # fmt: skip
    install_middleware(public, settings, adapter_cls.service_name)
    return public, model
