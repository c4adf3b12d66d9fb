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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from . import fsutil, metrics
from .errors import InvalidArgument
from .filters import parse_filters
from .fsutil import Usage
from .kubernetes import KubernetesConfig, PodLowers
from .labels import EXTRA_LOWERS_LABEL, UPPERDIR_LABEL, validate_labels
from .lowers import LowerPolicy, check_mount_limits, parse_lowers
from .mounts import Kind, Layout, Mount, compute_mounts
from .store import DB_NAME, Info, MetaStore, Snapshot

log = logging.getLogger(__name__)

TEMP_PREFIX = "new-"
REMOVED_PREFIX = "rm-"

KIND_NAMES = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}


@dataclass(frozen=True)
class Options:
    """What the configuration says about snapshot behaviour (the original's flags first)."""

    async_remove: bool = True
    upperdir_label: bool = False
    mount_options: tuple[str, ...] = ()
    allowed_roots: tuple[str, ...] = ("/",)  # where extra lower dirs named by path may lie
    named_lowers: Mapping[str, str] = field(default_factory=dict)  # name -> host dir
    kubernetes: KubernetesConfig = KubernetesConfig()  # pods' annotations choose lowers when enabled


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


def matching(rows: Sequence[tuple[int, Info]], filters: Sequence[str]) -> list[tuple[int, Info]]:
    """The (id, info) rows a List with these filters returns."""
    matcher = parse_filters(filters)
    return [(sid, info) for sid, info in rows if matcher.match(snapshot_fields(info))]


def measured_usage(layout: Layout, sid: int, info: Info, stored: Usage) -> Usage:
    """Usage as containerd reports it: a live walk for an active snapshot, stored for the rest."""
    return fsutil.disk_usage(Path(layout.upper(sid))) if info.kind == Kind.ACTIVE else stored


class Snapshotter:
    """containerd's overlayfs snapshotter semantics over a root directory."""

    def __init__(self, root: Path, options: Options = Options()):
        self.root = root
        self.options = options
        self.layout = Layout(str(root))
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not fsutil.supports_dtype(root):
            raise RuntimeError(
                f"{root}: the filesystem does not support d_type, which overlayfs needs "
                "(for xfs, format it with ftype=1)"
            )
        self.snapshots_dir = Path(self.layout.snapshots)
        self.snapshots_dir.mkdir(mode=0o700, exist_ok=True)
        self.lowers = LowerPolicy(str(root), tuple(options.allowed_roots), dict(options.named_lowers))
        k8s = options.kubernetes
        self.pods = PodLowers(k8s, LowerPolicy(str(root), k8s.allowed_roots, self.lowers.named)) if k8s.enabled else None
        self.store = MetaStore(root / DB_NAME)
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
        extra = self._extra_lowers(labels)  # refused before anything is created
        tree: Path | None = None  # wherever the new snapshot's directory is at the moment
        try:
            with self.store.transaction() as tx:
                # Made under the store's lock, so a concurrent Cleanup cannot take it for an orphan.
                tree = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.snapshots_dir))  # 0700, as containerd's
                (tree / "fs").mkdir(mode=0o755)
                if kind == Kind.ACTIVE:
                    (tree / "work").mkdir(mode=0o711)
                snap = tx.create(kind, key, parent, labels)
                mounts = self._mounts(snap, extra)
                if snap.parent_ids:  # the new root belongs to whoever owns the parent's
                    owner = os.stat(self.layout.upper(snap.parent_ids[0]))
                    if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
                        os.lchown(tree / "fs", owner.st_uid, owner.st_gid)
                final = Path(self.layout.dir(snap.id))
                os.rename(tree, final)
                tree = final
                # No fsync of snapshots/ here (nor in containerd): a kill cannot separate the
                # rename from the row; only a power cut within the journal's commit interval can,
                # and start-up reports a row whose directory is missing.
                self._ensure_dirs(extra)
        except BaseException:
            if tree is not None:
                fsutil.remove_tree(tree)
            raise
        return mounts

    def _extra_lowers(self, labels: Mapping[str, str]) -> tuple[str, ...]:
        """The host dirs the label asks for, checked against the policy, symlinks resolved."""
        try:
            return self._check_lowers(labels)
        except InvalidArgument as exc:
            metrics.LOWERS_REFUSED.labels("label").inc()
            log.warning("refused extra lowers: %s", exc)
            raise

    def _check_lowers(self, labels: Mapping[str, str]) -> tuple[str, ...]:
        source = f"label {EXTRA_LOWERS_LABEL}"
        dirs = parse_lowers(labels.get(EXTRA_LOWERS_LABEL, ""), self.lowers, source)
        for d in dirs:
            real = os.path.realpath(d)
            if real != d:
                self.lowers.check_outside_root(real, f"{source}: entry {d!r} resolves to")
                if self.lowers.allows(d) and not self.lowers.allows(real):
                    raise InvalidArgument(f"{source}: entry {d!r} resolves to {real!r}, outside the allowed roots")
            if os.path.lexists(real) and not os.path.isdir(real):
                raise InvalidArgument(f"{source}: entry {d!r} is not a directory")
        return dirs

    def _mounts(self, snap: Snapshot, extra: Sequence[str]) -> list[Mount]:
        mounts = compute_mounts(self.layout, snap.kind, snap.id, snap.parent_ids, self.overlay_options, extra)
        if extra:
            check_mount_limits(mounts, f"label {EXTRA_LOWERS_LABEL}")
            metrics.LOWERS_RESOLVED.labels("label").inc()
        return mounts

    @staticmethod
    def _ensure_dirs(dirs: Sequence[str]) -> None:
        """Create missing extra lower dirs (0755); the policy allowed each of them."""
        for d in dirs:
            os.makedirs(d, mode=0o755, exist_ok=True)

    # --- queries ------------------------------------------------------------------------------

    def mounts(self, key: str) -> list[Mount]:
        with self.store.read() as tx:
            snap = tx.get_snapshot(key)
        if self.pods is not None and snap.kind == Kind.ACTIVE and EXTRA_LOWERS_LABEL not in snap.labels:
            snap = self._record_pod_lowers(key, snap)
        extra = self._extra_lowers(snap.labels)  # again: the policy may have changed
        mounts = self._mounts(snap, extra)
        self._ensure_dirs(extra)
        return mounts

    def _record_pod_lowers(self, key: str, snap: Snapshot) -> Snapshot:
        """Ask containerd what the container's pod wants; record it as the label, so that later
        Mounts calls are stable and `ctr snapshots info` shows it."""
        assert self.pods is not None
        try:
            value = self.pods.for_key(key)
        except InvalidArgument as exc:
            metrics.LOWERS_REFUSED.labels("annotation").inc()
            log.warning("refused extra lowers for %s: %s", key, exc)
            raise
        if value is None:
            return snap
        metrics.LOWERS_RESOLVED.labels("annotation").inc()
        with self.store.transaction() as tx:
            tx.update_info(key, {EXTRA_LOWERS_LABEL: value}, [f"labels.{EXTRA_LOWERS_LABEL}"])
        log.info("recorded lowers %r for %s from its pod's annotation", value, key)
        with self.store.read() as tx:
            return tx.get_snapshot(key)

    def stat(self, key: str) -> Info:
        with self.store.read() as tx:
            sid, info, _ = tx.get_info(key)
        return self._decorate(sid, info)

    def usage(self, key: str) -> Usage:
        with self.store.read() as tx:
            sid, info, stored = tx.get_info(key)
        return measured_usage(self.layout, sid, info, stored)  # the walk, outside the lock

    def list(self, filters: Sequence[str]) -> Iterator[Info]:
        """Snapshots matching the filters, by key; reads the store once, then yields."""
        with self.store.read() as tx:
            rows = tx.walk()
        for sid, info in matching(rows, filters):
            yield self._decorate(sid, info)

    def _decorate(self, sid: int, info: Info) -> Info:
        """Add the never-stored upperdir label to active snapshots when asked to."""
        if self.options.upperdir_label and info.kind == Kind.ACTIVE:
            return replace(info, labels={**info.labels, UPPERDIR_LABEL: self.layout.upper(sid)})
        return info

    # --- changes ------------------------------------------------------------------------------

    def update(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str]) -> Info:
        validate_labels(labels)
        self._extra_lowers(labels)
        with self.store.transaction() as tx:
            sid, info = tx.update_info(name, labels, fieldpaths)
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
        moved: tuple[Path, Path] | None = None
        try:
            with self.store.transaction() as tx:
                sid, _ = tx.remove(key)
                current, removed = Path(self.layout.dir(sid)), self.snapshots_dir / f"{REMOVED_PREFIX}{sid}"
                os.rename(current, removed)
                moved = (current, removed)
        except BaseException:
            if moved is not None:  # the row is still there: so is its directory
                os.rename(moved[1], moved[0])
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
        """At start-up, undo what a kill between a directory rename and its COMMIT left behind.

        A create that died leaves a temp dir or a dir whose id was never committed (it will be
        handed out again): set it aside for Cleanup. A synchronous remove that died leaves a live
        snapshot's dir renamed to rm-<id>: put it back.
        """
        with self.store.read() as tx:
            last, live = tx.last_id(), tx.ids()
        for entry in os.listdir(self.snapshots_dir):
            sid = entry.removeprefix(REMOVED_PREFIX)
            if entry.startswith(REMOVED_PREFIX) and sid.isdigit() and int(sid) in live:
                os.rename(self.snapshots_dir / entry, self.snapshots_dir / sid)
                log.info("restored directory %s of live snapshot %s", entry, sid)
            elif entry.startswith(TEMP_PREFIX) or (entry.isdigit() and int(entry) > last):
                log.info("set aside unrecorded snapshot directory %s", self._set_aside(entry))
        for sid in sorted(live):
            if not os.path.isdir(self.layout.upper(sid)):
                log.error("snapshot id %d has no directory %s (lost in a power cut?); remove it "
                          "with ctr snapshots rm and pull its image again", sid, self.layout.upper(sid))

    def _set_aside(self, entry: str) -> str:
        """Rename snapshots/<entry> to a name no snapshot can take; returns the new name."""
        if entry.startswith(REMOVED_PREFIX):
            return entry
        target = REMOVED_PREFIX + entry
        if os.path.lexists(self.snapshots_dir / target):
            target += f"-{time.time_ns()}"
        os.rename(self.snapshots_dir / entry, self.snapshots_dir / target)
        return target
