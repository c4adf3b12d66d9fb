"""The daemon under abusive clients and heavy work: for each case, a fresh daemon, an attacker on
its socket, and a probe that opens a fresh connection and calls Stat meanwhile. Prints, per case,
the daemon's resident memory idle and at its peak, the probe's worst latency, and whether the
daemon survived. Run as root:

    python3 bench/abuse.py [--seconds 8] [--pythonpath DIR]

--pythonpath runs the daemon from another checkout (e.g. an older commit, for a before/after).
The attacker is raw HTTP/2 over the unix socket (hpack for header blocks), so it sends exactly
what each case needs, however invalid.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from addlower.api import snapshots_pb2 as pb  # noqa: E402
from addlower.api import snapshots_pb2_grpc
from addlower.dev.devcontainerd import SnapshotterProcess  # noqa: E402
from addlower.ops.client import SnapshotsClient  # noqa: E402
from addlower.server.http2 import CONTINUATION, DATA, END_STREAM, PING, RST_STREAM, SETTINGS, WINDOW_UPDATE, frame  # noqa: E402
from tests.support.h2 import RawClient  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


Attacker = RawClient  # one raw HTTP/2 connection to the daemon


def message(request: object) -> bytes:
    body = request.SerializeToString()  # type: ignore[attr-defined]
    return b"\x00" + struct.pack(">I", len(body)) + body


def continuation_flood(a: Attacker, stop: threading.Event, root: Path) -> None:
    a.send(a.headers(1, "Stat", end_headers=False))
    chunk = frame(CONTINUATION, 0, 1, b"\x00" * 16000)
    sent = 0
    while not stop.is_set() and sent < 300 << 20 and a.send(chunk):
        sent += len(chunk)


def stalled_data(a: Attacker, stop: threading.Event, root: Path) -> None:
    chunk = frame(DATA, 0, 0, b"x" * 16000)
    for i in range(300):
        sid = 2 * i + 1
        if not a.send(a.headers(sid, "Prepare")):
            return
        for _ in range(64):  # 1 MB each, never ended
            if stop.is_set() or not a.send(chunk[:5] + struct.pack(">I", sid) + chunk[9:]):
                return


def ping_flood(a: Attacker, stop: threading.Event, root: Path) -> None:
    ping = frame(PING, 0, 0, b"12345678") * 100
    while not stop.is_set() and a.send(ping):  # and never read an ACK
        pass


def settings_flood(a: Attacker, stop: threading.Event, root: Path) -> None:
    settings = frame(SETTINGS, 0, 0) * 100
    while not stop.is_set() and a.send(settings):
        pass


def rapid_reset(a: Attacker, stop: threading.Event, root: Path) -> None:
    body = frame(DATA, END_STREAM, 0, message(pb.CleanupRequest()))
    sid = 1
    while not stop.is_set():
        burst = b"".join(
            a.headers(s, "Cleanup")
            + body[:5]
            + struct.pack(">I", s)
            + body[9:]
            + frame(RST_STREAM, 0, s, struct.pack(">I", 8))
            for s in range(sid, sid + 200, 2)
        )
        sid += 200
        if not a.send(burst):
            return


def window_trickle(a: Attacker, stop: threading.Event, root: Path) -> None:
    body = message(pb.ListSnapshotsRequest())
    a.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 0)))  # stream windows of 0: nothing can go
    for i in range(1000):
        sid = 2 * i + 1
        a.send(a.headers(sid, "List") + frame(DATA, END_STREAM, sid, body))
    while not stop.is_set() and a.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)) * 50):
        pass


def unread_lists(a: Attacker, stop: threading.Event, root: Path) -> None:
    body = message(pb.ListSnapshotsRequest())
    for i in range(100):
        sid = 2 * i + 1
        a.send(a.headers(sid, "List") + frame(DATA, END_STREAM, sid, body))
    stop.wait()


def backtracking_regexp(a: Attacker, stop: threading.Event, root: Path) -> None:
    body = message(pb.ListSnapshotsRequest(filters=["labels.r~=^(v+)+x$"]))
    sid = 1
    while not stop.is_set():
        if not a.send(a.headers(sid, "List") + frame(DATA, END_STREAM, sid, body)):
            return
        sid += 2
        time.sleep(0.01)


def big_commit(a: Attacker, stop: threading.Event, root: Path) -> None:
    body = message(pb.CommitSnapshotRequest(name="big-committed", key="big"))
    a.send(a.headers(1, "Commit") + frame(DATA, END_STREAM, 1, body))
    stop.wait()


def prepare_store(client: SnapshotsClient, case: str, root: Path) -> None:
    if case in ("window_trickle", "unread_lists"):
        for i in range(1000):
            client.view(f"v{i:04d}", labels={"containerd.io/snapshot/pad": "x" * 200})
    if case == "backtracking_regexp":
        client.view("r", labels={"r": "v" * 26})
    if case == "big_commit":
        mounts = client.prepare("big")
        upper = Path(mounts[0].source)
        for i in range(100):
            d = upper / f"d{i}"
            d.mkdir()
            for j in range(1000):
                (d / str(j)).touch()


CASES: dict[str, Callable[[Attacker, threading.Event, Path], None]] = {
    "continuation_flood": continuation_flood,
    "stalled_data": stalled_data,
    "ping_flood": ping_flood,
    "settings_flood": settings_flood,
    "rapid_reset": rapid_reset,
    "window_trickle": window_trickle,
    "unread_lists": unread_lists,
    "backtracking_regexp": backtracking_regexp,
    "big_commit": big_commit,
}


def probe(socket_path: Path, timeout: float = 30.0) -> float:
    """Seconds for a Stat on a fresh connection (NOT_FOUND is an answer); inf if none came."""
    started = time.perf_counter()
    with grpc.insecure_channel(f"unix://{socket_path}") as ch:
        try:
            snapshots_pb2_grpc.SnapshotsStub(ch).Stat(pb.StatSnapshotRequest(key="probe"), timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                return float("inf")
    return time.perf_counter() - started


class CaseResult(TypedDict):
    """One case's figures: the daemon's RSS idle and at its peak, the slowest Stat during the
    attack and one after it, and whether the daemon survived."""

    case: str
    idle_mb: float
    peak_mb: float
    worst_probe_s: float
    probe_after_s: float
    alive: bool


def run_case(case: str, seconds: float, work: Path, env_path: str | None) -> CaseResult:
    root = work / case / "root"
    if env_path:
        os.environ["PYTHONPATH"] = env_path
    daemon = SnapshotterProcess(root).start()
    os.environ.pop("PYTHONPATH", None)
    assert daemon.proc is not None
    try:
        with grpc.insecure_channel(f"unix://{daemon.socket}") as ch:
            prepare_store(SnapshotsClient(ch), case, root)
        probe(daemon.socket)
        idle = rss_mb(daemon.proc.pid)
        stop = threading.Event()
        attacker = Attacker(daemon.socket)
        thread = threading.Thread(target=CASES[case], args=(attacker, stop, root), daemon=True)
        thread.start()
        peak, worst, deadline = idle, 0.0, time.monotonic() + seconds
        while time.monotonic() < deadline and daemon.proc.poll() is None:
            worst = max(worst, probe(daemon.socket))
            peak = max(peak, rss_mb(daemon.proc.pid))
            time.sleep(0.2)
        stop.set()
        attacker.close()
        thread.join(timeout=10)
        alive = daemon.proc.poll() is None
        after = probe(daemon.socket) if alive else float("inf")
        return {
            "case": case,
            "idle_mb": idle,
            "peak_mb": peak,
            "worst_probe_s": worst,
            "probe_after_s": after,
            "alive": alive,
        }
    finally:
        daemon.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--pythonpath", default=None, help="run the daemon from this checkout")
    parser.add_argument("cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="abuse-") as work:
        os.chdir(work)  # `python -m` puts the cwd first on the daemon's path: keep --pythonpath first
        print(f"{'case':<22} {'idle MB':>8} {'peak MB':>8} {'+MB':>6} {'worst Stat':>11} {'Stat after':>11} alive")
        for case in args.cases:
            r = run_case(case, args.seconds, Path(work), args.pythonpath)
            print(
                f"{r['case']:<22} {r['idle_mb']:>8.1f} {r['peak_mb']:>8.1f} {r['peak_mb'] - r['idle_mb']:>6.1f} "
                f"{r['worst_probe_s']:>10.3f}s {r['probe_after_s']:>10.3f}s {r['alive']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
