"""A replica's HTTP workers share new connections evenly (serving/accept_balance.py)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import psutil
import pytest

from serving import accept_balance
from serving.accept_balance import STALE_S, ConnectionTable
from tests.conftest import API_KEY


def test_the_table_tells_the_fewest_connections_of_the_live_siblings(tmp_path, monkeypatch):
    path = tmp_path / accept_balance.TABLE_FILE
    me, first, second = ConnectionTable(path, 1), ConnectionTable(path, 2), ConnectionTable(path, 3)
    assert me.fewest_elsewhere() is None  # nobody else has published: nothing to leave connections to
    first.publish(7)
    second.publish(3)
    me.publish(0)  # its own slot never counts
    assert me.fewest_elsewhere() == 3 and first.fewest_elsewhere() == 0
    now = time.monotonic()
    monkeypatch.setattr(accept_balance.time, "monotonic", lambda: now + accept_balance.STALE_S + 0.1)
    second.publish(5)  # still publishing; the others went quiet: a stopped worker's slot is ignored
    assert me.fewest_elsewhere() == 5


def _connections_per_worker(server) -> list[int]:
    from deploy import launch

    counts = []
    for pid in launch.descendants(server.proc.pid):
        try:
            conns = psutil.Process(pid).net_connections("tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == server.port for c in conns):  # an HTTP worker
            counts.append(sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.port for c in conns))
    return sorted(counts)


async def _burst(server, n: int) -> list[int]:
    """`n` keep-alive connections opened at once, one request on each; then who holds them."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> int:
            async with session.get(server.url + "/info", headers={"x-api-key": API_KEY}) as r:
                await r.read()
                return r.status

        assert await asyncio.gather(*(one() for _ in range(n))) == [200] * n
        return _connections_per_worker(server)


def test_a_burst_of_new_connections_is_shared_evenly_between_the_workers(image_server):
    """32 connections opened at once (a client's pool, a proxy reconnecting) end up 16/16 on two workers, give or
    take two, each time; left to the event loop, one worker took most or all of a burst while the other idled."""
    workers = len(_connections_per_worker(image_server))
    if workers < 2:
        pytest.skip("one HTTP worker (one CPU core): nothing to balance")
    # A ready replica has every worker taking connections (test_readyz_turns_200_only_once_every_worker_...)
    (path,) = image_server.log_path.parent.rglob(accept_balance.TABLE_FILE)
    table = ConnectionTable(path, accept_balance.SLOTS - 1)
    assert len(table.live()) == workers, table.live()
    for _ in range(3):
        held = asyncio.run(_burst(image_server, 32))
        assert sum(held) >= 32 and max(held) - min(held) <= 2, held
        time.sleep(2 * accept_balance.PUBLISH_EVERY_S)  # the closed connections leave the table


def test_a_replica_is_ready_once_every_worker_has_been_up_and_stays_so(tmp_path):
    """Readiness waits for the second worker's first publish, then holds when a worker goes (a restart must not
    take the replica out of its load balancer)."""
    from serving.accept_balance import AllWorkersUp

    first, second = ConnectionTable(tmp_path / "t.bin", 0), ConnectionTable(tmp_path / "t.bin", 1)
    first.publish(0)
    ready = AllWorkersUp(2, first)
    assert not ready()
    second.publish(0)
    assert ready()
    time.sleep(STALE_S + 0.1)  # both gone stale: still ready
    assert ready()
    assert AllWorkersUp(1, first)() and AllWorkersUp(2, None)()  # one worker, or no table: nothing to wait for


def test_readyz_turns_200_only_once_every_worker_takes_connections(image_run, tmp_path):
    """/readyz polled every 20 ms from the replica's start: at its first 200 both workers are in the connection
    table (each publishes once it serves), so a burst let in by readiness finds both; before, the first worker
    up answered 200 while the second still loaded its model."""
    from deploy import launch
    from servable.config import SERVED_MODELS

    prefix = SERVED_MODELS["image"].env_prefix
    env = {f"{prefix}MODEL_TAG": image_run.tag, f"{prefix}WORKERS": "2", "SERVABLE_AUTH_KEYS": f"tester:{API_KEY}"}
    server = launch.start(launch.SERVICES["image"], env, log_path=tmp_path / "server.log")
    try:
        deadline, tables = time.monotonic() + 180, []
        while time.monotonic() < deadline and server.proc.poll() is None:
            tables = tables or list(tmp_path.rglob(accept_balance.TABLE_FILE))
            if launch.get(server.url + "/readyz", timeout=2)[0] == 200:
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"never ready:\n{server.log()[-3000:]}")
        (path,) = tables or list(tmp_path.rglob(accept_balance.TABLE_FILE))
        live = ConnectionTable(path, accept_balance.SLOTS - 1).live()
        assert len(live) == 2, (live, server.log()[-2000:])
    finally:
        server.stop()
