"""Audit trail: one JSON line per call — who (API-key *name*), what (endpoint, model tag), when, outcome.

Separate from the access log so it can be kept, shipped and retained on its own terms: by default
the `servable.audit` logger writes to stderr beside the other JSON logs; with
`SERVABLE_AUDIT_FILE` it writes to a size-rotated file (`max_bytes`, at most `backup_count` old
files, the oldest deleted first: that is the retention). Never the key, the body, the query string
or client headers. The key name is also a label of `servable_requests_by_key_total`.

Each HTTP worker of a replica writes its own file (worker 1 the configured name, worker N
`<stem>.wN<suffix>`): a rotating file handler is not safe across processes.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import time
from pathlib import Path

import bentoml

from servable.config import SERVED_MODELS, AuditSettings
from serving.access_log import JsonFormatter

log = logging.getLogger("servable.audit")
access_log = logging.getLogger("servable.access")

REQUESTS_BY_KEY = bentoml.metrics.Counter(
    name="servable_requests_by_key_total", documentation="Requests by API-key name (never the key), endpoint, status",
    labelnames=["key_name", "endpoint", "status"],
)  # fmt: skip

# Paths every service answers besides its model's routes.
_SERVICE_PATHS = frozenset({"/info", "/metrics", "/docs", "/docs.json", "/v2/health/live", "/v2/health/ready"})


def labelled_routes() -> set[str]:
    """Paths that are labels as they are: each served model's predict and explain routes (from
    SERVED_MODELS, so a new model is audited under its own route) and the service paths. Anything
    else is folded so that scanners cannot blow up cardinality."""
    return set(_SERVICE_PATHS) | {r for e in SERVED_MODELS.values() for r in (e.route, e.route + "/explain")}


_FIXED = frozenset(labelled_routes())  # once per process: the served models do not change while it runs
_V2 = re.compile(r"^/v2/models/[^/]+(/ready|/infer)?$")
# The model tag each public service in this process serves, set when it has loaded its artifact.
_MODEL_TAGS: dict[str, str] = {}
_configured = False
_to_file = False  # audit lines go to their own file: the access fields then go to the general log


def set_model_tag(service: str, tag: str) -> None:
    _MODEL_TAGS[service] = tag


def endpoint_label(path: str) -> str:
    if path in _FIXED:
        return path
    m = _V2.match(path)
    if m:
        return "/v2/models/{name}" + (m.group(1) or "")
    return "other"


def worker_file(path: Path) -> Path:
    """This worker's audit file: the configured one for worker 1 (or outside BentoML), else `.wN`."""
    from bentoml._internal.context import server_context

    index = server_context.worker_index or 1
    return path if index == 1 else path.with_name(f"{path.stem}.w{index}{path.suffix}")


def configure(settings: AuditSettings | None = None) -> None:
    """Route `servable.audit` to its rotating file when one is configured (once per process)."""
    global _configured, _to_file
    if _configured:
        return
    settings = settings or AuditSettings()
    if settings.file is not None:
        settings.file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            worker_file(settings.file),
            maxBytes=settings.max_bytes,
            backupCount=settings.backup_count,
            encoding="utf-8",
            delay=True,  # only a process that audits opens the file (not the model workers)
        )
        handler.setFormatter(JsonFormatter())
        log.addHandler(handler)
        log.propagate = False  # the audit file only: not duplicated into the general log
        _to_file = True
    log.setLevel(logging.INFO)
    _configured = True


def record(service: str, scope: dict, status: int, start: float, access: dict | None = None) -> None:
    """Called by the access-log middleware once a response finished; no request content is read.

    With `access` (the access log's fields) and no audit file, the audit line *is* the request's one
    log line; with an audit file, the audit line goes there and the access fields to the general log.
    """
    try:
        state = scope.get("state", {})
        key_name = state.get("key_name")
        endpoint = endpoint_label(scope["path"])
        entry = {
            "service": service, "model_tag": _MODEL_TAGS.get(service), "key_name": key_name,
            "method": scope["method"], "endpoint": endpoint, "status": status,
            "latency_ms": round(1000 * (time.perf_counter() - start), 2), "request_id": state.get("request_id"),
        }  # fmt: skip
        if access is not None and _to_file:
            access_log.info("request", extra={"fields": access})
        elif access is not None:
            entry = {**access, **entry}
        log.info("call", extra={"fields": entry})
        REQUESTS_BY_KEY.labels(key_name=key_name or "-", endpoint=endpoint, status=str(status)).inc()
    except Exception:  # auditing must never turn an answered call into an error
        access_log.exception("audit record failed")
