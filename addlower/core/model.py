"""The snapshot model every layer shares: containerd's snapshot kinds, what a Stat answers (Info)
and what a Usage answers (Usage), as containerd's snapshots package defines them. Pure data;
imports nothing of addlower.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum


class Kind(IntEnum):
    """Snapshot kinds, numbered as in containerd's snapshots API."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        """The kind as containerd spells it in filters and `ctr snapshots ls` (active, view, ...)."""
        return self.name.lower()


@dataclass(frozen=True, eq=False)
class Info:
    """What Stat returns: containerd's snapshots.Info. Shared with the store's mirror: never mutate.

    Compared and hashed by identity: a changed snapshot gets a new Info, so callers may memoise
    what they derive from one (the service keeps its serialized form).
    """

    name: str
    parent: str
    kind: Kind
    created_at: int  # nanoseconds since the epoch, UTC
    updated_at: int
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    """What a snapshot's own data takes: bytes of blocks and inodes, as containerd's Usage."""

    size: int = 0
    inodes: int = 0
