"""Decoding off the event loop: a bounded pool of threads per HTTP worker, with a per-request deadline.

A worker's event loop parses every request; work of a size the client chooses (a large image's
decode and resize, a request of long texts' tokenisation) would stall all of them. An adapter says
which items are cheap (`Adapter.inline`: well under a millisecond, e.g. a thumbnail): those are
decoded on the loop, the rest here. Pillow and the tokenizers release the interpreter lock while
they work, so the loop keeps answering meanwhile. A request whose decode has not finished within
`decode_timeout_s` (its wait for a thread included) gets 503 `decode_timeout`; one still queued
at its deadline is dropped from the queue, never run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from serving.errors import ServingError

T = TypeVar("T")


class DecodeTimeout(ServingError):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(503, "decode_timeout", f"the request's inputs were not decoded within {timeout_s:g} s; "
                         "retry later", {"Retry-After": "1"})  # fmt: skip


class DecodePool:
    def __init__(self, threads: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")

    async def run(self, fn: Callable[..., T], *args) -> T:
        future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            raise DecodeTimeout(self.timeout_s) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
