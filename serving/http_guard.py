"""Request-size limit enforced before the app sees the body (413 with a JSON body).

The body is read here, up to the limit, and replayed to the app: a declared Content-Length over
the limit is refused before reading, and a chunked upload is cut off as soon as it passes it.
"""

from __future__ import annotations

from serving.errors import send_error


class BodyLimitMiddleware:
    def __init__(self, app, max_body_bytes: int) -> None:
        self.app, self.limit = app, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        message = f"request body larger than the limit of {self.limit} bytes"
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                await send_error(send, 413, "body_too_large", message)
                return
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # client went away
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await send_error(send, 413, "body_too_large", message)
                return
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
