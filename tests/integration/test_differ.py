"""The differ's rules on real dirs (overlay whiteouts are character devices 0/0 and opaque dirs a
trusted.overlay xattr, so this runs as root): which paths of an upper dir are changes against the
parent's merged layers, as containerd's walking differ would find them on the mounted views."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import grpc
import pytest

from addlower.api import diff_pb2, diff_pb2_grpc, mount_pb2
from addlower.engine.differ import LAYER_TAR, ChangeWriter, Dirs, Layers, changes, write_layer
from addlower.ops.client import SnapshotsClient
from tests.support.daemon import Daemon


def whiteout(path: Path) -> None:
    os.mknod(path, 0o600 | 0o020000, os.makedev(0, 0))


def opaque(path: Path) -> None:
    os.setxattr(path, "trusted.overlay.opaque", b"y")


def tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def found(upper: Path, *lowers: Path) -> list[tuple[str, str]]:
    layers = Layers(os.fsencode(upper), tuple(os.fsencode(p) for p in lowers))
    return [(kind.name, path.decode()) for kind, path, _ in changes(layers)]


def test_the_walking_differs_rules_from_the_upper_dir_and_the_merged_parent(tmp_path: Path):
    base, top, up = tmp_path / "base", tmp_path / "top", tmp_path / "up"
    tree(
        base,
        {"etc/conf": "a", "etc/same": "s", "d/x": "x", "d/sub/y": "y", "gone/z": "z", "hidden/h": "h", "o/old": "o"},
    )
    tree(top, {"etc/conf": "b", "o/kept-by-top": "k"})
    whiteout(top / "hidden")  # the parent itself deleted it
    opaque(top / "o")  # and made o opaque: base's o/old is not in the parent
    os.utime(base / "etc" / "same", ns=(0, 1_500_000_000_000_000_000))
    tree(up, {"etc/conf": "c", "etc/same": "s", "etc/new": "n", "d/new": "n", "o/fresh": "f", "hidden/again": "a"})
    os.utime(up / "etc" / "same", ns=(0, 1_500_000_000_000_000_000))  # copied up unchanged
    whiteout(up / "gone")  # a deleted dir
    whiteout(up / "not-in-parent")  # a whiteout of something only an extra lower had: nothing
    opaque(up / "d")  # rm -r d; mkdir d: every parent entry of d it lacks is deleted
    opaque(up / "o")  # hides top's o/kept-by-top; base's o/old is hidden by top's own opaque o already
    assert found(up, top, base) == [
        ("ADD", "d/new"),
        ("DELETE", "d/sub"),
        ("DELETE", "d/x"),  # opaque d: what the parent had, deleted
        ("MODIFY", "etc/conf"),
        ("ADD", "etc/new"),  # etc/same was copied up unchanged: the same file
        ("DELETE", "gone"),  # a deleted dir is one whiteout; "not-in-parent" is nothing
        ("ADD", "hidden"),
        ("ADD", "hidden/again"),  # the parent deleted "hidden": new here
        ("ADD", "o/fresh"),
        ("DELETE", "o/kept-by-top"),
    ]


def test_the_layer_has_parents_first_whiteouts_and_hardlinks(tmp_path: Path):
    base, up = tmp_path / "base", tmp_path / "up"
    tree(base, {"a/old": "o", "a/shared": "s"})
    tree(up, {"a/new": "n"})
    os.link(up / "a" / "new", up / "a" / "new-link")
    whiteout(up / "a" / "old")
    out = io.BytesIO()
    layer = write_layer(Layers(os.fsencode(up), (os.fsencode(base),)), out, LAYER_TAR, whiteout_time=0)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        members = tar.getmembers()
    assert [(m.name, m.type, m.linkname) for m in members] == [
        ("a", tarfile.DIRTYPE, ""),
        ("a/new", tarfile.REGTYPE, ""),
        ("a/new-link", tarfile.LNKTYPE, "a/new"),
        ("a/.wh.old", tarfile.REGTYPE, ""),
    ]
    assert layer.digest == layer.diff_id and layer.size == len(out.getvalue())  # a tar: one digest


def test_on_the_socket_what_is_not_ours_is_passed_on_and_a_bad_media_type_refused(tmp_path: Path):
    """containerd's diff service tries the next differ on UNIMPLEMENTED: for mounts that are not one
    of our active snapshots against its parent, and for Apply. A media type we do not write, for a
    snapshot of ours, is refused instead: the next differ would put the extra lowers in."""
    d = Daemon(root=tmp_path / "root").start()
    try:
        with d.channel() as ch:
            c = SnapshotsClient(ch)
            c.prepare("base-active")
            c.commit("base", "base-active")
            c.prepare("other-active", "base")
            c.commit("other", "other-active")
            right = c.prepare("job", "base")
            parent = c.view("base-view", "base")
            differ = diff_pb2_grpc.DiffStub(ch)

            def code(left: list, right: list, media_type: str = "") -> grpc.StatusCode:
                try:
                    differ.Diff(diff_pb2.DiffRequest(left=left, right=right, media_type=media_type))
                except grpc.RpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            foreign = [
                mount_pb2.Mount(
                    type="overlay", source="overlay", options=["upperdir=/var/lib/other/fs", "lowerdir=/a:/b"]
                )
            ]
            assert code(parent, foreign) == grpc.StatusCode.UNIMPLEMENTED  # another snapshotter's
            assert code(c.view("other-view", "other"), right) == grpc.StatusCode.UNIMPLEMENTED  # not its parent
            assert code(parent, c.view("job-view", "base")) == grpc.StatusCode.UNIMPLEMENTED  # a view
            assert (
                code(parent, right, "application/vnd.oci.image.layer.v1.tar+zstd")
                == grpc.StatusCode.FAILED_PRECONDITION
            )
            with pytest.raises(grpc.RpcError) as refused:
                differ.Apply(diff_pb2.ApplyRequest(mounts=right))
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        d.stop()


def test_what_a_container_swaps_for_a_symlink_while_its_layer_is_written_never_brings_in_the_host(tmp_path: Path):
    """A diff of a running container: it may swap a dir, or a file, of its upper dir for a symlink
    to a host file between the walk's listing and the writer's read. The writer reads through the
    dir the walk opened, and only the inode the walk listed: the layer gets the container's own
    bytes or the diff fails; never the host's."""
    base, up, host = tmp_path / "base", tmp_path / "up", tmp_path / "host"
    tree(base, {"keep": "k"})
    tree(up, {"a/f": "mine", "b": "mine too"})
    tree(host, {"f": "host secret", "secret": "host secret"})
    out = io.BytesIO()
    dirs: Dirs = {}
    writer = ChangeWriter(out, dirs)
    refused = []
    for kind, path, at in changes(Layers(os.fsencode(up), (os.fsencode(base),)), dirs):
        if path == b"a/f":  # the dir it is in becomes a symlink to a host dir with an f
            os.rename(up / "a", up / "a-moved")
            os.symlink(host, up / "a")
        if path == b"b":  # the file itself becomes a symlink to a host file
            os.rename(up / "b", up / "b-moved")
            os.symlink(host / "secret", up / "b")
            with pytest.raises(OSError) as err:
                writer.handle(kind, path, at)
            refused.append(err.value)
            continue
        writer.handle(kind, path, at)
    writer.close()
    assert refused  # b: read as it is now, a symlink: refused
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        assert tar.extractfile("a/f").read() == b"mine"  # type: ignore[union-attr]
    assert b"host secret" not in out.getvalue()
