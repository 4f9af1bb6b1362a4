"""Bounded waiting for what another process makes true a moment later (a log line, a child process)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout_s: float = 60.0, interval_s: float = 0.2) -> T:
    """`check()` once it is truthy, or its last value after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(interval_s)
    return value
