"""The daemon as an operator meets it: flags, socket handling, start-up failures, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from addlower.api import snapshots_pb2 as pb
from addlower.engine import store
from addlower.ops.client import SnapshotsClient
from tests.support.daemon import Daemon

CMD = [sys.executable, "-m", "addlower.cli"]


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout)


def test_socket_is_created_with_mode_0660_and_startup_line_names_everything(daemon: Daemon):
    mode = stat.S_IMODE(os.stat(daemon.socket).st_mode)
    assert mode == 0o660
    line = next(entry for entry in daemon.log().splitlines() if "serving" in entry)
    for part in ("msg=serving version=0.", f"root={daemon.root}", f"socket={daemon.socket}", "async_remove=True"):
        assert part in line


def test_sigterm_exits_zero_and_removes_the_socket(daemon: Daemon):
    assert daemon.stop(signal.SIGTERM) == 0
    assert not daemon.socket.exists()


def test_sigint_exits_zero(daemon: Daemon):
    assert daemon.stop(signal.SIGINT) == 0


def test_in_flight_call_finishes_after_sigterm(daemon: Daemon, client: SnapshotsClient):
    client.prepare("big")
    root_fs = daemon.root / "snapshots" / "1" / "fs"
    for i in range(200):  # enough files that the walk takes a good fraction of a second
        d = root_fs / f"d{i}"
        d.mkdir()
        for j in range(200):
            (d / str(j)).touch()
    result: dict[str, pb.UsageResponse] = {}
    started = threading.Event()

    def call() -> None:
        started.set()
        result["usage"] = client.usage("big")

    t = threading.Thread(target=call)
    t.start()
    started.wait()
    time.sleep(0.1)  # let the call reach the daemon
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    t.join(timeout=30)
    assert result["usage"].inodes == 1 + 200 + 200 * 200
    assert daemon.proc.wait(timeout=30) == 0


def test_stale_socket_file_is_replaced(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(root / "grpc.socks"))
    stale.close()  # the file stays, nobody listens
    d = Daemon(root=root).start()
    try:
        with d.channel() as ch:
            assert SnapshotsClient(ch).list() == []
    finally:
        d.kill()


def test_socket_held_by_a_live_daemon_is_not_taken(daemon: Daemon):
    second = run_cli("--root-dir", str(daemon.root))
    assert second.returncode != 0
    assert "another process is serving" in second.stderr
    with daemon.channel() as ch:  # the first one still serves
        assert SnapshotsClient(ch).list() == []


def test_listen_failure_exits_nonzero_with_a_message(tmp_path: Path):
    bad = tmp_path / "not-a-socket"
    bad.write_text("x")
    r = run_cli("--root-dir", str(tmp_path / "root"), "--address", str(bad))
    assert r.returncode != 0
    assert f"cannot listen on {bad}" in r.stderr


def test_unusable_root_exits_nonzero_with_a_message(tmp_path: Path):
    root = tmp_path / "file-not-dir"
    root.write_text("x")
    r = run_cli("--root-dir", str(root))
    assert r.returncode != 0
    assert f"root {root} is unusable" in r.stderr


def test_read_only_root_is_refused(tmp_path: Path):
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)], check=True)
    try:
        r = run_cli("--root-dir", str(ro / "root"))
        assert r.returncode != 0
        assert "is unusable" in r.stderr and "Read-only file system" in r.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_address_flag_moves_the_socket(tmp_path: Path):
    sock = tmp_path / "elsewhere" / "snap.sock"
    proc = subprocess.Popen(
        [*CMD, "--root-dir", str(tmp_path / "root"), "--address", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            grpc.channel_ready_future(ch).result(timeout=15)
            assert SnapshotsClient(ch).list() == []
        assert not (tmp_path / "root" / "grpc.socks").exists()
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


@pytest.mark.parametrize("flag", ["--async-remove=false", "-async-remove=false"])
def test_async_remove_false_deletes_at_once(tmp_path: Path, flag: str):
    d = Daemon(root=tmp_path / "root", args=[flag]).start()
    try:
        with d.channel() as ch:
            c = SnapshotsClient(ch)
            c.prepare("a")
            assert (d.root / "snapshots" / "1").is_dir()
            c.remove("a")
            assert os.listdir(d.root / "snapshots") == []
        assert "async_remove=False" in d.log()
    finally:
        d.kill()


def test_version_and_help():
    v = run_cli("--version")
    assert v.returncode == 0 and "0." in v.stdout
    h = run_cli("--help")
    assert h.returncode == 0
    assert "Defer deleting removed snapshots" in h.stdout  # --async-remove's own help, not swapped
    assert "overlay.upperdir" in h.stdout


def test_admin_serve_runs_the_same_daemon(tmp_path: Path):
    root = tmp_path / "root"
    proc = subprocess.Popen(
        ["addlower", "serve", "--root-dir", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with grpc.insecure_channel(f"unix://{root}/grpc.socks") as ch:
            grpc.channel_ready_future(ch).result(timeout=15)
            SnapshotsClient(ch).prepare("x")
        assert (root / "snapshots" / "1" / "fs").is_dir()
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


def test_readiness_is_sent_to_systemd_when_asked(tmp_path: Path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(15)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc = subprocess.Popen(
        [*CMD, "--root-dir", str(tmp_path / "root")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert notify.recv(100) == b"READY=1"
        assert (tmp_path / "root" / "grpc.socks").exists()  # ready means listening
        proc.terminate()
        assert notify.recv(100) == b"STOPPING=1"
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        notify.close()


def test_a_root_with_a_foreign_metadata_db_is_refused_clearly(tmp_path: Path):
    root = tmp_path / "root"
    (root / "snapshots").mkdir(parents=True)
    (root / "metadata.db").write_bytes(b"\x00bolt" * 2000)  # what the Go original leaves: not SQLite
    r = run_cli("--root-dir", str(root))
    assert r.returncode == 1
    assert "file is not a database" in r.stderr and "Go original" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_snapshot_whose_dir_was_lost_is_reported_once_the_daemon_serves(tmp_path: Path):
    """A power cut can lose a renamed dir while its row stays: start-up says which, by id and
    path, after the socket listens (a stat per snapshot), and calls are answered meanwhile."""
    root = tmp_path / "root"
    d = Daemon(root=root).start()
    with d.channel() as ch:
        SnapshotsClient(ch).prepare("kept")
        SnapshotsClient(ch).prepare("lost")
    d.stop()
    os.rename(root / "snapshots" / "2", tmp_path / "gone")
    d = Daemon(root=root).start()
    try:
        with d.channel() as ch:
            assert SnapshotsClient(ch).stat("lost").name == "lost"
        deadline = time.monotonic() + 10
        while "has no directory" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        [line] = [entry for entry in d.log().splitlines() if "has no directory" in entry]
        assert f"snapshot id 2 has no directory {root}/snapshots/2/fs" in line and "level=error" in line
    finally:
        assert d.stop() == 0


def test_a_large_store_of_an_older_daemon_is_answered_at_once_and_its_list_replies_filled(tmp_path: Path):
    """20,000 committed snapshots written as a daemon that kept no List replies left them (schema 1
    without the reply column): the daemon opens them without reading them, answers a Stat and a
    List at once, right, and encodes the missing replies once it listens."""
    root = tmp_path / "root"
    (root / "snapshots").mkdir(parents=True)
    n = 20_000
    with sqlite3.connect(root / "metadata.db") as older:
        older.execute("PRAGMA journal_mode = WAL")
        for statement in store._SCHEMA:
            older.execute(statement)
        older.execute("PRAGMA user_version = 1")
        older.executemany(
            "INSERT INTO snapshots(key, kind, parent_id, created_at, updated_at, labels) VALUES (?, 3, ?, 1, 2, ?)",
            ((f"layer-{i:05d}", i - 1 if i % 10 else None, json.dumps({"n": str(i)})) for i in range(1, n + 1)),
        )
    for i in range(1, n + 1):
        (root / "snapshots" / str(i) / "fs").mkdir(parents=True)
    d = Daemon(root=root).start()
    try:
        with d.channel() as ch:
            client = SnapshotsClient(ch)
            info = client.stat(f"layer-{n - 1:05d}")
            assert (info.parent, dict(info.labels)) == (f"layer-{n - 2:05d}", {"n": str(n - 1)})
            listed = client.list()
        assert [i.name for i in listed] == [f"layer-{i:05d}" for i in range(1, n + 1)]
        assert all(dict(i.labels) == {"n": str(k)} for k, i in enumerate(listed, 1))
        deadline = time.monotonic() + 60
        while "encoded the List replies" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"encoded the List replies of {n} snapshots stored without one" in d.log()
        with d.channel() as ch:
            assert [i.name for i in SnapshotsClient(ch).list()] == [i.name for i in listed]
    finally:
        assert d.stop() == 0
