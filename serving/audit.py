"""Audit trail: one JSON line per call — who (API-key *name*), what (endpoint, model tag), when, outcome.

Separate from the access log so it can be kept, shipped and retained on its own terms: by default
the `servable.audit` logger writes to stderr beside the other JSON logs; with
`SERVABLE_AUDIT_FILE` it writes to a size-rotated file (`max_bytes`, at most `backup_count` old
files, the oldest deleted first: that is the retention). Never the key, the body, the query string
or client headers. The key name is also a label of `servable_requests_by_key_total`.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import time

import bentoml

from servable.config import AuditSettings
from serving.access_log import JsonFormatter

log = logging.getLogger("servable.audit")

REQUESTS_BY_KEY = bentoml.metrics.Counter(
    name="servable_requests_by_key_total", documentation="Requests by API-key name (never the key), endpoint, status",
    labelnames=["key_name", "endpoint", "status"],
)  # fmt: skip

# Paths that are labels as they are; anything else is folded so that scanners cannot blow up cardinality.
_FIXED = {"/classify", "/sentiment", "/info", "/metrics", "/docs", "/docs.json", "/v2/health/live", "/v2/health/ready"}
_V2 = re.compile(r"^/v2/models/[^/]+(/ready|/infer)?$")
# The model tag each public service in this process serves, set when it has loaded its artifact.
_MODEL_TAGS: dict[str, str] = {}
_configured = False


def set_model_tag(service: str, tag: str) -> None:
    _MODEL_TAGS[service] = tag


def endpoint_label(path: str) -> str:
    if path in _FIXED:
        return path
    m = _V2.match(path)
    if m:
        return "/v2/models/{name}" + (m.group(1) or "")
    return "other"


def configure(settings: AuditSettings | None = None) -> None:
    """Route `servable.audit` to its rotating file when one is configured (once per process)."""
    global _configured
    if _configured:
        return
    settings = settings or AuditSettings()
    if settings.file is not None:
        settings.file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            settings.file,
            maxBytes=settings.max_bytes,
            backupCount=settings.backup_count,
            encoding="utf-8",
            delay=True,  # only a process that audits opens the file (not the model workers)
        )
        handler.setFormatter(JsonFormatter())
        log.addHandler(handler)
        log.propagate = False  # the audit file only: not duplicated into the general log
    log.setLevel(logging.INFO)
    _configured = True


def record(service: str, scope: dict, status: int, start: float) -> None:
    """Called by the access-log middleware once a response finished; no request content is read."""
    try:
        state = scope.get("state", {})
        key_name = state.get("key_name")
        endpoint = endpoint_label(scope["path"])
        log.info("call", extra={"fields": {
            "service": service, "model_tag": _MODEL_TAGS.get(service), "key_name": key_name,
            "method": scope["method"], "endpoint": endpoint, "status": status,
            "latency_ms": round(1000 * (time.perf_counter() - start), 2), "request_id": state.get("request_id"),
        }})  # fmt: skip
        REQUESTS_BY_KEY.labels(key_name=key_name or "-", endpoint=endpoint, status=str(status)).inc()
    except Exception:  # auditing must never turn an answered call into an error
        logging.getLogger("servable.access").exception("audit record failed")
