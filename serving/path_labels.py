"""Bounded metrics labels: a path the service does not serve reaches BentoML's request metrics as one value.

BentoML's HTTP metrics label each request with its raw URL path, and its metrics middleware is the
outermost of the app, so a client sending made-up paths would grow the series without bound (each
worker's multiprocess files in /tmp, then every scrape). The only earlier place is the HTTP
protocol (serving/http_guard.py): there `bound` hands a path that is not one of the service's own
to the app as `UNKNOWN`, and `RestorePath`, the service's outermost middleware, puts the real path
back. So BentoML's metrics (and its timeout and concurrency middleware) see `UNKNOWN`; the access
log, auth, routing and the answer see the path the client sent.

`activate` is called by a model's public service in each of its workers (not by the split topology's
model process, which serves other paths and has no `RestorePath`).
"""

from __future__ import annotations

from collections.abc import Callable

UNKNOWN = "/__unknown_path__"
_REAL = "servable.real_path"
_known: Callable[[str], bool] | None = None


def activate(known: Callable[[str], bool]) -> None:
    """This process serves a model's public service whose own paths are those `known` accepts."""
    global _known
    _known = known


def bound(scope: dict) -> None:
    """Called by the HTTP protocol on each request's scope, before any middleware."""
    if _known is not None and not _known(scope["path"]):
        scope[_REAL], scope["path"] = scope["path"], UNKNOWN


class RestorePath:
    """The service's outermost middleware: everything after BentoML's metrics sees the real path."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if _REAL in scope:
            scope["path"] = scope.pop(_REAL)
        await self.app(scope, receive, send)


def known_paths(route_paths: list[str], fixed: set[str], name: str | None, version: str | None) -> set[str]:
    """The service's own paths: `fixed` ones, and each route path with its {name} and {version} filled with
    the served model's (a path naming another model is not the service's own: V2 answers it 404)."""
    paths = set(fixed)
    for path in route_paths:
        if "{" not in path:
            paths.add(path)
        elif name is not None and set(_params(path)) <= {"name", "version"} and ("{version}" not in path or version):
            paths.add(path.replace("{name}", name).replace("{version}", version or ""))
    return paths


def _params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]
