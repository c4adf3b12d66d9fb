"""The HTTP/2 transport under arbitrary frame sequences (hypothesis): well-formed and malformed
frames of every type, on any stream, split at any byte. Whatever a peer sends, the connection
never lets an exception out of data_received (a protocol error is a GOAWAY or RST_STREAM), never
holds more than its limits, and only ever writes well-formed frames."""

from __future__ import annotations

import struct
from typing import Any

import hpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addlower.server import grpcserver as g
from addlower.server import http2 as h
from addlower.server import rpc
from tests.unit.test_grpcserver import ECHO, MANY, SLOW, WHO, Peer, message, run

FRAME_TYPES = [
    h.DATA,
    h.HEADERS,
    h.PRIORITY,
    h.RST_STREAM,
    h.SETTINGS,
    h.PUSH_PROMISE,
    h.PING,
    h.GOAWAY,
    h.WINDOW_UPDATE,
    h.CONTINUATION,
    0xA,
    0xFF,
]
STREAMS = [0, 1, 2, 3, 5, 7, 9, 2**31 - 1]
PATHS = [ECHO, SLOW, MANY, WHO, b"/unknown.Service/Method"]


@st.composite
def payloads(draw: Any, encoder: hpack.Encoder) -> tuple[int, bytes]:
    """A frame's type and payload: often what that type should carry, sometimes anything."""
    ftype = draw(st.sampled_from(FRAME_TYPES))
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return ftype, draw(st.binary(max_size=64))
    if ftype in (h.HEADERS, h.CONTINUATION):
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", draw(st.sampled_from(PATHS))),
            (b"content-type", b"application/grpc"),
        ]
        if draw(st.booleans()):
            headers.append((b"grpc-timeout", draw(st.sampled_from([b"1S", b"0n", b"99999999H", b"x"]))))
        if draw(st.booleans()):
            headers.append((b"containerd-namespace", b"ns"))
        return ftype, encoder.encode(headers)
    if ftype == h.DATA:
        return ftype, message(draw(st.text(max_size=20))) if kind == 1 else draw(st.binary(max_size=40))
    if ftype == h.SETTINGS:
        entries = draw(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2**32 - 1)), max_size=4))
        return ftype, b"".join(struct.pack(">HI", k, v) for k, v in entries)
    if ftype in (h.WINDOW_UPDATE, h.RST_STREAM):
        return ftype, struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
    if ftype in (h.PING, h.GOAWAY):
        return ftype, draw(st.binary(min_size=8, max_size=8 if ftype == h.PING else 16))
    return ftype, draw(st.binary(max_size=16))


@st.composite
def sessions(draw: Any) -> tuple[bytes, list[int]]:
    """The bytes a client sends after the preface, and where the transport's reads split them."""
    encoder = hpack.Encoder()
    frames = []
    for _ in range(draw(st.integers(1, 30))):
        ftype, payload = draw(payloads(encoder))
        flags = draw(
            st.sampled_from(
                [0, h.END_STREAM, h.END_HEADERS, h.END_STREAM | h.END_HEADERS, h.PADDED, h.PRIORITY_FLAG, 0xFF]
            )
        )
        frames.append(h.frame(ftype, flags, draw(st.sampled_from(STREAMS)), payload))
    data = b"".join(frames)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=5)))
    return data, cuts


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """The frames the server wrote; an assertion if they are not well formed."""
    frames = []
    while data:
        assert len(data) >= 9, "a cut frame header"
        n = int.from_bytes(data[:3], "big")
        assert len(data) >= 9 + n, "a cut frame"
        assert n <= h.MAX_FRAME
        frames.append((data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF, data[9 : 9 + n]))
        data = data[9 + n :]
    return frames


def parse_sent(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """The whole frames a client sent (a cut last one left out)."""
    frames = []
    while len(data) >= 9 and len(data) >= 9 + int.from_bytes(data[:3], "big"):
        n = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF, data[9 : 9 + n]))
        data = data[9 + n :]
    return frames


def check_limits(p: Peer) -> None:
    conn = p.conn
    assert len(conn.h2.streams) <= h.MAX_STREAMS
    assert len(conn.h2.buf) <= 9 + h.MAX_FRAME
    assert len(conn.h2.block) <= h.MAX_HEADER_BLOCK
    assert p.server.queued <= g.MAX_QUEUED
    for stream in conn.h2.streams.values():
        assert len(stream.body) <= rpc.MAX_MESSAGE + 5
        assert stream.recv_window.size >= 0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
def test_any_frame_sequence_ends_in_answers_or_a_protocol_error_within_the_limits(session):
    data, cuts = session

    def test() -> None:
        p = Peer()  # it has sent the preface and an empty SETTINGS
        last = 0
        for cut in [*cuts, len(data)]:
            p.send(data[last:cut])  # raises nothing, whatever the bytes
            last = cut
            check_limits(p)
        frames = parse_frames(bytes(p.transport.data))
        assert frames[0][0] == h.SETTINGS  # the server's preface
        goaways = [f for f in frames if f[0] == h.GOAWAY]
        assert len(goaways) <= 2  # at most a graceful one and the error
        said_goodbye = any(f[0] == h.GOAWAY and len(f[3]) >= 8 and f[2] == 0 for f in parse_sent(data))
        if p.transport.closed:
            assert goaways or said_goodbye, "closed without saying why"

    run(test)
