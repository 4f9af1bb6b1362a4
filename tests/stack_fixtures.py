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

import pytest

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
