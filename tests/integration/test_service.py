"""API-level facts of containerd's overlayfs snapshotter that the conformance suite
does not pin: exact mounts per case, error codes, Commit and Usage rules, List batching, the
on-disk layout, Cleanup with and without async remove, and the --upperdir-label flag.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from addlower.api import mount_pb2
from addlower.api import snapshots_pb2 as pb
from addlower.ops.client import SnapshotsClient
from tests.integration.layers import (
    apply,
    create_file,
    expect_code,
    link,
    mount_snapshot,
)
from tests.support.daemon import Daemon

Code = grpc.StatusCode
UPPERDIR_LABEL = "containerd.io/snapshot/overlay.upperdir"
MiB = 1 << 20


# --- helpers -------------------------------------------------------------------------------


def snapshot_ids(root: Path) -> set[int]:
    return {int(e) for e in os.listdir(root / "snapshots") if e.isdigit()}


def new_id(root: Path, create: Callable[[], object]) -> int:
    """Run a create call and return the id of the one snapshot directory it added."""
    before = snapshot_ids(root)
    create()
    (sid,) = snapshot_ids(root) - before
    return sid


def fs(root: Path, sid: int) -> str:
    return str(root / "snapshots" / str(sid) / "fs")


def work_dir(root: Path, sid: int) -> str:
    return str(root / "snapshots" / str(sid) / "work")


def _in_user_namespace() -> bool:
    with open("/proc/self/uid_map") as f:
        return f.read().split() != ["0", "0", "4294967295"]


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


def extra_options() -> list[str]:
    """containerd 1.7.4+: userxattr in a user namespace on kernel >= 5.11, then index=off when the
    overlay module has an `index` parameter."""
    opts = []
    if _in_user_namespace() and _kernel_at_least(5, 11):
        opts.append("userxattr")
    if os.path.exists("/sys/module/overlay/parameters/index"):
        opts.append("index=off")
    return opts


def as_tuples(mounts) -> list[tuple]:
    return [(m.type, m.source, m.target, list(m.options)) for m in mounts]


def disk_usage(path: Path) -> tuple[int, int]:
    """containerd's fs.DiskUsage: lstat walk including the root, each (dev, inode) counted once,
    size = sum of st_blocks * 512; returns (size, inodes)."""
    seen: dict[tuple[int, int], int] = {}
    paths = [path]
    for dirpath, dirnames, filenames in os.walk(path):
        paths += [Path(dirpath) / n for n in dirnames + filenames]
    for p in paths:
        st = os.lstat(p)
        seen.setdefault((st.st_dev, st.st_ino), st.st_blocks * 512)
    return sum(seen.values()), len(seen)


def usage_of(client: SnapshotsClient, key: str) -> tuple[int, int]:
    u = client.usage(key)
    return u.size, u.inodes


def write_mib(target: Path, name: str) -> None:
    """Write 1 MiB of incompressible data through a mount and flush it."""
    apply(target, create_file(name, os.urandom(MiB)))
    fd = os.open(target / name, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def restarted(daemon: Daemon, args: list[str] | None = None) -> Iterator[SnapshotsClient]:
    """Stop `daemon`, start a new one on the same root (optionally with other flags), and yield
    a client for it; the new daemon is killed afterwards."""
    assert daemon.stop(signal.SIGTERM) == 0
    again = Daemon(root=daemon.root, args=args or []).start()
    try:
        with again.channel() as channel:
            yield SnapshotsClient(channel)
    finally:
        again.kill()


@contextmanager
def extra_daemon(root: Path, *args: str) -> Iterator[tuple[Daemon, SnapshotsClient]]:
    d = Daemon(root=root, args=list(args)).start()
    try:
        with d.channel() as channel:
            yield d, SnapshotsClient(channel)
    finally:
        d.kill()


# --- mounts --------------------------------------------------------------------------------


def test_mounts_for_every_case(daemon: Daemon, client: SnapshotsClient):
    """Prepare/View/Mounts replies: bind rw,rbind for a parentless active, ro,rbind for a
    parentless view and for a view of one layer (the parent's fs), overlay with
    [extras, workdir, upperdir, lowerdir nearest-first] for actives, lowerdir only for views of
    2+ layers. Mounts returns the same as the create call."""
    root, extras = daemon.root, extra_options()
    c1 = new_id(root, lambda: client.prepare("c1-a"))
    client.commit("c1", "c1-a")
    c2 = new_id(root, lambda: client.prepare("c2-a", "c1"))
    client.commit("c2", "c2-a")

    cases: dict[str, list[mount_pb2.Mount]] = {}
    sid = new_id(root, lambda: cases.__setitem__("a0", client.prepare("a0")))
    expected = {"a0": [("bind", fs(root, sid), "", ["rw", "rbind"])]}
    sid = new_id(root, lambda: cases.__setitem__("v0", client.view("v0")))
    expected["v0"] = [("bind", fs(root, sid), "", ["ro", "rbind"])]
    new_id(root, lambda: cases.__setitem__("v1", client.view("v1", "c1")))
    expected["v1"] = [("bind", fs(root, c1), "", ["ro", "rbind"])]
    sid = new_id(root, lambda: cases.__setitem__("a1", client.prepare("a1", "c1")))
    expected["a1"] = [
        (
            "overlay",
            "overlay",
            "",
            [*extras, f"workdir={work_dir(root, sid)}", f"upperdir={fs(root, sid)}", f"lowerdir={fs(root, c1)}"],
        )
    ]
    sid = new_id(root, lambda: cases.__setitem__("a2", client.prepare("a2", "c2")))
    expected["a2"] = [
        (
            "overlay",
            "overlay",
            "",
            [
                *extras,
                f"workdir={work_dir(root, sid)}",
                f"upperdir={fs(root, sid)}",
                f"lowerdir={fs(root, c2)}:{fs(root, c1)}",
            ],
        )
    ]
    new_id(root, lambda: cases.__setitem__("v2", client.view("v2", "c2")))
    expected["v2"] = [("overlay", "overlay", "", [*extras, f"lowerdir={fs(root, c2)}:{fs(root, c1)}"])]

    for key, want in expected.items():
        assert as_tuples(cases[key]) == want, key
        assert as_tuples(client.mounts(key)) == want, key


def test_overlay_lowerdir_is_nearest_parent_first(client: SnapshotsClient, tmp_path: Path):
    """With three layers writing the same file, the active on top sees the nearest one's copy."""
    parent = ""
    for i in range(3):
        key = f"l{i}-a"
        with mount_snapshot(client.prepare(key, parent), tmp_path / key) as target:
            apply(target, create_file("/who", f"layer {i}\n"))
        parent = f"l{i}"
        client.commit(parent, key)
    with mount_snapshot(client.prepare("top", parent), tmp_path / "top") as target:
        assert (target / "who").read_text() == "layer 2\n"


def test_mounts_errors(client: SnapshotsClient):
    """Mounts of a committed snapshot is FAILED_PRECONDITION; of a missing key NOT_FOUND."""
    client.prepare("a")
    client.commit("c", "a")
    expect_code(Code.FAILED_PRECONDITION, client.mounts, "c")
    expect_code(Code.NOT_FOUND, client.mounts, "missing")


# --- errors of Stat, Prepare, Commit, Remove -----------------------------------------------


def test_missing_snapshot_is_not_found_everywhere(client: SnapshotsClient):
    """Stat, Usage, Remove and Commit of a key that does not exist are NOT_FOUND."""
    expect_code(Code.NOT_FOUND, client.stat, "missing")
    expect_code(Code.NOT_FOUND, client.usage, "missing")
    expect_code(Code.NOT_FOUND, client.remove, "missing")
    expect_code(Code.NOT_FOUND, client.commit, "name", "missing")


@pytest.mark.parametrize("parent_kind", ["active", "view"])
def test_parent_not_committed_is_invalid_argument(daemon: Daemon, client: SnapshotsClient, parent_kind: str):
    """Prepare or View on an active or view parent is INVALID_ARGUMENT and leaves nothing
    behind (no metadata, no directory)."""
    (client.prepare if parent_kind == "active" else client.view)("parent")
    before = sorted(os.listdir(daemon.root / "snapshots"))
    expect_code(Code.INVALID_ARGUMENT, client.prepare, "child", "parent")
    expect_code(Code.INVALID_ARGUMENT, client.view, "child-view", "parent")
    assert sorted(os.listdir(daemon.root / "snapshots")) == before
    assert [i.name for i in client.list()] == ["parent"]


def test_commit_errors(client: SnapshotsClient):
    """Commit of a view is FAILED_PRECONDITION; to a name already used (committed or not) is
    ALREADY_EXISTS; the active stays active after each refusal."""
    client.prepare("base-a")
    client.commit("base", "base-a")
    client.view("view", "base")
    client.prepare("active", "base")
    client.prepare("other")
    expect_code(Code.FAILED_PRECONDITION, client.commit, "from-view", "view")
    expect_code(Code.ALREADY_EXISTS, client.commit, "base", "active")
    expect_code(Code.ALREADY_EXISTS, client.commit, "other", "active")
    expect_code(Code.FAILED_PRECONDITION, client.commit, "again", "base")
    assert client.stat("active").kind == pb.ACTIVE
    assert client.stat("view").kind == pb.VIEW
    client.commit("done", "active")
    assert client.stat("done").parent == "base"


def test_commit_does_not_inherit_labels(client: SnapshotsClient):
    """The committed snapshot carries exactly the labels given to Commit, none of the active's."""
    client.prepare("a", "", {"from-prepare": "1", "shared": "prepare"})
    client.commit("c", "a", {"from-commit": "2", "shared": "commit"})
    assert dict(client.stat("c").labels) == {"from-commit": "2", "shared": "commit"}
    client.prepare("b", "")
    client.commit("d", "b")
    assert dict(client.stat("d").labels) == {}


def test_commit_keeps_the_directory(daemon: Daemon, client: SnapshotsClient, tmp_path: Path):
    """The committed snapshot keeps the active's id and directory: its files are in
    snapshots/N/fs and a child's lowerdir names N."""
    sid = new_id(daemon.root, lambda: client.prepare("a"))
    with mount_snapshot(client.mounts("a"), tmp_path / "a") as target:
        apply(target, create_file("/hello", "world\n"))
    client.commit("c", "a")
    assert (Path(fs(daemon.root, sid)) / "hello").read_text() == "world\n"
    assert snapshot_ids(daemon.root) == {sid}
    (m,) = client.prepare("child", "c")
    assert m.options[-1] == f"lowerdir={fs(daemon.root, sid)}"


# --- Usage ---------------------------------------------------------------------------------


def test_usage_active_is_live_and_committed_is_stored(daemon: Daemon, client: SnapshotsClient, tmp_path: Path):
    """Usage of an active walks its upper dir now (grows by 1 MiB after writing 1 MiB through the
    mount; a hard link adds nothing; lower layers are not counted); Usage of a committed snapshot
    is the value computed at Commit, whatever happens to the directory later; a view has none."""
    with mount_snapshot(client.prepare("base-a"), tmp_path / "base") as target:
        write_mib(target, "in-base")
    client.commit("base", "base-a")

    sid = new_id(daemon.root, lambda: client.prepare("a", "base"))
    upper = Path(fs(daemon.root, sid))
    empty = usage_of(client, "a")
    assert empty == disk_usage(upper)
    assert empty[0] < MiB

    with mount_snapshot(client.mounts("a"), tmp_path / "a") as target:
        write_mib(target, "big")
        grown = usage_of(client, "a")
        assert grown[0] - empty[0] >= MiB
        assert grown[1] == empty[1] + 1
        assert grown == disk_usage(upper)
        apply(target, link("/big", "/big-link"))
        assert usage_of(client, "a") == grown
    client.commit("c", "a")
    assert usage_of(client, "c") == grown

    (upper / "behind-the-back").write_bytes(os.urandom(MiB))
    assert disk_usage(upper) != grown
    assert usage_of(client, "c") == grown

    client.view("v", "c")
    assert usage_of(client, "v") == (0, 0)


# --- List ----------------------------------------------------------------------------------


def test_list_streams_batches_of_100(client: SnapshotsClient):
    """List sends at most 100 infos per message: 250 snapshots come as [100, 100, 50]; a filter
    matching nothing sends no message at all."""
    for i in range(250):
        client.prepare(f"s{i:03d}")
    assert client.list_batches() == [100, 100, 50]
    assert client.list_batches("name~=^s0") == [100]
    assert client.list_batches("name==none") == []
    assert sorted(i.name for i in client.list()) == [f"s{i:03d}" for i in range(250)]


# --- on-disk layout ------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_on_disk_layout(daemon: Daemon, client: SnapshotsClient):
    """root 0700 with metadata.db and snapshots/ (0700); snapshots/N/fs 0755; snapshots/N/work
    0711 for actives only; no temp dirs left behind, even after a failed create."""
    root = daemon.root
    a = new_id(root, lambda: client.prepare("a"))
    client.commit("c", "a")
    b = new_id(root, lambda: client.prepare("b", "c"))
    v = new_id(root, lambda: client.view("v", "c"))
    expect_code(Code.NOT_FOUND, client.prepare, "x", "missing")

    assert mode(root) == 0o700
    assert (root / "metadata.db").is_file()
    assert mode(root / "snapshots") == 0o700
    for sid in (a, b, v):
        assert mode(Path(fs(root, sid))) == 0o755, sid
    assert mode(Path(work_dir(root, b))) == 0o711
    assert not os.path.exists(work_dir(root, v))
    assert sorted(os.listdir(root / "snapshots")) == sorted(str(i) for i in (a, b, v))


def test_ids_are_never_reused(daemon: Daemon, client: SnapshotsClient):
    """After the newest snapshot is removed and cleaned up, the next one (also after a restart)
    still gets a new, higher id."""
    root = daemon.root
    new_id(root, lambda: client.prepare("a"))
    b = new_id(root, lambda: client.prepare("b"))
    client.remove("b")
    client.cleanup()
    c = new_id(root, lambda: client.prepare("c"))
    assert c > b
    client.remove("c")
    client.cleanup()
    with restarted(daemon) as again:
        d = new_id(root, lambda: again.prepare("d"))
    assert d > c


# --- Remove and Cleanup --------------------------------------------------------------------


def test_async_remove_defers_to_cleanup(daemon: Daemon, client: SnapshotsClient):
    """By default Remove drops only the metadata; Cleanup deletes every directory under
    snapshots/ that is not a live snapshot (removed ones and strays), and nothing else."""
    root = daemon.root
    a = new_id(root, lambda: client.prepare("a"))
    client.commit("c", "a")
    b = new_id(root, lambda: client.prepare("b", "c"))
    keep = new_id(root, lambda: client.prepare("keep"))
    client.remove("b")
    client.remove("c")
    assert {a, b} <= snapshot_ids(root)
    (root / "snapshots" / "stray").mkdir()
    (root / "snapshots" / "stray" / "file").write_text("x")

    client.cleanup()
    assert sorted(os.listdir(root / "snapshots")) == [str(keep)]
    client.cleanup()
    assert sorted(os.listdir(root / "snapshots")) == [str(keep)]


def test_sync_remove_deletes_at_once(tmp_path: Path):
    """With --async-remove=false, Remove deletes the snapshot's directory before it returns."""
    with extra_daemon(tmp_path / "sync-root", "--async-remove=false") as (d, client):
        a = new_id(d.root, lambda: client.prepare("a"))
        client.commit("c", "a")
        b = new_id(d.root, lambda: client.prepare("b", "c"))
        assert snapshot_ids(d.root) == {a, b}
        client.remove("b")
        assert snapshot_ids(d.root) == {a}
        client.remove("c")
        assert os.listdir(d.root / "snapshots") == []
        client.cleanup()


# --- --upperdir-label ----------------------------------------------------------------------


def test_upperdir_label(tmp_path: Path):
    """--upperdir-label adds containerd.io/snapshot/overlay.upperdir=<root>/snapshots/N/fs to
    every snapshot's Info in Stat, List and Update (containerd's overlayfs does so for every kind),
    and never stores it (gone after a restart without the flag)."""
    with extra_daemon(tmp_path / "ul-root", "--upperdir-label=true") as (d, client):
        c = new_id(d.root, lambda: client.prepare("c-a", "", {"x": "1"}))
        client.commit("c", "c-a", {"x": "1"})
        a = new_id(d.root, lambda: client.prepare("a", "c", {"x": "1"}))
        v = new_id(d.root, lambda: client.view("v", "c", {"x": "1"}))
        want = {"x": "1", UPPERDIR_LABEL: fs(d.root, a)}

        assert dict(client.stat("a").labels) == want
        listed = {i.name: dict(i.labels) for i in client.list()}
        assert listed == {
            "a": want,
            "c": {"x": "1", UPPERDIR_LABEL: fs(d.root, c)},
            "v": {"x": "1", UPPERDIR_LABEL: fs(d.root, v)},
        }
        assert dict(client.update("a", {"y": "2"}, ["labels.y"]).labels) == {**want, "y": "2"}
        assert dict(client.update("c", {"y": "2"}, ["labels.y"]).labels) == {
            "x": "1",
            "y": "2",
            UPPERDIR_LABEL: fs(d.root, c),
        }
        # as in containerd, filters see the stored labels, not the added one
        assert client.list(f'labels."{UPPERDIR_LABEL}"') == []

        client.commit("done", "a", {"z": "3"})
        assert dict(client.stat("done").labels) == {"z": "3", UPPERDIR_LABEL: fs(d.root, a)}
        client.prepare("b", "", {})
        assert d.stop(signal.SIGTERM) == 0

    with extra_daemon(tmp_path / "ul-root") as (d, client):
        assert dict(client.stat("b").labels) == {}
        assert dict(client.stat("c").labels) == {"x": "1", "y": "2"}


def test_no_upperdir_label_by_default(client: SnapshotsClient):
    """Without the flag, an active's Info has only the labels it was given."""
    client.prepare("a", "", {"x": "1"})
    assert dict(client.stat("a").labels) == {"x": "1"}
    assert dict(client.list()[0].labels) == {"x": "1"}


def test_usage_and_commit_of_a_big_upper_dir_count_every_inode(client: SnapshotsClient, tmp_path: Path):
    """An image layer's worth of files: counted whole (in the blocking pool, never on the loop)."""
    files = 5000
    upper = Path(client.prepare("big")[0].source)
    for i in range(files):
        (upper / f"f{i}").touch()
    assert client.usage("big").inodes == files + 1  # the files and the dir itself
    client.commit("big-done", "big")
    assert client.usage("big-done").inodes == files + 1


def test_mounts_of_a_key_used_again_are_the_new_snapshots(client: SnapshotsClient):
    """Mounts replies are kept per snapshot, not per key: a key removed and prepared again (a new
    id, another parent) answers with its new dirs."""
    client.prepare("a")
    client.commit("base", "a")
    client.prepare("k")
    first = client.mounts("k")[0].source
    client.remove("k")
    client.prepare("k", "base")
    (m,) = client.mounts("k")
    assert m.type == "overlay" and first not in ",".join(m.options)
    assert client.mounts("k") == [m]
