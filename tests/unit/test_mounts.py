"""Mount computation for every case of containerd's overlayfs snapshotter."""

import hashlib

import pytest

from addlower.core.errors import FailedPrecondition
from addlower.core.model import Kind
from addlower.core.mounts import Layout, Mount, compute_mounts

L = Layout("/r")


def test_active_without_parent_is_rw_bind_of_own_fs():
    assert compute_mounts(L, Kind.ACTIVE, 7, ()) == [Mount("bind", "/r/snapshots/7/fs", ("rw", "rbind"))]


def test_view_without_parent_is_ro_bind_of_own_fs():
    assert compute_mounts(L, Kind.VIEW, 7, ()) == [Mount("bind", "/r/snapshots/7/fs", ("ro", "rbind"))]


def test_view_of_one_layer_binds_the_parent_read_only():
    assert compute_mounts(L, Kind.VIEW, 7, (3,), ("index=off",)) == [
        Mount("bind", "/r/snapshots/3/fs", ("ro", "rbind"))
    ]


def test_active_with_one_parent_is_overlay_with_upper_and_work():
    [m] = compute_mounts(L, Kind.ACTIVE, 7, (3,))
    assert (m.type, m.source) == ("overlay", "overlay")
    assert m.options == ("workdir=/r/snapshots/7/work", "upperdir=/r/snapshots/7/fs", "lowerdir=/r/snapshots/3/fs")


def test_active_with_parents_lists_nearest_parent_leftmost_after_extra_options():
    [m] = compute_mounts(L, Kind.ACTIVE, 9, (5, 3, 1), ("userxattr", "index=off"))
    assert m.options == (
        "userxattr",
        "index=off",
        "workdir=/r/snapshots/9/work",
        "upperdir=/r/snapshots/9/fs",
        "lowerdir=/r/snapshots/5/fs:/r/snapshots/3/fs:/r/snapshots/1/fs",
    )


def test_view_with_two_parents_is_lowerdir_only_overlay():
    [m] = compute_mounts(L, Kind.VIEW, 9, (5, 3), ("index=off",))
    assert m == Mount("overlay", "overlay", ("index=off", "lowerdir=/r/snapshots/5/fs:/r/snapshots/3/fs"))


@pytest.mark.parametrize("parents", [(), (3,), (3, 2)])
def test_committed_snapshots_have_no_mounts(parents):
    with pytest.raises(FailedPrecondition, match="a committed snapshot has no mounts"):
        compute_mounts(L, Kind.COMMITTED, 9, parents)


def test_a_target_adds_a_mount_at_it_and_the_mountpoints_lower_under_the_rootfs():
    [root, m2] = compute_mounts(L, Kind.ACTIVE, 7, (3,), ("index=off",), (), [("/root/.m2", ["/r/lowers/7/0"])])
    assert root == Mount(
        "overlay",
        "overlay",
        (
            "index=off",
            "workdir=/r/snapshots/7/work",
            "upperdir=/r/snapshots/7/fs",
            "lowerdir=/r/snapshots/3/fs:/r/snapshots/7/mountpoints",
        ),
    )
    # Inside the snapshot (gone with it), named by the target's hash.
    base = "/r/snapshots/7/targets/" + hashlib.sha256(b"/root/.m2").hexdigest()[:16]
    assert m2 == Mount(
        "overlay",
        "overlay",
        ("index=off", f"workdir={base}/work", f"upperdir={base}/fs", "lowerdir=/r/lowers/7/0"),
        "/root/.m2",
    )


def test_targets_of_a_view_are_read_only():
    mounts = compute_mounts(L, Kind.VIEW, 7, (3,), (), (), [("/a", ["/r/lowers/7/0"]), ("/b", ["/x", "/y"])])
    assert mounts[1] == Mount("bind", "/r/lowers/7/0", ("ro", "rbind"), "/a")
    assert mounts[2] == Mount("overlay", "overlay", ("lowerdir=/x:/y",), "/b")
    assert mounts[0].options == ("lowerdir=/r/snapshots/3/fs:/r/snapshots/7/mountpoints",)


def test_a_target_dir_follows_the_target_not_its_place():
    assert L.target_dir(7, "/root/.m2") == L.target_dir(7, "/root/.m2") != L.target_dir(7, "/root/.npm")


def test_for_parallel_unpack_a_parentless_active_is_an_overlay_over_the_empty_dir():
    (m,) = compute_mounts(L, Kind.ACTIVE, 7, [], ("index=off",), parallel_unpack=True)
    assert (m.type, m.options) == (
        "overlay",
        ("index=off", "workdir=/r/snapshots/7/work", "upperdir=/r/snapshots/7/fs", "lowerdir=/r/empty"),
    )
    assert compute_mounts(L, Kind.ACTIVE, 7, [3], parallel_unpack=True) == compute_mounts(L, Kind.ACTIVE, 7, [3])
    assert compute_mounts(L, Kind.VIEW, 7, [], parallel_unpack=True) == compute_mounts(L, Kind.VIEW, 7, [])
