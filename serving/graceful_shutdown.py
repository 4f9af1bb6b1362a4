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
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import struct
from pathlib import Path
from types import FrameType

import uvicorn

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
        self._handoffs: set[asyncio.Task] = set()
        self._accepted, self._filtered = 0, False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # A socket inherited after a previous generation of workers stopped it (circus restarting the
        # workers, `bentoml serve --reload`): without the filter, uvicorn's listen() revives it.
        for sock in sockets or []:
            with contextlib.suppress(OSError):  # ENOENT: no filter, the usual case
                sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        await super().startup(sockets)

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
        """Own duplicates of the listening sockets, polled here; uvicorn's servers stop polling them."""
        loop = asyncio.get_running_loop()
        for server in self.servers:
            for sock in server.sockets:
                with contextlib.suppress(OSError):  # closed already (it stopped listening under uvloop)
                    dup = socket.socket(fileno=os.dup(sock.fileno()))
                    dup.setblocking(False)
                    self._listeners.append((dup, sock.fileno()))
                    loop.add_reader(dup.fileno(), self._accept_all, dup)
            server.close()

    def _accept_all(self, sock: socket.socket) -> bool:
        """Take every queued connection and hand it to uvicorn's protocol; False once the socket stopped listening."""
        loop = asyncio.get_running_loop()
        factory = functools.partial(self.config.http_protocol_class, config=self.config,
                                    server_state=self.server_state, app_state=self.lifespan.state)  # fmt: skip
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except ConnectionAbortedError:
                continue
            except OSError:  # EINVAL: another worker (or this one) stopped the socket listening
                loop.remove_reader(sock.fileno())
                return False
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
                if self._accept_all(sock):
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
