"""A small gRPC server: HTTP/2 framing on a unix socket, unary and server-streaming calls.

Why not grpcio's server: its per-call cost in Python (completion-queue polling, a thread hop per
call, GIL hand-offs) made Stat and Mounts about half as fast as the Go original, and CRI stats
every snapshot every 10 s. Here one asyncio loop parses frames, runs quick handlers inline and
sends blocking ones (tree walks, deletions) to a thread pool. HPACK decoding is the `hpack`
library's; responses use literal header fields without indexing, so no encoder state is kept.
Scope: what gRPC clients (grpc-go in containerd, grpcio) send to a unix socket: no TLS, no
compression, no server push. This module knows nothing about snapshots; it gets routes.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, Iterable

import hpack

log = logging.getLogger(__name__)

# Frame types and flags (RFC 9113, section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
PROTOCOL_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 0x1, 0x7, 0x9

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65_535
RECEIVE_WINDOW = 1 << 20  # what we let peers send before we acknowledge
MAX_FRAME = 16_384
MAX_MESSAGE = 16 << 20  # largest request message accepted
MAX_STREAMS = 1024  # calls one connection may have open at once



class Code(IntEnum):
    """gRPC status codes (the numbers are the wire protocol's)."""

    OK = 0
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14



def _hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = [limit]
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def header_block(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """HPACK literal fields without indexing: valid for any decoder state."""
    return b"".join(b"\x00" + _hpack_int(len(k), 7) + k + _hpack_int(len(v), 7) + v for k, v in headers)


def _frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((ftype, flags)) + struct.pack(">I", stream) + payload


def _grpc_message(text: str) -> bytes:
    """Percent-encode a status message as gRPC requires."""
    return b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in text.encode())


RESPONSE_HEADERS = header_block([(b":status", b"200"), (b"content-type", b"application/grpc")])
OK_TRAILERS = header_block([(b"grpc-status", b"0")])


@dataclass(frozen=True)
class Route:
    """One method: how to parse its request, what answers it, and where to run it."""

    request: Any  # a protobuf message class
    handler: Callable[[Any], Any]  # request -> response (a message or its bytes), or an iterable of them
    streaming: bool = False
    blocking: bool = False  # may take long (walks, deletions): run in the thread pool
    describe: Callable[[Any], str] = lambda request: ""  # for the per-call log line


ErrorMapper = Callable[[BaseException], tuple[Code, str]]


@dataclass
class _Stream:
    window: int
    path: bytes = b""
    header_block: bytearray = field(default_factory=bytearray)
    body: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    trailers: bytes | None = None
    answered: bool = False


class _Connection(asyncio.Protocol):
    def __init__(self, server: "GrpcServer"):
        self.server = server
        self.buf = bytearray()
        self.preface_seen = False
        self.decoder = hpack.Decoder()
        self.streams: dict[int, _Stream] = {}
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = MAX_FRAME
        self.last_stream = 0
        self.continuation_of = 0  # the stream whose header block continues, if any
        self.continued_flags = 0  # END_STREAM of the HEADERS frame being continued
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self.reading = False
        self.out = bytearray()

    # --- connection life -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        settings = struct.pack(">HIHI", SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW,
                               SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS)
        self._write(_frame(SETTINGS, 0, 0, settings)
                    + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", RECEIVE_WINDOW - DEFAULT_WINDOW)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.streams.clear()
        self.transport = None

    def _write(self, data: bytes) -> None:
        """Queue while a read is being handled (one write per read, frames in order), else send."""
        if self.reading:
            self.out += data
        elif self.transport is not None and data:
            self.transport.write(data)

    def go_away(self, error: int = 0) -> None:
        """Refuse new streams; close now on an error, else once the streams in flight are done."""
        self._write(_frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream, error)))
        self.closing = True
        if error:
            self.streams.clear()
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.closing and not self.streams and self.transport is not None and not self.reading:
            self.transport.close()

    # --- reading -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.reading = True
        try:
            self._read_frames()
        except (ConnectionError, hpack.HPACKError, struct.error, IndexError, KeyError) as exc:
            log.warning("closing a client connection: %s", exc)
            self.go_away(COMPRESSION_ERROR if isinstance(exc, hpack.HPACKError) else PROTOCOL_ERROR)
        finally:
            self.reading = False
            out, self.out = self.out, bytearray()
            self._write(bytes(out))
            self._close_if_idle()

    def _read_frames(self) -> None:
        if not self.preface_seen:
            if len(self.buf) < len(PREFACE):
                return
            if self.buf[: len(PREFACE)] != PREFACE:
                raise ConnectionError("the client did not start with the HTTP/2 preface")
            del self.buf[: len(PREFACE)]
            self.preface_seen = True
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[0:3], "big")
            if length > MAX_FRAME:
                raise ConnectionError(f"frame of {length} bytes exceeds {MAX_FRAME}")
            if len(self.buf) < 9 + length:
                break
            ftype, flags = self.buf[3], self.buf[4]
            stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(self.buf[9 : 9 + length])
            del self.buf[: 9 + length]
            self._on_frame(ftype, flags, stream, payload)

    def _on_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self.continuation_of and ftype != CONTINUATION:
            raise ConnectionError("expected a CONTINUATION frame")
        if ftype == DATA:
            self._on_data(flags, sid, self._unpad(flags, payload), len(payload))
        elif ftype == HEADERS:
            payload = self._unpad(flags, payload)
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            if sid % 2 == 0 or sid <= self.last_stream:
                raise ConnectionError(f"bad stream id {sid}")
            self.last_stream = sid
            stream = self.streams[sid] = _Stream(window=self.peer_initial_window)
            stream.header_block += payload
            self._headers_frame_done(sid, flags)
        elif ftype == CONTINUATION:
            if sid != self.continuation_of:
                raise ConnectionError("CONTINUATION on the wrong stream")
            self.streams[sid].header_block += payload
            self._headers_frame_done(sid, self.continued_flags | (flags & END_HEADERS))
        elif ftype == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
                self._write(_frame(SETTINGS, ACK, 0))
        elif ftype == PING:
            if not flags & ACK:
                self._write(_frame(PING, ACK, 0, payload))
        elif ftype == WINDOW_UPDATE:
            increment = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
            if sid == 0:
                self.send_window += increment
                for stream_id in list(self.streams):
                    self._flush(stream_id)
            elif sid in self.streams:
                self.streams[sid].window += increment
                self._flush(sid)
        elif ftype == RST_STREAM:
            self.streams.pop(sid, None)
            self._close_if_idle()
        elif ftype == GOAWAY:
            self.closing = True
            self._close_if_idle()
        elif ftype == PUSH_PROMISE:
            raise ConnectionError("clients must not push")
        # PRIORITY and unknown frame types are ignored, as the RFC asks.

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if flags & PADDED:
            pad = payload[0]
            return payload[1 : len(payload) - pad]
        return payload

    def _on_settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - len(payload) % 6, 6):
            ident, value = struct.unpack(">HI", payload[i : i + 6])
            if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.window += delta
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                self.peer_max_frame = value

    def _headers_frame_done(self, sid: int, flags: int) -> None:
        if not flags & END_HEADERS:
            self.continuation_of, self.continued_flags = sid, flags & END_STREAM
            return
        self.continuation_of = 0
        stream = self.streams[sid]
        headers = self.decoder.decode(bytes(stream.header_block), raw=True)
        stream.header_block.clear()
        if len(self.streams) > MAX_STREAMS:  # as advertised; decoded all the same, to keep HPACK in step
            del self.streams[sid]
            self._write(_frame(RST_STREAM, 0, sid, struct.pack(">I", REFUSED_STREAM)))
            return
        stream.path = next((v for k, v in headers if k == b":path"), b"")
        if flags & END_STREAM:
            self._dispatch(sid, stream)

    def _on_data(self, flags: int, sid: int, data: bytes, flow_len: int) -> None:
        stream = self.streams.get(sid)
        if flow_len:
            self._write(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", flow_len)))
            if stream is not None and not flags & END_STREAM:
                self._write(_frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", flow_len)))
        if stream is None:  # reset by the client meanwhile
            return
        if len(stream.body) + len(data) > MAX_MESSAGE + 5:
            self._finish(sid, [], Code.RESOURCE_EXHAUSTED, f"request larger than {MAX_MESSAGE} bytes")
            return
        stream.body += data
        if flags & END_STREAM:
            self._dispatch(sid, stream)

    # --- calls ---------------------------------------------------------------------------------

    def _dispatch(self, sid: int, stream: _Stream) -> None:
        route = self.server.routes.get(stream.path.decode("latin-1"))
        if route is None:
            self._finish(sid, [], Code.UNIMPLEMENTED, f"unknown method {stream.path.decode('latin-1')}")
            return
        body = stream.body
        if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            self._finish(sid, [], Code.INTERNAL, "expected one uncompressed gRPC message")
            return
        try:
            request = route.request.FromString(bytes(body[5:]))
        except Exception as exc:  # protobuf's DecodeError and friends
            self._finish(sid, [], Code.INTERNAL, f"cannot parse request: {exc}")
            return
        started = time.perf_counter()
        if not route.blocking:
            self._complete(sid, route, request, started, *self.server.call(route, request))
            return
        self.server.inflight += 1
        future = asyncio.get_running_loop().run_in_executor(self.server.executor, self.server.call, route, request)
        future.add_done_callback(lambda f: self._complete(sid, route, request, started, *f.result()))

    def _complete(self, sid: int, route: Route, request: Any, started: float,
                  messages: list[bytes], code: Code, message: str) -> None:
        if route.blocking:
            self.server.inflight -= 1
        seconds = time.perf_counter() - started
        self.server.observe(route.handler.__name__, seconds, code.name)
        log.debug("rpc method=%s key=%s duration=%.6fs code=%s", route.handler.__name__,
                  route.describe(request), seconds, code.name)
        self._finish(sid, messages, code, message)

    def _finish(self, sid: int, messages: list[bytes], code: Code, message: str) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.answered:
            return
        stream.answered = True
        self._write(_frame(HEADERS, END_HEADERS, sid, RESPONSE_HEADERS))
        for m in messages:
            stream.outbox += b"\x00" + struct.pack(">I", len(m)) + m
        if code == Code.OK:
            stream.trailers = OK_TRAILERS
        else:
            stream.trailers = header_block([(b"grpc-status", str(int(code)).encode()),
                                            (b"grpc-message", _grpc_message(message))])
        self._flush(sid)

    def _flush(self, sid: int) -> None:
        """Send what flow control allows of the stream's response; trailers once all is out."""
        stream = self.streams.get(sid)
        if stream is None or stream.trailers is None:
            return
        out = bytearray()
        while stream.outbox:
            n = min(len(stream.outbox), self.send_window, stream.window, self.peer_max_frame)
            if n <= 0:
                break
            out += _frame(DATA, 0, sid, bytes(stream.outbox[:n]))
            del stream.outbox[:n]
            self.send_window -= n
            stream.window -= n
        if not stream.outbox:
            out += _frame(HEADERS, END_HEADERS | END_STREAM, sid, stream.trailers)
            del self.streams[sid]
        self._write(bytes(out))
        self._close_if_idle()


class GrpcServer:
    """Serves `routes` ("/package.Service/Method" -> Route) on a unix socket."""

    def __init__(self, routes: dict[str, Route], executor: Executor, errors: ErrorMapper,
                 observe: Callable[[str, float, str], None] = lambda method, seconds, code: None):
        self.routes = routes
        self.executor = executor
        self.errors = errors
        self.observe = observe  # (method, seconds, code name) after each call, for metrics
        self.connections: set[_Connection] = set()
        self.inflight = 0
        self._server: asyncio.AbstractServer | None = None

    def call(self, route: Route, request: Any) -> tuple[list[bytes], Code, str]:
        """Run a handler; returns the serialized responses and the status (code, message)."""
        try:
            result = route.handler(request)
            responses = list(result) if route.streaming else [result]
            return [r if isinstance(r, bytes) else r.SerializeToString() for r in responses], Code.OK, ""
        except Exception as exc:
            code, message = self.errors(exc)
            return [], code, message

    async def listen(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), path)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, tell clients to go away, let calls in flight finish (up to `grace`)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.go_away()
        deadline = time.monotonic() + grace
        while (self.inflight or any(c.streams for c in self.connections)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
