"""The daemon's own HTTP/2 gRPC server, seen from grpcio clients: flow control, concurrency,
errors, unknown methods, and what happens to calls when a connection goes away."""

from __future__ import annotations

import struct
import threading

import grpc
import pytest

from addlower.api import snapshots_pb2 as pb
from addlower.ops.client import SnapshotsClient
from addlower.server.http2 import CONTINUATION, DATA, END_STREAM, RST_STREAM, H2Error, frame
from tests.support.daemon import Daemon
from tests.support.h2 import RawClient


def test_list_larger_than_the_flow_control_window_arrives_whole(client: SnapshotsClient):
    label = {"containerd.io/snapshot/pad": "x" * 200}
    for i in range(1200):
        client.view(f"v{i:04d}", labels=label)
    infos = client.list()
    assert [i.name for i in infos] == [f"v{i:04d}" for i in range(1200)]
    assert all(i.labels == label for i in infos)  # ~300 KB, several times the 64 KiB window
    assert client.list_batches() == [100] * 12


def test_request_larger_than_a_frame_and_the_initial_window(client: SnapshotsClient):
    labels = {f"containerd.io/snapshot/l{i}": "v" * 4000 for i in range(40)}  # ~160 KB request
    client.prepare("big", labels=labels)
    assert dict(client.stat("big").labels) == labels


def test_concurrent_calls_on_one_connection(client: SnapshotsClient):
    client.prepare("a")
    client.commit("base", "a")
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(30):
                client.prepare(f"w{n}-{i}", "base")
                assert client.stat(f"w{n}-{i}").parent == "base"
                client.remove(f"w{n}-{i}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [i.name for i in client.list()] == ["base"]


def test_error_messages_keep_non_ascii_text(client: SnapshotsClient):
    with pytest.raises(grpc.RpcError) as err:
        client.stat("schnapps-ü-日本")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "schnapps-ü-日本" in (err.value.details() or "")


def test_unknown_method_is_unimplemented(daemon: Daemon):
    with daemon.channel() as ch:
        call = ch.unary_unary(
            "/containerd.services.snapshots.v1.Snapshots/Rename",
            request_serializer=pb.StatSnapshotRequest.SerializeToString,
            response_deserializer=pb.StatSnapshotResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            call(pb.StatSnapshotRequest(key="x"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_garbage_on_the_socket_does_not_hurt_the_daemon(daemon: Daemon, client: SnapshotsClient):
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.socket))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    s.settimeout(5)
    s.recv(4096)  # the server's SETTINGS, then it closes on the bad preface
    s.close()
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.socket))
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x01\x05\x00\x00\x00\x01\xff\xff\xff\xff")
    s.close()  # a HEADERS frame with an undecodable header block
    client.prepare("still-fine")
    assert client.stat("still-fine").name == "still-fine"
    assert daemon.proc is not None and daemon.proc.poll() is None


# --- abusive peers: the connection ends with the RFC 9113 error, the daemon serves on ---------------


def message(request: object) -> bytes:
    body = request.SerializeToString()  # type: ignore[attr-defined]
    return b"\x00" + struct.pack(">I", len(body)) + body


def endless_continuation(c: RawClient) -> None:
    c.send(c.headers(1, "Stat", end_headers=False))
    for _ in range(1000):  # 16 MB of header block, unless cut off first
        if not c.send(frame(CONTINUATION, 0, 1, b"\x00" * 16000)):
            return


def data_beyond_the_window(c: RawClient) -> None:
    chunk = b"x" * 16000
    for i in range(300):  # 300 streams x 1 MB, none ever ended
        sid = 2 * i + 1
        if not c.send(c.headers(sid, "Prepare") + b"".join(frame(DATA, 0, sid, chunk) for _ in range(64))):
            return


def rapid_reset(c: RawClient) -> None:
    body = message(pb.CleanupRequest())
    for sid in range(1, 4001, 2):
        if not c.send(
            c.headers(sid, "Cleanup")
            + frame(DATA, END_STREAM, sid, body)
            + frame(RST_STREAM, 0, sid, struct.pack(">I", H2Error.CANCEL))
        ):
            return


@pytest.mark.parametrize(
    "attack, error",
    [
        (endless_continuation, H2Error.ENHANCE_YOUR_CALM),
        (data_beyond_the_window, H2Error.FLOW_CONTROL_ERROR),
        (rapid_reset, H2Error.ENHANCE_YOUR_CALM),
    ],
)
def test_an_abusive_peer_is_cut_off_and_others_are_served(daemon: Daemon, client: SnapshotsClient, attack, error):
    raw = RawClient(daemon.socket)
    try:
        attack(raw)
        assert raw.goaway() == error
    finally:
        raw.close()
    client.prepare("after")
    assert daemon.proc is not None
    assert client.stat("after").name == "after" and daemon.proc.poll() is None


def test_a_backtracking_pattern_is_answered_like_any_other(client: SnapshotsClient):
    """Python's re took seconds here (time doubling per character); RE2, as Go's regexp, is linear."""
    client.view("r", labels={"r": "v" * 40})
    assert client.list("labels.r~=^(v+)+x$") == []
    assert [i.name for i in client.list("labels.r~=^(v+)+$")] == ["r"]
