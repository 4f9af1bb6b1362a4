"""What an HTTP worker does on SIGTERM: answer every connection that reached it, refuse the rest cleanly.

BentoML's arbiter (circus) creates the listening socket, passes it to the HTTP workers and closes
it only after every worker has exited. uvicorn, on SIGTERM, stops taking connections from the
socket at once and closes the accepted ones that have not sent a whole request yet. Left at
that, a connection the kernel completed meanwhile waits in the socket's accept queue until the
arbiter closes the socket, and is then reset; so is an accepted one whose request the worker had
not read yet: the client's request is lost without an answer, where it should have been refused.

`DrainingServer` (uvicorn's Server, which BentoML's worker starts) does this on the first
SIGTERM or SIGINT instead:
1. the replica reports not ready at once (`draining()`: `/readyz` and `/v2/health/ready` 503);
2. for DRAIN_ACCEPT_S the worker keeps taking connections, from its own duplicate of the socket,
   and serves their requests as usual, each answer with `Connection: close`;
3. then the last worker still holding the (TCP) socket stops it listening, for every process that
   shares it: a filter drops new connection attempts, the queued connections are taken, and
   shutdown(2) turns the socket from listening to closed. A later connection attempt is refused
   (ECONNREFUSED: nothing was sent, so a client or proxy may retry it anywhere). A worker stopped
   alone (the others keep serving, or circus replaces it) leaves the socket listening to them;
4. uvicorn's own shutdown follows: requests in progress finish, and a connection accepted that
   has not sent its request yet is still served, within the header timeout
   (serving/http_guard.py::GuardedHttpToolsProtocol.shutdown).
A second signal cuts the window short. A worker started on a socket that a previous generation
of workers stopped (circus restarting them all, `bentoml serve --reload`) makes it listen again.

While serving, a worker takes one connection at a time from the socket, and leaves a queued one to a
sibling that holds fewer (serving/accept_balance.py), where asyncio and uvloop accept until the queue
is empty: one worker used to take a whole burst of new connections (a client opening its pool, a
proxy reconnecting) while the other idled, and each connection stays with its worker for its life.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from types import FrameType

import uvicorn

from serving.accept_balance import HOLD_BACK_S, PUBLISH_EVERY_S, RECHECK_S, ConnectionTable

# How long a worker keeps serving new connections after SIGTERM, reporting not ready meanwhile (a
# load balancer polling /readyz stops sending): short against any grace period (compose 40 s,
# Kubernetes 60 s after its preStop sleep).
DRAIN_ACCEPT_S = 1.0
SO_ATTACH_FILTER, SO_DETACH_FILTER = 26, 27  # Linux (asm-generic/socket.h); Python's socket module lacks them
log = logging.getLogger("servable.shutdown")
_draining = False


def draining() -> bool:
    """True from the worker's first SIGTERM (or SIGINT): the replica is going away, not ready."""
    return _draining


def _others_still_accepting(fd: int, inode: int) -> bool:
    """Whether another worker of the replica still takes connections from the listening socket: it holds
    it at the number it inherited, `fd`, which a worker closes as its drain begins (the arbiter, this
    worker's parent, holds it to the end). Then this worker leaves the socket listening to it."""
    skip = {str(os.getpid()), str(os.getppid())}
    for path in Path("/proc").glob(f"[0-9]*/fd/{fd}"):
        with contextlib.suppress(OSError):  # gone, or not ours to look at
            if path.parts[2] not in skip and path.stat().st_ino == inode:
                return True
    return False


def _drop_new_connections(sock: socket.socket) -> None:
    """A classic BPF filter that drops every packet to the listening socket: no new connection completes
    (its SYN goes unanswered; the client's retry, a second later, is refused). TCP only."""
    ret_drop = struct.pack("HBBI", 0x06, 0, 0, 0)  # BPF_RET | BPF_K, accept 0 bytes: drop
    insns = ctypes.create_string_buffer(ret_drop, len(ret_drop))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HP", 1, ctypes.addressof(insns)))


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with the drain above on the first SIGTERM/SIGINT (see the module's doc)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._captured_drain_signal = False
        self._drain: asyncio.Task | None = None
        self._listeners: list[tuple[socket.socket, int]] = []  # (this worker's duplicate, the inherited fd)
        self._polled: list[socket.socket] = []  # the inherited TCP sockets this worker takes connections from
        self._table: ConnectionTable | None = None  # the replica's open connections per worker
        self._held_since: float | None = None  # when this worker began leaving a connection to a sibling
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._handoffs: set[asyncio.Task] = set()
        self._accepted, self._filtered = 0, False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # A socket inherited after a previous generation of workers stopped it (circus restarting the
        # workers, `bentoml serve --reload`): without the filter, listen() revives it.
        for sock in sockets or []:
            with contextlib.suppress(OSError):  # ENOENT: no filter, the usual case
                sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        tcp = [sock for sock in sockets or [] if sock.family in (socket.AF_INET, socket.AF_INET6)]
        await super().startup(None if sockets is None else [sock for sock in sockets if sock not in tcp])
        if self.should_exit:  # the application failed to start
            return
        if tcp:
            self._table = ConnectionTable.for_this_worker()
            self._publish()
        for sock in tcp:  # polled here at its inherited number, one connection at a time (serving/accept_balance.py)
            sock.listen(self.config.backlog)
            sock.setblocking(False)
            self._polled.append(sock)
            self._poll(sock)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._stop_polling()  # uvicorn's own stop (no drain ran: e.g. the application failed)
        await super().shutdown(sockets)

    def _holding(self) -> int:
        return len(self.server_state.connections) + len(self._handoffs)

    def _publish(self) -> None:
        """This worker's connections into the replica's table, now and every PUBLISH_EVERY_S (they also close)."""
        if self._table is not None:
            self._table.publish(self._holding())
            self._timers["publish"] = asyncio.get_running_loop().call_later(PUBLISH_EVERY_S, self._publish)

    def _poll(self, sock: socket.socket) -> None:
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable, sock)

    def _on_readable(self, sock: socket.socket) -> None:
        """Take one queued connection, unless a live sibling holds fewer than this worker: then leave it to
        them and look again in RECHECK_S, for at most HOLD_BACK_S (serving/accept_balance.py)."""
        fewest = self._table.fewest_elsewhere() if self._table is not None else None
        if fewest is not None and self._holding() > fewest:
            now = time.monotonic()
            self._held_since = self._held_since or now
            if now - self._held_since < HOLD_BACK_S:
                loop = asyncio.get_running_loop()
                loop.remove_reader(sock.fileno())
                self._timers[f"look {sock.fileno()}"] = loop.call_later(RECHECK_S, self._look_again, sock)
                return
        self._held_since = None
        self._accept(sock, 1)
        if self._table is not None:
            self._table.publish(self._holding())

    def _look_again(self, sock: socket.socket) -> None:
        if sock in self._polled:
            queued = select.poll()
            queued.register(sock, select.POLLIN)
            if not queued.poll(0):
                self._held_since = None  # a sibling took it
            self._poll(sock)

    def _stop_polling(self) -> None:
        loop = asyncio.get_running_loop()
        for timer in self._timers.values():
            timer.cancel()
        for sock in self._polled:
            loop.remove_reader(sock.fileno())
        self._polled = []
        if self._table is not None:  # a stopping worker takes no more: its siblings stop leaving connections to it
            self._table.publish(sys.maxsize)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        global _draining
        if self._captured_drain_signal or not self.started:  # a second signal, or not serving yet: uvicorn's way
            if self.started:
                asyncio.get_running_loop().call_soon_threadsafe(self._stop_listening)
            super().handle_exit(sig, frame)
            return
        self._captured_drain_signal = True
        _draining = True  # readiness answers 503 from now on
        asyncio.get_running_loop().call_soon_threadsafe(self._start_drain, sig, frame)

    def _start_drain(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is None and not self.should_exit:
            self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit(sig, frame))

    async def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        self._take_over_listeners()
        log.info("%s: not ready; taking new connections for %.1f s more", signal.Signals(sig).name, DRAIN_ACCEPT_S)
        await asyncio.sleep(DRAIN_ACCEPT_S)
        if not self.should_exit:
            self._stop_listening()
            await asyncio.gather(*self._handoffs, return_exceptions=True)
            super().handle_exit(sig, frame)

    def _take_over_listeners(self) -> None:
        """Own duplicates of the listening sockets, polled here for every queued connection; the inherited
        numbers close (other workers read that as this one no longer taking connections)."""
        loop = asyncio.get_running_loop()

        def own(fd: int) -> None:
            with contextlib.suppress(OSError):  # closed already (it stopped listening under uvloop)
                dup = socket.socket(fileno=os.dup(fd))
                dup.setblocking(False)
                self._listeners.append((dup, fd))
                loop.add_reader(dup.fileno(), self._accept, dup, None)

        polled = self._polled
        self._stop_polling()
        for sock in polled:
            own(sock.fileno())
            sock.close()
        for server in self.servers:  # the split topology's model process: its Unix socket, uvicorn's server
            for sock in server.sockets:
                own(sock.fileno())
            server.close()

    def _accept(self, sock: socket.socket, most: int | None) -> bool:
        """Take up to `most` queued connections (None: all) and hand each to uvicorn's protocol; False once the
        socket stopped listening."""
        loop = asyncio.get_running_loop()
        factory = functools.partial(self.config.http_protocol_class, config=self.config,
                                    server_state=self.server_state, app_state=self.lifespan.state)  # fmt: skip
        taken = 0
        while most is None or taken < most:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except ConnectionAbortedError:
                continue
            except OSError:  # EINVAL: another worker (or this one) stopped the socket listening
                loop.remove_reader(sock.fileno())
                return False
            taken += 1
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._filtered:  # a connection completed as the filter came inherits it: it would drop the request
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
            self._accepted += 1
            task = loop.create_task(loop.connect_accepted_socket(factory, conn, ssl=self.config.ssl))
            self._handoffs.add(task)
            task.add_done_callback(self._handoffs.discard)
        return True

    def _stop_listening(self) -> None:
        """No new connection completes, the queued ones are taken, then the socket stops listening (refuses);
        unless another worker still takes connections from it (only this worker is stopping)."""
        loop = asyncio.get_running_loop()
        for sock, fd in self._listeners:
            loop.remove_reader(sock.fileno())
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                pass  # the split topology's model process (a Unix socket, its callers are the stopping workers)
            elif _others_still_accepting(fd, os.fstat(sock.fileno()).st_ino):
                log.info("another worker still takes connections: this one stops, the socket keeps listening")
            else:
                try:
                    _drop_new_connections(sock)
                    self._filtered = True
                except OSError as exc:  # then a connection completing in the next microseconds may be reset
                    log.warning("could not filter the listening socket (%s); stopping it all the same", exc)
                if self._accept(sock, None):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RD)  # LISTEN -> CLOSE, for the one socket every process shares
                    log.info("stopped listening: later connections are refused")
            log.info("took %d connections while draining; now finishing what this worker holds", self._accepted)
            sock.close()
        self._listeners = []


def install_graceful_shutdown() -> None:
    """Make BentoML's worker start a DrainingServer: it calls `uvicorn.Server(config)` after importing the
    service module, so the service module's import is early enough (as for `install_protocol_limits`)."""
    uvicorn.Server = DrainingServer  # type: ignore[misc]
