"""One identity per request: one credential, checked before the body, and guessing limited per address.

The proxy's side of the same rules (one credential keys the per-key limit; two different ones get
400 there too) is proven through nginx in tests/test_local_stack.py.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from urllib.parse import urlparse

import pytest
import requests

from tests.conftest import API_KEY, _serve

GUESSES = 5  # the test server's failed-authentication limit per address
WINDOW_S = 3.0  # ... per this many seconds


@pytest.fixture(scope="module")
def guarded_text_server(text_run, tmp_path_factory):
    """One worker (the limit is per worker), a small failed-authentication limit and a short window."""
    server = _serve("text", text_run.tag, tmp_path_factory, {
        "SERVABLE_TEXT_SERVE_WORKERS": "1", "SERVABLE_AUTH_FAILED_LIMIT": str(GUESSES),
        "SERVABLE_AUTH_FAILED_WINDOW_S": str(WINDOW_S)})  # fmt: skip
    yield server
    server.stop()


def _post(server, headers: dict, text: str = "fine") -> requests.Response:
    return requests.post(server.url + "/sentiment", json={"text": text}, headers=headers, timeout=30)


def test_two_different_credentials_get_400_one_credential_in_both_forms_passes(text_server):
    """A valid Bearer token beside another x-api-key is refused whatever the header order (before, the
    replica took whichever came first while the proxy limited the x-api-key: a fresh bucket per request)."""
    for headers in ({"authorization": f"Bearer {API_KEY}", "x-api-key": "random-other-key-1234"},
                    {"x-api-key": "random-other-key-1234", "authorization": f"Bearer {API_KEY}"}):  # fmt: skip
        r = _post(text_server, headers)
        assert r.status_code == 400 and r.json()["reason"] == "ambiguous_credentials", r.text
    assert _post(text_server, {"authorization": f"Bearer {API_KEY}", "x-api-key": API_KEY}).status_code == 200
    # the key header twice is two credentials too
    twice = _raw_post(text_server, [("x-api-key", API_KEY), ("x-api-key", "random-other-key-1234")])
    assert twice[0] == 400 and twice[1]["reason"] == "ambiguous_credentials"
    # the replica trims what nginx trims (spaces, tabs), not Unicode whitespace: nginx would see another key
    assert _raw_post(text_server, [("x-api-key", f" {API_KEY}\t")])[0] == 200
    assert _raw_post(text_server, [("x-api-key", f"\xa0{API_KEY}")])[0] == 401


def _raw_post(server, headers: list[tuple[str, str]]) -> tuple[int, dict]:
    """A request with exactly these header lines (requests merges repeated names and refuses blanks)."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    body = b'{"text": "fine"}'
    conn.putrequest("POST", "/sentiment")
    for name, value in [("content-type", "application/json"), ("content-length", str(len(body))), *headers]:
        conn.putheader(name, value.encode("latin-1"))
    conn.endheaders(body)
    answer = conn.getresponse()
    out = answer.status, json.loads(answer.read())
    conn.close()
    return out


def test_the_key_is_checked_before_the_body_is_read(text_server):
    """A request without a key that announces an 8 MB body is answered 401 at once, the body unsent (the
    body limit's reader would otherwise wait for it: up to 10 s, holding a concurrency slot)."""
    url = urlparse(text_server.url)
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(b"POST /sentiment HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 8000000\r\n\r\n")  # fmt: skip
        start = time.monotonic()
        answer = sock.recv(4096)
        took = time.monotonic() - start
        while b'"reason"' not in answer and (more := sock.recv(4096)):  # the body may come in its own segment
            answer += more
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b'"reason": "unauthenticated"' in answer and took < 3, took


def test_guessing_keys_from_one_address_hits_429_and_another_address_is_not_limited(guarded_text_server):
    """GUESSES wrong keys from one address are answered 401; the next request from it, even with the right
    key, 429 with Retry-After until its bucket refills. The client address is the one the proxy
    forwards (X-Forwarded-For from a trusted proxy, here 127.0.0.1): another address is not limited."""
    server = guarded_text_server
    attacker = {"x-forwarded-for": "203.0.113.7"}
    for i in range(GUESSES):
        r = _post(server, {**attacker, "x-api-key": f"guess-number-{i:04d}"})
        assert r.status_code == 401, (i, r.text)
    r = _post(server, {**attacker, "x-api-key": "guess-number-last"})
    assert r.status_code == 429 and r.json()["reason"] == "auth_throttled", r.text
    assert 1 <= int(r.headers["retry-after"]) <= WINDOW_S
    # a right guess is not told apart from a wrong one while throttled
    assert _post(server, {**attacker, "x-api-key": API_KEY}).status_code == 429
    # other clients are served meanwhile
    assert _post(server, {"x-forwarded-for": "198.51.100.9", "x-api-key": API_KEY}).status_code == 200
    time.sleep(WINDOW_S / GUESSES + 0.5)  # one failure's worth refilled: the right key passes again
    assert _post(server, {**attacker, "x-api-key": API_KEY}).status_code == 200
    assert "guess-number" not in server.log()
