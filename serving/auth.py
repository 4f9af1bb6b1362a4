"""API-key authentication for inference endpoints (header or Bearer token).

Keys are `name:key` pairs from a secret file (re-read when it changes, so keys rotate and are
revoked without a restart) and/or the environment. Comparison is constant-time; only the
key's *name* is ever logged or exported.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from servable.config import AuthSettings, parse_api_keys
from serving.errors import send_error
from serving.playground import PATHS as PLAYGROUND_PATHS

log = logging.getLogger("servable.auth")

# Always reachable without a key: probes, the OpenAPI document and its UI, the playground page
# (its calls carry the key the user types in).
OPEN_PATHS = {"/livez", "/readyz", "/healthz", "/v2/health/live", "/v2/health/ready", "/docs.json", "/", "/docs",
              *PLAYGROUND_PATHS}  # fmt: skip


class KeyStore:
    """The keys in force: inline ones and those of `keys_file`, re-read when the file changes.

    A change is a new (inode, mtime_ns, size) of the path: `mv`/`os.replace` and `sed -i` put a new
    inode there (a moved file keeps its own, possibly older, mtime), an in-place write moves mtime or
    size. The path is stat-ed at most once per RELOAD_INTERVAL_S, not on every request, so a revoked
    key stops working within that interval. Only key names are ever logged.
    """

    RELOAD_INTERVAL_S = 1.0

    def __init__(self, settings: AuthSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._inline = parse_api_keys(settings.keys)
        self._file_keys: dict[str, str] = {}
        self._seen: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) of the file in force
        self._next_check = float("-inf")
        if self._inline:
            log.info("%d inline API key(s): %s", len(self._inline), ", ".join(sorted(set(self._inline.values()))))
        self._reload()
        if settings.required and not self.keys():
            log.warning("auth is required but no API key is configured: every inference call will get 401")

    def _reload(self) -> None:
        path: Path | None = self.settings.keys_file
        if path is None:
            return
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self.RELOAD_INTERVAL_S
        try:
            st = os.stat(path)
        except OSError:
            if self._file_keys:
                log.warning("API key file %s disappeared: its keys are revoked", path)
            self._file_keys, self._seen = {}, None
            return
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            keys = parse_api_keys(path.read_text())
        except (OSError, ValueError) as exc:  # a bad rotation keeps the keys in force, never a 500
            log.error("API key file %s not loaded, the previous keys stay in force: %s", path, exc)
            return
        self._file_keys = keys
        names = sorted(set(keys.values()))
        log.info("loaded %d API key(s) from %s: %s", len(keys), path, ", ".join(names) or "none")

    def keys(self) -> dict[str, str]:
        return {**self._inline, **self._file_keys}

    def identify(self, presented: str | None) -> str | None:
        """The name of the key, or None. Every stored key is compared, in constant time."""
        self._reload()
        if not presented:
            return None
        found = None
        for key, name in self.keys().items():
            if hmac.compare_digest(key.encode(), presented.encode()):
                found = name
        return found


class FailedAuthLimiter:
    """Failed authentications per client address, a token bucket each: `limit` per `window_s`.

    Only failures make an entry (normal traffic costs nothing here) and the table keeps the
    `max_clients` most recent addresses, so an attacker cannot grow it without bound. While an
    address's bucket is empty every request from it is refused, a right key included: otherwise
    a guess that succeeded would still be told apart from one that failed.
    """

    def __init__(self, limit: int, window_s: float, max_clients: int = 10_000) -> None:
        self.limit, self.rate, self.max_clients = float(limit), limit / window_s, max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, at)

    def _tokens(self, address: str, now: float) -> float:
        tokens, at = self._buckets.get(address, (self.limit, now))
        return min(self.limit, tokens + (now - at) * self.rate)

    def retry_after(self, address: str, now: float | None = None) -> float:
        """Seconds until `address` may try again; 0 when it may now."""
        if address not in self._buckets:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens = self._tokens(address, now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def failed(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._buckets[address] = (self._tokens(address, now) - 1, now)
        self._buckets.move_to_end(address)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)


class Refused(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


# The Bearer form nginx reads too (deploy/nginx/servable.conf.template): both sides must see the same key.
BEARER = re.compile(rb"bearer[ \t]+(\S+)", re.IGNORECASE)
HEADER_BLANKS = b" \t"  # what nginx trims from a header value, no more (not Unicode whitespace)


class ApiKeyMiddleware:
    """Authenticates protected paths before anything reads the request's body: 401 JSON without a valid
    key, 400 when a request carries two different credentials (the proxy's per-key limit and this check
    must see one identity), 429 for a client address that failed too often; sets
    scope["state"]["key_name"]."""

    def __init__(self, app, settings: AuthSettings | None = None) -> None:
        self.app = app
        self.settings = settings or AuthSettings()
        self.store = KeyStore(self.settings)
        self.header = self.settings.header.lower().encode()
        self.failures = FailedAuthLimiter(self.settings.failed_limit, self.settings.failed_window_s)

    def presented(self, scope) -> str | None:
        """The one credential of the request: the key header, else the Bearer token; refuses two."""
        keys = [v.strip(HEADER_BLANKS) for k, v in scope.get("headers", []) if k == self.header]
        auths = [v.strip(HEADER_BLANKS) for k, v in scope.get("headers", []) if k == b"authorization"]
        if len(keys) > 1 or len(auths) > 1:
            raise Refused(400, "ambiguous_credentials", "send one API key: the key header or the "
                          "Authorization header appears more than once")  # fmt: skip
        bearer = next((m.group(1) for m in map(BEARER.fullmatch, auths) if m), None)
        key = keys[0] if keys and keys[0] else None
        if key and bearer and key != bearer:
            raise Refused(400, "ambiguous_credentials", f"two different API keys (the {self.settings.header} "
                          "header and a Bearer token): send one")  # fmt: skip
        found = key or bearer
        return found.decode("latin-1") if found else None

    def _is_open(self, path: str) -> bool:
        return path in OPEN_PATHS or (path == "/metrics" and not self.settings.metrics_require_key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.settings.required or self._is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else "unknown"  # uvicorn puts the proxy's X-Forwarded-For here
        wait = self.failures.retry_after(address)
        if wait > 0:
            await send_error(send, 429, "auth_throttled", "too many failed authentications from this address; "
                             "retry later", [(b"retry-after", str(math.ceil(wait)).encode())])  # fmt: skip
            return
        try:
            name = self.store.identify(self.presented(scope))
        except Refused as refused:
            self.failures.failed(address)
            await send_error(send, refused.status, refused.reason, str(refused))
            return
        if name is None:
            self.failures.failed(address)
            await send_error(send, 401, "unauthenticated",
                             f"a valid API key is required (header {self.settings.header} or Bearer token)",
                             [(b"www-authenticate", b"Bearer")])  # fmt: skip
            return
        scope.setdefault("state", {})["key_name"] = name
        await self.app(scope, receive, send)
