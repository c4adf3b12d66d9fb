"""Take over a root the Go original served: its bolt metadata.db becomes our SQLite one, in place.

The Go program and this daemon lay out a root the same way (snapshots/<id>/fs and work, as
containerd's overlayfs does), so taking it over is a change of the record alone: the same keys,
ids, parents, kinds, labels, times and usage, and the same last id, so every image and container
is served as it was and no dir is touched. The bolt file is kept beside it as metadata.db.bolt.

The steps, each safe to be killed after: read the bolt file under its lock (bbolt holds it
exclusively while the Go program runs: a running Go program is refused, never raced), write the
new database beside it, sync it, link the bolt file to its kept name, then rename the new database
over metadata.db. A kill before that rename leaves the bolt file in place and adoption starts over.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from addlower.core import bolt, gostorage
from addlower.core.model import Kind

from .store import DB_NAME, write_adopted

log = logging.getLogger(__name__)

KEPT_NAME = "metadata.db.bolt"  # the Go program's record, kept beside ours
NEW_NAME = "metadata.db.adopting"  # ours while it is being written


class AdoptError(RuntimeError):
    """The root's bolt metadata.db cannot be taken over; nothing was changed."""


@dataclass(frozen=True)
class Adopted:
    """What a bolt metadata.db held."""

    path: Path
    storage: gostorage.Storage

    def summary(self) -> str:
        kinds = Counter(snap.kind for snap in self.storage.snapshots)
        counts = ", ".join(f"{kinds[kind]} {kind.label}" for kind in (Kind.COMMITTED, Kind.ACTIVE, Kind.VIEW))
        return f"{len(self.storage.snapshots)} snapshots ({counts}), last id {self.storage.last_id}"


def holds_bolt(root: Path) -> bool:
    """Whether <root>/metadata.db is a bolt database (the Go original's)."""
    try:
        with open(root / DB_NAME, "rb") as file:
            return bolt.is_bolt(file.read(64))
    except FileNotFoundError:
        return False


def read(root: Path, locked: bool = True) -> Adopted:
    """Decode <root>/metadata.db, a bolt file. `locked`: take bbolt's own lock first, refusing
    while the Go program has it open; without it (a dry run beside a running Go program) the
    read may see a write in progress and fail, never change anything."""
    with _opened(root, locked) as fd:
        return _decode(fd, root / DB_NAME)


@contextmanager
def _opened(root: Path, locked: bool) -> Iterator[int]:
    """<root>/metadata.db opened (never through a symlink), under bbolt's exclusive lock if
    `locked`, until the block ends."""
    path = root / DB_NAME
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if locked:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AdoptError(
                    f"{path} is open in another process (the Go snapshotter still running?): stop it first"
                ) from None
        yield fd
    finally:
        os.close(fd)


def _decode(fd: int, path: Path) -> Adopted:
    """Read in whole (not mapped: a refusal's traceback would hold views into the map), decoded."""
    with os.fdopen(os.dup(fd), "rb") as file:
        data = file.read()
    if not data:
        raise AdoptError(f"{path} is empty")
    try:
        return Adopted(path, gostorage.decode(bolt.read(data)))
    except (bolt.BoltError, gostorage.StorageError) as exc:
        raise AdoptError(f"{path}: {exc}; nothing was changed") from None


def adopt(root: Path) -> Adopted:
    """Replace <root>/metadata.db, the Go original's bolt file, by our database with the same
    snapshots; the bolt file stays as <root>/metadata.db.bolt."""
    path = root / DB_NAME
    new, kept = root / NEW_NAME, root / KEPT_NAME
    with _opened(root, locked=True) as fd:  # held until the rename: a Go program started meanwhile waits
        adopted = _decode(fd, path)
        for stale in (new, root / f"{NEW_NAME}-journal", root / f"{KEPT_NAME}.new"):
            stale.unlink(missing_ok=True)  # a killed adoption's
        write_adopted(new, adopted.storage)
        _sync(new)
        os.link(path, root / f"{KEPT_NAME}.new")
        os.replace(root / f"{KEPT_NAME}.new", kept)
        os.replace(new, path)
        _sync(root)
    return adopted


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
