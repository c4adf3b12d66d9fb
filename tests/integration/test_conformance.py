"""containerd's snapshotter conformance suite (snapshots/testsuite: testsuite.go, issues.go,
helpers.go), ported to pytest and run against the daemon over gRPC with real overlay mounts.

Each test names the Go check it ports. Snapshots are created the containerd way: Prepare, mount,
write through the mount, unmount, Commit; contents are checked through a mounted View against a
plain directory that had the same changes applied (see layers.py).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from addlower.api import snapshots_pb2 as pb
from addlower.ops.client import SnapshotsClient
from tests.integration.layers import (
    GC_ROOT,
    apply,
    assert_same_tree,
    assert_tree_is,
    check_snapshots,
    chown,
    create_dir,
    create_file,
    create_snapshot,
    expect_code,
    link,
    mount_snapshot,
    remove_all,
)
from tests.support.daemon import Daemon

ACTIVE, VIEW, COMMITTED = pb.ACTIVE, pb.VIEW, pb.COMMITTED
Code = grpc.StatusCode


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The play area the Go suite passes as `work`: mount points and flat directories."""
    path = tmp_path / "work"
    path.mkdir()
    return path


def ns(ts) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def prepare_commit(client: SnapshotsClient, name: str, parent: str = "", labels=GC_ROOT) -> None:
    """An empty committed snapshot `name` on `parent` (no mount needed)."""
    client.prepare(f"{name}-a", parent, GC_ROOT)
    client.commit(name, f"{name}-a", labels)


def names(infos) -> list[str]:
    return sorted(i.name for i in infos)


# --- Basic, StatActive, StatComitted, TransitivityTest --------------------------------------


def test_basic(client: SnapshotsClient, work: Path):
    """checkSnapshotterBasic: prepare/commit/prepare/commit/view through real mounts; Stat, List
    and Remove agree, and a parent with a child cannot be removed."""
    initial = [
        create_file("/foo", "foo\n", 0o777),
        create_dir("/a", 0o755),
        create_dir("/a/b", 0o755),
        create_dir("/a/b/c", 0o755),
    ]
    diff = [create_file("/bar", "bar\n", 0o777), create_file("/foo", "bar\n", 0o777), remove_all("/a/b")]

    mounts = client.prepare("preparing", "", GC_ROOT)
    assert mounts
    with mount_snapshot(mounts, work / "preparing") as target:
        apply(target, *initial)
    client.commit("committed", "preparing", GC_ROOT)

    si = client.stat("committed")
    assert (si.parent, si.kind) == ("", COMMITTED)
    expect_code(Code.NOT_FOUND, client.stat, "preparing")

    mounts = client.prepare("nextlayer", "committed", GC_ROOT)
    with mount_snapshot(mounts, work / "nextlayer") as target:
        assert_tree_is(target, *initial)
        apply(target, *diff)
    ni = client.stat("nextlayer")
    assert (ni.parent, ni.kind) == ("committed", ACTIVE)

    client.commit("committed-next", "nextlayer", GC_ROOT)
    si2 = client.stat("committed-next")
    assert (si2.parent, si2.kind) == ("committed", COMMITTED)
    expect_code(Code.NOT_FOUND, client.stat, "nextlayer")

    walked = {i.name: i for i in client.list()}
    assert walked.get("committed") == si
    assert walked.get("committed-next") == si2

    mounts = client.view("nextnextlayer", "committed-next", GC_ROOT)
    with mount_snapshot(mounts, work / "nextnextlayer") as target:
        assert_tree_is(target, *initial, *diff)

    client.remove("nextnextlayer")
    err = expect_code(Code.FAILED_PRECONDITION, client.remove, "committed")
    assert "remove" in err.details()
    client.remove("committed-next")
    client.remove("committed")
    assert client.list() == []


def test_stat_active(client: SnapshotsClient, work: Path):
    """checkSnapshotterStatActive: a prepared snapshot with a file written is Stat'ed as active."""
    with mount_snapshot(client.prepare("preparing", "", GC_ROOT), work / "preparing") as target:
        apply(target, create_file("/foo", "foo\n", 0o777))
        si = client.stat("preparing")
    assert (si.name, si.kind, si.parent) == ("preparing", ACTIVE, "")
    assert dict(si.labels) == GC_ROOT


def test_stat_committed(client: SnapshotsClient, work: Path):
    """checkSnapshotterStatCommitted: after Commit, Stat of the name says committed, no parent."""
    with mount_snapshot(client.prepare("preparing", "", GC_ROOT), work / "preparing") as target:
        apply(target, create_file("/foo", "foo\n", 0o777))
    client.commit("committed", "preparing", GC_ROOT)
    si = client.stat("committed")
    assert (si.name, si.kind, si.parent) == ("committed", COMMITTED, "")


def test_transitivity(client: SnapshotsClient, work: Path):
    """checkSnapshotterTransitivity: A <- B; B's parent is A and A has no parent."""
    snap_a = create_snapshot(client, work, "", create_file("/foo", "foo\n", 0o777))
    snap_b = create_snapshot(client, work, snap_a, create_file("/foo", "foo bar\n", 0o777))
    si_a, si_b = client.stat(snap_a), client.stat(snap_b)
    si_parent_b = client.stat(si_b.parent)
    assert si_a.parent == ""
    assert si_b.parent == snap_a
    assert si_parent_b.parent == ""


# --- PreareViewFailingtest -----------------------------------------------------------------


def test_prepare_view_failing(client: SnapshotsClient, work: Path):
    """checkSnapshotterPrepareView: a key can be used once, whatever the kind (ALREADY_EXISTS),
    and a parent that does not exist is NOT_FOUND."""
    prepare_commit(client, "snapA")

    client.prepare("newlayer", "snapA", GC_ROOT)
    expect_code(Code.ALREADY_EXISTS, client.view, "newlayer", "snapA", GC_ROOT)

    client.prepare("prepLayer", "snapA", GC_ROOT)
    expect_code(Code.ALREADY_EXISTS, client.prepare, "prepLayer", "snapA", GC_ROOT)

    client.view("viewLayer", "snapA", GC_ROOT)
    expect_code(Code.ALREADY_EXISTS, client.view, "viewLayer", "snapA", GC_ROOT)
    expect_code(Code.ALREADY_EXISTS, client.prepare, "snapA", "", GC_ROOT)

    expect_code(Code.NOT_FOUND, client.prepare, "orphan", "doesnotexist", GC_ROOT)
    expect_code(Code.NOT_FOUND, client.view, "orphan-view", "doesnotexist", GC_ROOT)
    assert names(client.list()) == ["newlayer", "prepLayer", "snapA", "viewLayer"]


# --- Update --------------------------------------------------------------------------------

BASE_SNAPSHOTS = [  # (name, kind, parent) as built by baseTestSnapshots
    ("c1", COMMITTED, ""),
    ("c2", COMMITTED, "c1"),
    ("a1", ACTIVE, "c2"),
    ("a2", ACTIVE, ""),
    ("v1", VIEW, "c2"),
    ("v2", VIEW, ""),
]


def base_test_snapshots(client: SnapshotsClient) -> None:
    """baseTestSnapshots: c1 <- c2 committed, a1 on c2, a2 alone, v1 on c2, v2 alone."""
    prepare_commit(client, "c1")
    prepare_commit(client, "c2", "c1")
    client.prepare("a1", "c2", GC_ROOT)
    client.prepare("a2", "", GC_ROOT)
    client.view("v1", "c2", GC_ROOT)
    client.view("v2", "", GC_ROOT)


def update(client: SnapshotsClient, name: str, labels: dict, paths=None, parent: str = "doesnotexist"):
    """Update sending a whole Info (with a bogus parent, as the Go suite does) and an optional mask."""
    req = pb.UpdateSnapshotRequest(
        snapshotter=client.snapshotter, info=pb.Info(name=name, parent=parent, labels=labels)
    )
    if paths is not None:
        req.update_mask.paths.extend(paths)
    return client.stub.Update(req).info


def test_update(client: SnapshotsClient):
    """checkUpdate: created == updated at first; Update with no mask replaces the labels and bumps
    updated only; `labels.<k>` masks set or delete single labels; `labels` replaces all; name,
    kind and parent never change; a `parent` mask is INVALID_ARGUMENT."""
    t1 = time.time_ns()
    base_test_snapshots(client)
    t2 = time.time_ns()
    for name, kind, parent in BASE_SNAPSHOTS:
        st = client.stat(name)
        assert t1 <= ns(st.created_at) <= t2, name
        assert st.created_at == st.updated_at, name
        assert (st.name, st.kind, st.parent) == (name, kind, parent)

        root = {"containerd.io/gc.root": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        expected = {"l1": "v1", "l2": "v2", "l3": "v3", **root}
        u1 = time.time_ns()
        got = update(client, name, expected)
        u2 = time.time_ns()
        assert got.created_at == st.created_at, name
        assert u1 <= ns(got.updated_at) <= u2, name
        assert (got.name, got.kind, got.parent) == (name, kind, parent)
        assert dict(got.labels) == expected

        got = update(client, name, {"l1": "updated", "l4": "v4"}, ["labels.l1", "labels.l2"])
        assert dict(got.labels) == {"l1": "updated", "l3": "v3", **root}

        expected = {"l4": "v4", **root}
        got = update(client, name, expected, ["labels"])
        assert dict(got.labels) == expected
        assert client.stat(name) == got

        expect_code(Code.INVALID_ARGUMENT, update, client, name, expected, ["parent"])
        assert client.stat(name) == got


def test_update_masks_keys_with_dots_and_slashes(client: SnapshotsClient):
    """A mask path `labels.<key>` takes the rest of the path as the key, dots and slashes included."""
    client.prepare("a", "", {"containerd.io/gc.root": "x", "keep": "1"})
    got = client.update(
        "a",
        {"containerd.io/snapshot.ref": "sha256:abc"},
        ["labels.containerd.io/snapshot.ref", "labels.containerd.io/gc.root"],
    )
    assert dict(got.labels) == {"keep": "1", "containerd.io/snapshot.ref": "sha256:abc"}


@pytest.mark.parametrize("paths", [["parent"], ["name"], ["kind"], ["labels", "created_at"], ["label.x"]])
def test_update_rejects_other_field_paths(client: SnapshotsClient, paths):
    """Only `labels` and `labels.<key>` are updatable; anything else is INVALID_ARGUMENT and
    changes nothing."""
    client.prepare("a", "", {"k": "v"})
    expect_code(Code.INVALID_ARGUMENT, client.update, "a", {"k": "new"}, paths)
    assert dict(client.stat("a").labels) == {"k": "v"}


def test_label_size_limit(client: SnapshotsClient):
    """A label's key plus value may be 4096 bytes, not one more (INVALID_ARGUMENT), in Update,
    Prepare, View and Commit alike."""
    at_limit = {"k": "v" * 4095}
    over = {"k": "v" * 4096}
    client.prepare("a", "", at_limit)
    assert dict(client.update("a", at_limit, ["labels"]).labels) == at_limit
    expect_code(Code.INVALID_ARGUMENT, client.update, "a", over, ["labels.k"])
    expect_code(Code.INVALID_ARGUMENT, client.update, "a", over)
    assert dict(client.stat("a").labels) == at_limit
    expect_code(Code.INVALID_ARGUMENT, client.prepare, "b", "", over)
    expect_code(Code.INVALID_ARGUMENT, client.view, "c", "", over)
    expect_code(Code.INVALID_ARGUMENT, client.commit, "c1", "a", over)
    assert names(client.list()) == ["a"]


def test_update_missing_snapshot_is_not_found(client: SnapshotsClient):
    """Update of a name that does not exist is NOT_FOUND."""
    expect_code(Code.NOT_FOUND, client.update, "nope", {"a": "b"})


# --- Remove, RemoveIntermediateSnapshot ----------------------------------------------------


def test_remove(client: SnapshotsClient):
    """checkRemove: keys and names are free again once removed, whatever kind used them."""
    prepare_commit(client, "committed-1")
    client.prepare("reuse-1", "committed-1", GC_ROOT)
    client.remove("reuse-1")
    client.view("reuse-1", "committed-1", GC_ROOT)
    client.remove("reuse-1")
    client.prepare("reuse-1", "", GC_ROOT)
    client.remove("committed-1")
    client.commit("committed-1", "reuse-1", GC_ROOT)
    si = client.stat("committed-1")
    assert (si.kind, si.parent) == (COMMITTED, "")
    expect_code(Code.NOT_FOUND, client.remove, "reuse-1")


def test_remove_with_children_is_failed_precondition(client: SnapshotsClient):
    """A committed snapshot with an active or a view child cannot be removed
    (FAILED_PRECONDITION, containerd's GC relies on it); once the children are gone it can."""
    prepare_commit(client, "base")
    client.prepare("child", "base", GC_ROOT)
    client.view("child-view", "base", GC_ROOT)
    expect_code(Code.FAILED_PRECONDITION, client.remove, "base")
    client.remove("child")
    expect_code(Code.FAILED_PRECONDITION, client.remove, "base")
    client.remove("child-view")
    client.remove("base")
    expect_code(Code.NOT_FOUND, client.stat, "base")


def test_remove_intermediate_snapshot(client: SnapshotsClient, work: Path):
    """checkRemoveIntermediateSnapshot: base <- inter <- top; the middle one cannot go first,
    removal from the top down works."""
    with mount_snapshot(client.prepare("base", "", GC_ROOT), work / "base") as target:
        apply(target, create_file("/f", "base\n"))
    client.commit("committed-base", "base", GC_ROOT)
    client.prepare("intermediate", "committed-base", GC_ROOT)
    client.commit("committed-inter", "intermediate", GC_ROOT)
    client.prepare("toplayer", "committed-inter", GC_ROOT)

    expect_code(Code.FAILED_PRECONDITION, client.remove, "committed-inter")
    client.remove("toplayer")
    client.remove("committed-inter")
    client.remove("committed-base")
    assert client.list() == []


# --- Walk ----------------------------------------------------------------------------------

WALK_ROOT = {"containerd.io/gc.root": "check-walk"}
REF = "containerd.io/snapshot.ref"

WALK_CASES = [  # (filters, expected names): containerd's checkWalk table, then more
    (['labels."containerd.io/gc.root"==check-walk'], ["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"]),
    (['kind==active,labels."containerd.io/gc.root"==check-walk'], ["a-np", "a", "a-wl", "a-np-wl"]),
    (['kind==view,labels."containerd.io/gc.root"==check-walk'], ["v", "v-wl"]),
    (['kind==committed,labels."containerd.io/gc.root"==check-walk'], ["p", "p-wl"]),
    (["name==p", "name==a-np-wl"], ["p", "a-np-wl"]),
    (["name==a-wl,labels.l"], ["a-wl"]),
    (["parent==p"], ["a", "v"]),
    (['parent!="",labels."containerd.io/gc.root"==check-walk'], ["a", "v", "a-wl", "v-wl"]),
    (["labels.l"], ["p-wl", "a-wl", "v-wl", "a-np-wl"]),
    (["labels.l==2"], ["a-wl", "a-np-wl"]),
    # beyond the Go table: regexp, quoted values, OR of ANDs, the image-ref label, != on a missing
    (["name~=^a-"], ["a-np", "a-wl", "a-np-wl"]),
    (["name~=wl$,kind==view"], ["v-wl"]),
    (['name=="a-wl"'], ["a-wl"]),
    (["kind==active,labels.l==2", "kind==committed,labels.l==1"], ["a-wl", "a-np-wl", "p-wl"]),
    (["kind==view", "name==p"], ["v", "v-wl", "p"]),
    ([f'labels."{REF}"'], ["ref"]),
    ([f'labels."{REF}"==sha256:1234'], ["ref"]),
    ([f'labels."{REF}"==sha256:0000'], []),
    (["labels.l!=2,kind==active"], ["a-np", "a"]),
    (["kind==committed"], ["p", "p-wl", "ref"]),
    ([], ["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl", "ref"]),
]


def walk_snapshots(client: SnapshotsClient) -> None:
    """checkWalk's set: a-np, p <- (a, v), p-wl(l=1) <- (a-wl l=2, v-wl l=3), a-np-wl(l=2);
    plus `ref`, a committed snapshot carrying only the image-ref label."""
    client.prepare("a-np", "", WALK_ROOT)
    prepare_commit(client, "p", labels=WALK_ROOT)
    client.prepare("a", "p", WALK_ROOT)
    client.view("v", "p", WALK_ROOT)
    prepare_commit(client, "p-wl", labels={"l": "1", **WALK_ROOT})
    client.prepare("a-wl", "p-wl", {"l": "2", **WALK_ROOT})
    client.view("v-wl", "p-wl", {"l": "3", **WALK_ROOT})
    client.prepare("a-np-wl", "", {"l": "2", **WALK_ROOT})
    prepare_commit(client, "ref", labels={REF: "sha256:1234"})


def test_walk(client: SnapshotsClient):
    """checkWalk: List filters. Several filters are OR-ed, selectors inside one are AND-ed,
    operators ==, != and ~=, presence tests, quoted fields and values."""
    walk_snapshots(client)
    failures = []
    for filters, expected in WALK_CASES:
        got = names(client.list(*filters))
        if got != sorted(expected):
            failures.append(f"{filters}: got {got}, want {sorted(expected)}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("bad", ["name==", "==p", 'labels."unterminated', "name==p,", "kind==active,,name==a"])
def test_walk_bad_filter_is_invalid_argument(client: SnapshotsClient, bad: str):
    """A filter that does not parse fails the whole List with INVALID_ARGUMENT, even next to
    good ones."""
    client.prepare("a", "")
    expect_code(Code.INVALID_ARGUMENT, client.list, bad)
    expect_code(Code.INVALID_ARGUMENT, client.list, "name==a", bad)


def test_stat_in_walk(client: SnapshotsClient, work: Path):
    """checkStatInWalk: Stat may be called while a List stream is open, and agrees with it
    (kind, name, parent, labels, created and updated)."""
    prefix = "stats-in-walk-"
    with mount_snapshot(client.prepare(f"{prefix}c1-a", "", GC_ROOT), work / "c1") as target:
        apply(target, create_file("/base", "base\n"))
    client.commit(f"{prefix}c1", f"{prefix}c1-a", GC_ROOT)
    prepare_commit(client, f"{prefix}c2", f"{prefix}c1")
    client.prepare(f"{prefix}a1", f"{prefix}c2", GC_ROOT)
    client.view(f"{prefix}v1", f"{prefix}c2", GC_ROOT)

    stream = client.stub.List(pb.ListSnapshotsRequest(snapshotter=client.snapshotter))
    seen = []
    for response in stream:
        for info in response.info:
            if info.name.startswith(prefix):
                assert client.stat(info.name) == info
                seen.append(info.name)
    assert sorted(seen) == [f"{prefix}{n}" for n in ("a1", "c1", "c2", "v1")]


# --- issues.go: content through layers ----------------------------------------------------


def test_layer_file_update(client: SnapshotsClient, work: Path):
    """checkLayerFileUpdate (docker#21555): a file rewritten in an upper layer shows the new
    content and mode; run a few times across second boundaries, as the Go suite does."""
    l1 = [
        create_dir("/etc", 0o700),
        create_file("/etc/hosts", "mydomain 10.0.0.1", 0o644),
        create_file("/etc/profile", "PATH=/usr/bin", 0o644),
    ]
    l2 = [
        create_file("/etc/hosts", "mydomain 10.0.0.2", 0o644),
        create_file("/etc/profile", "PATH=/usr/bin", 0o666),
        create_dir("/root", 0o700),
        create_file("/root/.bashrc", "PATH=/usr/sbin:/usr/bin", 0o644),
    ]
    for i in range(3):
        check_snapshots(client, work / f"run{i}", l1, l2)
        time.sleep(1 - time.time() % 1)


def test_remove_directory_in_lower_layer(client: SnapshotsClient, work: Path):
    """checkRemoveDirectoryInLowerLayer (docker#25244): a directory removed and recreated in an
    upper layer hides the lower one's files (opaque dir), also one layer further up."""
    check_snapshots(
        client,
        work,
        [create_dir("/lib", 0o700), create_file("/lib/hidden", "", 0o644)],
        [remove_all("/lib"), create_dir("/lib", 0o700), create_file("/lib/not-hidden", "", 0o644)],
        [create_file("/lib/newfile", "", 0o644)],
    )


def test_chown(client: SnapshotsClient, work: Path):
    """checkChown (docker#20240, #24913, #28391): ownership changed in an upper layer sticks for
    directories and files."""
    check_snapshots(
        client,
        work,
        [
            create_dir("/opt", 0o700),
            create_dir("/opt/a", 0o700),
            create_dir("/opt/a/b", 0o700),
            create_file("/opt/a/b/file.txt", "hello", 0o644),
        ],
        [chown("/opt", 1, 1), chown("/opt/a", 1, 1), chown("/opt/a/b", 1, 1), chown("/opt/a/b/file.txt", 1, 1)],
    )


def test_directory_permission_on_commit(client: SnapshotsClient, work: Path):
    """checkDirectoryPermissionOnCommit (docker#27298): owners and modes of directories survive
    commit, removal and re-creation across three layers."""
    check_snapshots(
        client,
        work,
        [
            create_dir("/dir1", 0o700),
            create_dir("/dir2", 0o700),
            create_dir("/dir3", 0o700),
            create_dir("/dir4", 0o700),
            create_file("/dir4/f1", "...", 0o644),
            create_dir("/dir5", 0o700),
            create_file("/dir5/f1", "...", 0o644),
            chown("/dir1", 1, 1),
            chown("/dir2", 1, 1),
            chown("/dir3", 1, 1),
            chown("/dir5", 1, 1),
            chown("/dir5/f1", 1, 1),
        ],
        [chown("/dir2", 0, 0), remove_all("/dir3"), chown("/dir4", 1, 1), chown("/dir4/f1", 1, 1)],
        [
            create_dir("/dir3", 0o700),
            chown("/dir3", 1, 1),
            remove_all("/dir5"),
            create_dir("/dir5", 0o700),
            chown("/dir5", 1, 1),
        ],
    )


def test_deleted_files_in_child_snapshot(client: SnapshotsClient, work: Path):
    """checkDeletedFilesInChildSnapshot: a file deleted in a child stays deleted (whiteout) in
    the child's view and in an empty grandchild's."""
    check_snapshots(
        client,
        work,
        [create_file("/foo", "foo\n", 0o777), create_file("/foobar", "foobar\n", 0o777)],
        [remove_all("/foobar")],
        [],
    )


def test_move_file_from_lower_layer(client: SnapshotsClient, work: Path):
    """checkFileFromLowerLayer: a file hard-linked to a new place and removed from its lower
    directory, and a whole lower directory removed, come out right."""
    check_snapshots(
        client,
        work,
        [
            create_dir("/dir1", 0o700),
            create_file("/dir1/f1", "Hello", 0o644),
            create_dir("dir2", 0o700),
            create_file("dir2/f2", "...", 0o644),
        ],
        [
            create_dir("/dir3", 0o700),
            create_file("/dir3/f1", "Hello", 0o644),
            remove_all("/dir1"),
            link("dir2/f2", "dir3/f2"),
            remove_all("dir2/f2"),
        ],
    )


# --- ViewReadonly, RootPermission, CloseTwice ----------------------------------------------


@pytest.mark.parametrize("depth", [0, 1, 2], ids=["no-parent", "one-parent", "two-parents"])
def test_view_readonly(client: SnapshotsClient, work: Path, depth: int):
    """checkSnapshotterViewReadonly (#1368): writing into a mounted view fails (EROFS), whether
    the view is a ro bind (0 or 1 parent) or an overlay without upperdir (2+ parents)."""
    parent = ""
    for i in range(depth):
        parent = create_snapshot(client, work, parent, create_file(f"/f{i}", f"{i}\n"))
    mounts = client.view("view", parent, GC_ROOT)
    with mount_snapshot(mounts, work / "view-mount") as target:
        with pytest.raises(OSError) as info:
            (target / "testfile").write_text("testcontent")
        assert info.value.errno == errno.EROFS
        assert not (target / "testfile").exists()
    client.remove("view")


def test_root_permission(client: SnapshotsClient, work: Path):
    """checkRootPermission: the root of a fresh active snapshot is 0755 and root-owned; a child's
    root is 0755 and owned like its parent's root (fs is chowned to the parent's owner)."""
    mounts = client.prepare("preparing", "", GC_ROOT)
    with mount_snapshot(mounts, work / "preparing") as target:
        st = os.stat(target)
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o755, 0, 0)
        os.chown(target, 1000, 1001)
        os.chmod(target, 0o700)
    client.commit("base", "preparing", GC_ROOT)
    with mount_snapshot(client.prepare("child", "base", GC_ROOT), work / "child") as target:
        st = os.stat(target)
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o755, 1000, 1001)


def test_close_twice(daemon: Daemon, client: SnapshotsClient):
    """closeTwice, adapted: after some work the daemon stops cleanly (exit 0), stopping it again
    is harmless, and a daemon restarted on the same root sees the same state and serves again."""
    client.prepare("closeTwice-prepare", "", GC_ROOT)
    client.commit("closeTwice", "closeTwice-prepare", GC_ROOT)
    client.prepare("kept", "", GC_ROOT)
    client.remove("closeTwice")
    assert daemon.stop(signal.SIGTERM) == 0
    assert daemon.stop(signal.SIGTERM) == 0

    again = Daemon(root=daemon.root).start()
    try:
        with again.channel() as channel:
            c = SnapshotsClient(channel)
            assert names(c.list()) == ["kept"]
            expect_code(Code.NOT_FOUND, c.stat, "closeTwice")
            c.prepare("after-restart", "", GC_ROOT)
        assert again.stop(signal.SIGTERM) == 0
    finally:
        again.kill()


# --- 128LayersMount ------------------------------------------------------------------------


def test_128_layers_mount(client: SnapshotsClient, work: Path):
    """check128LayersMount: 128 committed layers (each rewriting /overwriteme, adding
    /addhere/file-N and replacing /onlyme) mount correctly at every step; a View and an active
    snapshot on top of all 128 see the flattened result (128 lowerdirs, compacted past a page)."""
    layers = [
        [
            create_file("/bottom", "way at the bottom\n", 0o777),
            create_file("/overwriteme", "FIRST!\n", 0o777),
            create_dir("/addhere", 0o755),
            create_dir("/onlyme", 0o755),
            create_file("/onlyme/bottom", "bye!\n", 0o777),
        ]
    ]
    for i in range(1, 128):
        layers.append(
            [
                create_file("/overwriteme", f"{i} WAS HERE!\n", 0o777),
                create_file(f"/addhere/file-{i}", "same\n", 0o755),
                remove_all("/onlyme"),
                create_dir("/onlyme", 0o755),
                create_file(f"/onlyme/file-{i}", "only me!\n", 0o777),
            ]
        )

    flat = work / "flat"
    flat.mkdir()
    parent = ""
    for i, ops in enumerate(layers):
        key = f"prepare-layer-{i}"
        with mount_snapshot(client.prepare(key, parent, GC_ROOT), work / key) as target:
            assert_same_tree(target, flat)
            apply(flat, *ops)
            apply(target, *ops)
            assert_same_tree(target, flat)
        parent = f"committed-{i}"
        client.commit(parent, key, GC_ROOT)

    assert len(os.listdir(flat / "addhere")) == 127
    assert (flat / "overwriteme").read_text() == "127 WAS HERE!\n"
    assert os.listdir(flat / "onlyme") == ["file-127"]

    view = client.view("fullview", parent, GC_ROOT)
    assert len(view[0].options[-1].split(":")) == 128
    with mount_snapshot(view, work / "fullview") as target:
        assert_same_tree(target, flat)

    with mount_snapshot(client.prepare("top", parent, GC_ROOT), work / "top") as target:
        assert_same_tree(target, flat)
        apply(target, create_file("/addhere/file-128", "top\n", 0o644))
        assert (target / "addhere" / "file-128").read_text() == "top\n"
