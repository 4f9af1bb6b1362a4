"""In-process topology: explanations computed in a low-priority child process of each HTTP worker.

The worker parses and validates the request (per request, before anything) and sends the parsed
input; the child builds the perturbed rows, scores them in chunks of `max_batch_size` on its own
ONNX Runtime session (same artifact, same variant, 1 intra-op thread) with the deadline checked
between chunks, and builds the answer. The child shares no interpreter lock with the worker and
its every thread runs `explain_nice` lower in the SCHED_IDLE class, so the predict path (event
loop, batcher) never waits behind an explanation that holds the lock, nor for the CPU.

The child is started with the worker, in the background (predict readiness does not wait for
it), stops with it (the shutdown hook; on its own if the worker is killed) and is replaced when it
dies: its callers get `ExplainCrashed` (a 503), the next explanation gets a new child.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from serving.batcher import BatchFailed
from serving.explain_queue import ExplainTimeout

log = logging.getLogger("servable.explain")


class ExplainCrashed(RuntimeError):
    """The explain process died (killed, out of memory) with this call in it: a 503; it is replaced."""


# ---------------------------------------------------------------- in the child


_child: dict[str, Any] = {}  # the adapter, its session and the chunk size, set by _start_child


def _lower_priority(increment: int) -> None:
    """Every thread of this process (Linux nice and policy are per thread; threads made later inherit
    their creator's) gets the nice increment and Linux's SCHED_IDLE class: it runs only on CPU time
    the predict path leaves idle, and a waking prediction preempts it at once (a nice value alone
    still gets a CFS share, which showed in predict p99). Never fatal: the admission limits still
    bound explanations."""
    if not increment:
        return
    try:
        target = min(19, os.getpriority(os.PRIO_PROCESS, 0) + increment)
        for tid in os.listdir("/proc/self/task"):  # numpy's BLAS pool, for one, exists before this runs
            os.setpriority(os.PRIO_PROCESS, int(tid), target)
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError) as exc:  # AttributeError: no SCHED_IDLE (not Linux)
        log.warning("could not lower the explain process's priority: %s", exc)


def _exit_with_parent() -> None:
    """Exit when the worker is gone, even killed (SIGKILL runs no clean-up, and nothing else would tell)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the worker's end of the spawn pipe closes: the worker is gone
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-worker", daemon=True).start()


def _start_child(adapter_cls, settings, nice: int) -> None:
    """The child's initializer: lower priority first (what it starts inherits it), then load the model
    the one way replicas load it (verified artifact, adapter, session, warm-up)."""
    _lower_priority(nice)
    _exit_with_parent()
    from serving.access_log import configure_json_logging
    from serving.loading import load_model

    configure_json_logging()
    adapter, model, _ = load_model(adapter_cls, settings, with_session=True)
    if not model.ready:
        raise RuntimeError(f"explain process: model not loaded: {model.error}")
    _child.update(adapter=adapter, session=model.session, step=settings.max_batch_size)


def _started() -> tuple[int, float]:
    """(pid, resident memory in MiB) of a child that has loaded its model."""
    with open("/proc/self/status") as status:
        rss_kb = next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
    return os.getpid(), rss_kb / 1024


def _explain(parsed, deadline: float) -> dict:
    """One whole explanation: rows, their scores in chunks (deadline between chunks), the answer."""
    adapter, session, step = _child["adapter"], _child["session"], _child["step"]
    rows = adapter.explain_rows(parsed)
    out = []
    for i in range(0, len(rows), step):
        if time.monotonic() > deadline:  # CLOCK_MONOTONIC: the same clock in the worker and here
            raise ExplainTimeout
        chunk = rows[i : i + step]
        try:
            out.append(adapter.run(session, chunk))
        except Exception as exc:  # as a failing batch: a 503 for this caller, logged by type only
            log.error("explanation chunk of %d rows failed: %s", len(chunk), type(exc).__name__)
            raise BatchFailed(type(exc).__name__) from None
    return adapter.explanation(parsed, np.concatenate(out))


# ---------------------------------------------------------------- in the worker


class ExplainProcess:
    """The worker's side: `explain_max_concurrency` child processes (a spawn-context process pool)."""

    def __init__(self, adapter_cls, settings, tag: str, variant: str) -> None:
        # The exact version and variant this worker serves (a newer `latest` may be registered since),
        # one intra-op thread per explanation: the admission limit is its share of the cores.
        child_settings = settings.model_copy(update={"model_tag": tag, "variant": variant, "intra_op_threads": 1})
        self._args = (adapter_cls, child_settings, settings.explain_nice)
        self._n = settings.explain_max_concurrency
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start the children now; they load in the background (this returns at once)."""
        self._pool = ProcessPoolExecutor(self._n, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_child, initargs=self._args)  # fmt: skip
        for _ in range(self._n):  # each submit with no idle child starts one
            self._pool.submit(_started).add_done_callback(_report_start)

    async def explain(self, parsed, deadline: float) -> dict:
        pool = self._pool
        assert pool is not None
        try:
            return await asyncio.wrap_future(pool.submit(_explain, parsed, deadline))
        except BrokenProcessPool as exc:
            if pool is self._pool:  # the first caller to see it replaces the pool, once
                log.error("explain process died; starting a new one")
                pool.shutdown(wait=False, cancel_futures=True)
                self.start()
            raise ExplainCrashed from exc

    def stop(self) -> None:
        """Queued explanations cancelled, a running one finished, the children joined."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _report_start(started: Future) -> None:
    if started.cancelled():  # the pool was stopped before the child started
        return
    try:
        pid, rss_mib = started.result()
    except Exception as exc:  # a child that cannot load: its callers get 503s, and the log says why
        log.error("explain process did not start: %s", type(exc).__name__)
        return
    log.info("explain process %d ready (resident memory %.0f MiB)", pid, rss_mib)
