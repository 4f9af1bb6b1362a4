"""What queueing alone does to latency: the yardstick beside a measured tail.

A FIFO queue fed by Poisson arrivals (independent users) has a spread of latencies even when every request
costs the same; the benchmark's tail target (p99 / p50 at 70 % of saturation) is read against it.
"""

from __future__ import annotations

import functools
import heapq

import numpy as np


@functools.cache
def fifo_floor(load: float, servers: int = 1, requests: int = 200_000, seed: int = 0) -> float:
    """p99 / p50 of the time in system of a FIFO queue with Poisson arrivals and one constant service time
    (M/D/c), each of `servers` busy `load` of the time: what queueing alone gives at that load, with no
    variance in the work. A server whose requests queue (the batcher's, one per worker) cannot be expected
    below it; batching can only beat it where a batch of n costs less than n single rows."""
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1.0 / (load * servers), requests)).tolist()
    free, sojourn = [0.0] * servers, []
    for t in arrivals:
        end = max(t, heapq.heappop(free)) + 1.0
        heapq.heappush(free, end)
        sojourn.append(end - t)
    p50, p99 = np.percentile(sojourn[requests // 10 :], [50, 99])  # the first tenth: the queue filling
    return float(p99 / p50)
