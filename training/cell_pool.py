"""A study's cells side by side: one spawned process per job, each with its share of the cores.

Both studies (training/limited_data.py, training/domain_study.py) are many small trainings. The limited-data
study's small models use two threads poorly, so two cells on one core each finish sooner than one after the
other on both; for the domain study's BERT the two are level (both measured: docs/training.md). The caller
says which cells may start (`ready`: a cell that reads what another writes waits for it) and records each
result as it comes back (`on_done`), so progress is saved cell by cell.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any

from tqdm import tqdm

from servable.config import cpu_cores


def job_shape(jobs: int, threads: int, most: int = 4) -> tuple[int, int]:
    """(cells at once, torch threads per cell) from the settings' `jobs` and `num_threads` (0 = derive): one job
    per core, at most `most`, the cores shared equally."""
    cores = cpu_cores()  # its CPU set and a container's CPU quota, as the serving workers count them
    jobs = jobs or min(cores, most)
    return jobs, threads or max(1, cores // jobs)


def _in_worker(work: Callable[..., dict], cell: Sequence) -> tuple[int, dict]:
    return os.getpid(), work(*cell)


def run_in_workers(todo: list[Hashable], jobs: int, start: Callable[..., None], start_args: tuple,
                   work: Callable[..., dict], ready: Callable[[Any, list], bool],
                   on_done: Callable[[Any, dict], None], name: Callable[[Any], str]) -> None:  # fmt: skip
    """Run `todo`'s cells (tuples) `jobs` at a time in spawned processes, in `todo`'s order except where a cell is
    not `ready(cell, running)` yet. Each process runs `start(*start_args)` once, then `work(*cell)` per cell (both
    module-level functions: they are sent by name); `on_done(cell, record)` runs here as each cell ends."""
    todo = list(todo)
    running: dict[Future, Any] = {}
    context = get_context("spawn")  # a fork of a process that has run torch threads can hang
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=start, initargs=start_args) as pool:
        while todo or running:
            for cell in list(todo):
                if len(running) < jobs and ready(cell, list(running.values())):
                    todo.remove(cell)
                    tqdm.write(f"== {name(cell)}")
                    running[pool.submit(_in_worker, work, cell)] = cell
            if not running:
                raise RuntimeError(f"cells wait for something no cell will make: {todo}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                cell = running.pop(f)
                pid, record = f.result()
                tqdm.write(f"done {name(cell)}: test accuracy {record['accuracy']:.3f} (process {pid})")
                on_done(cell, record)
