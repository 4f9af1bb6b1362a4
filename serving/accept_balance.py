"""Connections shared out evenly between a replica's HTTP workers.

Every worker polls the one listening socket the arbiter made. Left to the event loop, the first worker to
wake takes every queued connection, and a connection stays with the worker that took it for its whole life
(keep-alive clients, a proxy's pool of upstream connections): a burst of 32 went 32/0 as often as 16/16,
and the busy worker queued requests while the other idled. So each worker publishes how many connections
it holds in a small table that every worker of the replica maps (a file in the replica's Prometheus
directory, which each start of the replica wipes), and takes a queued connection only while it holds no
more than its least-loaded live sibling; a worker that has held back for HOLD_BACK_S takes it anyway, so a
sibling that is busy, stuck or gone never keeps a connection waiting longer than that.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

SLOTS = 64  # workers per replica this table can tell apart (one per core; more share slots)
RECORD = struct.Struct("=qd")  # open connections, time.monotonic() of the update (one clock for every process)
STALE_S = 1.0  # a slot not updated for this long is a worker that stopped: ignored
PUBLISH_EVERY_S = 0.25  # connections also close: each worker refreshes its count this often
HOLD_BACK_S = 0.02  # the longest a worker leaves a queued connection to a less-loaded sibling
RECHECK_S = 0.001  # how often a worker holding back looks again
TABLE_FILE = "servable-connections.bin"


class ConnectionTable:
    """The replica's table of open connections per worker, `index` this worker's slot."""

    def __init__(self, path: Path, index: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SLOTS * RECORD.size:
                os.ftruncate(fd, SLOTS * RECORD.size)  # every worker may do it: same size, zeros
            self._map = mmap.mmap(fd, SLOTS * RECORD.size)
        finally:
            os.close(fd)
        self.index = index % SLOTS

    @classmethod
    def for_this_worker(cls) -> ConnectionTable | None:
        """The table of the replica this BentoML HTTP worker belongs to; None outside one (no Prometheus
        directory or worker index: nothing to balance against)."""
        from bentoml._internal.context import server_context

        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder or server_context.worker_index is None or not Path(folder).is_dir():
            return None
        return cls(Path(folder) / TABLE_FILE, server_context.worker_index)

    def publish(self, connections: int) -> None:
        RECORD.pack_into(self._map, self.index * RECORD.size, connections, time.monotonic())

    def live(self) -> dict[int, int]:
        """Slot -> open connections of every worker that published within STALE_S (this one included)."""
        now, out = time.monotonic(), {}
        for slot in range(SLOTS):
            count, stamp = RECORD.unpack_from(self._map, slot * RECORD.size)
            if stamp and now - stamp < STALE_S:
                out[slot] = count
        return out

    def fewest_elsewhere(self) -> int | None:
        """The fewest connections a live sibling holds; None when no sibling has published lately."""
        return min((n for slot, n in self.live().items() if slot != self.index), default=None)


class AllWorkersUp:
    """Whether every HTTP worker the replica starts has been up at once, seen in the connection table.

    Each worker answers /readyz for itself, so a replica whose first worker had warmed up turned ready while
    the second still loaded: the burst that readiness let in then landed on one worker (the other takes no
    connections yet). Until every worker has published, this says no; after that it always says yes: a
    worker that dies and restarts later must not take the whole replica out of its load balancer."""

    def __init__(self, workers: int, table: ConnectionTable | None) -> None:
        self.workers, self.table = min(workers, SLOTS), table
        self.seen = table is None or self.workers <= 1  # nothing to wait for

    @classmethod
    def for_this_worker(cls, workers: int) -> AllWorkersUp:
        return cls(workers, ConnectionTable.for_this_worker())

    def __call__(self) -> bool:
        if not self.seen:
            assert self.table is not None
            self.seen = len(self.table.live()) >= self.workers
        return self.seen
