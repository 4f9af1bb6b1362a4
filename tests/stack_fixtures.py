"""The local stack (deploy/local_stack.py) as a pytest fixture: 2+2 replicas, nginx, Prometheus.

Import the fixture into a test module (`from tests.stack_fixtures import local_stack`). It uses
the tiny models the session fixtures of tests/conftest.py train, and stops every process it
started (by process group) when the module's tests are done, whether they passed or not.
"""

from __future__ import annotations

import pytest

from tests.conftest import API_KEY


@pytest.fixture(scope="module")
def local_stack(image_run, text_run, tmp_path_factory):
    from deploy.local_stack import LocalStack

    # as tests/conftest.py's servers: a generous batching queue bound on a busy 2-core machine
    slack = {"SERVABLE_IMAGE_SERVE_MAX_LATENCY_MS": "5000", "SERVABLE_TEXT_SERVE_MAX_LATENCY_MS": "5000"}
    stack = LocalStack(tmp_path_factory.mktemp("stack"), image_run.tag, text_run.tag, {"tester": API_KEY},
                       extra_env=slack)  # fmt: skip
    try:
        stack.start(timeout_s=300)
    except BaseException:
        logs = stack.logs()
        stack.stop()
        pytest.fail(f"local stack did not start; logs:\n{logs}")
    try:
        yield stack
    finally:
        stack.stop()
