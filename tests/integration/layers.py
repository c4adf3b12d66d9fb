"""Filesystem helpers for the conformance tests: a small port of continuity's `fstest` and of the
helpers in containerd's `snapshots/testsuite` (applyToMounts, createSnapshot, checkSnapshots).

An *op* is a function applied to a directory (a mounted snapshot or a plain "flat" directory);
`apply` runs ops in order, `tree` captures a directory the way `fstest.CheckDirectoryEqual`
compares it (type, permission bits, owner, content, link target, xattrs; the root itself excluded)
and `assert_same_tree` reports the differences.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from addlower.dev.mounting import mounted
from addlower.ops.client import SnapshotsClient

Op = Callable[[Path], None]

# The label containerd's suite puts on every snapshot it creates (snapshots.WithLabels(opt)).
GC_ROOT = {"containerd.io/gc.root": "2024-01-01T00:00:00Z"}


# --- fstest appliers ---------------------------------------------------------------------------


def _at(root: Path, name: str) -> Path:
    return root / name.lstrip("/")


def create_file(name: str, data: bytes | str, mode: int = 0o644) -> Op:
    """fstest.CreateFile: write (truncating) and then force the permission bits."""
    content = data.encode() if isinstance(data, str) else data

    def op(root: Path) -> None:
        path = _at(root, name)
        path.write_bytes(content)
        os.chmod(path, mode)

    return op


def create_dir(name: str, mode: int = 0o755) -> Op:
    """fstest.CreateDir: mkdir -p and force the permission bits."""

    def op(root: Path) -> None:
        path = _at(root, name)
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)

    return op


def remove_all(name: str) -> Op:
    """fstest.RemoveAll: remove a file or a whole tree; missing is fine."""

    def op(root: Path) -> None:
        path = _at(root, name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

    return op


def chown(name: str, uid: int, gid: int) -> Op:
    """fstest.Chown (lchown, like Go's os.Lchown)."""
    return lambda root: os.lchown(_at(root, name), uid, gid)


def link(old: str, new: str) -> Op:
    """fstest.Link: a hard link."""
    return lambda root: os.link(_at(root, old), _at(root, new))


def rename(old: str, new: str) -> Op:
    """fstest.Rename."""
    return lambda root: os.rename(_at(root, old), _at(root, new))


def apply(root: Path, *ops: Op) -> None:
    """Run ops, in order, against a directory (this is the one way tests write into mounts)."""
    for op in ops:
        op(root)


# --- directory comparison ----------------------------------------------------------------------


def _xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


def tree(root: Path) -> dict[str, tuple]:
    """Everything below `root` (not `root` itself), keyed by relative path."""
    entries: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            rel = str(path.relative_to(root))
            common = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, _xattrs(path))
            if stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", *common)
            elif stat.S_ISREG(st.st_mode):
                entries[rel] = ("file", *common, path.read_bytes())
            elif stat.S_ISLNK(st.st_mode):
                entries[rel] = ("symlink", *common, os.readlink(path))
            else:
                entries[rel] = ("special", *common, stat.S_IFMT(st.st_mode), st.st_rdev)
    return entries


def assert_same_tree(actual: Path, expected: Path) -> None:
    """fstest.CheckDirectoryEqual: fail listing every path that is missing, extra or different."""
    got, want = tree(actual), tree(expected)
    problems = [f"missing {p}: {want[p]!r}" for p in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {p}: {got[p]!r}" for p in sorted(got.keys() - want.keys())]
    problems += [
        f"differs {p}: got {got[p]!r}, want {want[p]!r}" for p in sorted(got.keys() & want.keys()) if got[p] != want[p]
    ]
    assert not problems, f"{actual} != {expected}:\n" + "\n".join(problems)


def assert_tree_is(actual: Path, *ops: Op) -> None:
    """fstest.CheckDirectoryEqualWithApplier: `actual` equals an empty dir after `ops`."""
    with tempfile.TemporaryDirectory(dir=actual.parent) as expected:
        apply(Path(expected), *ops)
        assert_same_tree(actual, Path(expected))


# --- mounting ----------------------------------------------------------------------------------


@contextmanager
def mount_snapshot(mounts: Sequence, target: Path) -> Iterator[Path]:
    """Mount what the snapshotter returned on `target`, always unmounting afterwards."""
    with mounted(mounts, target) as path:
        yield path


# --- snapshot chains (testsuite/helpers.go) ----------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """How a call failed, read like grpc.RpcError's code() and details(); a status without a
    message has details() == ""."""

    status: grpc.StatusCode
    message: str

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.message


def expect_code(code: grpc.StatusCode, call: Callable, *args, **kwargs) -> Failure:
    """Run a client call that must fail with `code`; returns how it failed, for further checks."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    assert info.value.code() == code, f"expected {code}, got {info.value.code()}: {info.value.details()}"
    return Failure(info.value.code(), info.value.details() or "")


def create_snapshot(
    client: SnapshotsClient, work: Path, parent: str, *ops: Op, labels: Mapping[str, str] = GC_ROOT
) -> str:
    """createSnapshot: Prepare on `parent`, apply `ops` through a real mount, unmount, Commit."""
    name = f"layer-{uuid.uuid4().hex[:12]}"
    key = f"{name}-prepare"
    mounts = client.prepare(key, parent, labels)
    with mount_snapshot(mounts, work / key) as target:
        apply(target, *ops)
    client.commit(name, key, labels)
    return name


def check_snapshot(client: SnapshotsClient, work: Path, name: str, flat: Path) -> None:
    """checkSnapshot: a View of `name`, mounted, must equal the flat directory."""
    view = f"{name}-view"
    mounts = client.view(view, name, GC_ROOT)
    try:
        with mount_snapshot(mounts, work / view) as target:
            assert_same_tree(target, flat)
    finally:
        client.remove(view)


def check_snapshots(client: SnapshotsClient, work: Path, *layers: Sequence[Op]) -> list[str]:
    """checkSnapshots: build a chain, one committed snapshot per layer, and after each layer
    compare a view of the chain with a plain directory that had the same ops applied."""
    flat = work / "flat"
    flat.mkdir(parents=True)
    parent, names = "", []
    for ops in layers:
        parent = create_snapshot(client, work, parent, *ops)
        apply(flat, *ops)
        check_snapshot(client, work, parent, flat)
        names.append(parent)
    return names
