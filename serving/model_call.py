"""split topology only: the HTTP worker's call to the model process, with its failure modes.

A dropped connection to the model process is retried: inference is a pure function of its input,
and BentoML 1.4's dependency client closes its pooled session every `runner_connection.max_requests`
calls (default 100) while other calls are still in flight on it (they fail with
ServerDisconnectedError / ClientOSError, or aiohttp's RuntimeErrors "Session is closed" and
"Connection closed."; upstream bentoml/BentoML PR #5522, issue #5540). The services raise that
bound out of reach (`runner_max_requests`), so the retry is for the remaining cases: a session
closed at `runner_max_age_s`, a model process restarted under a call. The in-process topology
makes no such call and has no retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

import numpy as np

from serving import metrics

log = logging.getLogger("servable.model_call")

MODEL_CALL_ATTEMPTS = 3
DROPPED_RUNTIME_ERRORS = ("session is closed", "connection closed")


class ModelUnavailable(RuntimeError):
    """Every attempt failed: a 503 for the caller."""


def dropped(exc: Exception) -> bool:
    import aiohttp  # here, not with the module: the in-process topology never calls a model process

    return isinstance(exc, aiohttp.ClientConnectionError) or (
        isinstance(exc, RuntimeError) and str(exc).lower().startswith(DROPPED_RUNTIME_ERRORS)
    )


async def call_model(labels: Mapping[str, str], timeout_s: float, make_call: Callable[[], Awaitable]) -> np.ndarray:
    """Each attempt has its own deadline (`model_call_timeout_s`): a stuck attempt is abandoned and
    retried, like a dropped one, instead of sitting until the request timeout (a 504). `labels`: the
    model's metric labels (model, version)."""
    for attempt in range(1, MODEL_CALL_ATTEMPTS + 1):
        try:
            return np.asarray(await asyncio.wait_for(make_call(), timeout_s))
        except Exception as exc:
            stuck = isinstance(exc, TimeoutError)
            if (stuck or dropped(exc)) and attempt < MODEL_CALL_ATTEMPTS:
                if stuck:
                    log.warning("model call attempt %d got no answer within %.1f s; retrying", attempt, timeout_s)
                metrics.MODEL_CALL_RETRIES.labels(**labels).inc()
                continue
            log.warning("model call failed (attempt %d): %s", attempt, type(exc).__name__)
            raise ModelUnavailable(type(exc).__name__) from exc
    raise AssertionError("unreachable")
