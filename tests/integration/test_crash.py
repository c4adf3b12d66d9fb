"""kill -9 at random instants of a prepare/commit/remove loop: the store must stay consistent.

After each kill the daemon restarts on the same root. Then: every acknowledged commit is still
there, every snapshot in the metadata has its directories, and after Cleanup the directories
under snapshots/ are exactly the live snapshots.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import pytest

from addlower.core.mounts import Kind
from addlower.ops.client import SnapshotsClient
from tests.support.daemon import Daemon

ROUNDS = 12


def workload(client: SnapshotsClient, acked: set[str], stop: threading.Event, seed: int) -> None:
    """Chains of prepare -> write -> commit, with removals; records what was acknowledged."""
    rng = random.Random(seed)
    parent = ""
    n = 0
    while not stop.is_set():
        n += 1
        key, name = f"s{seed}-{n}-active", f"s{seed}-{n}"
        try:
            client.prepare(key, parent)
            if rng.random() < 0.2:
                client.remove(key)
                continue
            client.commit(name, key)
            acked.add(name)
            parent = name
            if rng.random() < 0.3:
                acked.discard(parent)  # from here on it may or may not exist
                client.remove(parent)
                parent = ""
        except grpc.RpcError:
            return  # the daemon died under us


def check_consistent(root: Path, acked: set[str]) -> None:
    db = sqlite3.connect(f"file:{root / 'metadata.db'}?mode=ro", uri=True)
    rows = db.execute("SELECT id, key, kind, parent_id FROM snapshots").fetchall()
    db.close()
    ids = {r[0] for r in rows}
    keys = {r[1] for r in rows}
    assert acked <= keys, f"acknowledged commits lost: {sorted(acked - keys)}"
    for sid, key, kind, parent_id in rows:
        d = root / "snapshots" / str(sid)
        assert (d / "fs").is_dir(), f"snapshot {key} (id {sid}) has no fs directory"
        if kind == Kind.ACTIVE:  # committed ones keep theirs, as in containerd
            assert (d / "work").is_dir(), f"active snapshot {key} has no work dir"
        assert parent_id is None or parent_id in ids, f"{key} points at missing parent {parent_id}"


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_kill_9_at_random_points_leaves_a_consistent_store(tmp_path: Path, mode: str):
    root = tmp_path / "root"
    args = [] if mode == "async" else ["--async-remove=false"]
    rng = random.Random(1234)
    acked: set[str] = set()
    for round_ in range(ROUNDS):
        d = Daemon(root=root, args=args).start()
        stop = threading.Event()
        with d.channel() as ch:
            client = SnapshotsClient(ch)
            workers = [threading.Thread(target=workload, args=(client, acked, stop, round_ * 10 + w))
                       for w in range(2)]
            for w in workers:
                w.start()
            time.sleep(rng.uniform(0.05, 0.4))
            d.kill()
            stop.set()
            for w in workers:
                w.join(timeout=30)
        d = Daemon(root=root, args=args).start()
        try:
            check_consistent(root, acked)
            with d.channel() as ch:
                client = SnapshotsClient(ch)
                listed = {i.name for i in client.list()}
                assert acked <= listed
                client.cleanup()
            db = sqlite3.connect(f"file:{root / 'metadata.db'}?mode=ro", uri=True)
            live = {str(r[0]) for r in db.execute("SELECT id FROM snapshots")}
            db.close()
            assert set(os.listdir(root / "snapshots")) == live
        finally:
            d.stop()
    assert acked, "the workload never got a commit acknowledged"
