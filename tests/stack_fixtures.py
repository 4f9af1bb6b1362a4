"""The local stack (deploy/local_stack.py) as a pytest fixture: 2+2 replicas, nginx, Prometheus.

Import the fixture into a test module (`from tests.stack_fixtures import local_stack`). It uses
the tiny models the session fixtures of tests/conftest.py train, and stops every process it
started (by process group) when the module's tests are done, whether they passed or not.

The proxy is HTTPS with the stack's own self-signed CA: while the fixture is active,
REQUESTS_CA_BUNDLE points at it, so `requests` verifies the proxy's certificate (never
`verify=False`). Its per-key rate limit is set far above what the tests send; the rate-limit
test starts a second proxy with a low limit (`LocalStack.start_extra_proxy`).
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable

import pytest
import requests

from tests.conftest import API_KEY, UNTHROTTLED_AUTH

# Two more keys in the stack's key file: a second client (rate limits are per key) and a key
# whose value must never appear in a log or a rendered config (tests/test_local_stack.py).
OTHER_KEY = "other-client-key-6a0f2c9d41"
PLANTED_KEY = "planted-secret-key-Zq8v3RkW0tYx"
STACK_KEYS = {"tester": API_KEY, "other": OTHER_KEY, "planted": PLANTED_KEY}


@pytest.fixture(scope="module")
def local_stack(image_run, text_run, tmp_path_factory):
    from deploy.local_stack import LocalStack

    # as tests/conftest.py's servers: a generous batching queue bound on a busy 2-core machine
    # and a drift window of a few requests, so the tests' little traffic exports drift (servable_drift_psi)
    slack = {"SERVABLE_IMAGE_SERVE_MAX_LATENCY_MS": "5000", "SERVABLE_TEXT_SERVE_MAX_LATENCY_MS": "5000",
             "SERVABLE_IMAGE_SERVE_DRIFT_WINDOW": "4", "SERVABLE_TEXT_SERVE_DRIFT_WINDOW": "4",
             **UNTHROTTLED_AUTH}  # fmt: skip
    stack = LocalStack(tmp_path_factory.mktemp("stack"), image_run.tag, text_run.tag, STACK_KEYS, extra_env=slack,
                       rate_limit="1000r/s", rate_burst=1000)  # fmt: skip
    try:
        stack.start(timeout_s=300)
    except BaseException:
        logs = stack.logs()
        stack.stop()
        pytest.fail(f"local stack did not start; logs:\n{logs}")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("REQUESTS_CA_BUNDLE", stack.ca_file)  # requests verifies the proxy against the stack's CA
            yield stack
    finally:
        stack.stop()


class ReleaseTraffic:
    """While a release runs on a local stack: one client sending `send()` through the proxy all along (each
    request on its own connection), every answer that is not a 200 recorded in `failed`; and the stack applying
    the release command's requests, as `python -m deploy.local_stack` does in its loop. `send()` returns the
    status and, for a 200, the answer's `model` (the tag that answered), else the body."""

    def __init__(self, stack, send: Callable[[], tuple[int, str]], pause_s: float = 0.0) -> None:
        self.stack, self.send, self.pause_s = stack, send, pause_s
        self.failed: list[tuple[int, str]] = []
        self.sent = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._traffic, self._serve_requests)]

    def _traffic(self) -> None:
        while not self._stop.is_set():
            try:
                status, model = self.send()
            except requests.RequestException as exc:  # a refused or reset connection is a failed request too
                status, model = 0, repr(exc)
            self.sent += 1
            if status != 200:
                self.failed.append((status, model))
            self._stop.wait(self.pause_s)

    def _serve_requests(self) -> None:
        while not self._stop.is_set():
            self.stack.handle_request()
            self._stop.wait(0.2)

    def answers(self, n: int, workers: int = 4) -> list[str]:
        """`n` more requests, `workers` at a time, beside the background client: the model of each answer
        (every one a 200)."""
        with cf.ThreadPoolExecutor(workers) as ex:
            got = list(ex.map(lambda _: self.send(), range(n)))
        assert {s for s, _ in got} == {200}, [g for g in got if g[0] != 200][:5]
        return [m for _, m in got]

    def __enter__(self) -> ReleaseTraffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)
