"""Client errors as JSON: `{"error": message, "reason": code, "request_id": id}` with a 4xx status."""

from __future__ import annotations

import json

from starlette.responses import JSONResponse


class ClientError(Exception):
    """Raised by validation; becomes a 4xx JSON response and a `rejected` metric with its reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


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
