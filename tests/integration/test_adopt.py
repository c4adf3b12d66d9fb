"""Taking over the Go original's root: what the Go program answers for every snapshot, our daemon
answers the same after it started on that root; a Go program still running, a damaged bolt file
and a killed adoption change nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from addlower.dev.devcontainerd import GO_ORIGINAL, SnapshotterProcess
from addlower.ops.client import SnapshotsClient
from tests.support import gostore
from tests.support.daemon import Daemon


@pytest.fixture
def go_root(tmp_path: Path) -> Iterator[Path]:
    """A root the Go program populated (gostore.populate) and then stopped serving."""
    assert GO_ORIGINAL.exists(), f"{GO_ORIGINAL} is missing: scripts/setup.sh builds it"
    go = SnapshotterProcess(tmp_path / "root", command=[str(GO_ORIGINAL)]).start()
    try:
        with grpc.insecure_channel(f"unix://{go.socket}") as channel:
            gostore.populate(SnapshotsClient(channel))
    finally:
        go.stop()
    yield go.root


def answers(socket: Path) -> dict[str, tuple]:
    """Every snapshot as Stat, List and Usage answer it."""
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        client = SnapshotsClient(channel)
        found = {}
        for info in client.list():
            usage = client.usage(info.name) if info.kind == 3 else None  # committed: recorded usage
            stat = client.stat(info.name)
            assert stat == info
            found[info.name] = (
                info.parent,
                info.kind,
                info.created_at.ToNanoseconds(),
                info.updated_at.ToNanoseconds(),
                dict(info.labels),
                (usage.size, usage.inodes) if usage else None,
            )
        return found


def test_every_snapshot_is_answered_as_the_go_program_answered_it(go_root: Path):
    go = SnapshotterProcess(go_root, command=[str(GO_ORIGINAL)]).start()
    try:
        theirs = answers(go.socket)
    finally:
        go.stop()
    dirs = set(os.listdir(go_root / "snapshots"))
    doctor = subprocess.run(["addlower", "doctor", "--root-dir", str(go_root)], capture_output=True, text=True)
    assert f"{len(theirs)} snapshots ({gostore.LAYERS} committed" in " ".join(doctor.stdout.split())
    assert len(theirs) == 3 * gostore.LAYERS + 1
    assert len(dirs) == len(theirs) + gostore.REMOVED  # the Go program leaves removed ones' dirs
    daemon = Daemon(root=go_root).start()
    try:
        assert answers(daemon.socket) == theirs
        assert theirs["ns/big/labelled"][4][gostore.BIG_LABEL] == gostore.BIG_VALUE
        assert (go_root / "metadata.db.bolt").is_file()
        assert not (go_root / "metadata.db.adopting").exists()
        with daemon.channel() as channel:
            client = SnapshotsClient(channel)
            # A new snapshot's dir takes none of the ids the Go program handed out, the removed
            # snapshots' (the last ones) included.
            client.prepare("ns/new/after", gostore.layer_key(gostore.LAYERS - 1))
            assert set(os.listdir(go_root / "snapshots")) - dirs == {str(len(dirs) + 1)}
            client.cleanup()  # the removed ones' dirs are garbage now: their ids are no snapshot's
            assert len(os.listdir(go_root / "snapshots")) == len(theirs) + 1
    finally:
        daemon.stop()
    again = Daemon(root=go_root).start()  # a restart reads our store; the bolt file stays aside
    try:
        assert len(answers(again.socket)) == len(theirs) + 1
    finally:
        again.stop()


def test_a_running_go_program_is_refused_not_raced(go_root: Path):
    """Found by its socket, or by bbolt's lock on the file once it served a call (with another
    socket for us, as a config's `address` gives)."""
    go = SnapshotterProcess(go_root, command=[str(GO_ORIGINAL)]).start()
    before = (go_root / "metadata.db").read_bytes()
    other = go_root.parent / "other.toml"
    other.write_text(f'address = "{go_root.parent / "other.sock"}"\n')
    try:
        same_socket = start_ours(go_root)
        with grpc.insecure_channel(f"unix://{go.socket}") as channel:
            assert SnapshotsClient(channel).list()  # bbolt opens (and locks) the file at its first call
        other_socket = start_ours(go_root, "--config", str(other))
    finally:
        go.stop()
    assert same_socket.returncode == other_socket.returncode == 1
    assert "grpc.socks: another process is serving on it" in same_socket.stderr
    assert "metadata.db is open in another process (the Go snapshotter still running?)" in other_socket.stderr
    assert (go_root / "metadata.db").read_bytes() == before
    assert not (go_root / "metadata.db.bolt").exists() and not (go_root / "metadata.db.adopting").exists()


def start_ours(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "addlower.cli", "--root-dir", str(root), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_a_damaged_bolt_file_is_refused_and_left_as_it_was(go_root: Path):
    db = go_root / "metadata.db"
    data = bytearray(db.read_bytes())
    page_size = 4096
    data[3 * page_size : 3 * page_size + 8] = (7777).to_bytes(8, "little")  # a page that names another id
    db.write_bytes(data)
    with pytest.raises(RuntimeError, match=r"metadata.db: page \d+ says it is page 7777; nothing was changed"):
        Daemon(root=go_root).start()
    assert db.read_bytes() == data
    assert sorted(os.listdir(go_root)) == ["metadata.db", "snapshots"]  # and the stale socket is gone


def test_an_adoption_killed_before_its_rename_starts_over(go_root: Path):
    # What a kill after writing the new database and linking the bolt file leaves: a half-written
    # database with a hot journal, and the link.
    (go_root / "metadata.db.adopting").write_bytes(b"half")
    (go_root / "metadata.db.adopting-journal").write_bytes(b"journal")
    os.link(go_root / "metadata.db", go_root / "metadata.db.bolt.new")
    kept = go_root.parent / "bolt"
    shutil.copyfile(go_root / "metadata.db", kept)
    daemon = Daemon(root=go_root).start()
    try:
        with daemon.channel() as channel:
            assert len(SnapshotsClient(channel).list()) == 3 * gostore.LAYERS + 1
    finally:
        daemon.stop(signal.SIGTERM)
    assert (go_root / "metadata.db.bolt").read_bytes() == kept.read_bytes()
    leftovers = {"metadata.db.adopting", "metadata.db.adopting-journal", "metadata.db.bolt.new"}
    assert leftovers.isdisjoint(os.listdir(go_root))
