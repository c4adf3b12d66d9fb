"""Attacks on the extra-lowers policy, through the daemon's socket with real mounts: whoever can
write under an allowed root swaps dirs for symlinks while the daemon checks them, hostile labels
and keys, a lost metadata.db, and removals that must never reach into a host dir."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import sqlite3
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from addlower.api import snapshots_pb2 as pb
from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.core.labels import POD_LABEL
from addlower.core.lowers import DEFAULT_ALLOWED_ROOTS
from addlower.dev.devcontainerd import unmount_under
from addlower.dev.mounting import mounted
from addlower.ops.client import SnapshotsClient
from tests.integration.layers import expect_code
from tests.support.daemon import Daemon, allowing, config_args
from tests.support.logfmt import parse

Code = grpc.StatusCode
RACE_SECONDS = 3.0
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    """Swap two names atomically (renameat2 RENAME_EXCHANGE), as an attacker's loop would."""
    if _libc.renameat2(-100, bytes(a), -100, bytes(b), RENAME_EXCHANGE) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


@contextmanager
def swapping(a: Path, b: Path) -> Iterator[None]:
    """Keep swapping `a` and `b` in a thread for the duration of the block."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            exchange(a, b)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


@contextmanager
def serving(root: Path, args: list[str]) -> Iterator[tuple[Daemon, SnapshotsClient]]:
    d = Daemon(root=root, args=args).start()
    try:
        with d.channel() as ch:
            yield d, SnapshotsClient(ch)
    finally:
        d.kill()


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed root with a job-writable dir in it, and a host dir outside it with a secret."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "cache").mkdir(parents=True)
    (allowed / "cache" / "which").write_text("inside\n")
    outside.mkdir()
    (outside / "which").write_text("outside\n")
    return allowed, outside


def test_swapping_a_checked_dir_for_a_symlink_never_mounts_the_symlinks_target(
    tmp_path: Path, layout: tuple[Path, Path]
):
    allowed, outside = layout
    (allowed / "link").symlink_to(outside)
    seen: dict[str, int] = {}
    with (
        serving(tmp_path / "root", allowing(tmp_path / "c.toml", allowed)) as (_, c),
        swapping(allowed / "cache", allowed / "link"),
    ):
        deadline, n = time.monotonic() + RACE_SECONDS, 0
        while time.monotonic() < deadline:
            n += 1
            try:
                mounts = c.prepare(f"c{n}", labels={LOWERS: str(allowed / "cache")})
            except grpc.RpcError as err:
                details = err.details() or ""
                assert err.code() == Code.INVALID_ARGUMENT and "is a symlink or not a directory" in details
                seen["refused"] = seen.get("refused", 0) + 1
                continue
            with mounted(mounts, tmp_path / "mnt") as m:  # the mount comes after the check, as containerd's
                which = (m / "which").read_text().strip()
            seen[which] = seen.get(which, 0) + 1
            c.remove(f"c{n}")
    assert "outside" not in seen, seen
    assert seen.get("inside") and seen.get("refused"), f"the race did not run both ways: {seen}"


def test_missing_dirs_are_never_made_outside_the_allowed_root_however_the_path_moves(
    tmp_path: Path, layout: tuple[Path, Path]
):
    allowed, outside = layout
    (allowed / "link").symlink_to(outside)
    made = 0
    with (
        serving(tmp_path / "root", allowing(tmp_path / "c.toml", allowed)) as (_, c),
        swapping(allowed / "cache", allowed / "link"),
    ):
        deadline, n = time.monotonic() + RACE_SECONDS, 0
        while time.monotonic() < deadline:
            n += 1
            try:
                c.prepare(f"c{n}", labels={LOWERS: str(allowed / "cache" / f"new{n}")})
                made += 1
            except grpc.RpcError as err:
                assert err.code() == Code.INVALID_ARGUMENT, err.details()
    assert sorted(os.listdir(outside)) == ["which"]
    assert made and len(list(allowed.glob("*/new*"))) == made


def test_pins_show_host_changes_and_cannot_be_written_through(daemon: Daemon, client: SnapshotsClient, tmp_path: Path):
    host = tmp_path / "host"
    host.mkdir()
    [m] = client.prepare("c", labels={LOWERS: str(host)})
    lowerdir = next(o for o in m.options if o.startswith("lowerdir=")).removeprefix("lowerdir=")
    st = os.stat(host)  # a path only root can reach, named for the dir it pins, not the host path
    assert lowerdir == f"{daemon.root}/lowers/pins/{st.st_dev}-{st.st_ino}"
    assert stat.S_IMODE(os.stat(daemon.root).st_mode) == 0o700
    (host / "later").write_text("live\n")
    assert (Path(lowerdir) / "later").read_text() == "live\n"
    with pytest.raises(OSError, match="Read-only file system"):
        (Path(lowerdir) / "x").write_text("no")
    client.remove("c")
    assert not Path(lowerdir).exists() and (host / "later").exists()


def no_pins(root: Path) -> bool:
    """No snapshot records a pin, and no pin is left."""
    return os.listdir(root / "lowers") == ["pins"] and os.listdir(root / "lowers" / "pins") == []


@pytest.mark.parametrize("sync", [False, True])
def test_removal_and_cleanup_never_delete_through_a_mount(tmp_path: Path, sync: bool):
    """A snapshot dir with a host dir mounted inside (a stray mount, or a bug that put a pin
    there): Remove and Cleanup leave it, and the host dir keeps every file."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "precious").write_text("keep\n")
    args = allowing(tmp_path / "c.toml", host) + (["--async-remove=false"] if sync else [])
    with serving(tmp_path / "root", args) as (d, c):
        c.prepare("with-lower", labels={LOWERS: str(host)})
        c.prepare("victim")
        inside = d.root / "snapshots" / "2" / "fs" / "mnt"
        inside.mkdir()
        subprocess.run(["mount", "--bind", str(host), str(inside)], check=True)
        try:
            for key in ("with-lower", "victim"):
                c.remove(key)
            c.cleanup()
            assert (host / "precious").read_text() == "keep\n"
            assert "not removing it" in d.log()
        finally:  # wherever the removal renamed the dir to
            unmount_under(d.root / "snapshots")
        c.cleanup()  # unmounted: now it goes
        assert os.listdir(d.root / "snapshots") == [] and no_pins(d.root)
    assert (host / "precious").read_text() == "keep\n"


@pytest.mark.parametrize(
    "value, says",
    [
        ("{allowed}/afile/x", "{allowed}/afile is a symlink or not a directory"),
        ("{allowed}/" + "y" * 300, "is longer than 255 bytes"),
        ("{allowed}/a\u0085b", "character '\\x85'"),
        ("{allowed}/a\u202eb", "character '\\u202e'"),
    ],
)
def test_filesystem_and_character_refusals_are_invalid_argument_naming_the_entry(tmp_path: Path, value: str, says: str):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "afile").write_text("x")
    with serving(tmp_path / "root", allowing(tmp_path / "c.toml", allowed)) as (d, c):
        value = value.format(allowed=allowed)
        err = expect_code(Code.INVALID_ARGUMENT, c.prepare, "c", labels={LOWERS: value})
        assert says.format(allowed=allowed) in err.details() and LOWERS in err.details()
        assert c.list() == [] and os.listdir(d.root / "snapshots") == []
        assert "Traceback" not in d.log()


def test_a_refused_entry_leaves_no_dir_made_for_an_earlier_one(tmp_path: Path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "afile").write_text("x")
    with serving(tmp_path / "root", allowing(tmp_path / "c.toml", allowed)) as (d, c):
        expect_code(Code.INVALID_ARGUMENT, c.prepare, "c", labels={LOWERS: f"{allowed}/new/deep:{allowed}/afile/x"})
        assert sorted(os.listdir(allowed)) == ["afile"]
        assert no_pins(d.root)


def test_the_default_policy_takes_the_cache_root_and_nothing_else(tmp_path: Path):
    """With no settings (an empty config file is the defaults, as no file at all)."""
    mine = Path(DEFAULT_ALLOWED_ROOTS[0]) / f"test-{os.getpid()}-{time.monotonic_ns()}"
    made_root = not mine.parent.exists()
    try:
        with serving(tmp_path / "root", config_args(tmp_path / "c.toml", "")) as (_, c):
            for path in ("/etc", "/var/lib/kubelet/pods/x", "/opt/cache"):
                err = expect_code(Code.INVALID_ARGUMENT, c.prepare, "c", labels={LOWERS: path})
                assert "outside the allowed roots" in err.details() and "lowers.allowed_roots" in err.details()
            assert not Path("/var/lib/kubelet/pods/x").exists() and not Path("/opt/cache").exists()
            c.prepare("c", labels={LOWERS: f"{mine}/m2"})
            assert (mine / "m2").is_dir()
            c.remove("c")
    finally:
        shutil.rmtree(mine, ignore_errors=True)
        if made_root:
            os.rmdir(mine.parent)


def test_the_pod_label_is_the_snapshotters_own(client: SnapshotsClient):
    err = expect_code(Code.INVALID_ARGUMENT, client.prepare, "c", labels={POD_LABEL: "team-a/x"})
    assert f"label {POD_LABEL} is set by the snapshotter only" in err.details()
    client.prepare("c")
    expect_code(Code.INVALID_ARGUMENT, client.update, "c", {POD_LABEL: "team-a/x"}, [f"labels.{POD_LABEL}"])


def test_a_newline_in_a_key_cannot_forge_a_log_line(tmp_path: Path):
    with serving(tmp_path / "root", ["--log-level", "debug"]) as (d, c):
        forged = "k\ntime=2026 level=ERROR logger=addlower msg=forged"
        expect_code(Code.NOT_FOUND, c.stat, forged)
    entries = parse(d.log(), "text")  # one record per line, whatever the key held
    assert not any(e["msg"] == "forged" or e["time"] == "2026" for e in entries)
    assert any(e.get("key") == forged for e in entries)


def populated(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "root"
    with serving(root, []) as (_, c):
        c.prepare("a")
        c.commit("base", "a")
        c.prepare("b", "base")
    return root, sorted(os.listdir(root / "snapshots"))


@pytest.mark.parametrize("damage", ["emptied", "deleted"])
def test_a_root_whose_metadata_is_lost_is_refused_and_kept(tmp_path: Path, damage: str):
    root, dirs = populated(tmp_path)
    for suffix in ("-wal", "-shm"):
        (root / f"metadata.db{suffix}").unlink(missing_ok=True)
    if damage == "emptied":
        (root / "metadata.db").write_bytes(b"")
    else:
        (root / "metadata.db").unlink()
    d = Daemon(root=root)
    with pytest.raises(RuntimeError, match="exited 1") as err:
        d.start()
    assert "metadata.db is missing or empty" in str(err.value) and "Nothing was changed" in str(err.value)
    assert sorted(os.listdir(root / "snapshots")) == dirs == ["1", "2"]


def test_a_root_whose_metadata_is_older_than_its_snapshots_is_refused(tmp_path: Path):
    root = tmp_path / "root"
    with serving(root, []) as (_, c):
        c.prepare("a")
    old = tmp_path / "old.db"
    with sqlite3.connect(root / "metadata.db") as src, sqlite3.connect(old) as dst:
        src.backup(dst)
    with serving(root, []) as (_, c):
        for key in ("b", "c", "d"):
            c.prepare(key)
    for suffix in ("-wal", "-shm"):
        (root / f"metadata.db{suffix}").unlink(missing_ok=True)
    shutil.copy(old, root / "metadata.db")
    with pytest.raises(RuntimeError, match="never handed out") as err:
        Daemon(root=root).start()
    assert "[3, 4]" in str(err.value)
    assert sorted(os.listdir(root / "snapshots")) == ["1", "2", "3", "4"]


# --- found by an attack study of the pins --------------------------------------------------------


def test_a_container_made_tree_deeper_than_python_recursion_is_removed(tmp_path: Path):
    with serving(tmp_path / "root", []) as (d, c):
        c.prepare("deep")
        c.prepare("other")
        fd = os.open(d.root / "snapshots" / "1" / "fs", os.O_RDONLY)  # what a container does in its rootfs
        for _ in range(1200):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(fd)
        c.remove("deep")
        c.remove("other")
        c.cleanup()
        assert os.listdir(d.root / "snapshots") == []


def test_a_dir_removed_by_its_writer_while_pinned_is_invalid_argument(tmp_path: Path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    x, stop, codes, pinned = allowed / "x", threading.Event(), set(), 0

    def writer() -> None:
        while not stop.is_set():
            for op in (os.mkdir, os.rmdir):
                with contextlib.suppress(OSError):
                    op(x)

    with serving(tmp_path / "root", allowing(tmp_path / "c.toml", allowed)) as (d, c):
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        refused = 0
        try:  # until the race went both ways: pinned, and refused because the dir went meanwhile
            for n in range(3000):
                try:
                    c.prepare(f"k{n}", labels={LOWERS: str(x)})
                    c.remove(f"k{n}")
                    pinned += 1
                except grpc.RpcError as err:
                    codes.add(err.code())
                    refused += 1
                if pinned >= 20 and refused >= 20:
                    break
        finally:
            stop.set()
            t.join()
        assert pinned >= 20 and refused >= 20, f"the race did not run both ways: {pinned} pinned, {refused} refused"
        assert codes == {Code.INVALID_ARGUMENT} and "Traceback" not in d.log()


def test_a_dir_swapped_in_for_one_the_daemon_made_is_neither_chmodded_nor_removed(tmp_path: Path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "afile").write_text("x")
    victim = allowed / "victim"
    victim.mkdir(mode=0o700)
    os.chown(victim, 1234, 1234)  # another user's private dir, beside the one a label asks for
    with serving(tmp_path / "root", allowing(tmp_path / "c.toml", allowed)) as (_, c):
        for n in range(200):
            made, stop = allowed / f"new{n}", threading.Event()

            def swap(made: Path = made, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    with contextlib.suppress(OSError):
                        exchange(made, victim)

            t = threading.Thread(target=swap, daemon=True)
            t.start()
            try:  # odd rounds: a later entry is refused, so the daemon removes what it made
                label = str(made) + (f":{allowed}/afile/x" if n % 2 else "")
                with contextlib.suppress(grpc.RpcError):
                    c.prepare(f"k{n}", labels={LOWERS: label})
            finally:
                stop.set()
                t.join()
            owned = [p for p in (victim, made) if p.exists() and p.stat().st_uid == 1234]
            assert len(owned) == 1, f"round {n}: the other user's dir is gone: " + repr(
                [(e.name, e.stat(follow_symlinks=False).st_uid) for e in os.scandir(allowed)]
            )
            assert stat.S_IMODE(owned[0].stat().st_mode) == 0o700, f"round {n}: chmodded"
            if owned[0] != victim:
                os.rename(owned[0], victim)


def test_the_same_dir_twice_at_one_place_is_refused_before_the_mount_would_fail(
    daemon: Daemon, client: SnapshotsClient, tmp_path: Path
):
    cache = tmp_path / "cache"
    cache.mkdir()
    err = expect_code(Code.INVALID_ARGUMENT, client.prepare, "c", labels={LOWERS: f"{cache}:{cache}"})
    assert "the same dir as" in err.details()


def test_a_pin_left_writable_by_a_kill_is_made_read_only_again(tmp_path: Path):
    """A kill between a pin's bind mount and its read-only remount: the next daemon checks the
    pins it finds before it hands them out again."""
    cache, root = tmp_path / "cache", tmp_path / "root"
    cache.mkdir()
    args = allowing(tmp_path / "c.toml", cache)
    d = Daemon(root=root, args=args).start()
    with d.channel() as ch:
        [m] = SnapshotsClient(ch).prepare("c", labels={LOWERS: str(cache)})
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)  # not d.kill(): the harness would unmount the pins
    d.proc.wait()
    pin = next(o for o in m.options if o.startswith("lowerdir=")).removeprefix("lowerdir=")
    subprocess.run(["mount", "-o", "remount,bind,rw", str(pin)], check=True)
    assert not os.statvfs(pin).f_flag & os.ST_RDONLY
    d = Daemon(root=root, args=args).start()
    try:
        with d.channel() as ch:
            SnapshotsClient(ch).mounts("c")
        assert os.statvfs(pin).f_flag & os.ST_RDONLY
    finally:
        d.kill()


class HungFuse:
    """A FUSE filesystem mounted at `mountpoint` (as `fusermount -o allow_other` would for a user)
    whose server answers INIT and GETATTR and never a LOOKUP until released: a hung network or
    user filesystem under an allowed root."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.dev = os.open("/dev/fuse", os.O_RDWR)
        options = f"fd={self.dev},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if _libc.mount(b"fuse", bytes(mountpoint), b"fuse", 6, options) != 0:  # MS_NOSUID | MS_NODEV
            raise OSError(ctypes.get_errno(), "mount fuse")
        self.stuck, self.release = threading.Event(), threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                buf = os.read(self.dev, 1 << 17)
            except OSError:
                return
            _, op, unique = struct.unpack_from("<IIQ", buf)

            def reply(err: int, body: bytes = b"", unique: int = unique) -> None:
                with contextlib.suppress(OSError):
                    os.write(self.dev, struct.pack("<IiQ", 16 + len(body), err, unique) + body)

            if op == 26:  # INIT
                reply(0, struct.pack("<IIIIHHIIHHI", 7, 31, 0, 0, 16, 12, 4096, 1, 0, 0, 0).ljust(64, b"\0"))
            elif op == 3:  # GETATTR of the root
                attr = struct.pack("<QQQQQQIIIIIIIII", 1, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 2, 0, 0, 0, 4096)
                reply(0, struct.pack("<QII", 0, 0, 0) + attr.ljust(88, b"\0"))
            elif op == 1:  # LOOKUP: hang
                self.stuck.set()
                self.release.wait()
                reply(-2)
            else:
                reply(-38)

    def close(self) -> None:
        self.release.set()
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
        os.close(self.dev)


def test_a_hung_filesystem_under_an_allowed_root_stalls_only_the_call_that_walks_it(tmp_path: Path):
    allowed = tmp_path / "allowed"
    (allowed / "hung").mkdir(parents=True)
    (allowed / "fine").mkdir()
    fuse = HungFuse(allowed / "hung")

    def walk_the_hung_dir(c: SnapshotsClient) -> None:
        with contextlib.suppress(grpc.RpcError):
            c.prepare("x", labels={LOWERS: f"{allowed}/hung/sub"})

    try:
        with serving(tmp_path / "root", allowing(tmp_path / "c.toml", allowed)) as (d, c):
            try:
                c.prepare("probe")
                stalled = threading.Thread(target=walk_the_hung_dir, args=(c,), daemon=True)
                stalled.start()
                assert fuse.stuck.wait(10)
                with d.channel() as ch:  # another client: the loop and the store still serve it, in time
                    stub = SnapshotsClient(ch).stub
                    assert stub.Stat(pb.StatSnapshotRequest(key="probe"), timeout=5).info.name == "probe"
                    stub.Prepare(pb.PrepareSnapshotRequest(key="plain"), timeout=5)  # a writer meanwhile
                    stub.Prepare(
                        pb.PrepareSnapshotRequest(key="lowered", labels={LOWERS: f"{allowed}/fine"}), timeout=5
                    )  # and another call with host dirs
            finally:
                fuse.release.set()  # before the daemon is stopped: it may be waiting on the filesystem
                stalled.join(10)
    finally:
        fuse.close()
