"""In-process topology: explanations computed in a low-priority child process of each HTTP worker.

The worker parses and validates the request (per request, before anything) and sends the parsed
input; the child builds the perturbed rows, scores them in chunks of `max_batch_size` on its own
ONNX Runtime session (same artifact, same variant, 1 intra-op thread) with the deadline checked
between chunks, and builds the answer. The child shares no interpreter lock with the worker and
its every thread runs `explain_nice` lower in the SCHED_IDLE class, so the predict path (event
loop, batcher) never waits behind an explanation that holds the lock, nor for the CPU.

The child starts on the worker's first explanation, not with the worker: a worker whose
explanations are never asked for holds no second copy of the model and runtime (about 135-170 MiB
per worker). The first explanation of each worker pays the child's start (a new interpreter, the
model verified, loaded and warmed up: a few seconds on an idle machine), within its deadline
(`explain_timeout_s`: the worker waits no longer than that, whatever the child does). The child is
spawned from a thread already at its priority, so its start, too, gets only CPU time the predict
path leaves idle: when predictions keep every core busy a start can outlast the deadline, and that
caller gets the 503 `explain_timeout` while the child goes on starting for the next ones.
Concurrent first explanations start the children once (`explain_max_concurrency`, 1 by default).
The child stops with the worker (the shutdown hook; on its own if the worker is killed) and is
replaced when it dies: its callers get `ExplainCrashed` (a 503), the next explanation starts a new
child.
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


def _idle_target(increment: int) -> int | None:
    """The nice value `increment` above this thread's (at most 19); None for 0: no change at all."""
    return min(19, os.getpriority(os.PRIO_PROCESS, 0) + increment) if increment else None


def _set_idle(tid: int, target: int) -> None:
    """One thread (Linux thread id) to nice `target` in Linux's SCHED_IDLE class."""
    os.setpriority(os.PRIO_PROCESS, tid, target)
    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


def _lower_priority(target: int | None) -> None:
    """Every thread of this process (Linux nice and policy are per thread; threads made later inherit
    their creator's) to nice `target` and Linux's SCHED_IDLE class: it runs only on CPU time the
    predict path leaves idle, and a waking prediction preempts it at once (a nice value alone still
    gets a CFS share, which showed in predict p99). The child normally starts that way already (it
    is spawned from a thread at that priority); this also covers threads made before (numpy's BLAS
    pool). Never fatal: the admission limits still bound explanations."""
    if target is None:
        return
    try:
        for tid in os.listdir("/proc/self/task"):
            _set_idle(int(tid), target)
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


def _start_child(adapter_cls, settings, nice: int | None) -> None:
    """The child's initializer: lower priority first (what it starts inherits it), then load the model
    the one way replicas load it (verified artifact, adapter, session, warm-up)."""
    _lower_priority(nice)
    _exit_with_parent()
    from serving.access_log import configure_json_logging
    from serving.loading import load_model

    configure_json_logging()
    # Explanations run in chunks of max_batch_size rows (the last one shorter): that size warmed up.
    adapter, model, _ = load_model(adapter_cls, settings, with_session=True, warmup_sizes=[settings.max_batch_size])
    if not model.ready:
        raise RuntimeError(f"explain process: model not loaded: {model.error}")
    _child.update(adapter=adapter, session=model.session, step=settings.max_batch_size)


def _started(since: float) -> tuple[int, float, float]:
    """(pid, resident memory in MiB, seconds since `since`, the worker's time.monotonic() when it asked for
    this child) of a child that has loaded its model."""
    with open("/proc/self/status") as status:
        rss_kb = next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
    return os.getpid(), rss_kb / 1024, time.monotonic() - since


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


class _Pool(ProcessPoolExecutor):
    """A spawn-context process pool whose children start at the explain priority: each is spawned from a
    short-lived thread lowered first (a forked thread's nice and policy carry over to the child and
    through exec), so even its interpreter start and imports, before the initializer runs, use only
    CPU time the predict path leaves idle. The worker's own threads keep their priority: a SCHED_IDLE
    thread in the worker could hold its interpreter lock while the event loop waits for it."""

    def __init__(self, n: int, args: tuple, nice: int | None) -> None:
        super().__init__(n, mp_context=multiprocessing.get_context("spawn"), initializer=_start_child,
                         initargs=(*args, nice))  # fmt: skip
        self._nice = nice

    def _spawn_process(self) -> None:  # CPython's hook for each new child (3.9+); unused elsewhere: no effect
        if self._nice is None:
            return super()._spawn_process()
        failed: list[BaseException] = []

        def spawn() -> None:
            try:
                _set_idle(threading.get_native_id(), self._nice)
            except (OSError, AttributeError) as exc:  # the child still lowers itself in its initializer
                log.warning("could not lower the explain process's priority before its start: %s", exc)
            try:
                super(_Pool, self)._spawn_process()
            except BaseException as exc:  # raised in the caller, as without the thread
                failed.append(exc)

        thread = threading.Thread(target=spawn, name="spawn-explain-process")
        thread.start()
        thread.join()
        if failed:
            raise failed[0]


class ExplainProcess:
    """The worker's side: `explain_max_concurrency` child processes (a spawn-context process pool), started
    on the first explanation."""

    def __init__(self, adapter_cls, settings, tag: str, variant: str) -> None:
        # The exact version and variant this worker serves (a newer `latest` may be registered since),
        # one intra-op thread per explanation: the admission limit is its share of the cores.
        child_settings = settings.model_copy(update={"model_tag": tag, "variant": variant, "intra_op_threads": 1})
        self._args = (adapter_cls, child_settings)
        self._increment = settings.explain_nice
        self._nice: int | None = None
        self._n = settings.explain_max_concurrency
        self._pool: ProcessPoolExecutor | None = None
        self._starting = asyncio.Lock()  # concurrent first explanations start one pool
        self._guard = threading.Lock()  # the pool's creation (a thread) against stop() (another thread)
        self._started = self._stopped = False

    def start(self) -> None:
        """Called at the worker's start: records the children's priority (from the worker's own) and starts
        nothing; the first explanation starts the children."""
        self._nice = _idle_target(self._increment)
        self._started = True

    def _new_pool(self) -> ProcessPoolExecutor | None:
        """A pool with its children being spawned (they load in the background); None once stopped."""
        with self._guard:
            if self._stopped:
                return None
            pool = _Pool(self._n, self._args, self._nice)
            since = time.monotonic()
            for _ in range(self._n):  # each submit with no idle child starts one
                pool.submit(_started, since).add_done_callback(_report_start)
            self._pool = pool
            return pool

    async def _running_pool(self) -> ProcessPoolExecutor:
        pool = self._pool
        if pool is None:
            async with self._starting:
                pool = self._pool
                if pool is None:  # spawning takes tens of ms: not on the event loop
                    pool = await asyncio.to_thread(self._new_pool)
        if pool is None:
            raise ExplainCrashed("the explain process is stopped")  # the worker is shutting down: a 503
        return pool

    async def explain(self, parsed, deadline: float) -> dict:
        """The explanation, computed in a child (started now if this is the worker's first); ExplainTimeout
        once `deadline` (time.monotonic) has passed, whether the child is starting, queued or computing."""
        assert self._started, "ExplainProcess.start() was not called"
        pool = await self._running_pool()
        try:
            future = asyncio.wrap_future(pool.submit(_explain, parsed, deadline))
            return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
        except TimeoutError:  # the call is cancelled if still queued; the child checks the deadline itself
            raise ExplainTimeout from None
        except BrokenProcessPool as exc:
            if pool is self._pool:  # the first caller to see it drops the pool, once: the next call starts one
                log.error("explain process died; the next explanation starts a new one")
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise ExplainCrashed from exc

    def stop(self) -> None:
        """Queued explanations cancelled, a running one finished, the children joined; nothing to do if no
        explanation ever started them. No child starts afterwards."""
        with self._guard:
            self._stopped = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _report_start(started: Future) -> None:
    if started.cancelled():  # the pool was stopped before the child started
        return
    try:
        pid, rss_mib, seconds = started.result()
    except Exception as exc:  # a child that cannot load: its callers get 503s, and the log says why
        log.error("explain process did not start: %s", type(exc).__name__)
        return
    log.info("explain process %d ready (resident memory %.0f MiB, started in %.1f s)", pid, rss_mib, seconds)
