"""Commit with a parent (containerd 2.2's parallel unpack, `rebase` capability): a layer unpacked
into an active snapshot of its own is put on top of the layer below at Commit. Straight on the
socket, with real overlay mounts and a restart."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc

from addlower.api import snapshots_pb2 as pb
from addlower.ops.client import SnapshotsClient
from tests.integration.layers import GC_ROOT, apply, assert_tree_is, create_file, expect_code, mount_snapshot
from tests.support.daemon import Daemon, config_args

Code = grpc.StatusCode


def unpacked(client: SnapshotsClient, work: Path, key: str, *ops) -> None:
    """An active snapshot without a parent, holding one layer's changes."""
    with mount_snapshot(client.prepare(key, "", GC_ROOT), work / key) as target:
        apply(target, *ops)


def test_layers_unpacked_apart_are_stacked_at_commit_and_stay_so(daemon: Daemon, tmp_path: Path):
    work = tmp_path / "work"
    with daemon.channel() as ch:
        client = SnapshotsClient(ch)
        unpacked(client, work, "l1", create_file("/a", "one\n"), create_file("/b", "one\n"))
        unpacked(client, work, "l2", create_file("/b", "two\n"))  # both unpacked before either is committed
        client.commit("layer-1", "l1", GC_ROOT)
        client.commit("layer-2", "l2", GC_ROOT, parent="layer-1")
        assert client.stat("layer-2").parent == "layer-1"
        expect_code(Code.FAILED_PRECONDITION, client.remove, "layer-1")  # it has a child now
    daemon.stop()
    daemon.start()
    with daemon.channel() as ch:
        client = SnapshotsClient(ch)
        assert client.stat("layer-2").parent == "layer-1"
        with mount_snapshot(client.view("v", "layer-2", GC_ROOT), work / "v") as target:
            assert_tree_is(target, create_file("/a", "one\n"), create_file("/b", "two\n"))


def test_a_commit_cannot_move_a_snapshot_to_another_parent(client: SnapshotsClient, tmp_path: Path):
    work = tmp_path / "work"
    unpacked(client, work, "l1", create_file("/a", "1\n"))
    client.commit("base", "l1", GC_ROOT)
    unpacked(client, work, "other-a")
    client.commit("other", "other-a", GC_ROOT)
    client.prepare("on-base", "base", GC_ROOT)
    err = expect_code(Code.INVALID_ARGUMENT, client.commit, "x", "on-base", parent="other")
    assert "'on-base'" in err.details() and "'base'" in err.details() and "'other'" in err.details()
    client.commit("same", "on-base", GC_ROOT, parent="base")  # its own parent again is fine
    assert client.stat("same").parent == "base"


def test_a_rebase_onto_a_missing_or_uncommitted_parent_changes_nothing(client: SnapshotsClient, tmp_path: Path):
    unpacked(client, tmp_path / "work", "l1", create_file("/a", "1\n"))
    client.prepare("still-active", "", GC_ROOT)
    assert "'nowhere'" in expect_code(Code.NOT_FOUND, client.commit, "x", "l1", parent="nowhere").details()
    expect_code(Code.FAILED_PRECONDITION, client.commit, "x", "l1", parent="still-active")
    info = client.stat("l1")
    assert info.kind == pb.ACTIVE and info.parent == ""  # still the active it was
    client.commit("x", "l1", GC_ROOT)
    assert client.stat("x").parent == ""


def test_with_parallel_unpack_a_layer_is_unpacked_through_an_overlay_and_its_whiteouts_hide_below(tmp_path: Path):
    """containerd's applier writes whiteouts (0/0 char devices in the upper dir) only into an
    overlay mount: with parallel_unpack a parentless active is one, over an empty dir."""
    work = tmp_path / "work"
    d = Daemon(root=tmp_path / "root", args=config_args(tmp_path / "config.toml", "parallel_unpack = true\n")).start()
    try:
        with d.channel() as ch:
            client = SnapshotsClient(ch)
            unpacked(client, work, "l1", create_file("/a", "1\n"), create_file("/gone", "1\n"))
            (m,) = client.prepare("l2", "", GC_ROOT)
            options = dict(o.split("=", 1) for o in m.options if "=" in o)
            assert m.type == "overlay" and options["lowerdir"] == str(tmp_path / "root" / "empty")
            with mount_snapshot([m], work / "l2") as target:
                apply(target, create_file("/b", "2\n"))
            os.mknod(Path(options["upperdir"]) / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))  # as the applier
            client.commit("layer-1", "l1", GC_ROOT)
            client.commit("layer-2", "l2", GC_ROOT, parent="layer-1")
            with mount_snapshot(client.view("v", "layer-2", GC_ROOT), work / "v") as target:
                assert_tree_is(target, create_file("/a", "1\n"), create_file("/b", "2\n"))
            assert os.listdir(tmp_path / "root" / "empty") == []
    finally:
        d.stop()
