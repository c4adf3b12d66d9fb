"""A small gRPC server: HTTP/2 framing on a unix socket, unary and server-streaming calls.

Why not grpcio's server: its per-call cost in Python (completion-queue polling, a thread hop per
call, GIL hand-offs) made Stat and Mounts about half as fast as the Go original, and CRI stats
every snapshot every 10 s; grpcio's asyncio server and grpclib measured slower still. Here one
asyncio loop (uvloop's, in the daemon) parses frames in place, runs quick handlers inline and
sends blocking ones to bounded thread pools. HPACK decoding is the `hpack` library's, and a header
block made only of indexed fields (what a client sends again and again) is decoded once per
table state; responses use literal header fields without indexing, so no encoder state is kept,
and a unary answer goes out as one write. Scope: what gRPC clients (grpc-go in containerd, grpcio)
send to a unix socket: no TLS, no compression, no server push.

Hand-written, so it guards what a peer sends the way python-hyper's h2 does: every length,
window and count a peer controls is checked against a named limit below, a peer at fault gets
the RFC 9113 error (a GOAWAY for the connection, a RST_STREAM for one stream), streams move
through explicit states, received data counts against advertised windows that are replenished
only as requests are consumed, and a peer that does not read its replies stops being read.
This module knows nothing about snapshots; it gets routes.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import logging
import re
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import Any

import hpack

from addlower.core.codes import Code
from addlower.core.logformat import fields

log = logging.getLogger(__name__)

# Frame types and flags (RFC 9113, section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6


class H2Error(IntEnum):
    """HTTP/2 error codes (RFC 9113, section 7)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    ENHANCE_YOUR_CALM = 0xB


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
MIN_FRAME, MAX_FRAME_LIMIT = 16_384, 2**24 - 1  # the range of SETTINGS_MAX_FRAME_SIZE

# Limits: each bounds something a peer controls.
MAX_FRAME = 16_384  # frames we accept (we never raise SETTINGS_MAX_FRAME_SIZE)
MAX_HEADER_BLOCK = 64 << 10  # one header block, HEADERS and CONTINUATION frames together
# Request headers a handler may read (call_metadata()): containerd's namespace and lease, which a
# differ passes on when it writes to containerd's content store. Nothing else is kept.
KEPT_METADATA = frozenset({b"containerd-namespace", b"containerd-lease"})
MAX_MESSAGE = 4 << 20  # one request message (containerd's largest are label maps of a few kB)
STREAM_WINDOW = 1 << 20  # advertised per stream; extended while a message is still below MAX_MESSAGE
CONNECTION_WINDOW = 2 * MAX_MESSAGE  # all the request data one connection may have buffered here
MAX_STREAMS = 1024  # calls one connection may have open at once (advertised)
MAX_CONNECTIONS = 256  # open connections per server
MAX_QUEUED = 256  # calls waiting for or running in the thread pools, per server
PREFACE_TIMEOUT = 10.0  # seconds a new connection has to send the HTTP/2 preface
MAX_EARLY_RESETS = 100  # streams a peer may reset before their answer, per second ("rapid reset")

# grpc-timeout: up to 8 digits and a unit (gRPC over HTTP/2, "Timeout").
_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


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


_FRAME_HEAD = struct.Struct(">HBBBI")  # length (high 16 bits, low 8 bits), type, flags, stream


def frame_head(ftype: int, flags: int, stream: int, length: int) -> bytes:
    return _FRAME_HEAD.pack(length >> 8, length & 0xFF, ftype, flags, stream)


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return frame_head(ftype, flags, stream, len(payload)) + payload


# Bytes that are, alone, an HPACK indexed header field (index 1-126): a block made only of them
# leaves the decoder's dynamic table as it was, so its decoding can be remembered (see _Headers).
_INDEXED_FIELD_BYTES = bytes(range(0x81, 0xFF))
MAX_REMEMBERED_BLOCKS = 64  # header blocks remembered per connection


def _grpc_message(text: str) -> bytes:
    """Percent-encode a status message as gRPC requires."""
    return b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in text.encode())


def grpc_timeout(value: bytes) -> float | None:
    """Seconds from a grpc-timeout header value; None when it is not one."""
    found = _TIMEOUT.fullmatch(value)
    return int(found.group(1)) * _TIMEOUT_UNITS[found.group(2)] if found else None


RESPONSE_HEADERS = header_block([(b":status", b"200"), (b"content-type", b"application/grpc")])
OK_TRAILERS = header_block([(b"grpc-status", b"0")])
_MESSAGE_HEAD = struct.Struct(">BI")  # gRPC length-prefixed message: compressed flag, length


class _Headers:
    """HPACK decoding of request header blocks, down to what a call needs: `:path`,
    `grpc-timeout` and the KEPT_METADATA (containerd's namespace and lease, for a differ that
    writes to containerd's content store on the caller's behalf). A client that keeps calling
    sends the same few blocks of indexed fields (7 bytes for grpc-go); such a block cannot change
    the decoder's table, so what it decoded to is remembered until a block that can change the
    table arrives."""

    def __init__(self) -> None:
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_BLOCK)
        self.known: dict[bytes, tuple[bytes, float | None, Metadata]] = {}

    def decode(self, block: bytes) -> tuple[bytes, float | None, Metadata]:
        """(path, timeout in seconds or None, kept metadata); hpack.HPACKError for a bad block."""
        found = self.known.get(block)
        if found is not None:
            return found
        path, timeout, kept = b"", None, {}
        for name, value in self.decoder.decode(block, raw=True):  # always: HPACK state must stay in step
            if name == b":path":
                path = value
            elif name == b"grpc-timeout":
                timeout = grpc_timeout(value)
            elif name in KEPT_METADATA:
                kept[name.decode("latin-1")] = value.decode("latin-1")
        if block.translate(None, _INDEXED_FIELD_BYTES):
            self.known.clear()  # literals or a table size update: the table may have changed
        else:
            if len(self.known) >= MAX_REMEMBERED_BLOCKS:
                self.known.clear()
            self.known[block] = path, timeout, kept
        return path, timeout, kept


@dataclass(frozen=True)
class Route:
    """One method: how to parse its request, what answers it, and where to run it."""

    request: Any  # a protobuf message class
    handler: Callable[[Any], Any]  # request -> response (a message or its bytes), or an iterator of them
    streaming: bool = False
    pool: str | None = None  # the thread pool for calls that may take long; None: on the loop
    describe: Callable[[Any], str] = lambda request: ""  # for the per-call log line
    # Where a call runs when it depends on the request: decided on the loop (so quickly) before
    # the call starts; overrides `pool`.
    place: Callable[[Any], str | None] | None = None

    @functools.cached_property
    def name(self) -> str:
        """The method, for metrics and logs."""
        return self.handler.__name__


ErrorMapper = Callable[[BaseException], tuple[Code, str]]
Metadata = Mapping[str, str]  # the KEPT_METADATA a call came with

_metadata: contextvars.ContextVar[Metadata] = contextvars.ContextVar("metadata", default=MappingProxyType({}))


def call_metadata() -> Metadata:
    """The KEPT_METADATA of the call the running handler answers."""
    return _metadata.get()


class ConnectionFault(Exception):
    """The peer broke the protocol: the connection ends with a GOAWAY carrying `error`."""

    def __init__(self, error: H2Error, message: str):
        super().__init__(message)
        self.error = error


@dataclass(slots=True)
class Window:
    """A flow-control window (RFC 9113, 6.9): what may still be sent, or received, on the
    connection or one stream. Taking more than it holds, or growing it past 2^31-1, is the peer's
    flow-control error; the caller knows whether that ends the stream or the connection."""

    size: int

    def take(self, n: int) -> bool:
        """Count `n` bytes against it; False when they did not fit."""
        self.size -= n
        return self.size >= 0

    def give(self, n: int) -> bool:
        """Grow it by `n` (a WINDOW_UPDATE, a new initial size); False past 2^31-1."""
        self.size += n
        return self.size <= MAX_WINDOW


class State(enum.Enum):
    """A stream's life as the server sees it (RFC 9113, 5.1); closed streams are forgotten."""

    OPEN = "open"  # receiving the request
    HALF_CLOSED_REMOTE = "half-closed (remote)"  # the request is complete; the answer is on its way


class Received(enum.Enum):
    """What the peer sends on a stream that exists (HEADERS make it, in State.OPEN)."""

    DATA = "DATA"
    DATA_END = "DATA with END_STREAM"
    HEADERS_END = "a header block with END_STREAM"  # the opening one, or trailers
    HEADERS = "a header block without END_STREAM"  # on a stream that exists: never allowed


# A stream's transitions on what the peer sends. Anything else is the peer's error: a DATA frame
# resets the stream (STREAM_CLOSED: the request was complete), a header block ends the connection
# (PROTOCOL_ERROR). The server half-closes a stream itself when it answers an oversized request.
TRANSITIONS: dict[tuple[State, Received], State] = {
    (State.OPEN, Received.DATA): State.OPEN,
    (State.OPEN, Received.DATA_END): State.HALF_CLOSED_REMOTE,
    (State.OPEN, Received.HEADERS_END): State.HALF_CLOSED_REMOTE,
}


@dataclass(slots=True)
class _Stream:
    sid: int
    send_window: Window
    state: State = State.OPEN
    recv_window: Window = field(default_factory=lambda: Window(STREAM_WINDOW))
    held: int = 0  # bytes of this stream counted against the connection's receive window
    unacked: int = 0  # bytes received since the stream's window was last extended
    path: bytes = b""
    metadata: Metadata = field(default_factory=dict)
    deadline: float | None = None  # loop time
    body: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    more: Iterator[bytes] | None = None  # a streaming answer's messages not yet framed
    trailers: bytes | None = None
    answered: bool = False
    work: Future | None = None
    timer: asyncio.TimerHandle | None = None


class _Connection(asyncio.Protocol):
    def __init__(self, server: GrpcServer):
        self.server = server
        self.buf = bytearray()
        self.preface_seen = False
        self.headers = _Headers()
        self.streams: dict[int, _Stream] = {}
        self.send_window = Window(DEFAULT_WINDOW)
        self.recv_window = Window(CONNECTION_WINDOW)
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = MIN_FRAME
        self.last_stream = 0
        self.block = bytearray()  # the header block being received
        self.failed = False  # a connection error was sent (GOAWAY): the connection is done
        self.block_stream = 0  # its stream while CONTINUATION frames are due, else 0
        self.block_flags = 0  # END_STREAM of the HEADERS frame that opened it
        self.blocked: dict[int, None] = {}  # streams with output waiting for the connection window
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self.paused = False  # the peer is not reading what we write
        self.reading = False
        self.out = bytearray()
        self.preface_timer: asyncio.TimerHandle | None = None
        self.resets = 0  # early resets in the current second
        self.resets_since = 0.0

    # --- connection life -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.server.connections) >= MAX_CONNECTIONS:
            log.warning("refusing a connection: %d are open already", MAX_CONNECTIONS)
            transport.close()
            return
        self.server.connections.add(self)
        self.preface_timer = asyncio.get_running_loop().call_later(PREFACE_TIMEOUT, self._preface_overdue)
        settings = struct.pack(
            ">HIHIHI",
            SETTINGS_INITIAL_WINDOW_SIZE,
            STREAM_WINDOW,
            SETTINGS_MAX_CONCURRENT_STREAMS,
            MAX_STREAMS,
            SETTINGS_MAX_HEADER_LIST_SIZE,
            MAX_HEADER_BLOCK,
        )
        self._write(
            frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", CONNECTION_WINDOW - DEFAULT_WINDOW))
        )

    def _preface_overdue(self) -> None:
        if not self.preface_seen and self.transport is not None:
            log.warning("closing a client connection: no HTTP/2 preface within %.0fs", PREFACE_TIMEOUT)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.preface_timer is not None:
            self.preface_timer.cancel()
        for stream in list(self.streams.values()):
            self._drop(stream)
        self.transport = None

    def pause_writing(self) -> None:
        """The peer reads too slowly: read nothing more from it until its replies drain."""
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()
        self._flush_blocked()

    def _write(self, data: bytes) -> None:
        """Queue while a read is being handled (one write per read, frames in order), else send."""
        if self.reading:
            self.out += data
        elif self.transport is not None and data:
            self.transport.write(data)

    def go_away(self, error: H2Error = H2Error.NO_ERROR, reason: str = "") -> None:
        """Refuse new streams; close now on an error, else once the streams in flight are done."""
        self._write(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream, error) + reason.encode()[:256]))
        self.closing = True
        if error:
            self.failed = True  # nothing more is read: what follows an error means nothing
            for stream in list(self.streams.values()):
                self._drop(stream)
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.closing and not self.streams and self.transport is not None and not self.reading:
            self.transport.close()

    # --- reading -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.failed:  # bytes the transport had read before it closed
            return
        if self.buf:
            self.buf += data
            data = bytes(self.buf)
        self.reading = True
        try:
            self._read_frames(data)
        except ConnectionFault as exc:
            log.warning("closing a client connection: %s (%s)", exc, exc.error.name)
            self.go_away(exc.error, str(exc))
        except hpack.HPACKError as exc:
            log.warning("closing a client connection: bad header block: %s", exc)
            self.go_away(H2Error.COMPRESSION_ERROR, "bad header block")
        finally:
            self.reading = False
            out, self.out = self.out, bytearray()
            self._write(bytes(out))
            self._close_if_idle()

    def _read_frames(self, data: bytes) -> None:
        """Handle the whole frames in `data` (what was held back, then what arrived); hold back
        the rest in self.buf."""
        pos, end = 0, len(data)
        self.buf = bytearray()
        if not self.preface_seen:
            if end < len(PREFACE):
                if not PREFACE.startswith(data):
                    raise ConnectionFault(H2Error.PROTOCOL_ERROR, "the client did not start with the HTTP/2 preface")
                self.buf = bytearray(data)
                return
            if not data.startswith(PREFACE):
                raise ConnectionFault(H2Error.PROTOCOL_ERROR, "the client did not start with the HTTP/2 preface")
            pos = len(PREFACE)
            self.preface_seen = True
            if self.preface_timer is not None:
                self.preface_timer.cancel()
        while end - pos >= 9 and self.transport is not None:
            high, low, ftype, flags, sid = _FRAME_HEAD.unpack_from(data, pos)
            length = high << 8 | low
            if length > MAX_FRAME:
                raise ConnectionFault(H2Error.FRAME_SIZE_ERROR, f"a frame of {length} bytes, more than {MAX_FRAME}")
            start = pos + 9
            if end - start < length:
                break
            pos = start + length
            self._on_frame(ftype, flags, sid & 0x7FFFFFFF, data[start:pos])
        if pos < end:
            self.buf = bytearray(data[pos:])

    def _on_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self.block_stream and ftype != CONTINUATION:
            raise ConnectionFault(H2Error.PROTOCOL_ERROR, "expected a CONTINUATION frame")
        handler = self._FRAMES.get(ftype)
        if handler is not None:  # unknown frame types are ignored, as the RFC asks
            handler(self, flags, sid, payload)

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0 or sid > self.last_stream:
            raise ConnectionFault(H2Error.PROTOCOL_ERROR, f"DATA on {'stream 0' if sid == 0 else 'an idle stream'}")
        if not self.recv_window.take(len(payload)):
            raise ConnectionFault(H2Error.FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
        data = self._unpad(flags, payload)
        stream = self.streams.get(sid)
        if stream is None:  # answered or reset meanwhile: nothing will consume it
            self._credit(len(payload))
            return
        error = self._receive(stream, Received.DATA_END if flags & END_STREAM else Received.DATA)
        if error is not None:
            self._credit(len(payload))
            self._reset(stream, error)
            return
        fits = stream.recv_window.take(len(payload))
        stream.held += len(payload)
        if not fits:
            self._reset(stream, H2Error.FLOW_CONTROL_ERROR)
            return
        if flags & END_STREAM and not stream.body:
            self._dispatch(stream, data)  # the usual request: one message in one DATA frame
            return
        stream.body += data
        if len(stream.body) > MAX_MESSAGE + 5:
            stream.state = State.HALF_CLOSED_REMOTE
            self._release(stream)
            self._finish(stream, [], Code.RESOURCE_EXHAUSTED, f"request larger than {MAX_MESSAGE} bytes")
            return
        if flags & END_STREAM:
            self._dispatch(stream, bytes(stream.body))
            return
        stream.unacked += len(payload)
        if stream.unacked >= STREAM_WINDOW // 2:  # let a message grow (MAX_MESSAGE bounds it)
            self._write(frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", stream.unacked)))
            stream.recv_window.give(stream.unacked)
            stream.unacked = 0

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        payload = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise ConnectionFault(H2Error.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            payload = payload[5:]
        if sid == 0 or sid % 2 == 0:
            raise ConnectionFault(H2Error.PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        if sid <= self.last_stream and sid not in self.streams:
            raise ConnectionFault(H2Error.STREAM_CLOSED, f"HEADERS on closed stream {sid}")
        self.last_stream = max(self.last_stream, sid)
        self.block = bytearray(payload)
        self.block_flags = flags & END_STREAM
        self._header_fragment(sid, flags)

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if not self.block_stream or sid != self.block_stream:
            raise ConnectionFault(H2Error.PROTOCOL_ERROR, "CONTINUATION without a header block on its stream")
        if len(self.block) + len(payload) > MAX_HEADER_BLOCK:  # checked before it is held
            self.block = bytearray()
            raise ConnectionFault(H2Error.ENHANCE_YOUR_CALM, f"a header block of more than {MAX_HEADER_BLOCK} bytes")
        self.block += payload
        self._header_fragment(sid, flags)

    def _header_fragment(self, sid: int, flags: int) -> None:
        if not flags & END_HEADERS:
            self.block_stream = sid
            return
        self.block_stream = 0
        path, timeout, metadata = self.headers.decode(bytes(self.block))
        self.block = bytearray()
        existing = self.streams.get(sid)
        if existing is not None:  # trailers after the request body: end of the request
            self._receive(existing, Received.HEADERS_END if self.block_flags else Received.HEADERS)
            self._dispatch(existing, bytes(existing.body))
            return
        if self.closing or len(self.streams) >= MAX_STREAMS:  # as advertised
            self._write(frame(RST_STREAM, 0, sid, struct.pack(">I", H2Error.REFUSED_STREAM)))
            return
        stream = self.streams[sid] = _Stream(sid, Window(self.peer_initial_window), path=path, metadata=metadata)
        if timeout is not None:
            stream.deadline = asyncio.get_running_loop().time() + timeout
        if self.block_flags:
            self._receive(stream, Received.HEADERS_END)
            self._dispatch(stream, b"")

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionFault(H2Error.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionFault(H2Error.FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ConnectionFault(H2Error.FRAME_SIZE_ERROR, f"SETTINGS of {len(payload)} bytes")
        for i in range(0, len(payload), 6):
            ident, value = struct.unpack(">HI", payload[i : i + 6])
            if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionFault(H2Error.FLOW_CONTROL_ERROR, f"initial window {value}")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    if not stream.send_window.give(delta):
                        raise ConnectionFault(H2Error.FLOW_CONTROL_ERROR, "a stream window beyond 2^31-1")
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                if not MIN_FRAME <= value <= MAX_FRAME_LIMIT:
                    raise ConnectionFault(H2Error.PROTOCOL_ERROR, f"max frame size {value}")
                self.peer_max_frame = value
            elif ident == SETTINGS_ENABLE_PUSH and value > 1:
                raise ConnectionFault(H2Error.PROTOCOL_ERROR, f"enable push {value}")
        self._write(frame(SETTINGS, ACK, 0))
        for stream in list(self.streams.values()):  # a larger initial window may free some output
            if stream.trailers is not None:
                self._flush(stream)

    def _on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionFault(H2Error.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ConnectionFault(H2Error.FRAME_SIZE_ERROR, f"PING of {len(payload)} bytes")
        if not flags & ACK:
            self._write(frame(PING, ACK, 0, payload))

    def _on_window_update(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionFault(H2Error.FRAME_SIZE_ERROR, f"WINDOW_UPDATE of {len(payload)} bytes")
        increment = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise ConnectionFault(H2Error.PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            if not self.send_window.give(increment):
                raise ConnectionFault(H2Error.FLOW_CONTROL_ERROR, "the connection window beyond 2^31-1")
            self._flush_blocked()
            return
        if sid > self.last_stream:
            raise ConnectionFault(H2Error.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
        stream = self.streams.get(sid)
        if stream is None:
            return
        if increment == 0:
            self._reset(stream, H2Error.PROTOCOL_ERROR)
            return
        if not stream.send_window.give(increment):
            self._reset(stream, H2Error.FLOW_CONTROL_ERROR)
            return
        self._flush(stream)

    def _on_rst_stream(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionFault(H2Error.FRAME_SIZE_ERROR, f"RST_STREAM of {len(payload)} bytes")
        if sid == 0 or sid > self.last_stream:
            raise ConnectionFault(H2Error.PROTOCOL_ERROR, "RST_STREAM on stream 0 or an idle stream")
        stream = self.streams.get(sid)
        if stream is not None:
            now = asyncio.get_running_loop().time()
            if now - self.resets_since >= 1.0:
                self.resets, self.resets_since = 0, now
            self.resets += 1
            if self.resets > MAX_EARLY_RESETS:
                raise ConnectionFault(
                    H2Error.ENHANCE_YOUR_CALM, f"more than {MAX_EARLY_RESETS} streams reset in a second"
                )
            self._drop(stream)  # the client gave up: its queued work goes too
        self._close_if_idle()

    def _on_priority(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 5:
            raise ConnectionFault(H2Error.FRAME_SIZE_ERROR, f"PRIORITY of {len(payload)} bytes")

    def _on_goaway(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionFault(H2Error.PROTOCOL_ERROR, f"GOAWAY on stream {sid}")
        if len(payload) < 8:
            raise ConnectionFault(H2Error.FRAME_SIZE_ERROR, f"GOAWAY of {len(payload)} bytes")
        self.closing = True
        self._close_if_idle()

    def _on_push_promise(self, flags: int, sid: int, payload: bytes) -> None:
        raise ConnectionFault(H2Error.PROTOCOL_ERROR, "clients must not push")

    _FRAMES: dict[int, Callable[[_Connection, int, int, bytes], None]] = {
        DATA: _on_data,
        HEADERS: _on_headers,
        CONTINUATION: _on_continuation,
        SETTINGS: _on_settings,
        PING: _on_ping,
        WINDOW_UPDATE: _on_window_update,
        RST_STREAM: _on_rst_stream,
        PRIORITY: _on_priority,
        GOAWAY: _on_goaway,
        PUSH_PROMISE: _on_push_promise,
    }

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise ConnectionFault(H2Error.PROTOCOL_ERROR, "padding as long as the frame")
        return payload[1 : len(payload) - payload[0]]

    # --- flow control and stream ends ------------------------------------------------------------

    @staticmethod
    def _receive(stream: _Stream, what: Received) -> H2Error | None:
        """Move `stream` on what the peer sent (TRANSITIONS); the stream error to reset it with,
        or ConnectionFault when that ends the connection."""
        state = TRANSITIONS.get((stream.state, what))
        if state is not None:
            stream.state = state
            return None
        if what in (Received.DATA, Received.DATA_END):
            return H2Error.STREAM_CLOSED
        raise ConnectionFault(H2Error.PROTOCOL_ERROR, f"{what.value} on stream {stream.sid}, {stream.state.value}")

    def _credit(self, n: int) -> None:
        """Give `n` bytes back to the peer's connection window: they were consumed or dropped."""
        if n:
            self.recv_window.give(n)
            self._write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", n)))

    def _release(self, stream: _Stream) -> None:
        """The stream's request data is consumed (or dropped): credit the connection for it."""
        if stream.body:
            stream.body = bytearray()
        self._credit(stream.held)
        stream.held = 0

    def _drop(self, stream: _Stream) -> None:
        """Forget a stream: cancel its queued work and timer, credit its data."""
        self.streams.pop(stream.sid, None)
        self.blocked.pop(stream.sid, None)
        if stream.work is not None:
            stream.work.cancel()  # a call not yet started never runs
        if stream.timer is not None:
            stream.timer.cancel()
        if self.transport is not None:
            self._release(stream)

    def _reset(self, stream: _Stream, error: H2Error) -> None:
        self._write(frame(RST_STREAM, 0, stream.sid, struct.pack(">I", error)))
        self._drop(stream)

    # --- calls ---------------------------------------------------------------------------------

    def _dispatch(self, stream: _Stream, body: bytes) -> None:
        """The request (`body`, its DATA) is complete: parse it and run or queue its call."""
        self._release(stream)
        route = self.server.routes.get(stream.path)
        if route is None:
            self._finish(stream, [], Code.UNIMPLEMENTED, f"unknown method {stream.path.decode('latin-1')}")
            return
        if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            self._finish(stream, [], Code.INTERNAL, "expected one uncompressed gRPC message")
            return
        try:
            request = route.request.FromString(body[5:])
        except Exception as exc:  # protobuf's DecodeError and friends
            self._finish(stream, [], Code.INTERNAL, f"cannot parse request: {exc}")
            return
        loop = asyncio.get_running_loop()
        if stream.deadline is not None and loop.time() >= stream.deadline:
            self._finish(stream, [], Code.DEADLINE_EXCEEDED, "the deadline passed before the call started")
            return
        started = time.perf_counter()
        pool = route.pool if route.place is None else self.server.place(route, request)
        if pool is None:
            self._complete(stream, route, request, started, self.server.call(route, request, stream.metadata))
            return
        if self.server.queued >= MAX_QUEUED:
            self._finish(stream, [], Code.RESOURCE_EXHAUSTED, f"{MAX_QUEUED} calls are waiting already")
            return
        self.server.queued += 1
        stream.work = future = self.server.pools[pool].submit(self.server.call, route, request, stream.metadata)
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(self._done, stream, route, request, started, f))
        if stream.deadline is not None:
            stream.timer = loop.call_at(stream.deadline, self._expire, stream)

    def _done(self, stream: _Stream, route: Route, request: Any, started: float, future: Future) -> None:
        self.server.queued -= 1
        if future.cancelled() or self.streams.get(stream.sid) is not stream:
            return  # reset, timed out or gone with the connection
        self._complete(stream, route, request, started, future.result())

    def _expire(self, stream: _Stream) -> None:
        """The client's deadline passed: tell it so, and drop the work if it has not started."""
        if stream.work is not None:
            stream.work.cancel()
        self._finish(stream, [], Code.DEADLINE_EXCEEDED, "the call did not finish before its deadline")

    def _complete(
        self, stream: _Stream, route: Route, request: Any, started: float, result: tuple[Iterable[bytes], Code, str]
    ) -> None:
        messages, code, message = result
        seconds = time.perf_counter() - started
        self.server.observe(route.name, seconds, code)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "rpc", extra=fields(method=route.name, key=route.describe(request), code=code.name, duration_s=seconds)
            )
        self._finish(stream, messages, code, message)

    def _finish(self, stream: _Stream, messages: Iterable[bytes], code: Code, message: str) -> None:
        if stream.answered or self.streams.get(stream.sid) is not stream:
            return
        stream.answered = True
        if stream.timer is not None:
            stream.timer.cancel()
        if code is Code.OK and type(messages) is list and len(messages) == 1 and self._send_whole(stream, messages[0]):
            return
        self._write(frame(HEADERS, END_HEADERS, stream.sid, RESPONSE_HEADERS))
        stream.more = iter(messages)
        stream.trailers = self._trailers(code, message)
        self._flush(stream)

    def _send_whole(self, stream: _Stream, message: bytes) -> bool:
        """A unary answer as one write (headers, one DATA frame, trailers), when the windows and
        the peer's frame size take it at once; False (nothing sent) otherwise."""
        n = len(message) + 5
        if self.paused or n > self.send_window.size or n > stream.send_window.size or n > self.peer_max_frame:
            return False
        sid = stream.sid
        self._write(
            b"".join(
                (
                    frame_head(HEADERS, END_HEADERS, sid, len(RESPONSE_HEADERS)),
                    RESPONSE_HEADERS,
                    frame_head(DATA, 0, sid, n),
                    _MESSAGE_HEAD.pack(0, n - 5),
                    message,
                    frame_head(HEADERS, END_HEADERS | END_STREAM, sid, len(OK_TRAILERS)),
                    OK_TRAILERS,
                )
            )
        )
        self.send_window.size -= n  # checked above: it fits
        stream.send_window.size -= n
        self._drop(stream)
        self._close_if_idle()
        return True

    @staticmethod
    def _trailers(code: Code, message: str) -> bytes:
        if code == Code.OK:
            return OK_TRAILERS
        return header_block([(b"grpc-status", str(int(code)).encode()), (b"grpc-message", _grpc_message(message))])

    def _next_message(self, stream: _Stream) -> bool:
        """Frame the answer's next message into the outbox; False when there is none."""
        assert stream.more is not None
        try:
            m = next(stream.more)
        except StopIteration:
            stream.more = None
            return False
        except Exception as exc:  # a streaming handler failed midway: its status goes in the trailers
            code, message = self.server.errors(exc)
            stream.more, stream.trailers = None, self._trailers(code, message)
            return False
        stream.outbox += _MESSAGE_HEAD.pack(0, len(m)) + m
        return True

    def _flush(self, stream: _Stream) -> None:
        """Send what flow control allows of the stream's answer, pulling a streaming answer's
        messages only as they can go out; trailers once all is out."""
        if stream.trailers is None or self.streams.get(stream.sid) is not stream:
            return
        out = bytearray()
        while True:
            open_window = min(self.send_window.size, stream.send_window.size) > 0 and not self.paused
            if not stream.outbox and (stream.more is None or not open_window or not self._next_message(stream)):
                break
            n = min(len(stream.outbox), self.send_window.size, stream.send_window.size, self.peer_max_frame)
            if n <= 0:
                break
            out += frame(DATA, 0, stream.sid, bytes(stream.outbox[:n]))
            del stream.outbox[:n]
            self.send_window.size -= n  # n is at most what both hold
            stream.send_window.size -= n
        if not stream.outbox and stream.more is None:
            out += frame(HEADERS, END_HEADERS | END_STREAM, stream.sid, stream.trailers)
            self._drop(stream)
        elif self.send_window.size <= 0 or self.paused:
            self.blocked[stream.sid] = None  # resumed by a connection WINDOW_UPDATE or resume_writing
        self._write(bytes(out))
        self._close_if_idle()

    def _flush_blocked(self) -> None:
        """Streams waiting for the connection window, oldest first, while it lasts: O(1) per
        WINDOW_UPDATE when nothing can move, whatever the number of streams."""
        while self.blocked and self.send_window.size > 0 and not self.paused:
            sid = next(iter(self.blocked))
            del self.blocked[sid]
            stream = self.streams.get(sid)
            if stream is not None:
                self._flush(stream)


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

    @staticmethod
    def place(route: Route, request: Any) -> str | None:
        """The pool (None: the loop) `route` picks for `request`; the loop when picking fails (the
        handler then answers with the error)."""
        assert route.place is not None
        try:
            return route.place(request)
        except Exception:
            return None

    def call(self, route: Route, request: Any, metadata: Metadata) -> tuple[Iterable[bytes], Code, str]:
        """Run a handler; returns its serialized answer (a list of one message, or lazily an
        iterator for streaming routes) and the status (code, message)."""
        token = _metadata.set(metadata)
        try:
            result = route.handler(request)
            if route.streaming:
                return (r if isinstance(r, bytes) else r.SerializeToString() for r in result), Code.OK, ""
            return [result if isinstance(result, bytes) else result.SerializeToString()], Code.OK, ""
        except Exception as exc:
            code, message = self.errors(exc)
            return iter(()), code, message
        finally:
            _metadata.reset(token)

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
        while (self.queued or any(c.streams for c in self.connections)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
