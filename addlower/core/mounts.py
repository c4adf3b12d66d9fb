"""Mount computation: which mount containerd gets for a snapshot.

Pure functions over ids and paths, tested without root. The rules follow containerd's overlayfs
snapshotter and live in one table below. This module must not touch the filesystem, the metadata
store or gRPC; callers hand it the snapshot's kind, its parent chain and the option prefix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from addlower.core.errors import FailedPrecondition
from addlower.core.model import Kind

# A managed cache's upper is mounted so that what a job leaves is plain files, dirs, whiteouts and
# opaque dirs, which any later overlay reads the same way: no redirects, no metacopy-only files.
CACHE_UPPER_OPTIONS = ("redirect_dir=off", "metacopy=off")


@dataclass(frozen=True)
class Mount:
    """One entry of a Mounts reply, in containerd.types.Mount's shape."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


@dataclass(frozen=True)
class Layout:
    """Where snapshot N's directories live under the snapshotter root (plain strings: hot path)."""

    root: str

    @property
    def snapshots(self) -> str:
        return f"{self.root}/snapshots"

    def dir(self, sid: int | str) -> str:
        return f"{self.root}/snapshots/{sid}"

    def upper(self, sid: int | str) -> str:
        return f"{self.root}/snapshots/{sid}/fs"

    def work(self, sid: int | str) -> str:
        return f"{self.root}/snapshots/{sid}/work"

    def mountpoints(self, sid: int | str) -> str:
        """A lower at the bottom of the rootfs holding the dirs target mounts are mounted on: the
        image's own dirs above it keep their modes."""
        return f"{self.root}/snapshots/{sid}/mountpoints"

    @property
    def empty(self) -> str:
        """A dir kept empty: the lower of a parentless active when unpacks run in parallel."""
        return f"{self.root}/empty"

    def targets(self, sid: int | str) -> str:
        return f"{self.root}/snapshots/{sid}/targets"

    def sid_of_upper(self, path: str) -> int | None:
        """The snapshot whose own dir `path` is (`snapshots/N/fs`), or None."""
        prefix = f"{self.root}/snapshots/"
        if not (path.startswith(prefix) and path.endswith("/fs")):
            return None
        sid = path[len(prefix) : -len("/fs")]
        return int(sid) if sid.isdigit() and sid[0] != "0" else None

    def target_dir(self, sid: int | str, target: str) -> str:
        """The upper and work dirs of the mount at container path `target`, named by its hash so
        that they follow the target, not its place in the label."""
        return f"{self.targets(sid)}/{hashlib.sha256(target.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class MountRule:
    """How to mount one (kind, number of parents) case when no extra lower dirs are asked for."""

    type: str  # "bind" or "overlay"
    bind_of: str = ""  # "self" or "parent": whose fs a bind mount exposes
    mode: str = ""  # "rw" or "ro", for bind mounts


# (kind, parents) -> rule; parents is 0, 1 or "many" (>= 2). Committed snapshots have no mounts.
# Active overlays get workdir= and upperdir=; with extra lower dirs every case is an overlay.
MOUNT_RULES: dict[tuple[Kind, int | str], MountRule] = {
    (Kind.ACTIVE, 0): MountRule("bind", bind_of="self", mode="rw"),
    (Kind.VIEW, 0): MountRule("bind", bind_of="self", mode="ro"),
    (Kind.VIEW, 1): MountRule("bind", bind_of="parent", mode="ro"),
    (Kind.ACTIVE, 1): MountRule("overlay"),
    (Kind.ACTIVE, "many"): MountRule("overlay"),
    (Kind.VIEW, "many"): MountRule("overlay"),
}


def option(mount: Mount, key: str) -> str | None:
    """The value of option `key=` of `mount`, if it has one."""
    prefix = key + "="
    return next((o[len(prefix) :] for o in mount.options if o.startswith(prefix)), None)


def layer_dirs(mount: Mount) -> tuple[str | None, list[str]] | None:
    """(upper dir or None, lower dirs topmost first) of a rootfs mount as a snapshotter gives it:
    an overlay's upperdir= and lowerdir=, or a bind mount's source; None for anything else."""
    if mount.type == "bind":
        return None, [mount.source]
    if mount.type != "overlay":
        return None
    lowers = option(mount, "lowerdir")
    return option(mount, "upperdir"), lowers.split(":") if lowers else []


def rule_for(kind: Kind, nparents: int) -> MountRule:
    bucket: int | str = nparents if nparents < 2 else "many"
    rule = MOUNT_RULES.get((kind, bucket))
    if rule is None:
        raise FailedPrecondition(f"a {kind.label} snapshot has no mounts")
    return rule


def compute_mounts(
    layout: Layout,
    kind: Kind,
    sid: int,
    parent_ids: Sequence[int],
    options: Sequence[str] = (),
    extra_lowers: Sequence[str] = (),
    targets: Sequence[tuple[str, Sequence[str]]] = (),
    parallel_unpack: bool = False,
    cache_targets: Collection[str] = (),
) -> list[Mount]:
    """The mounts for snapshot `sid` whose parents are `parent_ids`, nearest first.

    `options` are the leading overlay options (configured options, userxattr, index=off), placed
    before workdir/upperdir/lowerdir in the order containerd uses. `extra_lowers` (host dirs,
    topmost first) go between the snapshot's own dir and its parents: under an active snapshot's
    upper dir or a parentless view's own dir, above every image layer. `targets` are (container
    path, host dirs topmost first): each becomes one more mount with that `target` (those in
    `cache_targets` hold a managed cache), which
    containerd 1.7+ mounts inside the rootfs, after it; the rootfs then gets the mountpoints lower
    at its bottom. `parallel_unpack`: a parentless active is an overlay over Layout.empty, not a
    bind, so that containerd's diff applier writes a layer's whiteouts and opaque dirs into it
    (containerd 2.2+ unpacks each layer into a parentless active and rebases it at Commit; it
    turns the bind into an overlay itself only for the snapshotter named "overlayfs").
    """
    rule = rule_for(kind, len(parent_ids))
    overlay_for_unpack = parallel_unpack and kind == Kind.ACTIVE and not parent_ids
    if rule.type == "bind" and not extra_lowers and not targets and not overlay_for_unpack:
        src = sid if rule.bind_of == "self" else parent_ids[0]
        return [Mount("bind", layout.upper(src), (rule.mode, "rbind"))]
    opts = list(options)
    lowers = [*extra_lowers, *(layout.upper(p) for p in parent_ids)]
    if targets:
        lowers.append(layout.mountpoints(sid))
    if not lowers:  # a parentless active with nothing else below it
        lowers.append(layout.empty)
    if kind == Kind.ACTIVE:
        opts += [f"workdir={layout.work(sid)}", f"upperdir={layout.upper(sid)}"]
    elif not parent_ids:
        lowers.insert(0, layout.upper(sid))
    opts.append("lowerdir=" + ":".join(lowers))
    return [
        Mount("overlay", "overlay", tuple(opts)),
        *(target_mount(layout, kind, sid, target, dirs, options, target in cache_targets) for target, dirs in targets),
    ]


def target_mount(
    layout: Layout, kind: Kind, sid: int, target: str, dirs: Sequence[str], options: Sequence[str], cache: bool = False
) -> Mount:
    """The mount of host `dirs` at container path `target`: copy-on-write into the snapshot's own
    dirs for an active snapshot, read-only for a view. A managed cache's upper may become a
    generation: it is never volatile, and holds no redirects or metacopy-only files."""
    if kind == Kind.ACTIVE:
        base = layout.target_dir(sid, target)
        if cache:
            options = [*(o for o in options if o != "volatile"), *CACHE_UPPER_OPTIONS]
        opts = [*options, f"workdir={base}/work", f"upperdir={base}/fs", "lowerdir=" + ":".join(dirs)]
        return Mount("overlay", "overlay", tuple(opts), target)
    if len(dirs) == 1:  # overlayfs wants two lowers without an upper
        return Mount("bind", dirs[0], ("ro", "rbind"), target)
    return Mount("overlay", "overlay", (*options, "lowerdir=" + ":".join(dirs)), target)
