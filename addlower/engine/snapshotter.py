"""The snapshotter: turns snapshot operations into directories, metadata and mounts.

Behaves like containerd's overlayfs snapshotter. Ordering is what keeps a kill at any instant
consistent: a new snapshot is built in a temp dir and renamed into place inside the metadata
transaction, so a crash leaves at worst an orphan directory that Cleanup removes. Must not know
about gRPC; errors are raised as addlower.core.errors types.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from operator import itemgetter
from pathlib import Path
from typing import TypeVar

from addlower.core.cacheimage import check_reference
from addlower.core.caches import CachePolicy, Promote
from addlower.core.config import Config, reloaded
from addlower.core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from addlower.core.keys import split_key
from addlower.core.labels import EXTRA_LOWERS_LABEL, POD_LABEL, UPPERDIR_LABEL, validate_labels
from addlower.core.logformat import fields
from addlower.core.lowers import ROOT_TARGET, Lower, check_mount_limits, target_count
from addlower.core.model import Info, Kind, Usage
from addlower.core.mounts import Layout, Mount, compute_mounts, layer_dirs
from addlower.engine import adopt, fsutil, metrics, wire
from addlower.engine.cacheimage import CacheImages
from addlower.engine.caches import Caches, Refused
from addlower.engine.ctrdversion import TargetSupport
from addlower.engine.differ import Layers
from addlower.engine.exits import TaskExits
from addlower.engine.pinning import Opened, Pins
from addlower.engine.podlookup import PodLowers
from addlower.engine.resolver import LABEL_SOURCE, Resolver, counted
from addlower.engine.store import DB_NAME, MetaStore, Reader, Snapshot, Tx, disk_full, matching, stored_schema_version

log = logging.getLogger(__name__)

# Seconds a removed job's writes to a cache that promotes on success wait for its exit to be seen
# (ctr run --rm removes the snapshot as the task's exit event goes out); then they are deleted.
EXIT_WAIT = 10.0

TEMP_PREFIX = "new-"
REMOVED_PREFIX = "rm-"
# The snapshot id a dir under snapshots/ is named after: its own, set aside, or set aside again.
_DIR_ID = re.compile(rf"(?:{REMOVED_PREFIX})?(\d+)(?:-\d+)?")

# Room kept back on the root's filesystem for deleting rows when it is full (see fsutil.Reserve):
# SQLite writes a few 4 KiB pages to its WAL per Remove, so this covers thousands.
RESERVE_NAME = "reserve"
RESERVE_BYTES = 8 << 20


T = TypeVar("T")


class LostMetadata(RuntimeError):
    """snapshots/ holds data that metadata.db does not account for: starting would delete it."""


def measured_usage(layout: Layout, sid: int, info: Info, stored: Usage) -> Usage:
    """Usage as containerd reports it: a live walk for an active snapshot, stored for the rest."""
    return live_usage(layout, sid) if info.kind == Kind.ACTIVE else stored


def live_usage(layout: Layout, sid: int) -> Usage:
    """What an active snapshot's writes take: its upper dir and its targets' upper dirs."""
    usage = fsutil.disk_usage(Path(layout.upper(sid)))
    targets = Path(layout.targets(sid))
    if not targets.is_dir():
        return usage
    extra = fsutil.disk_usage(targets)
    return Usage(usage.size + extra.size, usage.inodes + extra.inodes)


@dataclass(frozen=True)
class Awaited:
    """A removed snapshot's writes to a cache, parked until its job's exit is seen."""

    key: str
    cache: str
    pod: str | None  # namespace/name of its pod, for the policy and the record
    parked: str
    scope: str | None = None  # the scope whose chain the writes would join

    @property
    def namespace(self) -> str | None:
        return self.pod.partition("/")[0] if self.pod is not None else None

    @property
    def container(self) -> tuple[str, str] | None:
        """(containerd namespace, container id) of the job, from the key."""
        return split_key(self.key)


@dataclass(frozen=True)
class Moved:
    """An upper renamed in a Remove's transaction: into a generation, or parked (awaits)."""

    cache: str
    upper: str
    to: str
    awaits: Awaited | None = None
    scope: str | None = None


class _Awaiting:
    """Parked writes by job, each settled once: by its exit, or with None after EXIT_WAIT."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_job: dict[tuple[str, str], list[Awaited]] = {}

    def add(self, awaits: Awaited, settle: Callable[[Awaited, int | None], None]) -> None:
        job = awaits.container
        if job is None:  # not a containerd key: its exit can never be seen
            settle(awaits, None)
            return
        with self._lock:
            self._by_job.setdefault(job, []).append(awaits)
        timer = threading.Timer(EXIT_WAIT, lambda: self._expire(awaits, settle))
        timer.daemon = True
        timer.start()

    def drop(self, awaits: Awaited) -> None:
        job = awaits.container
        with self._lock:
            if job is not None and awaits in self._by_job.get(job, []):
                self._by_job[job].remove(awaits)

    def take(self, namespace: str, container: str) -> builtins.list[Awaited]:
        with self._lock:
            return self._by_job.pop((namespace, container), [])

    def _expire(self, awaits: Awaited, settle: Callable[[Awaited, int | None], None]) -> None:
        job = awaits.container
        with self._lock:
            waiting = self._by_job.get(job, []) if job is not None else []
            if awaits not in waiting:
                return  # settled by its exit
            waiting.remove(awaits)
        settle(awaits, None)


class _Planned(threading.local):
    """The mounts mounts_work computed for a Mounts it placed on the loop, for that call alone:
    the loop runs the call right after placing it, so what was decided is what runs."""

    key: str | None = None
    mounts: list[Mount] = []  # noqa: RUF012 (replaced, never changed in place)


class Snapshotter:
    """containerd's overlayfs snapshotter semantics over a root directory."""

    def __init__(self, root: Path, config: Config | None = None):
        """Serve `root` with `config`'s snapshot behaviour (its root_dir is the daemon's business)."""
        config = config or Config()
        self.root = root
        self.config = config
        self.layout = Layout(str(root))
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not fsutil.supports_dtype(root):
            raise RuntimeError(
                f"{root}: the filesystem does not support d_type, which overlayfs needs "
                "(for xfs, format it with ftype=1)"
            )
        if adopt.holds_bolt(root):
            self._adopt()
        self.snapshots_dir = Path(self.layout.snapshots)
        self.snapshots_dir.mkdir(mode=0o700, exist_ok=True)
        Path(self.layout.empty).mkdir(mode=0o755, exist_ok=True)
        self.pods = PodLowers(config.kubernetes) if config.kubernetes.enabled else None
        self.resolver = Resolver(str(root), config, self.pods)
        k8s = config.kubernetes
        self.targets = TargetSupport(config.mount_targets, k8s.containerd_address, k8s.timeout)
        self._refuse_lost_metadata()
        self.reserve = fsutil.Reserve(root / RESERVE_NAME, RESERVE_BYTES)
        self.pins = Pins(str(root))
        self.overlay_options = fsutil.overlay_options(config.mount_options)
        self._cleaning = threading.Lock()
        self._removing: set[str] = set()  # rm-<id> dirs a synchronous Remove is deleting
        self._planned = _Planned()
        self._awaiting = _Awaiting()
        self._squasher = ThreadPoolExecutor(1, thread_name_prefix="squash")  # one squash at a time
        # A full disk must not keep the daemon from starting: the reserve's room lets SQLite open
        # (its -wal and -shm files) and start-up record what it sets aside.
        self.store = self._with_reserve(lambda: MetaStore(root / DB_NAME, wire.encode_field), "open the metadata")
        self._with_reserve(self._set_aside_unrecorded, "start")
        self.caches = Caches(str(root), self.store, self.overlay_options)
        self.caches.recover()
        self.images = CacheImages(
            str(root),
            self.store,
            self.caches,
            config.kubernetes.containerd_address,
            str(config.registry_config_path),
            config.ctr_path,
        )
        self._registry = ThreadPoolExecutor(1, thread_name_prefix="registry")  # pushes and pulls, one at a time
        self._closed = threading.Event()
        # The caches whose image a loop pulls (now and every `refresh`), each with its wake-up.
        self._pulls: dict[str, threading.Event] = {}
        self._pulls_lock = threading.Lock()
        self.exits: TaskExits | None = None
        self._follow_exits(config)
        metrics.expect_caches(config.caches)
        if not self.reserve.keep():
            log.warning(
                "the filesystem of %s has no room for its reserve (%d bytes): new snapshots are refused until it has",
                root,
                RESERVE_BYTES,
            )

    def close(self) -> None:
        self._closed.set()
        with self._pulls_lock:
            for wake in self._pulls.values():
                wake.set()
        if self.exits is not None:
            self.exits.stop()
        self.store.close()

    def _follow_exits(self, config: Config) -> None:
        """Subscribe to containerd's task exits once a cache promotes on success (started when
        the daemon listens, or at once after a reload)."""
        wanted = any(policy.promote is Promote.ON_SUCCESS for policy in config.caches.values())
        if wanted and self.exits is None:
            self.exits = TaskExits(config.kubernetes.containerd_address, self.record_exit)

    # --- creation -----------------------------------------------------------------------------

    # --- what a call will do, known before it starts (where it runs follows from it) -----------

    def create_opens_dirs(self, key: str, labels: Mapping[str, str]) -> bool:
        """Whether a Prepare or View of `key` with `labels` walks host dirs (a filesystem under an
        allowed root may hang): it asks for extra lowers, outside the pods' namespace (where they
        wait for the container's pod)."""
        return bool(labels.get(EXTRA_LOWERS_LABEL)) and not self.resolver.held_for_pods(key)

    def mounts_work(self, key: str) -> tuple[bool, bool]:
        """(walks host dirs, may ask containerd) for a Mounts of `key`, from what the store holds.
        A snapshot whose pins were made, by this process, for exactly the entries the policy
        allows it now walks nothing: its mounts are computed here and the call, placed on the
        loop by this answer, returns them (planned for the calling thread alone)."""
        self._planned.key = None
        with self.store.read() as reader:
            info = reader.find(key)
            if info is None:
                return False, False
            if self.resolver.held_for_pods(key) and POD_LABEL not in info.labels:
                return True, True
            if not info.labels.get(EXTRA_LOWERS_LABEL):
                return self.resolver.held_for_pods(key), False
            if info.kind not in (Kind.ACTIVE, Kind.VIEW):
                return True, False  # the call says why not
            snap = reader.get_snapshot(key)
        mounts = self._reused_mounts(key, snap)
        if mounts is None:
            return True, False
        self._planned.key, self._planned.mounts = key, mounts
        return False, False

    def _reused_mounts(self, key: str, snap: Snapshot) -> list[Mount] | None:
        """The mounts of `snap` through the pins it holds, when they were made for exactly the
        entries its label asks for and the policy still allows them; else None. Race-free
        without touching a host path: a pin is a mount under the daemon's 0700 root that holds
        the very dir an earlier openat2(RESOLVE_NO_SYMLINKS) of that entry found (so it cannot
        be swapped), and a dir swapped at the entry's path later is for new containers only."""
        lowers = self.resolver.allowed_quietly(key, snap.labels)
        if not lowers:
            return None
        pins = self.pins.reusable(snap.id, lowers) if any(not lower.cache for lower in lowers) else ()
        if pins is None:
            return None
        chains = {}
        with self.store.read() as reader:
            for lower in lowers:
                if lower.cache:
                    gens = reader.cache_use(snap.id, lower.name or "")
                    if gens is None:
                        return None
                    chains[lower.name or ""] = self.caches.dirs(lower.name or "", gens)
        return self._compute(snap, lowers, pins, chains)

    def remove_walks(self, key: str) -> bool:
        """Whether a Remove of `key` walks a tree: a synchronous remove deletes its dir, and a job's
        writes to a cache are checked before they are promoted."""
        if not self.config.async_remove:
            return True
        if not self.config.caches:
            return False
        with self.store.read() as reader:
            sid, info, _ = reader.get_info(key)
            return info.kind == Kind.ACTIVE and bool(reader.cache_uses(sid))

    def walks_upper(self, key: str) -> bool:
        """Whether a Usage of `key` counts a tree (an active snapshot's); the rest is stored."""
        with self.store.read() as reader:
            info = reader.find(key)
        return info is not None and info.kind == Kind.ACTIVE

    # --- creation -----------------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        validate_labels(labels)
        if not self.reserve.kept and not self.reserve.keep():
            raise self._no_space(
                f"no room for a new snapshot while the filesystem cannot hold the reserve kept for "
                f"removals ({RESERVE_BYTES} bytes)"
            )
        self._refuse_reserved(labels, {})
        lowers = self.resolver.for_create(kind, key, labels)
        with counted("label", lambda: self._open(key, lowers, LABEL_SOURCE), key=key) as opened:  # no lock
            return self._create_opened(kind, key, parent, labels, opened)

    def _create_opened(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str], opened: Opened
    ) -> list[Mount]:
        tree: Path | None = None  # wherever the new snapshot's directory is at the moment
        sid: int | None = None
        try:
            with self.store.transaction() as tx:
                # Made under the store's lock, so a concurrent Cleanup cannot take it for an orphan.
                tree = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.snapshots_dir))  # 0700, as containerd's
                (tree / "fs").mkdir(mode=0o755)
                if kind == Kind.ACTIVE:
                    (tree / "work").mkdir(mode=0o711)
                snap = tx.create(kind, key, parent, labels)
                sid = snap.id
                if snap.parent_ids:  # the new root belongs to whoever owns the parent's
                    owner = os.stat(self.layout.upper(snap.parent_ids[0]))
                    if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
                        os.lchown(tree / "fs", owner.st_uid, owner.st_gid)
                final = Path(self.layout.dir(snap.id))
                os.rename(tree, final)
                tree = final
                # In place: the mounts may need dirs inside it (a target's mountpoint and upper).
                mounts = counted("label", lambda: self._mounts(snap, opened, LABEL_SOURCE, tx), key=key)
                # No fsync of snapshots/ here (nor in containerd): a kill cannot separate the
                # rename from the row; only a power cut within the journal's commit interval can,
                # and start-up reports a row whose directory is missing.
        except BaseException:
            if sid is not None:
                self.pins.release(sid)
            if tree is not None:
                try:  # the store's lock is released: a Cleanup may be removing it too
                    fsutil.remove_tree(tree)
                except OSError as exc:  # the call's own error is the one to answer with
                    log.warning("could not remove %s of a failed create, Cleanup will: %s", tree, exc)
            raise
        if opened.lowers:
            metrics.LOWERS_RESOLVED.inc("label")
        return mounts

    # --- extra lowers: which entries, checked against which policy -----------------------------

    def reload(self, config: Config) -> list[str]:
        """Apply a re-read config's policy in one step (each check sees the old policy or the new
        one, whole); returns the changed keys that need a restart."""
        applied, later = reloaded(self.config, config)
        self.resolver.reload(applied)
        before, self.config = self.config.caches, applied
        for name in applied.caches.keys() | before.keys():
            old, new = before.get(name), applied.caches.get(name)
            if (old and (old.image, old.refresh)) != (new and (new.image, new.refresh)):
                self._pull_soon(name)  # a new image (or refresh) is pulled now, a dropped one stops
        if self.exits is None:
            self._follow_exits(applied)
            if self.exits is not None:
                self.exits.start()
        metrics.expect_caches(applied.caches)
        return later

    @staticmethod
    def _refuse_reserved(labels: Mapping[str, str], current: Mapping[str, str]) -> None:
        if POD_LABEL in labels and labels[POD_LABEL] != current.get(POD_LABEL):
            raise InvalidArgument(f"label {POD_LABEL} is set by the snapshotter only")

    def _open(self, key: str, lowers: Sequence[Lower], source: str) -> Opened:
        """Everything about `lowers` that may take long, done before any lock is taken: whether
        containerd honours targets (a call to it), and walking the host dirs (a slow filesystem)."""
        if any(lower.target != ROOT_TARGET for lower in lowers):
            self.targets.check(source)
        for lower in lowers:  # a first use copies its seed in
            policy = self.config.caches.get(lower.name or "") if lower.cache else None
            if policy is not None:
                self.caches.seed(lower.name or "", policy)
        return self.pins.open(lowers, f"{source}: entry", key)

    def _mounts(self, snap: Snapshot, opened: Opened, source: str, tx: Tx | None = None) -> list[Mount]:
        """The mounts of `snap` with the `opened` lowers pinned; drops pins of entries it no longer
        has. A cache's chain is the one recorded with the snapshot, or its current one, recorded
        in `tx` (or a transaction of its own)."""
        pins = self.pins.attach(snap.id, opened, f"{source}: entry", self.config.max_host_mounts)
        try:
            caches = [lower for lower in opened.lowers if lower.cache]
            chains: dict[str, list[str]] = {}
            if caches:
                with contextlib.ExitStack() as stack:
                    tx = tx or stack.enter_context(self.store.transaction())
                    for lower in caches:
                        policy = self.config.caches.get(lower.name or "")
                        most = policy.max_scopes if policy is not None else 0
                        chains[lower.name or ""] = self.caches.chain(
                            tx, snap.id, lower.name or "", lower.target, lower.scope, most
                        )
            return self._compute(snap, opened.lowers, pins, chains, source)
        except BaseException:
            self.pins.release(snap.id)
            raise

    def _compute(
        self,
        snap: Snapshot,
        lowers: Sequence[Lower],
        pins: Sequence[str],
        chains: Mapping[str, Sequence[str]],
        source: str | None = None,
    ) -> list[Mount]:
        """The mounts of `snap` with `lowers`: host dirs at `pins` (in order), caches' generations
        from `chains` (by name, newest first); with a `source`, the target dirs are made and the
        kernel's limits checked (both hold for pins reused as they were made)."""
        at_root: list[str] = []
        targets: dict[str, list[str]] = {}
        host = iter(pins)
        for lower in lowers:
            dirs = (chains[lower.name or ""] or [self.layout.empty]) if lower.cache else [next(host)]
            (at_root if lower.target == ROOT_TARGET else targets.setdefault(lower.target, [])).extend(dirs)
        if source is not None:
            self._make_target_dirs(snap, targets)
        mounts = compute_mounts(
            self.layout,
            snap.kind,
            snap.id,
            snap.parent_ids,
            self.overlay_options,
            at_root,
            list(targets.items()),
            self.config.parallel_unpack,
            {lower.target for lower in lowers if lower.cache},
        )
        if lowers and source is not None:
            check_mount_limits(mounts, source)
        return mounts

    def _make_target_dirs(self, snap: Snapshot, targets: Mapping[str, Sequence[str]]) -> None:
        """The mountpoint of each target in the rootfs's bottom lower, and (active) its upper and
        work dirs: all inside the snapshot's own dir, which nobody else can write."""
        for target in targets:
            os.makedirs(self.layout.mountpoints(snap.id) + target, mode=0o755, exist_ok=True)
            if snap.kind == Kind.ACTIVE:
                base = self.layout.target_dir(snap.id, target)
                os.makedirs(f"{base}/fs", mode=0o755, exist_ok=True)
                os.makedirs(f"{base}/work", mode=0o711, exist_ok=True)

    # --- mounts: a read that re-checks lowers, re-pins them and may record a pod's ------------

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active or view snapshot. Checks its lowers again each time (the policy
        or the host may have changed) and, for a pod's container, records what it got."""
        planned, self._planned.key = self._planned.key, None
        if planned == key:  # this thread's mounts_work computed them just now
            return self._planned.mounts
        with self.store.read() as reader:
            snap = reader.get_snapshot(key)
        request = self.resolver.for_mounts(key, snap.labels)
        context = {"key": key, **request.pod}
        with counted(request.metric, lambda: self._open(key, request.lowers, request.source), **context) as opened:
            mounts = counted(request.metric, lambda: self._mounts(snap, opened, request.source), **context)
        if request.lowers:
            with self.store.read() as reader:
                if not reader.has_id(snap.id):  # removed while it was being pinned: its pins go too
                    self.pins.release(snap.id)
                    raise NotFound(f"snapshot {key!r} does not exist")
        if request.record:  # only once the dirs are pinned: a refusal records nothing
            with self.store.transaction() as tx:
                tx.update_info(key, request.record, [f"labels.{k}" for k in request.record])
            log.info(
                "recorded the pod's extra lowers",
                extra=fields(key=key, **request.pod, lowers=request.record[EXTRA_LOWERS_LABEL]),
            )
            if request.lowers:
                metrics.LOWERS_RESOLVED.inc(request.metric)
        return mounts

    def diff_layers(self, left: Sequence[Mount], right: Sequence[Mount]) -> tuple[Layers, str] | None:
        """What a differ compares when `right` is one of our active snapshots' mounts and `left`
        its parent's (as containerd's CreateDiff asks: a view of the parent): the snapshot's own
        dir and its parent's layers, never its extra lowers or targets; and the snapshot's key.
        None for anything else, which the next differ takes."""
        roots = [m for m in right if not m.target]
        dirs = layer_dirs(roots[0]) if len(roots) == 1 else None
        sid = self.layout.sid_of_upper(dirs[0]) if dirs and dirs[0] else None
        bases = [m for m in left if not m.target]
        base = layer_dirs(bases[0]) if len(bases) == 1 else ((None, []) if not left else None)
        if sid is None or base is None or base[0] is not None:
            return None
        # A parentless snapshot is compared with a parentless view of ours (an empty one).
        view = self.layout.sid_of_upper(base[1][0]) if len(base[1]) == 1 else None
        with self.store.read() as reader:
            found = reader.with_parents(sid)
            seen = reader.with_parents(view) if view is not None else None
        if found is None or found[0].kind != Kind.ACTIVE:
            return None
        info, parent_ids = found
        parents = [self.layout.upper(p) for p in parent_ids]
        parentless_view = seen is not None and not seen[1]
        if base[1] != parents and (parents or not parentless_view):
            return None
        return Layers(os.fsencode(self.layout.upper(sid)), tuple(os.fsencode(d) for d in base[1])), info.name

    def plain(self, key: str) -> Info | None:
        """The Info of `key` when its mounts follow from the store alone (no extra lowers asked
        for, no pod to look up): they stay what they are as long as that Info lives."""
        with self.store.read() as reader:
            _, info, _ = reader.get_info(key)
        if (
            info.kind not in (Kind.ACTIVE, Kind.VIEW)
            or EXTRA_LOWERS_LABEL in info.labels
            or self.resolver.held_for_pods(key)
        ):
            return None
        return info

    # --- queries ------------------------------------------------------------------------------

    def stat(self, key: str) -> Info:
        with self.store.read() as reader:
            sid, info, _ = reader.get_info(key)
        return self._decorate(sid, info)

    def usage(self, key: str) -> Usage:
        with self.store.read() as reader:
            sid, info, stored = reader.get_info(key)
        return measured_usage(self.layout, sid, info, stored)  # outside the lock

    def list(self, filters: Sequence[str]) -> Iterator[bytes]:
        """The snapshots matching the filters, by key, each as an Info field of a reply
        (wire.encode_field): the filters are checked now, the store read as the caller iterates
        (without filters, its stored replies)."""
        with self.store.read() as reader:
            rows = (
                ((sid, wire.encode_field(info)) for sid, info in matching(reader.walk(), filters))
                if filters
                else reader.walk_encoded()
            )
        if not self.config.upperdir_label:
            return map(itemgetter(1), rows)
        return (wire.with_label(field, UPPERDIR_LABEL, self.layout.upper(sid)) for sid, field in rows)

    def _decorate(self, sid: int, info: Info) -> Info:
        """Add the never-stored upperdir label when asked to: to every kind, as containerd's
        overlayfs does in 1.7 and 2.x (a view's or committed snapshot's own fs dir)."""
        if self.config.upperdir_label:
            return replace(info, labels={**info.labels, UPPERDIR_LABEL: self.layout.upper(sid)})
        return info

    # --- changes ------------------------------------------------------------------------------

    def update(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str]) -> Info:
        """A label update; a new lowers value is checked now (against the pods' policy in the CRI
        namespace) and pinned at the next Mounts."""
        validate_labels(labels)
        with self.store.read() as reader:
            _, current, _ = reader.get_info(name)
        self._refuse_reserved(labels, current.labels)
        self.resolver.check_update(name, labels)
        with self.store.transaction() as tx:
            sid, info = tx.update_info(name, labels, fieldpaths)
        return self._decorate(sid, info)

    def commit(self, name: str, key: str, labels: Mapping[str, str], parent: str = "") -> None:
        """Commit an active snapshot, onto `parent` when it was made without one (its upper dir
        does not depend on what lies below)."""
        validate_labels(labels)
        with self.store.read() as reader:
            sid, info, _ = reader.get_info(key)
        # The walk happens outside the lock; the transaction re-checks everything.
        usage = live_usage(self.layout, sid) if info.kind == Kind.ACTIVE else Usage()
        with self.store.transaction() as tx:
            sid = tx.commit_active(key, name, usage, labels, parent)
        self.pins.release(sid)  # a committed snapshot has no mounts

    def remove(self, key: str) -> None:
        """Remove `key`; on a full filesystem, again with the reserve's room (new snapshots are
        refused until a Cleanup or this removal gives the room back)."""
        self._with_reserve(lambda: self._remove(key), f"remove {key!r}")
        if not self.reserve.kept:
            self.reserve.keep()

    def _with_reserve(self, call: Callable[[], T], what: str) -> T:
        """call(), and once more with the reserve's room when it failed for want of space."""
        try:
            return call()
        except Exception as exc:
            if not (self._full(exc) and self.reserve.release()):
                raise
        log.warning(
            "the filesystem of %s is full: released its reserve (%d bytes) to %s", self.root, RESERVE_BYTES, what
        )
        return call()

    @staticmethod
    def _full(exc: BaseException) -> bool:
        return (isinstance(exc, OSError) and exc.errno in fsutil.NO_SPACE) or disk_full(exc)

    def explain(self, exc: BaseException) -> BaseException:
        """A failure for want of space as RESOURCE_EXHAUSTED naming the filesystem; others as they are."""
        if not self._full(exc):
            return exc
        what = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else str(exc)
        return self._no_space(what)

    def _no_space(self, what: str) -> ResourceExhausted:
        room = fsutil.space(self.root)
        return ResourceExhausted(
            f"the filesystem of {self.root} (mounted at {room.mount_point}) is full: {room.free_bytes} bytes and "
            f"{room.free_inodes} inodes free ({what}); remove containers and images (containerd's Cleanup then "
            "frees their snapshots) or give it more room"
        )

    def _remove(self, key: str) -> None:
        moved: builtins.list[Moved] = []  # uppers renamed in the Remove's transaction
        try:
            self._remove_promoting(key, moved)
        except BaseException:
            for m in moved:  # rolled back: the upper is the snapshot's again
                if m.awaits is not None:
                    self._awaiting.drop(m.awaits)
                os.rename(m.to, m.upper)
            raise
        for m in moved:
            if m.awaits is None:
                log.info(
                    "promoted a job's writes",
                    extra=fields(key=key, cache=m.cache, generation=m.to, **({"scope": m.scope} if m.scope else {})),
                )
                if m.scope is None:
                    self._grown(m.cache)
            else:
                log.info(
                    "awaiting the exit of a job whose writes may be promoted", extra=fields(key=key, cache=m.cache)
                )

    def _promote(self, tx: Tx, key: str, moved: builtins.list[Moved]) -> None:
        """Make the writes of `key`'s container to each cache it uses that it may grow the
        cache's next generation, in `tx` (its Remove's): its uppers are mounted no more. One whose
        job's exit is still to be seen is parked for it (settled by record_exit). A refusal is
        logged and counted; the Remove goes on."""
        if not self.config.caches:  # nothing to promote into
            return
        sid, info = tx.info(key)
        if info.kind != Kind.ACTIVE:
            return
        pod = info.labels.get(POD_LABEL)
        namespace = pod.partition("/")[0] if pod is not None else None
        for name, target, status, scope in tx.cache_uses(sid):
            policy = self.config.caches.get(name)
            if policy is None or policy.promote is Promote.NEVER:
                continue
            if not policy.may_promote(namespace, 0, scope):  # a pod of a namespace that may not
                metrics.CACHE_PROMOTIONS.inc(name, "denied")
                log.info(
                    "not promoting a job's writes: its namespace may not promote to this cache",
                    extra=fields(key=key, cache=name, namespace=namespace or "-"),
                )
                continue
            upper = f"{self.layout.target_dir(sid, target)}/fs"
            try:
                if fsutil.upper_in_use(upper):
                    raise Refused("its upper dir is still mounted")
                if status is None and policy.promote is Promote.ON_SUCCESS:
                    if not (os.path.isdir(upper) and os.listdir(upper)):
                        metrics.CACHE_PROMOTIONS.inc(name, "empty")
                        continue
                    awaits = Awaited(key, name, pod, self.caches.park(name, upper, sid), scope)
                    moved.append(Moved(name, upper, awaits.parked, awaits))
                    self._awaiting.add(awaits, self._settle)
                    continue
                if not policy.may_promote(namespace, status, scope):
                    metrics.CACHE_PROMOTIONS.inc(name, "failed")
                    log.info(
                        "not promoting a job's writes: it exited with status %s",
                        status,
                        extra=fields(key=key, cache=name),
                    )
                    continue
                gen = self.caches.promote(tx, name, upper, key, policy, pod, scope)
            except Refused as exc:
                metrics.CACHE_PROMOTIONS.inc(name, "refused")
                log.warning("did not promote a job's writes to cache %s: %s", name, exc, extra=fields(key=key))
                continue
            metrics.CACHE_PROMOTIONS.inc(name, "promoted" if gen is not None else "empty")
            if gen is not None:
                moved.append(Moved(name, upper, self.caches.generation(name, gen), scope=scope))

    def record_exit(self, namespace: str, container: str, status: int) -> None:
        """containerd said container `container` of `namespace` exited with `status`: kept with
        the snapshots using caches whose key is its (containerd's `<namespace>/<n>/<id>`), and a
        removed one's parked writes settled. In a transaction, so a Remove parking them meanwhile
        has registered them before this looks."""
        with self.store.transaction() as tx:
            sids = [
                sid
                for sid, key in tx.cache_users_named(namespace, container)
                if split_key(key) == (namespace, container)
            ]
            if sids:
                tx.set_exit(sids, status)
            settled = self._awaiting.take(namespace, container)
        for awaits in settled:
            self._settle(awaits, status)

    def _settle(self, awaits: Awaited, status: int | None) -> None:
        """A parked upper whose job's exit is known (`status`; None: not seen in time): the next
        generation, or deleted."""
        policy = self.config.caches.get(awaits.cache)
        if status is None or policy is None or not policy.may_promote(awaits.namespace, status, awaits.scope):
            why = "its exit was not seen in time" if status is None else f"it exited with status {status}"
            metrics.CACHE_PROMOTIONS.inc(awaits.cache, "unseen" if status is None else "failed")
            log.info("not promoting a job's writes: %s", why, extra=fields(key=awaits.key, cache=awaits.cache))
            fsutil.remove_tree(Path(awaits.parked))
            return
        try:
            with self.store.transaction() as tx:
                gen = self.caches.promote(tx, awaits.cache, awaits.parked, awaits.key, policy, awaits.pod, awaits.scope)
        except Refused as exc:
            metrics.CACHE_PROMOTIONS.inc(awaits.cache, "refused")
            log.warning(
                "did not promote a job's writes to cache %s: %s", awaits.cache, exc, extra=fields(key=awaits.key)
            )
            fsutil.remove_tree(Path(awaits.parked))
            return
        metrics.CACHE_PROMOTIONS.inc(awaits.cache, "promoted")
        log.info("promoted a job's writes", extra=fields(key=awaits.key, cache=awaits.cache, generation=gen))
        if awaits.scope is None:
            self._grown(awaits.cache)

    # --- the operator's hand on caches (addlower cache ...) -----------------------------------

    def rollback(self, name: str, gen: int, scope: str = "") -> str:
        """Make cache `name`'s chain (of `scope`) end at generation `gen` (0: drop its newest) for
        containers created from now on; running ones keep theirs, and Cleanup deletes what nobody uses."""
        scoped = f" scope {scope!r}" if scope else ""
        with self.store.transaction() as tx:
            chain = tx.cache_chain(name, scope)
            if not chain and not tx.cache_log(name):
                raise NotFound(f"cache {name!r} has no generations")
            if gen and gen not in chain:
                raise InvalidArgument(f"generation {gen} is not in the chain of cache {name!r}{scoped}: {chain}")
            kept = chain[: chain.index(gen) + 1] if gen else chain[:-1]
            tx.set_chain(name, kept, scope)
        log.warning(
            "rolled a cache back", extra=fields(cache=name, scope=scope or "-", chain=",".join(map(str, kept)) or "-")
        )
        return f"cache {name}{scoped}: chain {chain} -> {kept}"

    def _policy(self, name: str) -> CachePolicy:
        policy = self.config.caches.get(name)
        if policy is None:
            raise NotFound(f"cache {name!r} is not configured")
        return policy

    def push_cache(self, name: str, ref: str = "") -> str:
        """Push cache `name`'s chain as an image to `ref` (default: its `push`), one push or pull
        at a time."""
        policy = self._policy(name)
        ref = check_reference(ref or policy.push or "", f"cache {name!r}: the image to push to (or its push key)")
        return self._registry.submit(self.images.push, name, ref, policy).result()

    def pull_cache(self, name: str, ref: str = "") -> str:
        """Make the layers of image `ref` (default: its `image`) cache `name`'s chain for the
        containers created from now on; running ones keep theirs."""
        policy = self._policy(name)
        ref = check_reference(ref or policy.image or "", f"cache {name!r}: the image to pull (or its image key)")
        gens, digest = self._registry.submit(self.images.pull, name, ref).result()
        return f"cache {name}: chain {gens} from {ref}@{digest}"

    def _pull_soon(self, name: str) -> None:
        """Wake cache `name`'s pull loop, or start one if its table names an image."""
        with self._pulls_lock:
            wake = self._pulls.get(name)
            if wake is not None:
                wake.set()
                return
            policy = self.config.caches.get(name)
            if self._closed.is_set() or policy is None or policy.image is None:
                return
            wake = self._pulls[name] = threading.Event()
        threading.Thread(target=self._keep_pulling, args=(name, wake), name=f"pull-{name}", daemon=True).start()

    def _keep_pulling(self, name: str, wake: threading.Event) -> None:
        """Pull cache `name`'s image now, and again every `refresh` or when woken (a reload
        changed them), while its table names one; an image unchanged costs a manifest request."""
        while True:
            with self._pulls_lock:  # a reload swaps the config before it wakes: no wake-up is lost
                policy = self.config.caches.get(name)
                if self._closed.is_set() or policy is None or policy.image is None:
                    del self._pulls[name]
                    return
                wake.clear()
            try:  # a new image is logged where it is pulled; an unchanged one says nothing
                self.pull_cache(name)
            except Exception as exc:  # the cache keeps what it has
                log.error("pulling the image of cache %s failed: %s", name, exc, extra=fields(cache=name))
            if policy.refresh is not None:
                wake.wait(policy.refresh)
            with self._pulls_lock:
                if policy.refresh is None and not wake.is_set():
                    del self._pulls[name]
                    return

    def _in_background(self, call: Callable[[str], str], name: str) -> None:
        def run() -> None:
            try:  # what it did is logged where it is done
                call(name)
            except Exception as exc:  # the cache keeps what it has
                log.error("%s of cache %s failed: %s", call.__name__, name, exc, extra=fields(cache=name))

        threading.Thread(target=run, name=f"{call.__name__}-{name}", daemon=True).start()

    def promote_writes(self, key: str) -> str:
        """An operator's hand: the writes of `key`'s container (stopped: its uppers mounted no
        more) to each cache it uses become generations now, whatever the caches' promote says
        (their budgets and checks hold); its uppers start empty again."""
        moved: builtins.list[Moved] = []
        done = []
        try:
            with self.store.transaction() as tx:
                sid, info = tx.info(key)
                uses = tx.cache_uses(sid) if info.kind == Kind.ACTIVE else []
                if not uses:
                    raise FailedPrecondition(f"snapshot {key!r} is no container using a cache")
                for name, target, _, scope in uses:
                    policy = self.config.caches.get(name)
                    if policy is None:
                        raise FailedPrecondition(f"cache {name!r} is no longer configured")
                    upper = f"{self.layout.target_dir(sid, target)}/fs"
                    if fsutil.upper_in_use(upper):
                        raise FailedPrecondition(
                            f"{key!r}: its writes to cache {name!r} are still mounted; stop it first"
                        )
                    try:
                        gen = self.caches.promote(tx, name, upper, key, policy, info.labels.get(POD_LABEL), scope)
                    except Refused as exc:
                        raise FailedPrecondition(f"cache {name!r}: {exc}") from None
                    if gen is None:
                        done.append(f"cache {name}: nothing written")
                        continue
                    moved.append(Moved(name, upper, self.caches.generation(name, gen), scope=scope))
                    os.mkdir(upper, 0o755)
                    done.append(f"cache {name}: generation {gen}")
        except BaseException:
            for m in moved:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(m.upper)
                os.rename(m.to, m.upper)
            raise
        for m in moved:
            metrics.CACHE_PROMOTIONS.inc(m.cache, "promoted")
            log.info("promoted a job's writes by hand", extra=fields(key=key, cache=m.cache, generation=m.to))
            if m.scope is None:
                self._grown(m.cache)
        return "\n".join(done)

    def promote_to_default(self, key: str) -> str:
        """An operator's (or a trusted step's) hand: the chains of the scopes `key`'s container
        got move onto their caches' default chains, for containers created afterwards."""
        done = []
        with self.store.transaction() as tx:
            sid, _ = tx.info(key)
            scoped = [(name, scope) for name, _, _, scope in tx.cache_uses(sid) if scope]
            if not scoped:
                raise FailedPrecondition(f"snapshot {key!r} got no cache scope")
            for name, scope in scoped:
                moving = tx.cache_chain(name, scope)
                tx.set_chain(name, [*tx.cache_chain(name), *moving])
                tx.set_chain(name, [], scope)
                done.append(f"cache {name}: scope {scope}'s generations {moving} moved to the default chain")
        for name, scope in scoped:
            log.warning("moved a scope's generations to the default chain", extra=fields(cache=name, scope=scope))
            self._grown(name)
        return "\n".join(done)

    def _grown(self, name: str) -> None:
        """Cache `name`'s default chain grew: squash it in the background once it is longer than
        its max_generations, and push it when its table says where (after the squash, if one)."""
        policy = self.config.caches.get(name)
        if policy is None:
            return
        with self.store.read() as reader:
            long = len(reader.cache_chain(name)) > policy.max_generations
        if long:
            self._squasher.submit(self.squash, name)
        elif policy.push is not None:
            self._in_background(self.push_cache, name)

    def squash(self, name: str) -> int | None:
        """Squash cache `name`'s chain into one generation now; its number, or None (nothing to do)."""
        policy = self._policy(name)
        started = time.monotonic()
        try:
            gen = self.caches.squash(name)
        except Exception:
            metrics.CACHE_SQUASHES.inc(name, "failed")
            log.exception("squashing cache %s failed", name)
            raise
        if gen is not None:
            seconds = time.monotonic() - started
            metrics.CACHE_SQUASHES.inc(name, "squashed")
            metrics.CACHE_SQUASH_SECONDS.observe(name, seconds)
            log.info("squashed a cache", extra=fields(cache=name, generation=gen, duration_s=round(seconds, 3)))
            if policy.push is not None:
                self._in_background(self.push_cache, name)
        return gen

    def _remove_promoting(self, key: str, uppers: builtins.list[Moved]) -> None:
        if self.config.async_remove:
            with self.store.transaction() as tx:
                self._promote(tx, key, uppers)
                sid, _ = tx.remove(key)
            self.pins.release(sid)
            return
        moved: tuple[Path, Path] | None = None
        try:
            with self.store.transaction() as tx:
                self._promote(tx, key, uppers)
                sid, _ = tx.remove(key)
                current, removed = Path(self.layout.dir(sid)), self.snapshots_dir / f"{REMOVED_PREFIX}{sid}"
                if os.path.lexists(removed):  # a create's leftover of the same id, from before ids were reserved
                    self._set_aside(removed.name, again=True)
                os.rename(current, removed)
                moved = (current, removed)
                self._removing.add(removed.name)  # not Cleanup's to delete
        except BaseException:
            if moved is not None:  # the row is still there: so is its directory
                self._removing.discard(moved[1].name)
                os.rename(moved[1], moved[0])
            raise
        self.pins.release(sid)
        try:
            fsutil.remove_tree(removed)
        except Exception as exc:  # the metadata is gone already; Cleanup retries the directory
            log.warning("removing %s failed, Cleanup will retry: %s", removed, exc)
        finally:
            self._removing.discard(removed.name)

    def cleanup(self) -> builtins.list[str]:
        """Delete every directory under snapshots/ that is not a live snapshot, and the pins of
        snapshots that are gone; returns the names of the directories removed. One at a time: a
        second Cleanup waits for the first, then finds what is left."""
        with self._cleaning:
            # A look without the store's lock (a Cleanup with nothing to do takes it only to
            # release stale pins' records): only the entries of no snapshot are checked again,
            # under it, and an entry made meanwhile waits for the next Cleanup.
            entries = os.listdir(self.snapshots_dir)
            with self.store.read() as reader:
                ids = reader.ids()
            candidates = [e for e in entries if not (e.isdigit() and int(e) in ids)]
            with self.store.exclusive() as reader:
                doomed = [
                    self._set_aside(e, in_place_when_full=True)
                    for e in candidates
                    if e not in self._removing  # a sync Remove deletes its own
                    and not (e.isdigit() and reader.has_id(int(e)))
                    and os.path.lexists(self.snapshots_dir / e)  # a create's temp dir renamed meanwhile
                ]
                # Under the lock: creates pin inside their transaction. A committed snapshot's pins
                # are left only by a kill between its Commit and their release.
                self.pins.release_all_but(reader.is_mountable)
            # One read of the mount table, after the renames: nobody is handed a set-aside name to
            # mount on, and remove_tree stops at any mount made since.
            mounted = fsutil.mounts_inside(str(self.snapshots_dir), doomed) if doomed else {}
            removed = []
            for name in doomed:
                path = self.snapshots_dir / name
                try:
                    if name in mounted:
                        raise OSError(
                            errno.EBUSY,
                            f"{len(mounted[name])} mount(s) inside, such as {mounted[name][0]}: not removing it",
                            str(path),
                        )
                    fsutil.remove_tree(path)
                    removed.append(name)
                except Exception as exc:  # left for the next Cleanup, and for the operator to look at
                    log.error("cleanup could not remove %s: %s", path, exc)
            ttls = {name: policy.scope_ttl for name, policy in self.config.caches.items() if policy.scope_ttl}
            for cache, scope in self.caches.expire_scopes(ttls):
                log.info("a cache's scope expired, unused for its scope_ttl", extra=fields(cache=cache, scope=scope))
            for gone in self.caches.collect():  # generations no chain has and no container got
                log.info("removed generation %s, which no container uses", gone)
                removed.append(f"caches/{gone}")
        if removed and not self.reserve.kept:
            self.reserve.keep()
        return removed

    def _adopt(self) -> None:
        """Take over the Go original's root: its bolt record becomes ours, no dir changes."""
        adopted = adopt.adopt(self.root)
        log.info(
            "took over the Go snapshotter's root: %s; its bolt database is kept as %s",
            adopted.summary(),
            adopt.KEPT_NAME,
        )
        asking = sum(1 for snap in adopted.storage.snapshots if snap.labels.get(EXTRA_LOWERS_LABEL))
        if asking:
            log.warning(
                "%d adopted snapshots ask for extra lowers: their next Mounts are checked against this "
                "daemon's lowers policy, which the Go program did not have",
                asking,
            )

    def _refuse_lost_metadata(self) -> None:
        """Refuse a root whose snapshots/ holds directories while metadata.db is missing, empty or
        never initialised: taken for a fresh store, every directory would go at the next Cleanup."""
        with os.scandir(self.snapshots_dir) as entries:
            held = next(entries, None) is not None
        db = self.root / DB_NAME
        if held and stored_schema_version(db) == 0:
            raise LostMetadata(
                f"{self.snapshots_dir} holds snapshot directories but {db} is missing or empty: "
                "the metadata was lost and starting would delete them. Nothing was changed. Restore "
                f"{DB_NAME} from a backup, or move {self.root} aside and start on an empty root (then remove "
                "the containers and images that used it and let containerd unpack them again)"
            )

    def _set_aside_unrecorded(self) -> None:
        """At start-up, undo what a kill between a directory rename and its COMMIT left behind.

        A create that died leaves a temp dir or the dir of the one id after the last committed one
        (creates hold the store's lock, so there is at most one): set it aside for Cleanup, and
        reserve its id, so that no later snapshot gets it (and a dir named after it). A synchronous
        remove that died leaves a live snapshot's dir renamed to rm-<id>: put it back, unless the
        live dir is there too (a set-aside create of the same id, when ids could be handed out
        twice): then the rm-<id> is the garbage. Dirs of higher ids mean metadata.db is older than
        snapshots/ (restored from an old copy?): refuse, rather than delete them.
        """
        with self.store.read() as reader:  # holds no lock: each lookup below is one SELECT
            self._recover(reader)

    def _recover(self, reader: Reader) -> None:
        """_set_aside_unrecorded's work, with the store's answers from `reader`."""
        last = reader.last_id()
        # One pass over the names (a store's worth of them), with no lookup for a snapshot's own
        # dir: the rest is rare, and each asks the store alone.
        ahead: list[str] = []
        odd: list[str] = []
        highest = last
        for entry in os.listdir(self.snapshots_dir):
            if entry.isdigit():
                sid = int(entry)
                if sid > last:
                    highest = max(highest, sid)
                    (ahead if sid > last + 1 else odd).append(entry)
            else:
                odd.append(entry)
                found = _DIR_ID.fullmatch(entry)  # a set-aside dir's id is taken too
                if found:
                    highest = max(highest, int(found[1]))
        if ahead:
            raise LostMetadata(
                f"{self.snapshots_dir} holds directories {sorted(map(int, ahead))[:5]} of ids that {DB_NAME} never "
                f"handed out (its last is {last}): it is older than the snapshots. Nothing was changed. Restore the "
                f"{DB_NAME} that belongs to them, or move {self.root} aside and start on an empty root"
            )
        for entry in odd:
            named = entry.removeprefix(REMOVED_PREFIX)
            if entry.startswith(REMOVED_PREFIX) and named.isdigit() and reader.has_id(int(named)):
                if os.path.lexists(self.layout.dir(named)):
                    log.warning(
                        "set aside %s as %s: snapshot %s's own directory is there",
                        entry,
                        self._set_aside(entry, again=True),
                        named,
                    )
                else:
                    os.rename(self.snapshots_dir / entry, self.snapshots_dir / named)
                    log.info("restored directory %s of live snapshot %s", entry, named)
            elif entry.startswith(TEMP_PREFIX) or entry.isdigit():  # a digit here is last + 1
                log.info("set aside unrecorded snapshot directory %s", self._set_aside(entry))
        if highest > last:
            with self.store.transaction() as tx:
                tx.reserve_ids(highest)
            log.info("ids up to %d are taken by directories on disk: new snapshots start above", highest)
        policy = self.resolver.policy.lowers.named

        def targets(sid: int) -> int:  # asked only of snapshots with pins
            info = reader.info_of(sid)
            return target_count(info.labels.get(EXTRA_LOWERS_LABEL, "") if info else "", policy)

        for gone in self.pins.recover(reader.is_mountable, targets):
            log.info("released the pinned lowers of snapshot %s, which is gone or committed", gone)

    def after_listening(self) -> None:
        """Start-up's work over every snapshot, which the daemon runs once it listens (calls are
        answered meanwhile, from the store): missing dirs reported, rows' replies kept."""
        if self.exits is not None:
            self.exits.start()
        for name in self.config.caches:  # containerd unpacks into us: only once we listen
            self._pull_soon(name)
        try:
            self.report_missing_dirs()
            filled = self.store.fill_replies()
            if filled:
                log.info("encoded the List replies of %d snapshots stored without one", filled)
        except Exception:
            log.exception("start-up's checks over every snapshot failed")

    def report_missing_dirs(self) -> None:
        """Log every snapshot whose directory is gone (a power cut between a rename and the
        journal's commit): a check of every snapshot, so the daemon runs it once it listens, over
        the ids a page at a time (a store's worth of them is never in memory)."""
        after = 0
        while True:
            with self.store.read() as reader:
                page = reader.ids_after(after, 1000)
            if not page:
                return
            for sid in page:
                if not os.path.isdir(self.layout.upper(sid)):
                    log.error(
                        "snapshot id %d has no directory %s (lost in a power cut?); remove it "
                        "with ctr snapshots rm and pull its image again",
                        sid,
                        self.layout.upper(sid),
                    )
            after = page[-1]

    def _set_aside(self, entry: str, again: bool = False, in_place_when_full: bool = False) -> str:
        """Rename snapshots/<entry> to a name no snapshot can take and start-up never restores;
        returns the new name. An rm- dir stays as it is, unless `again`. `in_place_when_full`: a
        full directory block cannot take a longer name; Cleanup then removes it where it is (under
        the store's lock it is garbage, and its id is never handed out again)."""
        if entry.startswith(REMOVED_PREFIX) and not again:
            return entry
        target = entry if again else REMOVED_PREFIX + entry
        if again or os.path.lexists(self.snapshots_dir / target):
            target += f"-{time.time_ns()}"
        try:
            os.rename(self.snapshots_dir / entry, self.snapshots_dir / target)
        except OSError as exc:
            if not (in_place_when_full and exc.errno in fsutil.NO_SPACE):
                raise
            return entry
        return target
