"""Reading request bodies with clear 4xx answers: JSON (with a nesting guard) and raw uploads."""

from __future__ import annotations

import json

import numpy as np
from starlette.requests import Request

from serving.errors import ClientError

MAX_JSON_DEPTH = 32
OPENERS, CLOSERS = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def json_depth(value: object) -> int:
    """Nesting depth of parsed JSON (iterative: a deep document cannot exhaust the stack here)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, depth)
        todo.extend((child, depth + 1) for child in node if isinstance(child, dict | list))
    return deepest


def bracket_depth(raw: bytes) -> int:
    """Deepest bracket nesting of raw bytes, vectorised (brackets inside strings count too)."""
    b = np.frombuffer(raw, np.uint8)
    step = np.isin(b, OPENERS).astype(np.int32) - np.isin(b, CLOSERS).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


async def json_body(request: Request, max_depth: int = MAX_JSON_DEPTH) -> object:
    """Parse a JSON body with clear 4xx: wrong content type, then as `parse_json`."""
    ctype = content_type(request)
    if ctype != "application/json":
        raise ClientError(415, "unsupported_media_type", f"send application/json, not {ctype or 'nothing'}")
    return parse_json(await request.body(), max_depth)


def parse_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> object:
    """Parse JSON bytes with clear 4xx: empty, non-UTF-8, invalid or too deeply nested JSON."""
    if not raw.strip():
        raise ClientError(400, "empty_body", "the request body is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClientError(400, "not_utf8", f"the body is not UTF-8 (bad byte at offset {exc.start})") from exc
    too_deep = ClientError(400, "too_deep", f"JSON nested deeper than {max_depth} levels")
    # Counting brackets is C speed; only a body with more of them than the limit is looked at further.
    many = raw.count(b"[") + raw.count(b"{") > max_depth
    try:
        value = json.loads(text)  # the C parser; pathological nesting raises RecursionError, not a crash
    except RecursionError as exc:
        raise too_deep from exc
    except ValueError as exc:
        if many and bracket_depth(raw) > max_depth:  # invalid and deeply nested: say the latter
            raise too_deep from exc
        raise ClientError(400, "invalid_json", f"the body is not valid JSON: {exc}") from exc
    if many and json_depth(value) > max_depth:
        raise too_deep
    return value
