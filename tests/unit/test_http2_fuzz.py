"""The HTTP/2 protocol core alone (no asyncio, no gRPC) under arbitrary frame sequences: receive()
never raises, reports only its four events (a connection error at most once, and nothing after
it), gives each stream at most one request, holds no more than its limits, and writes only
well-formed frames, whatever the peer sends and however the reads split it."""

from __future__ import annotations

import struct
from typing import Any

import hpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addlower.server import http2 as h
from tests.unit.test_grpcserver_fuzz import parse_frames, payloads, sessions

MAX_BODY = 100  # small, so the fuzzer reaches it


@st.composite
def flows(draw: Any) -> tuple[bytes, list[int]]:
    """Mostly what a client does (requests opened in order, their data in pieces, resets, window
    updates), with stray frames between, split at any byte."""
    encoder = hpack.Encoder()
    frames: list[bytes] = []
    opened: list[int] = []
    for _ in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["open", "data", "data", "data", "rst", "window", "stray"]))
        if kind == "open" or not opened:
            opened.append(2 * len(opened) + 1)
            block = encoder.encode([(b":method", b"POST"), (b":path", b"/a.B/C")])
            end = draw(st.sampled_from([0, 0, 0, h.END_STREAM]))
            frames.append(h.frame(h.HEADERS, h.END_HEADERS | end, opened[-1], block))
            continue
        sid = draw(st.sampled_from(opened))
        if kind == "data":
            end = draw(st.sampled_from([0, 0, h.END_STREAM]))
            frames.append(h.frame(h.DATA, end, sid, bytes(draw(st.integers(0, 80)))))
        elif kind == "rst":
            frames.append(h.frame(h.RST_STREAM, 0, sid, struct.pack(">I", h.H2Error.CANCEL)))
        elif kind == "window":
            frames.append(h.frame(h.WINDOW_UPDATE, 0, draw(st.sampled_from([0, sid])), struct.pack(">I", 40_000)))
        else:
            ftype, payload = draw(payloads(encoder))
            frames.append(h.frame(ftype, draw(st.sampled_from([0, h.END_STREAM, h.PADDED])), sid, payload))
    data = b"".join(frames)
    return data, sorted(draw(st.lists(st.integers(0, len(data)), max_size=5)))


def chunks(n: int) -> h.Body:
    for i in range(n):
        yield bytes([i]) * 5000  # several frames' worth, so flow control holds some back
    return h.header_block([(b"grpc-status", b"0")])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(sessions(), flows()), st.lists(st.integers(0, 2), min_size=1))
def test_the_core_turns_any_bytes_into_events_and_well_formed_frames_within_its_limits(session, answers):
    data, cuts = session
    now = [0.0]
    conn: h.Connection[Any] = h.Connection(frozenset({b":path"}), dict, MAX_BODY, lambda: now[0])
    conn.initiate()
    conn.receive(h.PREFACE + h.frame(h.SETTINGS, 0, 0))
    requested: list[int] = []
    terminated = 0
    last = 0
    for i, cut in enumerate([*cuts, len(data)]):
        now[0] += 0.001
        events = conn.receive(data[last:cut])
        last = cut
        if terminated:
            assert events == []
        for event in events:
            assert isinstance(event, h.RequestReceived | h.RequestTooLarge | h.StreamReset | h.ConnectionTerminated)
            if isinstance(event, h.ConnectionTerminated):
                terminated += 1
                assert event.error != h.H2Error.NO_ERROR
                conn.go_away(event.error, event.reason)
            elif isinstance(event, h.RequestReceived):
                assert event.stream_id % 2 == 1 and event.stream_id not in requested
                assert len(event.body) <= MAX_BODY
                requested.append(event.stream_id)
                answer = answers[i % len(answers)]
                if answer == 1:
                    conn.respond(event.stream_id, b"", chunks(3))
                elif answer == 2 and not conn.respond_whole(event.stream_id, b"", (b"ok",), b""):
                    conn.respond(event.stream_id, b"", chunks(0))
        assert terminated <= 1
        assert len(conn.streams) <= h.MAX_STREAMS
        assert len(conn.buf) <= 9 + h.MAX_FRAME
        assert len(conn.block) <= h.MAX_HEADER_BLOCK
        assert conn.recv_window.size >= 0
        for stream in conn.streams.values():
            assert stream.state in h.State
            assert len(stream.body) <= MAX_BODY and stream.recv_window.size >= 0
    frames = parse_frames(conn.data_to_send())
    assert frames[0][0] == h.SETTINGS
    assert all(f[0] in (h.SETTINGS, h.WINDOW_UPDATE, h.PING, h.HEADERS, h.DATA, h.RST_STREAM, h.GOAWAY) for f in frames)
    assert all(f[2] in requested for f in frames if f[0] in (h.HEADERS, h.DATA))  # answers only to requests
