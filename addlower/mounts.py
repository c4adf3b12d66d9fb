"""Mount computation: which mount containerd gets for a snapshot.

Pure functions over ids and paths, tested without root. The rules follow containerd's overlayfs
snapshotter and live in one table below. This module must not touch the filesystem, the metadata
store or gRPC; callers hand it the snapshot's kind, its parent chain and the option prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Sequence


class Kind(IntEnum):
    """Snapshot kinds, numbered as in containerd's snapshots API."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


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


def rule_for(kind: Kind, nparents: int) -> MountRule:
    bucket: int | str = nparents if nparents < 2 else "many"
    return MOUNT_RULES[(kind, bucket)]


def compute_mounts(
    layout: Layout,
    kind: Kind,
    sid: int,
    parent_ids: Sequence[int],
    options: Sequence[str] = (),
    extra_lowers: Sequence[str] = (),
) -> list[Mount]:
    """The mounts for snapshot `sid` whose parents are `parent_ids`, nearest first.

    `options` are the leading overlay options (configured options, userxattr, index=off), placed
    before workdir/upperdir/lowerdir in the order containerd uses. `extra_lowers` (host dirs,
    topmost first) go between the snapshot's own dir and its parents: under an active snapshot's
    upper dir or a parentless view's own dir, above every image layer.
    """
    rule = rule_for(kind, len(parent_ids))
    if rule.type == "bind" and not extra_lowers:
        src = sid if rule.bind_of == "self" else parent_ids[0]
        return [Mount("bind", layout.upper(src), (rule.mode, "rbind"))]
    opts = list(options)
    lowers = [*extra_lowers, *(layout.upper(p) for p in parent_ids)]
    if kind == Kind.ACTIVE:
        opts += [f"workdir={layout.work(sid)}", f"upperdir={layout.upper(sid)}"]
    elif not parent_ids:
        lowers.insert(0, layout.upper(sid))
    opts.append("lowerdir=" + ":".join(lowers))
    return [Mount("overlay", "overlay", tuple(opts))]
