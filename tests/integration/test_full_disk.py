"""A full filesystem under the root: calls fail with RESOURCE_EXHAUSTED naming it, and containers
can still be removed through the API, which frees the room (a real ext4, loop-mounted, filled by a
container's writes)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from addlower.core.labels import UPPERDIR_LABEL
from addlower.ops.client import SnapshotsClient
from tests.support.daemon import Daemon


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 64 MiB ext4 (no blocks reserved for root: the daemon is root) mounted at tmp_path/fs."""
    image, mnt = tmp_path / "fs.img", tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> int:
    """Write files into `directory` until the filesystem is full (blocks, then inodes); the bytes written."""
    written = 0
    chunk = b"\xa5" * (1 << 20)
    with open(directory / "big", "wb") as f:
        try:
            while True:
                written += f.write(chunk)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    for n in range(100_000):  # the last blocks, and the inodes
        try:
            (directory / f"small-{n}").write_bytes(b"x")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            break
    return written


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_full_disk_refuses_creates_by_name_and_removing_a_container_frees_it(small_fs: Path, mode: str):
    args = ["--upperdir-label=true"] + ([] if mode == "async" else ["--async-remove=false"])
    d = Daemon(root=small_fs, args=args).start()  # its log is beside the filesystem, not on it
    try:
        with d.channel() as ch:
            c = SnapshotsClient(ch)
            c.prepare("image-active")
            c.commit("image", "image-active")
            c.prepare("job", "image")
            upper = Path(c.stat("job").labels[UPPERDIR_LABEL])
            written = fill(upper)  # the container writes until the disk is full
            assert written > 16 << 20
            assert free_bytes(small_fs) < 1 << 20

            with pytest.raises(grpc.RpcError) as refused:
                c.prepare("next", "image")
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"the filesystem of {small_fs} (mounted at {small_fs}) is full" in (refused.value.details() or "")
        # A restart on the full disk comes back serving (SQLite must make its -wal and -shm again).
        d.stop()
        d = Daemon(root=small_fs, args=args).start()
        with d.channel() as ch:
            c = SnapshotsClient(ch)
            with pytest.raises(grpc.RpcError) as refused:
                c.commit("job-done", "job")
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            c.remove("job")  # the operator removes the container through containerd
            c.cleanup()  # containerd's GC then calls Cleanup
            assert not upper.exists()
            assert free_bytes(small_fs) > written
            c.prepare("next", "image")  # and the node works again
            assert {i.name for i in c.list()} == {"image", "next"}
    finally:
        d.stop()
    log = d.log()
    assert "Traceback" not in log and "level=error" not in log, log[-3000:]
    assert "is full" in log and "released its reserve" in log
