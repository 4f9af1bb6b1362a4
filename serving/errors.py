"""Client errors as JSON: `{"error": message, "reason": code, "request_id": id}` with a 4xx status."""

from __future__ import annotations

import json
from typing import ClassVar

from starlette.responses import JSONResponse


class ServingError(Exception):
    """Any answer other than the prediction: raised anywhere on the request path, turned into a JSON
    response by the service's one handler (serving/model_service.py)."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.reason, self.message, self.headers)


class ClientError(ServingError):
    """Raised by validation; becomes a 4xx JSON response and a `rejected` metric with its reason."""


def error_response(status: int, reason: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "reason": reason}, status_code=status, headers=headers)


async def send_error(send, status: int, reason: str, message: str, headers: list | None = None) -> None:
    """The same body from raw ASGI middleware (before any app code runs)."""
    body = json.dumps({"error": message, "reason": reason}).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    *(headers or [])],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class JsonRouterErrors:
    """Give the routers' 404/405 (unknown path or method: plain text, or FastAPI's `detail`) the JSON error body."""

    REASONS: ClassVar[dict[int, str]] = {404: "not_found", 405: "method_not_allowed"}

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rewriting = False

        async def wrapped(msg):
            nonlocal rewriting
            if msg["type"] == "http.response.start" and msg["status"] in self.REASONS:
                ctype = dict(msg.get("headers", [])).get(b"content-type", b"")
                # Our routes answer their own 404s in JSON; a 405 only ever comes from a router.
                rewriting = msg["status"] == 405 or not ctype.startswith(b"application/json")
                if rewriting:
                    status = msg["status"]
                    kept = [(k, v) for k, v in msg.get("headers", []) if k not in (b"content-type", b"content-length")]
                    await send_error(
                        send,
                        status,
                        self.REASONS[status],
                        f"no route for {scope['method']} {scope['path']!r}"
                        if status == 404
                        else "method not allowed here",
                        kept,
                    )
                    return
            if rewriting:
                return  # the plain-text body is replaced by the JSON one already sent
            await send(msg)

        await self.app(scope, receive, wrapped)
