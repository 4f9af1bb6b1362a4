"""What a replica bounds on its own, before the app: request headers, body size, slow clients.

A replica normally sits behind nginx (deploy/nginx/), which bounds slow and abusive clients first;
these limits hold when a replica is reached directly (`make serve`) or behind a misconfigured
proxy. Every refusal is a JSON error (`{"error", "reason"}`) and closes the connection.

- `GuardedHttpToolsProtocol`, uvicorn's HTTP protocol (httptools) with:
  request line + headers over MAX_HEADER_BYTES, or more than MAX_HEADERS fields: 431, as soon as
  the limit is passed (not after the whole header was buffered; what the client still sends is
  read and dropped for LINGER_S so that it gets the answer); the whole header not received
  within HEADER_TIMEOUT_S of the connection's accept or of the request's first byte: 408 (a
  connection that sent nothing is closed). BentoML starts uvicorn itself and passes neither these
  limits nor a protocol class (uvicorn has no header size, header count or header-read timeout
  option at all); `install_protocol_limits` points uvicorn's `http="auto"`, which BentoML uses,
  at this class.
- `BodyLimitMiddleware` (ASGI): a declared Content-Length over the limit is refused before reading
  (413), a chunked body as soon as it passes the limit (413); a body that stops arriving for
  BODY_TIMEOUT_S: 408. A chunk's declared size is not visible here: httptools does not report it,
  so an oversized declared chunk is refused on the bytes that arrive or on the read timeout
  (nginx refuses it from the declaration).
- Idle keep-alive connections: uvicorn's own timeout (BentoML passes its `--timeout-keep-alive`,
  5 s by default).
- While the replica stops (serving/graceful_shutdown.py): every answer closes its connection, and a
  connection accepted whose request has not arrived yet is kept for it (uvicorn would close it
  unanswered), within the header timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serving import path_labels
from serving.errors import send_error
from serving.graceful_shutdown import draining

# Request line + header fields. nginx forwards at most 4 x 8 KiB of client headers (its
# large_client_header_buffers) plus the few it adds; API clients send well under 1 KiB.
MAX_HEADER_BYTES = 40 * 1024
# Header fields per request: Apache's LimitRequestFields default; an API request carries about 10.
MAX_HEADERS = 100
# The header must arrive within this of the connection's accept or the request's first byte
# (nginx: client_header_timeout); a body may pause this long between two reads (client_body_timeout).
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
# After refusing, what the client still sends is read and dropped for this long (nginx's lingering
# close): closing with unread data would reset the connection and lose the answer on the way.
LINGER_S = 2.0
CLOSE = [(b"connection", b"close")]
log = logging.getLogger("servable.http_guard")


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; answered by `send_400_response`."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header size, header count and header-read time limits."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._refusal: tuple[int, str, str] | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._reading_header, self._header_bytes, self._header_fields, self._header_raw = True, 0, 0, 0
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return
        if self._reading_header:  # a header arriving in pieces: refused once its bytes pass the limit
            self._header_raw += len(data)
        super().data_received(data)
        if self._reading_header and self._header_raw > MAX_HEADER_BYTES and self._refusal is None:
            self._refuse(431, "headers_too_large", f"request headers larger than {MAX_HEADER_BYTES} bytes")

    # ---------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_header, self._header_bytes, self._header_fields = True, 0, 0
        self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)  # "name: value\r\n"
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_header = False
        self._disarm_header_timer()
        super().on_headers_complete()
        if self.cycle is not None:
            path_labels.bound(self.cycle.scope)  # before any middleware: BentoML's metrics label by path
            if draining():  # the replica is stopping: answer, then close
                self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_header, self._header_raw = True, 0

    def shutdown(self) -> None:
        """The server stops (serving/graceful_shutdown.py). uvicorn closes a connection with no request in
        progress; one accepted that has not sent its request yet, or only part of it, would lose it unanswered:
        it stays open for that request (answered with `Connection: close`), within the header timeout."""
        if self._refusal is not None:  # being refused: closes itself after the linger
            return
        idle = self.cycle is None or self.cycle.response_complete
        awaited = self.cycle is None or self._header_raw > 0  # a new connection's first request, or one arriving
        if idle and awaited and not self.transport.is_closing():
            self._arm_header_timer()
        else:
            super().shutdown()

    def _count(self, size: int, fields: int) -> None:
        self._header_bytes += size
        self._header_fields += fields
        if self._header_fields > MAX_HEADERS:
            self._refusal = (431, "too_many_headers", f"more than {MAX_HEADERS} request header fields")
        elif self._header_bytes > MAX_HEADER_BYTES:
            self._refusal = (431, "headers_too_large", f"request headers larger than {MAX_HEADER_BYTES} bytes")
        else:
            return
        raise _Refused  # httptools stops and raises a parser error; uvicorn then calls send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:  # a malformed request: uvicorn's own answer
            super().send_400_response(msg)
        else:
            self._refuse(*self._refusal)

    # ---------------------------------------------------------------- the header-read timeout

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        answering = self.cycle is not None and not self.cycle.response_complete
        if self._header_raw == 0 or answering:  # nothing sent yet, or a pipelined request: no answer of ours
            self.transport.close()
        else:
            self._refuse(408, "header_timeout", f"request headers not received within {HEADER_TIMEOUT_S:g} s")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer a JSON error and close, without the app: the request never reached it."""
        self._refusal = (status, reason, message)
        self._disarm_header_timer()
        if self.transport.is_closing():
            return
        log.info("request refused before the app: %d %s", status, reason)
        body = json.dumps({"error": message, "reason": reason}).encode()
        head = [STATUS_LINE[status]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head.append(b"content-type: application/json\r\nconnection: close\r\n")
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():  # the answer, then our end closed; theirs drained until LINGER_S
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def install_protocol_limits() -> None:
    """Make uvicorn's `http="auto"` (what BentoML's worker passes) the guarded protocol.

    BentoML builds uvicorn's Config itself after importing the service module, and uvicorn resolves
    "auto" through this table when the server starts, so the service module's import is early enough.
    """
    from uvicorn import config

    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:{GuardedHttpToolsProtocol.__name__}"


class BodyLimitMiddleware:
    """Request-size limit and body-read timeout, enforced before the app sees the body.

    The body is read here, up to the limit, and replayed to the app: a declared Content-Length over
    the limit is refused before reading, a chunked upload is cut off as soon as it passes it (413,
    the connection closed: the rest of the body is not read), and a body that stops arriving for
    BODY_TIMEOUT_S is answered 408 and the connection closed.
    """

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.app, self.limit, self.timeout_s = app, max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        message = f"request body larger than the limit of {self.limit} bytes"
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                # the body is still coming: close, or the connection reads (and drops) all of it
                await send_error(send, 413, "body_too_large", message, CLOSE)
                return
        chunks, size = [], 0
        while True:
            try:
                msg = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                await send_error(send, 408, "body_timeout", f"request body stalled for {self.timeout_s:g} s", CLOSE)
                return
            if msg["type"] != "http.request":  # client went away
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await send_error(send, 413, "body_too_large", message, CLOSE)
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
