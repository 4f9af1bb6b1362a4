"""What both public services share: middleware, model-call error mapping, V2 health/metadata."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import numpy as np
from fastapi import FastAPI, Request
from starlette.formparsers import MultiPartParser
from starlette.responses import JSONResponse

from servable.config import AuthSettings, ServeCommon
from serving import audit, metrics
from serving.access_log import AccessLogMiddleware, configure_json_logging
from serving.auth import ApiKeyMiddleware
from serving.errors import ClientError, JsonRouterErrors, error_response
from serving.http_guard import BodyLimitMiddleware
from serving.loading import ServedModel

log = logging.getLogger("servable.frontend")


def service_config(settings: ServeCommon) -> dict:
    """BentoML service options from the typed settings (BentoML's plain access log is replaced)."""
    return {
        "traffic": {"timeout": settings.timeout_s, "max_concurrency": settings.max_concurrency},
        "logging": {"access": {"enabled": False}},
    }


def install_middleware(service, settings: ServeCommon, name: str) -> None:
    configure_json_logging()
    audit.configure()
    # Uploads stay in memory (never spooled to a temp file): the body limit bounds their size.
    MultiPartParser.spool_max_size = settings.max_body_bytes + 1
    service.add_asgi_middleware(AccessLogMiddleware, service=name, on_finish=audit.record)
    service.add_asgi_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    service.add_asgi_middleware(ApiKeyMiddleware, settings=AuthSettings())
    service.add_asgi_middleware(JsonRouterErrors)


def not_ready(front: ServedModel) -> JSONResponse:
    return error_response(503, "not_ready", f"model not ready: {front.error or 'loading'}", {"Retry-After": "5"})


def rejected(front: ServedModel, err: ClientError) -> JSONResponse:
    metrics.REJECTED.labels(model=front.name, reason=err.reason).inc()
    return error_response(err.status, err.reason, err.message)


# A dropped connection to the model worker is retried: inference is a pure function of its input,
# and BentoML 1.4's dependency client closes its pooled session every 100 calls while other calls
# are still in flight on it (they fail with ServerDisconnectedError / ClientOSError, or with one
# of aiohttp's RuntimeErrors: "Session is closed" when the call starts on the session being closed,
# "Connection closed." when its connection is closed while the answer's body is being read).
MODEL_CALL_ATTEMPTS = 3
DROPPED_RUNTIME_ERRORS = ("session is closed", "connection closed")


def _dropped(exc: Exception) -> bool:
    return isinstance(exc, aiohttp.ClientConnectionError) or (
        isinstance(exc, RuntimeError) and str(exc).lower().startswith(DROPPED_RUNTIME_ERRORS)
    )


async def call_model(front: ServedModel, make_call: Callable[[], Awaitable]) -> np.ndarray | JSONResponse:
    """Call the model service; its overload or failure is a 503 for the caller, never a 500.

    Each attempt has its own deadline (`model_call_timeout_s`): under load about 1 call in 1,000
    never got an answer across BentoML's session recycling and sat until the request timeout (a
    504). A stuck attempt is abandoned and retried instead, like a dropped one.
    """
    start = time.perf_counter()
    for attempt in range(1, MODEL_CALL_ATTEMPTS + 1):
        try:
            out = await asyncio.wait_for(make_call(), front.settings.model_call_timeout_s)
            break
        except Exception as exc:
            stuck = isinstance(exc, TimeoutError)
            if (stuck or _dropped(exc)) and attempt < MODEL_CALL_ATTEMPTS:
                if stuck:
                    log.warning("model call attempt %d got no answer within %.1f s; retrying", attempt,
                                front.settings.model_call_timeout_s)  # fmt: skip
                metrics.MODEL_CALL_RETRIES.labels(model=front.name).inc()
                continue
            log.warning("model call failed (attempt %d): %s", attempt, type(exc).__name__)
        return error_response(503, "model_unavailable", "the model service could not answer; retry later",
                              {"Retry-After": "1"})  # fmt: skip
    metrics.MODEL_CALL_SECONDS.labels(model=front.name).observe(time.perf_counter() - start)
    return np.asarray(out)


async def predict(front: ServedModel, make_call: Callable[[], Awaitable], feedback, headers, items: list):
    """The model call and what follows every answer: prediction metrics and the opt-in feedback hook."""
    probs = await call_model(front, make_call)
    if isinstance(probs, np.ndarray):
        record_predictions(front, probs)
        await feedback.observe(headers, items, probs, front.art.tag)  # stores nothing unless opted in
    return probs


async def dependency_ready(svc) -> bool:
    """The model service's readiness, whether it runs as a separate process or in-process."""
    if hasattr(svc, "is_ready"):
        return bool(await svc.is_ready(5))
    return bool(svc.__is_ready__())


async def model_runtime(svc) -> dict:
    try:
        return await svc.to_async.runtime()
    except Exception as exc:  # reported, not hidden: the info call still answers
        return {"provider": "unknown", "runtime_error": type(exc).__name__}


def record_predictions(front: ServedModel, probs: np.ndarray) -> None:
    top = probs.argmax(1)
    for i, p in zip(top, probs.max(1), strict=True):
        metrics.PREDICTIONS.labels(model=front.name, label=front.manifest.labels[i]).inc()
        metrics.CONFIDENCE.labels(model=front.name).observe(float(p))


async def json_body(request: Request, max_depth: int = 32) -> object:
    """Parse JSON with clear 4xx: wrong content type, non-UTF-8, invalid or too deeply nested JSON."""
    import json

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ClientError(415, "unsupported_media_type", f"send application/json, not {ctype or 'nothing'}")
    raw = await request.body()
    if not raw.strip():
        raise ClientError(400, "empty_body", "the request body is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClientError(400, "not_utf8", f"the body is not UTF-8 (bad byte at offset {exc.start})") from exc
    depth = deepest = 0
    for ch in text:  # refuse pathological nesting before the parser recurses into it
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    if deepest > max_depth:
        raise ClientError(400, "too_deep", f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ClientError(400, "invalid_json", f"the body is not valid JSON: {exc}") from exc


def v2_health_routes(app: FastAPI, get_service) -> None:
    """Open Inference Protocol (KServe V2) liveness and readiness."""

    @app.get("/v2/health/live", tags=["v2"])
    async def v2_live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"], responses={503: {"description": "not ready"}})
    async def v2_ready():
        svc = get_service()
        ready = svc is not None and await svc.is_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def v2_model_error(front: ServedModel, name: str) -> JSONResponse | None:
    """The answer for a V2 call naming `name`: None when this replica serves it and is ready."""
    if not front.ready:
        return not_ready(front)
    if name != front.manifest.name:
        return error_response(404, "unknown_model", f"no model named {name!r}; this service serves "
                                                    f"{front.manifest.name!r}")  # fmt: skip
    return None


def v2_metadata(front: ServedModel, inputs: list[dict], outputs: list[dict]) -> dict:
    m = front.manifest
    return {"name": m.name, "versions": [m.version], "platform": "onnxruntime", "inputs": inputs,
            "outputs": outputs, "parameters": {"tag": front.art.tag, "labels": m.labels}}  # fmt: skip


def v2_tensor(spec: object, datatypes: dict[str, str]) -> tuple[str, str, list[int], list]:
    """Validate one V2 input tensor: known name, matching datatype, shape and data length."""
    if not isinstance(spec, dict):
        raise ClientError(422, "invalid_v2", "each input must be an object with name, shape, datatype, data")
    name, dtype, shape, data = spec.get("name"), spec.get("datatype"), spec.get("shape"), spec.get("data")
    if name not in datatypes:
        raise ClientError(422, "unknown_input", f"unknown input {name!r}; this model takes {sorted(datatypes)}")
    if dtype != datatypes[name]:
        raise ClientError(422, "wrong_datatype", f"input {name} must have datatype {datatypes[name]}, got {dtype!r}")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ClientError(422, "wrong_shape", f"input {name}: shape must be a list of positive integers")
    if not isinstance(data, list):
        raise ClientError(422, "invalid_v2", f"input {name}: data must be a (flat or nested) list")
    flat = np.asarray(data, dtype=object).ravel().tolist() if data and isinstance(data[0], list) else data
    if len(flat) != int(np.prod(shape)):
        raise ClientError(422, "wrong_shape", f"input {name}: shape {shape} needs {int(np.prod(shape))} values, "
                                              f"got {len(flat)}")  # fmt: skip
    return name, dtype, shape, flat


def v2_request_inputs(body: object) -> tuple[list, str | None]:
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise ClientError(422, "invalid_v2", "a V2 infer request needs a non-empty `inputs` list")
    rid = body.get("id")
    return body["inputs"], rid if isinstance(rid, str) else None


def v2_response(front: ServedModel, probs: np.ndarray, request_id: str | None) -> dict:
    labels = [front.manifest.labels[i] for i in probs.argmax(1)]
    out = {
        "model_name": front.manifest.name, "model_version": front.manifest.version,
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
             "data": probs.astype(float).ravel().round(6).tolist()},
            {"name": "label", "datatype": "BYTES", "shape": [len(labels)], "data": labels},
        ],
    }  # fmt: skip
    if request_id is not None:
        out["id"] = request_id
    return out
