"""API-key authentication for inference endpoints (header or Bearer token).

Keys are `name:key` pairs from a secret file (re-read when it changes, so keys rotate and are
revoked without a restart) and/or the environment. Comparison is constant-time; only the
key's *name* is ever logged or exported.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
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


class ApiKeyMiddleware:
    """401 JSON for protected paths without a valid key; sets scope["state"]["key_name"]."""

    def __init__(self, app, settings: AuthSettings | None = None) -> None:
        self.app = app
        self.settings = settings or AuthSettings()
        self.store = KeyStore(self.settings)
        self.header = self.settings.header.lower().encode()

    def _presented(self, scope) -> str | None:
        for k, v in scope.get("headers", []):
            if k == self.header:
                return v.decode("latin-1").strip()
            if k == b"authorization" and v[:7].lower() == b"bearer ":
                return v[7:].decode("latin-1").strip()
        return None

    def _is_open(self, path: str) -> bool:
        return path in OPEN_PATHS or (path == "/metrics" and not self.settings.metrics_require_key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.settings.required or self._is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        name = self.store.identify(self._presented(scope))
        if name is None:
            await send_error(send, 401, "unauthenticated",
                             f"a valid API key is required (header {self.settings.header} or Bearer token)",
                             [(b"www-authenticate", b"Bearer")])  # fmt: skip
            return
        scope.setdefault("state", {})["key_name"] = name
        await self.app(scope, receive, send)
