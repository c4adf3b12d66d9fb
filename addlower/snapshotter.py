"""The snapshotter: turns snapshot operations into directories, metadata and mounts.

Behaves like containerd's overlayfs snapshotter. Ordering is what keeps a kill at any instant
consistent: a new snapshot is built in a temp dir and renamed into place inside the metadata
transaction, so a crash leaves at worst an orphan directory that Cleanup removes. Must not know
about gRPC; errors are raised as addlower.errors types.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Mapping, Sequence

from . import fsutil
from .errors import InvalidArgument
from .filters import parse_filters
from .fsutil import Usage
from .labels import UPPERDIR_LABEL, validate_labels
from .mounts import Kind, Layout, Mount, compute_mounts
from .store import Info, MetaStore

log = logging.getLogger(__name__)

TEMP_PREFIX = "new-"
REMOVED_PREFIX = "rm-"

KIND_NAMES = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}


@dataclass(frozen=True)
class Options:
    """Daemon options that change snapshotter behaviour (flags of the original)."""

    async_remove: bool = True
    upperdir_label: bool = False
    mount_options: tuple[str, ...] = ()


def snapshot_fields(info: Info):  # -> filters.Adaptor
    """The fields a List filter can test on a snapshot, as containerd names them."""

    def field(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return KIND_NAMES.get(info.kind, ""), True
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels" and len(path) > 1:
            value = info.labels.get(".".join(path[1:]))
            return (value, True) if value is not None else ("", False)
        return "", False

    return field


class Snapshotter:
    """containerd's overlayfs snapshotter semantics over a root directory."""

    def __init__(self, root: Path, options: Options = Options()):
        self.root = root
        self.options = options
        self.layout = Layout(PurePosixPath(root))
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not fsutil.supports_dtype(root):
            raise RuntimeError(
                f"{root}: the filesystem does not support d_type, which overlayfs needs "
                "(for xfs, format it with ftype=1)"
            )
        self.snapshots_dir = Path(self.layout.snapshots)
        self.snapshots_dir.mkdir(mode=0o700, exist_ok=True)
        self.store = MetaStore(root / "metadata.db")
        self.overlay_options = fsutil.overlay_options(options.mount_options)
        self._set_aside_unrecorded()

    def close(self) -> None:
        self.store.close()

    # --- creation -----------------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        validate_labels(labels)
        with self.store.transaction() as tx:
            temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.snapshots_dir))
            try:
                os.chmod(temp, 0o755)
                (temp / "fs").mkdir(mode=0o755)
                if kind == Kind.ACTIVE:
                    (temp / "work").mkdir(mode=0o711)
                snap = tx.create(kind, key, parent, labels)
                if snap.parent_ids:
                    owner = os.stat(self.layout.upper(snap.parent_ids[0]))
                    os.lchown(temp / "fs", owner.st_uid, owner.st_gid)
                final = Path(self.layout.dir(snap.id))
                os.rename(temp, final)
            except BaseException:
                fsutil.remove_tree(temp)
                raise
            try:
                fsutil.fsync_dir(self.snapshots_dir)
            except BaseException:
                os.rename(final, temp)
                fsutil.remove_tree(temp)
                raise
        return self._mounts(snap.kind, snap.id, snap.parent_ids)

    def _mounts(self, kind: Kind, sid: int, parent_ids: Sequence[int]) -> list[Mount]:
        return compute_mounts(self.layout, kind, sid, parent_ids, self.overlay_options)

    # --- queries ------------------------------------------------------------------------------

    def mounts(self, key: str) -> list[Mount]:
        with self.store.read() as tx:
            snap = tx.get_snapshot(key)
        return self._mounts(snap.kind, snap.id, snap.parent_ids)

    def stat(self, key: str) -> Info:
        with self.store.read() as tx:
            sid, info, _ = tx.get_info(key)
        return self._decorate(sid, info)

    def usage(self, key: str) -> Usage:
        with self.store.read() as tx:
            sid, info, stored = tx.get_info(key)
        if info.kind != Kind.ACTIVE:
            return stored
        return fsutil.disk_usage(Path(self.layout.upper(sid)))

    def list(self, filters: Sequence[str]) -> Iterator[Info]:
        """Snapshots matching the filters, by key; reads the store once, then yields."""
        matcher = parse_filters(filters)
        with self.store.read() as tx:
            rows = list(tx.walk())
        for sid, info in rows:
            if matcher.match(snapshot_fields(info)):
                yield self._decorate(sid, info)

    def _decorate(self, sid: int, info: Info) -> Info:
        """Add the never-stored upperdir label to active snapshots when asked to."""
        if self.options.upperdir_label and info.kind == Kind.ACTIVE:
            info.labels[UPPERDIR_LABEL] = str(self.layout.upper(sid))
        return info

    # --- changes ------------------------------------------------------------------------------

    def update(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str]) -> Info:
        validate_labels(labels)
        with self.store.transaction() as tx:
            info = tx.update_info(name, labels, fieldpaths)
            sid = tx.get_info(name)[0]
        return self._decorate(sid, info)

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        validate_labels(labels)
        with self.store.read() as tx:
            sid, info, _ = tx.get_info(key)
        # The walk happens outside the lock; the transaction re-checks everything.
        usage = fsutil.disk_usage(Path(self.layout.upper(sid))) if info.kind == Kind.ACTIVE else Usage()
        with self.store.transaction() as tx:
            tx.commit_active(key, name, usage, labels)

    def remove(self, key: str) -> None:
        if self.options.async_remove:
            with self.store.transaction() as tx:
                tx.remove(key)
            return
        with self.store.transaction() as tx:
            sid, _ = tx.remove(key)
            current = Path(self.layout.dir(sid))
            removed = self.snapshots_dir / f"{REMOVED_PREFIX}{sid}"
            os.rename(current, removed)
            try:
                fsutil.fsync_dir(self.snapshots_dir)
            except BaseException:
                os.rename(removed, current)
                raise
        try:
            fsutil.remove_tree(removed)
        except OSError as exc:  # the metadata is gone already; Cleanup retries the directory
            log.warning("removing %s failed, Cleanup will retry: %s", removed, exc)

    def cleanup(self) -> list[str]:
        """Delete every directory under snapshots/ that is not a live snapshot; returns their names."""
        with self.store.read() as tx:
            live = {str(i) for i in tx.ids()}
            doomed = [self._set_aside(e) for e in os.listdir(self.snapshots_dir) if e not in live]
        for name in doomed:
            fsutil.remove_tree(self.snapshots_dir / name)
        return doomed

    def _set_aside_unrecorded(self) -> None:
        """At start-up, rename directories of creates that died before their commit.

        Their ids were never acknowledged and will be handed out again; Cleanup deletes them.
        """
        with self.store.read() as tx:
            last = tx.last_id()
        for entry in os.listdir(self.snapshots_dir):
            if entry.startswith(TEMP_PREFIX) or (entry.isdigit() and int(entry) > last):
                log.info("set aside unrecorded snapshot directory %s", self._set_aside(entry))

    def _set_aside(self, entry: str) -> str:
        """Rename snapshots/<entry> to a name no snapshot can take; returns the new name."""
        if entry.startswith(REMOVED_PREFIX):
            return entry
        target = REMOVED_PREFIX + entry
        if os.path.lexists(self.snapshots_dir / target):
            target += f"-{time.time_ns()}"
        os.rename(self.snapshots_dir / entry, self.snapshots_dir / target)
        return target
