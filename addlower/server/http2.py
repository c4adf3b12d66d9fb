"""HTTP/2, the server's side of one connection, with no I/O (built like python-hyper's h2): the
peer's bytes go in through `Connection.receive`, which returns events; answers go in through
`respond`; what to send collects until `data_to_send`. Time comes from a clock the caller passes.

Scope: what gRPC clients (grpc-go in containerd, grpcio) send to a unix socket: requests whose
body is buffered whole, answers that may stream; no TLS, no server push, no priorities.

It guards what a peer sends the way h2 does: every length, window and count a peer controls is
checked against a named limit below; a peer at fault gets the RFC 9113 error (a GOAWAY for the
connection, a RST_STREAM for one stream); a stream moves only as TRANSITIONS says; received data
counts against advertised windows that are given back only as requests are consumed. HPACK
decoding is the `hpack` library's; a header block made only of indexed fields (what a client sends
again and again) is decoded once per table state.

Never imports asyncio, sockets, threads, or anything of addlower: `rpc` (gRPC on top of these
streams) and `grpcserver` (the asyncio adapter) sit above it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Generic, TypeVar

import hpack

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
STREAM_WINDOW = 1 << 20  # advertised per stream; extended while a request is below the caller's max_body
CONNECTION_WINDOW = 8 << 20  # all the request data one connection may have buffered here
MAX_STREAMS = 1024  # streams one connection may have open at once (advertised)
MAX_EARLY_RESETS = 100  # streams a peer may reset before their answer, per second ("rapid reset")
MAX_REMEMBERED_BLOCKS = 64  # decoded header blocks remembered per connection


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
    """HPACK literal fields without indexing: valid for any decoder state, so answers keep no
    encoder state."""
    return b"".join(b"\x00" + _hpack_int(len(k), 7) + k + _hpack_int(len(v), 7) + v for k, v in headers)


_FRAME_HEAD = struct.Struct(">HBBBI")  # length (high 16 bits, low 8 bits), type, flags, stream


def frame_head(ftype: int, flags: int, stream: int, length: int) -> bytes:
    return _FRAME_HEAD.pack(length >> 8, length & 0xFF, ftype, flags, stream)


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return frame_head(ftype, flags, stream, len(payload)) + payload


# Bytes that are, alone, an HPACK indexed header field (index 1-126): a block made only of them
# leaves the decoder's dynamic table as it was, so its decoding can be remembered.
_INDEXED_FIELD_BYTES = bytes(range(0x81, 0xFF))

Head = TypeVar("Head")  # what the layer above makes of a request's header fields


class _Headers(Generic[Head]):
    """HPACK decoding of request header blocks, down to the `wanted` fields, which `make` turns
    into the layer above's head. A client that keeps calling sends the same few blocks of indexed
    fields (7 bytes for grpc-go); such a block cannot change the decoder's table, so what it
    decoded to is remembered until a block that can change the table arrives."""

    def __init__(self, wanted: frozenset[bytes], make: Callable[[dict[bytes, bytes]], Head]) -> None:
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_BLOCK)
        self.wanted = wanted
        self.make = make
        self.known: dict[bytes, Head] = {}

    def decode(self, block: bytes) -> Head:
        """The head of `block`; hpack.HPACKError for a bad block."""
        found = self.known.get(block)
        if found is not None:
            return found
        wanted = self.wanted
        fields = {n: v for n, v in self.decoder.decode(block, raw=True) if n in wanted}  # always: HPACK state
        head = self.make(fields)
        if block.translate(None, _INDEXED_FIELD_BYTES):
            self.known.clear()  # literals or a table size update: the table may have changed
        else:
            if len(self.known) >= MAX_REMEMBERED_BLOCKS:
                self.known.clear()
            self.known[block] = head
        return head


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
# (PROTOCOL_ERROR). The server half-closes a stream itself when it refuses an oversized request.
TRANSITIONS: dict[tuple[State, Received], State] = {
    (State.OPEN, Received.DATA): State.OPEN,
    (State.OPEN, Received.DATA_END): State.HALF_CLOSED_REMOTE,
    (State.OPEN, Received.HEADERS_END): State.HALF_CLOSED_REMOTE,
}

# An answer's body: yields DATA payload, returns the trailers' header block. Pulled only as flow
# control lets its output go, so a long streaming answer is made as fast as the peer reads it.
Body = Generator[bytes, None, bytes]


# --- events: what receive() reports ------------------------------------------------------------


@dataclass(slots=True)
class RequestReceived(Generic[Head]):
    """A whole request: its head, its body, and the clock's time when its headers came."""

    stream_id: int
    head: Head
    body: bytes
    opened: float


@dataclass(slots=True)
class RequestTooLarge:
    """A request's body passed max_body: the stream waits for an answer, its data is dropped."""

    stream_id: int


@dataclass(slots=True)
class StreamReset:
    """A stream ended before its answer did (the peer reset it, or broke its rules): whatever
    works on its answer can stop."""

    stream_id: int


@dataclass(slots=True)
class ConnectionTerminated:
    """The peer broke the protocol; nothing more is read. The caller answers what it can of the
    events before this one, then calls go_away(error, reason)."""

    error: H2Error
    reason: str  # for the GOAWAY
    detail: str  # for the log


Event = RequestReceived | RequestTooLarge | StreamReset | ConnectionTerminated


@dataclass(slots=True)
class _Stream:
    sid: int
    send_window: Window
    opened: float
    state: State = State.OPEN
    recv_window: Window = field(default_factory=lambda: Window(STREAM_WINDOW))
    held: int = 0  # bytes of this stream counted against the connection's receive window
    unacked: int = 0  # bytes received since the stream's window was last extended
    head: object = None
    body: bytearray = field(default_factory=bytearray)
    responding: bool = False
    outbox: bytearray = field(default_factory=bytearray)  # answer bytes waiting for the windows
    more: Body | None = None  # the answer's body, not yet pulled to the end
    trailers: bytes | None = None  # once the body has returned them


class Connection(Generic[Head]):
    """One HTTP/2 connection, server side. `wanted` names the request header fields `make` gets;
    a request body above `max_body` bytes is refused (RequestTooLarge)."""

    def __init__(
        self,
        wanted: frozenset[bytes],
        make: Callable[[dict[bytes, bytes]], Head],
        max_body: int,
        clock: Callable[[], float],
    ) -> None:
        self.headers = _Headers(wanted, make)
        self.max_body = max_body
        self.clock = clock
        self.buf = bytearray()  # a frame not yet whole
        self.preface_seen = False
        self.streams: dict[int, _Stream] = {}
        self.send_window = Window(DEFAULT_WINDOW)
        self.recv_window = Window(CONNECTION_WINDOW)
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = MIN_FRAME
        self.last_stream = 0
        self.block = bytearray()  # the header block being received
        self.block_stream = 0  # its stream while CONTINUATION frames are due, else 0
        self.block_flags = 0  # END_STREAM of the HEADERS frame that opened it
        self.blocked: dict[int, None] = {}  # streams with output waiting for the connection window
        self.closing = False  # a GOAWAY went or came: no new streams
        self.failed = False  # a connection error was found: nothing more is read
        self.paused = False  # the peer is not reading what we write: send no DATA
        self.resets = 0  # early resets in the current second
        self.resets_since = 0.0
        self.out = bytearray()
        self.events: list[Event] = []

    # --- the caller's side -----------------------------------------------------------------------

    def initiate(self) -> None:
        """The server's preface: our settings, and the connection window we advertise."""
        settings = struct.pack(
            ">HIHIHI",
            SETTINGS_INITIAL_WINDOW_SIZE,
            STREAM_WINDOW,
            SETTINGS_MAX_CONCURRENT_STREAMS,
            MAX_STREAMS,
            SETTINGS_MAX_HEADER_LIST_SIZE,
            MAX_HEADER_BLOCK,
        )
        self.out += frame(SETTINGS, 0, 0, settings)
        self.out += frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", CONNECTION_WINDOW - DEFAULT_WINDOW))

    def data_to_send(self) -> bytes:
        out, self.out = self.out, bytearray()
        return bytes(out)

    @property
    def finished(self) -> bool:
        """Closing, with no stream left to answer: the transport can close."""
        return self.closing and not self.streams

    def receive(self, data: bytes) -> list[Event]:
        """Take the peer's bytes; the events they complete, in order."""
        if self.failed:  # bytes that were read before the transport closed
            return []
        if self.buf:
            self.buf += data
            data = bytes(self.buf)
        try:
            self._read_frames(data)
        except ConnectionFault as exc:
            self._fail(ConnectionTerminated(exc.error, str(exc), str(exc)))
        except hpack.HPACKError as exc:
            self._fail(ConnectionTerminated(H2Error.COMPRESSION_ERROR, "bad header block", f"bad header block: {exc}"))
        events, self.events = self.events, []
        return events

    def respond(self, sid: int, head: bytes, body: Body) -> None:
        """Answer stream `sid`: a header block now, then `body` as flow control lets it go."""
        stream = self.streams.get(sid)
        if stream is None or stream.responding:
            return
        stream.responding = True
        self.out += frame(HEADERS, END_HEADERS, sid, head)
        stream.more = body
        self._flush(stream)

    def respond_whole(self, sid: int, head: bytes, data: tuple[bytes, ...], trailers: bytes) -> bool:
        """A short answer in one go (headers, one DATA frame of `data` joined, trailers) when the
        windows and the peer's frame size take it at once; False (nothing sent) otherwise."""
        stream = self.streams.get(sid)
        n = sum(map(len, data))
        if (
            stream is None
            or stream.responding
            or self.paused
            or n > self.send_window.size
            or n > stream.send_window.size
            or n > self.peer_max_frame
        ):
            return False
        self.out += b"".join(
            (
                frame_head(HEADERS, END_HEADERS, sid, len(head)),
                head,
                frame_head(DATA, 0, sid, n),
                *data,
                frame_head(HEADERS, END_HEADERS | END_STREAM, sid, len(trailers)),
                trailers,
            )
        )
        self.send_window.size -= n  # checked above: it fits
        stream.send_window.size -= n
        self._drop(stream)
        return True

    def go_away(self, error: H2Error = H2Error.NO_ERROR, reason: str = "") -> None:
        """Refuse new streams; on an error, also forget every stream (their answers never go)."""
        self.out += frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream, error) + reason.encode()[:256])
        self.closing = True
        if error:
            self.failed = True
            for stream in list(self.streams.values()):
                self._drop(stream)

    def pause(self) -> None:
        """The peer stopped reading: hold answers' DATA."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._flush_blocked()

    # --- reading -------------------------------------------------------------------------------

    def _fail(self, event: ConnectionTerminated) -> None:
        self.failed = True
        self.buf = bytearray()
        self.events.append(event)

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
        while end - pos >= 9:
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
            self._request(stream, data)  # the usual request: one message in one DATA frame
            return
        stream.body += data
        if len(stream.body) > self.max_body:
            stream.state = State.HALF_CLOSED_REMOTE
            self._release(stream)
            self.events.append(RequestTooLarge(sid))
            return
        if flags & END_STREAM:
            self._request(stream, bytes(stream.body))
            return
        stream.unacked += len(payload)
        if stream.unacked >= STREAM_WINDOW // 2:  # let a request grow (max_body bounds it)
            self.out += frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", stream.unacked))
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
        head = self.headers.decode(bytes(self.block))
        self.block = bytearray()
        existing = self.streams.get(sid)
        if existing is not None:  # trailers after the request body: end of the request
            self._receive(existing, Received.HEADERS_END if self.block_flags else Received.HEADERS)
            self._request(existing, bytes(existing.body))
            return
        if self.closing or len(self.streams) >= MAX_STREAMS:  # as advertised
            self.out += frame(RST_STREAM, 0, sid, struct.pack(">I", H2Error.REFUSED_STREAM))
            return
        stream = self.streams[sid] = _Stream(sid, Window(self.peer_initial_window), self.clock(), head=head)
        if self.block_flags:
            self._receive(stream, Received.HEADERS_END)
            self._request(stream, b"")

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
        self.out += frame(SETTINGS, ACK, 0)
        for stream in list(self.streams.values()):  # a larger initial window may free some output
            if stream.responding:
                self._flush(stream)

    def _on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionFault(H2Error.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ConnectionFault(H2Error.FRAME_SIZE_ERROR, f"PING of {len(payload)} bytes")
        if not flags & ACK:
            self.out += frame(PING, ACK, 0, payload)

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
            now = self.clock()
            if now - self.resets_since >= 1.0:
                self.resets, self.resets_since = 0, now
            self.resets += 1
            if self.resets > MAX_EARLY_RESETS:
                raise ConnectionFault(
                    H2Error.ENHANCE_YOUR_CALM, f"more than {MAX_EARLY_RESETS} streams reset in a second"
                )
            self._drop(stream)  # the client gave up: its work can stop
            self.events.append(StreamReset(sid))

    def _on_priority(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 5:
            raise ConnectionFault(H2Error.FRAME_SIZE_ERROR, f"PRIORITY of {len(payload)} bytes")

    def _on_goaway(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionFault(H2Error.PROTOCOL_ERROR, f"GOAWAY on stream {sid}")
        if len(payload) < 8:
            raise ConnectionFault(H2Error.FRAME_SIZE_ERROR, f"GOAWAY of {len(payload)} bytes")
        self.closing = True

    def _on_push_promise(self, flags: int, sid: int, payload: bytes) -> None:
        raise ConnectionFault(H2Error.PROTOCOL_ERROR, "clients must not push")

    _FRAMES: dict[int, Callable[[Connection, int, int, bytes], None]] = {
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

    # --- stream states, flow control ---------------------------------------------------------------

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

    def _request(self, stream: _Stream, body: bytes) -> None:
        """The request is whole: its data is consumed, the layer above gets it."""
        self._release(stream)
        self.events.append(RequestReceived(stream.sid, stream.head, body, stream.opened))

    def _credit(self, n: int) -> None:
        """Give `n` bytes back to the peer's connection window: they were consumed or dropped."""
        if n:
            self.recv_window.give(n)
            self.out += frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", n))

    def _release(self, stream: _Stream) -> None:
        """The stream's request data is consumed (or dropped): credit the connection for it."""
        if stream.body:
            stream.body = bytearray()
        self._credit(stream.held)
        stream.held = 0

    def _drop(self, stream: _Stream) -> None:
        """Forget a stream, crediting its data."""
        self.streams.pop(stream.sid, None)
        self.blocked.pop(stream.sid, None)
        self._release(stream)

    def _reset(self, stream: _Stream, error: H2Error) -> None:
        self.out += frame(RST_STREAM, 0, stream.sid, struct.pack(">I", error))
        self._drop(stream)
        self.events.append(StreamReset(stream.sid))

    # --- answers -------------------------------------------------------------------------------

    def _pull(self, stream: _Stream) -> bool:
        """Move the body's next chunk to the outbox; False when the body has ended."""
        assert stream.more is not None
        try:
            chunk = next(stream.more)
        except StopIteration as end:
            stream.more, stream.trailers = None, end.value
            return False
        stream.outbox += chunk
        return True

    def _flush(self, stream: _Stream) -> None:
        """Send what flow control allows of the stream's answer, pulling its body only as it can
        go out; trailers once all is out."""
        if not stream.responding or self.streams.get(stream.sid) is not stream:
            return
        out = bytearray()
        while True:
            open_window = min(self.send_window.size, stream.send_window.size) > 0 and not self.paused
            if not stream.outbox and (stream.more is None or not open_window or not self._pull(stream)):
                break
            n = min(len(stream.outbox), self.send_window.size, stream.send_window.size, self.peer_max_frame)
            if n <= 0:
                break
            out += frame(DATA, 0, stream.sid, bytes(stream.outbox[:n]))
            del stream.outbox[:n]
            self.send_window.size -= n  # n is at most what both hold
            stream.send_window.size -= n
        if not stream.outbox and stream.more is None:
            assert stream.trailers is not None
            out += frame(HEADERS, END_HEADERS | END_STREAM, stream.sid, stream.trailers)
            self._drop(stream)
        elif self.send_window.size <= 0 or self.paused:
            self.blocked[stream.sid] = None  # resumed by a connection WINDOW_UPDATE or resume()
        self.out += out

    def _flush_blocked(self) -> None:
        """Streams waiting for the connection window, oldest first, while it lasts: O(1) per
        WINDOW_UPDATE when nothing can move, whatever the number of streams."""
        while self.blocked and self.send_window.size > 0 and not self.paused:
            sid = next(iter(self.blocked))
            del self.blocked[sid]
            stream = self.streams.get(sid)
            if stream is not None:
                self._flush(stream)
