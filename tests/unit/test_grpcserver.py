"""The HTTP/2 framing of addlower.server.grpcserver, driven frame by frame through a fake transport: each
limit on what a peer sends, the RFC 9113 errors, flow control both ways, cancellation, deadlines
and backpressure. No socket, no root."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from typing import Any

import hpack
import pytest
from google.protobuf import wrappers_pb2

from addlower.core.codes import Code
from addlower.server import grpcserver as g
from addlower.server import http2 as h
from addlower.server import rpc
from addlower.server.http2 import H2Error, frame

ECHO, SLOW, MANY, WHO = b"/t.T/Echo", b"/t.T/Slow", b"/t.T/Many", b"/t.T/Who"


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class HeldPool(Executor):
    """A pool whose work never starts: what a busy pool looks like to queued calls."""

    def __init__(self) -> None:
        self.futures: list[Future] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        self.futures.append(future)
        return future


def message(value: str) -> bytes:
    body = wrappers_pb2.StringValue(value=value).SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


class Peer:
    """A client speaking HTTP/2 to one _Connection, and reading its frames back."""

    def __init__(self, pulled: list[int] | None = None) -> None:
        self.pool = HeldPool()
        self.pulled = pulled if pulled is not None else []

        def many(request: Any) -> Iterator[bytes]:
            for i in range(1000):
                self.pulled.append(i)
                yield b"m" * 1000

        routes = {
            ECHO.decode(): rpc.Route(
                wrappers_pb2.StringValue, lambda r: wrappers_pb2.StringValue(value=r.value.upper())
            ),
            SLOW.decode(): rpc.Route(wrappers_pb2.StringValue, lambda r: r, pool="held"),
            MANY.decode(): rpc.Route(wrappers_pb2.StringValue, many, streaming=True),
            WHO.decode(): rpc.Route(
                wrappers_pb2.StringValue,
                lambda r: wrappers_pb2.StringValue(value=repr(sorted(rpc.call_metadata().items()))),
            ),
        }
        self.server = g.GrpcServer(routes, {"held": self.pool}, lambda exc: (Code.UNKNOWN, str(exc)))
        self.conn = g._Connection(self.server)
        self.transport = FakeTransport()
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        self.encoder = hpack.Encoder()
        self.sent = 0
        self.send(h.PREFACE + frame(h.SETTINGS, 0, 0))

    def send(self, data: bytes) -> None:
        self.conn.data_received(data)

    def headers(self, sid: int, path: bytes = ECHO, end_stream: bool = False, extra: tuple = ()) -> bytes:
        block = self.encoder.encode(
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path),
                (b"content-type", b"application/grpc"),
                *extra,
            ]
        )
        return frame(h.HEADERS, h.END_HEADERS | (h.END_STREAM if end_stream else 0), sid, block)

    def call(self, sid: int, path: bytes = ECHO, value: str = "hi", extra: tuple = ()) -> None:
        self.send(self.headers(sid, path, extra=extra) + frame(h.DATA, h.END_STREAM, sid, message(value)))

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        """Every frame the server wrote since the last call."""
        data, out = bytes(self.transport.data[self.sent :]), []
        self.sent = len(self.transport.data)
        while data:
            n = int.from_bytes(data[:3], "big")
            out.append((data[3], data[4], int.from_bytes(data[5:9], "big"), data[9 : 9 + n]))
            data = data[9 + n :]
        return out

    def goaway(self) -> H2Error | None:
        codes = [struct.unpack(">II", p[:8])[1] for t, _, _, p in self.frames() if t == h.GOAWAY]
        return H2Error(codes[-1]) if codes else None

    def status(self, frames: list, sid: int) -> int | None:
        """The grpc-status in the trailers of stream `sid`."""
        for t, flags, s, payload in frames:
            if t == h.HEADERS and s == sid and flags & h.END_STREAM:
                return int(dict(hpack.Decoder().decode(payload, raw=True))[b"grpc-status"])
        return None


def run(test: Any) -> Any:
    async def main() -> Any:
        return test()

    return asyncio.run(main())


def test_a_call_is_answered():
    def test() -> None:
        p = Peer()
        p.frames()
        p.call(1, value="hi")
        out = p.frames()
        data = b"".join(payload for t, _, s, payload in out if t == h.DATA and s == 1)
        assert wrappers_pb2.StringValue.FromString(data[5:]).value == "HI"
        assert p.status(out, 1) == 0

    run(test)


def test_a_handler_sees_containerds_namespace_and_lease_of_its_own_call_and_nothing_else():
    def test() -> None:
        p = Peer()
        p.frames()
        kept = ((b"containerd-namespace", b"ci"), (b"containerd-lease", b"l1"), (b"authorization", b"secret"))
        p.call(1, WHO, extra=kept)
        p.call(3, WHO, extra=((b"containerd-namespace", b"other"),))
        p.call(5, WHO, extra=kept)  # the same block again: remembered, with its metadata
        out = p.frames()
        answers = [
            wrappers_pb2.StringValue.FromString(
                b"".join(payload for t, _, s, payload in out if t == h.DATA and s == sid)[5:]
            ).value
            for sid in (1, 3, 5)
        ]
        both = "[('containerd-lease', 'l1'), ('containerd-namespace', 'ci')]"
        assert answers == [both, "[('containerd-namespace', 'other')]", both]
        assert rpc.call_metadata() == {}  # only while a handler runs

    run(test)


def test_endless_continuation_ends_the_connection_with_its_buffer_bounded():
    def test() -> None:
        p = Peer()
        p.send(frame(h.HEADERS, 0, 1, b"\x00" * 1000))
        for _ in range(200):  # 200 kB of header block, more than MAX_HEADER_BLOCK
            if p.transport.closed:
                break
            p.send(frame(h.CONTINUATION, 0, 1, b"\x00" * 1000))
            assert len(p.conn.h2.block) <= h.MAX_HEADER_BLOCK
        assert p.goaway() is H2Error.ENHANCE_YOUR_CALM and p.transport.closed

    run(test)


def test_data_is_not_acknowledged_until_consumed_and_a_peer_beyond_the_window_is_cut_off():
    def test() -> None:
        p = Peer()
        p.frames()
        chunk = b"x" * h.MAX_FRAME
        sid = 1
        sent = 0
        while sent + len(chunk) <= h.CONNECTION_WINDOW:  # many streams, none ever finished
            if sent % rpc.MAX_MESSAGE == 0:
                sid += 2
                p.send(p.headers(sid))
            p.send(frame(h.DATA, 0, sid, chunk))
            sent += len(chunk)
        updates = [p_ for t, _, s, p_ in p.frames() if t == h.WINDOW_UPDATE and s == 0]
        assert updates == []  # nothing consumed, so nothing given back
        p.send(frame(h.DATA, 0, sid, chunk))
        assert p.goaway() is H2Error.FLOW_CONTROL_ERROR

    run(test)


def test_consumed_requests_give_their_window_back():
    def test() -> None:
        p = Peer()
        p.frames()
        p.call(1)
        credited = sum(struct.unpack(">I", x)[0] for t, _, s, x in p.frames() if t == h.WINDOW_UPDATE and s == 0)
        assert credited == len(message("hi"))

    run(test)


def test_a_request_above_the_message_limit_is_resource_exhausted():
    def test() -> None:
        p = Peer()
        p.send(p.headers(1))
        chunk = b"y" * h.MAX_FRAME
        for _ in range(rpc.MAX_MESSAGE // h.MAX_FRAME + 2):
            p.send(frame(h.DATA, 0, 1, chunk))
        assert p.status(p.frames(), 1) == Code.RESOURCE_EXHAUSTED

    run(test)


def test_streams_beyond_the_advertised_limit_are_refused():
    def test() -> None:
        p = Peer()
        for i in range(h.MAX_STREAMS + 1):
            p.send(p.headers(2 * i + 1))
        refused = [
            s for t, _, s, x in p.frames() if t == h.RST_STREAM and struct.unpack(">I", x)[0] == H2Error.REFUSED_STREAM
        ]
        assert refused == [2 * h.MAX_STREAMS + 1]

    run(test)


def test_queued_work_is_bounded_and_a_reset_cancels_it():
    def test() -> None:
        p = Peer()
        for i in range(g.MAX_QUEUED + 1):
            p.call(2 * i + 1, SLOW)
        out = p.frames()
        assert p.status(out, 2 * g.MAX_QUEUED + 1) == Code.RESOURCE_EXHAUSTED
        assert len(p.pool.futures) == g.MAX_QUEUED
        p.send(frame(h.RST_STREAM, 0, 1, struct.pack(">I", H2Error.CANCEL)))
        assert p.pool.futures[0].cancelled() and not p.pool.futures[1].cancelled()

    run(test)


def test_the_deadline_answers_and_drops_work_that_never_started():
    async def main() -> None:
        p = Peer()
        p.call(1, SLOW, extra=((b"grpc-timeout", b"20m"),))
        await asyncio.sleep(0.1)
        assert p.status(p.frames(), 1) == Code.DEADLINE_EXCEEDED
        assert p.pool.futures[0].cancelled()

    asyncio.run(main())


@pytest.mark.parametrize(
    "value, seconds", [(b"1S", 1.0), (b"250m", 0.25), (b"2H", 7200.0), (b"5x", None), (b"123456789S", None)]
)
def test_grpc_timeout_values(value, seconds):
    assert rpc.grpc_timeout(value) == seconds


def test_a_peer_that_does_not_read_is_not_read_either():
    def test() -> None:
        p = Peer()
        p.conn.pause_writing()
        assert not p.transport.reading
        p.conn.resume_writing()
        assert p.transport.reading

    run(test)


def test_a_streaming_answer_is_made_only_as_fast_as_the_peer_takes_it():
    def test() -> None:
        pulled: list[int] = []
        p = Peer(pulled)
        p.call(1, MANY)
        assert len(pulled) < 70  # the 64 KiB initial windows hold about 65 messages of 1 kB
        p.send(
            frame(h.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20))
            + frame(h.WINDOW_UPDATE, 0, 1, struct.pack(">I", 1 << 20))
        )
        assert len(pulled) == 1000 and p.status(p.frames(), 1) == 0

    run(test)


def test_connection_window_updates_cost_a_stream_each_whatever_the_number_waiting():
    def test() -> None:
        p = Peer()
        for i in range(300):  # the first answers use up the connection window; the rest wait
            p.call(2 * i + 1, MANY)
        assert len(p.conn.h2.blocked) > 200
        flushed: list[int] = []
        real = p.conn.h2._flush

        def flush(stream: h._Stream) -> None:
            flushed.append(stream.sid)
            real(stream)

        p.conn.h2._flush = flush  # type: ignore[method-assign]  # a spy on the instance: records each flush
        for _ in range(100):  # a byte at a time, as the attack did
            p.send(frame(h.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)))
        assert len(flushed) <= 101  # stream 1 (waiting on its own window too) leaves the queue once

    run(test)


@pytest.mark.parametrize(
    "payload, error",
    [
        (frame(h.SETTINGS, 0, 0, b"\x00" * 5), H2Error.FRAME_SIZE_ERROR),
        (frame(h.SETTINGS, h.ACK, 0, b"\x00" * 6), H2Error.FRAME_SIZE_ERROR),
        (frame(h.SETTINGS, 0, 0, struct.pack(">HI", h.SETTINGS_MAX_FRAME_SIZE, 100)), H2Error.PROTOCOL_ERROR),
        (
            frame(h.SETTINGS, 0, 0, struct.pack(">HI", h.SETTINGS_INITIAL_WINDOW_SIZE, 2**31)),
            H2Error.FLOW_CONTROL_ERROR,
        ),
        (frame(h.SETTINGS, 0, 1), H2Error.PROTOCOL_ERROR),
        (frame(h.WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1)), H2Error.FLOW_CONTROL_ERROR),
        (frame(h.WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)), H2Error.PROTOCOL_ERROR),
        (frame(h.WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"), H2Error.FRAME_SIZE_ERROR),
        (frame(h.PING, 0, 0, b"\x00" * 7), H2Error.FRAME_SIZE_ERROR),
        (frame(h.PING, 0, 3, b"\x00" * 8), H2Error.PROTOCOL_ERROR),
        (frame(h.DATA, 0, 9, b"x"), H2Error.PROTOCOL_ERROR),  # an idle stream
        (frame(h.DATA, h.PADDED, 1, b"\x05ab"), H2Error.PROTOCOL_ERROR),
        (frame(h.RST_STREAM, 0, 0, b"\x00" * 4), H2Error.PROTOCOL_ERROR),
        (frame(h.PUSH_PROMISE, 0, 1, b"\x00" * 4), H2Error.PROTOCOL_ERROR),
        (frame(h.HEADERS, h.END_HEADERS, 2, b""), H2Error.PROTOCOL_ERROR),  # even: a server's stream
        (b"\x00\x40\x01" + bytes(6), H2Error.FRAME_SIZE_ERROR),  # 16 kB + 1 frame
    ],
)
def test_a_peer_at_fault_gets_the_rfc_9113_error(payload, error):
    def test() -> None:
        p = Peer()
        p.send(p.headers(1))  # stream 1 open, so frames about it are not idle
        p.frames()
        p.send(payload)
        assert p.goaway() is error and p.transport.closed

    run(test)


def test_data_after_the_request_is_complete_resets_the_stream():
    def test() -> None:
        p = Peer()
        p.call(1, SLOW)
        p.frames()
        p.send(frame(h.DATA, 0, 1, b"late"))
        resets = [struct.unpack(">I", x)[0] for t, _, s, x in p.frames() if t == h.RST_STREAM and s == 1]
        assert resets == [H2Error.STREAM_CLOSED] and not p.transport.closed

    run(test)


def test_a_connection_without_the_preface_is_closed_in_time(monkeypatch):
    monkeypatch.setattr(g, "PREFACE_TIMEOUT", 0.05)

    async def main() -> None:
        conn = g._Connection(g.GrpcServer({}, {}, lambda exc: (Code.UNKNOWN, "")))
        transport = FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(h.PREFACE[:5])
        await asyncio.sleep(0.2)
        assert transport.closed

    asyncio.run(main())


def test_connections_beyond_the_limit_are_closed_at_once():
    def test() -> None:
        server = g.GrpcServer({}, {}, lambda exc: (Code.UNKNOWN, ""))
        transports = [FakeTransport() for _ in range(g.MAX_CONNECTIONS + 1)]
        for t in transports:
            g._Connection(server).connection_made(t)  # type: ignore[arg-type]
        assert [t.closed for t in transports].count(True) == 1 and transports[-1].closed

    run(test)


def test_a_route_picks_where_a_call_runs_from_its_request_before_it_starts():
    def test() -> None:
        p = Peer()
        ran: list[str] = []

        def handler(request: Any) -> Any:
            ran.append(request.value)
            return request

        def place(request: Any) -> str | None:
            if request.value == "boom":
                raise ValueError("cannot tell")  # picking fails: the loop, the handler answers
            return "held" if request.value == "slow" else None

        p.server.routes[b"/t.T/Maybe"] = rpc.Route(wrappers_pb2.StringValue, handler, place=place)
        p.call(1, b"/t.T/Maybe", "quick")
        p.call(3, b"/t.T/Maybe", "slow")
        p.call(5, b"/t.T/Maybe", "boom")
        out = p.frames()
        assert ran == ["quick", "boom"]  # on the loop, once each; "slow" waits in the pool, not run yet
        assert len(p.pool.futures) == 1 and p.status(out, 3) is None
        assert p.status(out, 1) == 0 and p.status(out, 5) == 0

    run(test)


def test_a_remembered_header_block_is_decoded_again_once_the_table_changed():
    """The same indexed bytes mean another :path once a literal shifted the dynamic table."""
    enc = hpack.Encoder()
    first = enc.encode([(":path", "/a"), ("x", "1")])  # literals: both enter the table
    again = enc.encode([(":path", "/a"), ("x", "1")])  # indexed only: remembered
    other = enc.encode([(":path", "/b")])  # a literal: every index moves by one
    headers, reference = h._Headers(rpc.HEAD_FIELDS, rpc.RequestHead.of), hpack.Decoder()
    paths = []
    for block in (first, again, other, again):
        want = dict(reference.decode(block, raw=True)).get(b":path", b"")
        paths.append(headers.decode(block).path)
        assert paths[-1] == want
    assert paths == [b"/a", b"/a", b"/b", b"/b"] and len(again) == 2
