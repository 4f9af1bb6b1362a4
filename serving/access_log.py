"""One JSON log line per request: id, method, path, status, latency, key name. Never content.

Request and response bodies, query strings and headers other than the request id are not
logged, so nothing a user sends reaches the logs.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

log = logging.getLogger("servable.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                 "msg": record.getMessage()}  # fmt: skip
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
        return json.dumps(entry)


def configure_json_logging() -> None:
    """Servable's loggers write JSON lines to stderr (BentoML's own access log is turned off)."""
    root = logging.getLogger("servable")
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


class AccessLogMiddleware:
    """Outermost middleware: assigns/propagates X-Request-ID and logs the outcome of each call."""

    def __init__(self, app, service: str, on_finish=None) -> None:
        # on_finish(service, scope, status, start, fields): the audit hook (serving/audit.py::record)
        self.app, self.service, self.on_finish = app, service, on_finish

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and len(incoming) <= 64 and incoming.isprintable() else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start, status = time.perf_counter(), 500

        async def send_with_id(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg["headers"] = [*msg.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(msg)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["path"] not in ("/livez", "/readyz", "/healthz", "/metrics"):
                fields = {
                    "service": self.service, "request_id": request_id, "method": scope["method"],
                    "path": scope["path"], "status": status,
                    "latency_ms": round(1000 * (time.perf_counter() - start), 2),
                    "key_name": scope["state"].get("key_name"),
                }  # fmt: skip
                if self.on_finish is not None:  # the audit record carries these fields: one line per request
                    self.on_finish(self.service, scope, status, start, fields)
                else:
                    log.info("request", extra={"fields": fields})
