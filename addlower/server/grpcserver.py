"""A small gRPC server on a unix socket: the asyncio adapter over `http2` (the protocol) and `rpc`
(gRPC's meaning). Here live the socket, the timers (the preface's, the calls' deadlines), where a
call runs (inline on the loop, or in a bounded thread pool), backpressure and metrics; nothing of
HTTP/2 or gRPC framing.

Why not grpcio's server: its per-call cost in Python (completion-queue polling, a thread hop per
call, GIL hand-offs) made Stat and Mounts about half as fast as the Go original, and CRI stats
every snapshot every 10 s; grpcio's asyncio server and grpclib measured slower still. Here one
asyncio loop (uvloop's, in the daemon) runs quick handlers inline and a unary answer goes out as
one write per read. This module knows nothing about snapshots; it gets routes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

from addlower.core.codes import Code
from addlower.core.logformat import fields
from addlower.server import http2, rpc
from addlower.server.rpc import ErrorMapper, RequestHead, Route

log = logging.getLogger(__name__)

# Limits: each bounds something a peer controls (http2 holds the protocol's).
MAX_CONNECTIONS = 256  # open connections per server
MAX_QUEUED = 256  # calls waiting for or running in the thread pools, per server
PREFACE_TIMEOUT = 10.0  # seconds a new connection has to send the HTTP/2 preface


@dataclass(slots=True)
class _Call:
    """A call in a pool: its work, and the timer of its deadline."""

    work: Future | None = None
    timer: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.work is not None:
            self.work.cancel()  # a call not yet started never runs
        if self.timer is not None:
            self.timer.cancel()


class _Connection(asyncio.Protocol):
    def __init__(self, server: GrpcServer):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.h2 = http2.Connection(rpc.HEAD_FIELDS, RequestHead.of, rpc.MAX_MESSAGE + 5, self.loop.time)
        self.calls: dict[int, _Call] = {}  # streams whose call is in a pool
        self.transport: asyncio.Transport | None = None
        self.preface_timer: asyncio.TimerHandle | None = None

    # --- connection life -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.server.connections) >= MAX_CONNECTIONS:
            log.warning("refusing a connection: %d are open already", MAX_CONNECTIONS)
            transport.close()
            return
        self.server.connections.add(self)
        self.preface_timer = self.loop.call_later(PREFACE_TIMEOUT, self._preface_overdue)
        self.h2.initiate()
        self._send()

    def _preface_overdue(self) -> None:
        if not self.h2.preface_seen and self.transport is not None:
            log.warning("closing a client connection: no HTTP/2 preface within %.0fs", PREFACE_TIMEOUT)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.preface_timer is not None:
            self.preface_timer.cancel()
        self._cancel_calls()
        self.transport = None

    def pause_writing(self) -> None:
        """The peer reads too slowly: read nothing more from it until its replies drain."""
        self.h2.pause()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()
        self.h2.resume()
        self._send()

    def go_away(self, error: http2.H2Error = http2.H2Error.NO_ERROR, reason: str = "") -> None:
        """Refuse new streams; close now on an error, else once the streams in flight are done."""
        self.h2.go_away(error, reason)
        if error:
            self._cancel_calls()
        self._send()

    def _cancel_calls(self) -> None:
        for call in self.calls.values():
            call.cancel()
        self.calls.clear()

    def _send(self) -> None:
        """Write what the protocol has for the peer, in one write; close once it is all done."""
        if self.transport is None:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)
        if self.h2.finished:
            self.transport.close()

    # --- reading -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        events = self.h2.receive(data)
        if self.h2.preface_seen and self.preface_timer is not None:
            self.preface_timer.cancel()
            self.preface_timer = None
        for event in events:
            if type(event) is http2.RequestReceived:
                self._dispatch(event)
            elif type(event) is http2.StreamReset:
                call = self.calls.pop(event.stream_id, None)
                if call is not None:
                    call.cancel()
            elif type(event) is http2.RequestTooLarge:
                self._answer(
                    event.stream_id, [], Code.RESOURCE_EXHAUSTED, f"request larger than {rpc.MAX_MESSAGE} bytes"
                )
            elif type(event) is http2.ConnectionTerminated:
                log.warning("closing a client connection: %s (%s)", event.detail, event.error.name)
                self.h2.go_away(event.error, event.reason)
                self._cancel_calls()
        self._send()

    # --- calls ---------------------------------------------------------------------------------

    def _dispatch(self, event: http2.RequestReceived[RequestHead]) -> None:
        """A whole request: parse it and run or queue its call."""
        sid, head = event.stream_id, event.head
        parsed = rpc.parse(self.server.routes, head, event.body)
        if isinstance(parsed, rpc.Refused):
            self._answer(sid, [], parsed.code, parsed.message)
            return
        route, request = parsed
        deadline = None if head.timeout is None else event.opened + head.timeout
        if deadline is not None and self.loop.time() >= deadline:
            self._answer(sid, [], Code.DEADLINE_EXCEEDED, "the deadline passed before the call started")
            return
        started = time.perf_counter()
        pool = route.where(request)
        if pool is None:
            self._complete(sid, route, request, started, rpc.run(route, request, head.metadata, self.server.errors))
            return
        if self.server.queued >= MAX_QUEUED:
            self._answer(sid, [], Code.RESOURCE_EXHAUSTED, f"{MAX_QUEUED} calls are waiting already")
            return
        self.server.queued += 1
        call = self.calls[sid] = _Call()
        call.work = future = self.server.pools[pool].submit(rpc.run, route, request, head.metadata, self.server.errors)
        loop = self.loop
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(self._done, sid, call, route, request, started, f))
        if deadline is not None:
            call.timer = loop.call_at(deadline, self._expire, sid, call)

    def _done(self, sid: int, call: _Call, route: Route, request: Any, started: float, future: Future) -> None:
        self.server.queued -= 1
        if future.cancelled() or self.calls.get(sid) is not call:
            return  # reset, timed out or gone with the connection
        del self.calls[sid]
        if call.timer is not None:
            call.timer.cancel()
        self._complete(sid, route, request, started, future.result())
        self._send()

    def _expire(self, sid: int, call: _Call) -> None:
        """The client's deadline passed: tell it so, and drop the work if it has not started."""
        if self.calls.get(sid) is not call:
            return
        del self.calls[sid]
        call.cancel()
        self._answer(sid, [], Code.DEADLINE_EXCEEDED, "the call did not finish before its deadline")
        self._send()

    def _complete(self, sid: int, route: Route, request: Any, started: float, result: rpc.Result) -> None:
        messages, code, message = result
        seconds = time.perf_counter() - started
        self.server.observe(route.name, seconds, code)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "rpc", extra=fields(method=route.name, key=route.describe(request), code=code.name, duration_s=seconds)
            )
        self._answer(sid, messages, code, message)

    def _answer(self, sid: int, messages: Iterable[bytes], code: Code, message: str) -> None:
        """A unary answer in one go when it fits, else as flow control lets it go."""
        if code is Code.OK and type(messages) is list and len(messages) == 1:
            m = messages[0]
            if self.h2.respond_whole(sid, rpc.RESPONSE_HEADERS, (rpc.MESSAGE_HEAD.pack(0, len(m)), m), rpc.OK_TRAILERS):
                return
        self.h2.respond(sid, rpc.RESPONSE_HEADERS, rpc.framed(messages, code, message, self.server.errors))


class GrpcServer:
    """Serves `routes` ("/package.Service/Method" -> Route) on a unix socket; a route's pool names
    one of `pools`."""

    def __init__(
        self,
        routes: dict[str, Route],
        pools: Mapping[str, Executor],
        errors: ErrorMapper,
        observe: Callable[[str, float, Code], None] = lambda method, seconds, code: None,
    ):
        unknown = {r.pool for r in routes.values() if r.pool is not None} - set(pools)  # place's: at the call
        if unknown:
            raise ValueError(f"routes name unknown pools {sorted(unknown)}")
        self.routes = {path.encode("latin-1"): route for path, route in routes.items()}
        self.pools = pools
        self.errors = errors
        self.observe = observe  # (method, seconds, code) after each call, for metrics
        self.connections: set[_Connection] = set()
        self.queued = 0  # calls submitted to the pools and not done
        self._server: asyncio.AbstractServer | None = None

    async def listen(self, path: str | None = None, sock: socket.socket | None = None) -> None:
        """Serve on a new socket at `path`, or on the listening `sock` (systemd's)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), path, sock=sock)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, tell clients to go away, let calls in flight finish (up to `grace`)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.go_away()
        deadline = time.monotonic() + grace
        while (self.queued or any(c.h2.streams for c in self.connections)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
