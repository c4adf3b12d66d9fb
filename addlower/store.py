"""The metadata store: snapshots, their parents, labels and usage, in SQLite.

One transaction per operation, serialised by one lock; commits are durable (WAL with
synchronous=FULL), ids come from AUTOINCREMENT and are never reused. The rules of containerd's
snapshot storage (which errors, in which order) live here. This module must not touch snapshot
directories or know about mounts or gRPC.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .fsutil import Usage
from .mounts import Kind

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key         TEXT    NOT NULL UNIQUE,
    kind        INTEGER NOT NULL,
    parent_id   INTEGER REFERENCES snapshots(id),
    created_at  INTEGER NOT NULL,   -- nanoseconds since the epoch, UTC
    updated_at  INTEGER NOT NULL,
    size        INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0,
    labels      TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX snapshots_parent ON snapshots(parent_id);
"""

_INFO_SELECT = """
SELECT s.id, s.key, s.kind, p.key, s.created_at, s.updated_at, s.labels, s.size, s.inodes
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""

_CHAIN = """
WITH RECURSIVE chain(id, parent_id, depth) AS (
    SELECT id, parent_id, 0 FROM snapshots WHERE id = ?
    UNION ALL
    SELECT s.id, s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.parent_id
)
SELECT id FROM chain WHERE depth > 0 ORDER BY depth
"""


@dataclass
class Info:
    """What Stat returns: containerd's snapshots.Info."""

    name: str
    parent: str
    kind: Kind
    created_at: int
    updated_at: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """What mount computation needs: the id and the parent ids, nearest first."""

    id: int
    kind: Kind
    parent_ids: tuple[int, ...]


def _now() -> int:
    return time.time_ns()


def _info(row: tuple) -> Info:
    return Info(
        name=row[1],
        parent=row[3] or "",
        kind=Kind(row[2]),
        created_at=row[4],
        updated_at=row[5],
        labels=json.loads(row[6]),
    )


class Tx:
    """Operations inside one transaction; obtained from MetaStore.transaction()."""

    def __init__(self, conn: sqlite3.Connection):
        self._db = conn

    def _row(self, key: str) -> tuple | None:
        return self._db.execute(_INFO_SELECT + " WHERE s.key = ?", (key,)).fetchone()

    def get_info(self, key: str) -> tuple[int, Info, Usage]:
        row = self._row(key)
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return row[0], _info(row), Usage(size=row[7], inodes=row[8])

    def get_snapshot(self, key: str) -> Snapshot:
        """The snapshot behind an active or view key (mountable kinds only)."""
        row = self._db.execute("SELECT id, kind FROM snapshots WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        kind = Kind(row[1])
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(f"snapshot {key!r} is {kind.name.lower()}, not active or view")
        return Snapshot(row[0], kind, self._parent_ids(row[0]))

    def _parent_ids(self, sid: int) -> tuple[int, ...]:
        return tuple(r[0] for r in self._db.execute(_CHAIN, (sid,)))

    def create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> Snapshot:
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        parent_id = None
        if parent:
            row = self._db.execute("SELECT id, kind FROM snapshots WHERE key = ?", (parent,)).fetchone()
            if row is None:
                raise NotFound(f"parent snapshot {parent!r} does not exist")
            if Kind(row[1]) != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            parent_id = row[0]
        now = _now()
        try:
            cur = self._db.execute(
                "INSERT INTO snapshots(key, kind, parent_id, created_at, updated_at, labels)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key, int(kind), parent_id, now, now, json.dumps(dict(labels))),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"snapshot {key!r} already exists") from None
        sid = cur.lastrowid
        assert sid is not None
        parents = (parent_id, *self._parent_ids(parent_id)) if parent_id is not None else ()
        return Snapshot(sid, kind, parents)

    def commit_active(self, key: str, name: str, usage: Usage, labels: Mapping[str, str]) -> int:
        if not name:
            raise InvalidArgument("commit name must not be empty")
        if self._db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
            raise AlreadyExists(f"snapshot {name!r} already exists")
        row = self._db.execute("SELECT id, kind FROM snapshots WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        if Kind(row[1]) != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is {Kind(row[1]).name.lower()}, not active")
        now = _now()
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created_at = ?, updated_at = ?, labels = ?,"
            " size = ?, inodes = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), now, now, json.dumps(dict(labels)), usage.size, usage.inodes, row[0]),
        )
        return row[0]

    def remove(self, key: str) -> tuple[int, Kind]:
        row = self._db.execute("SELECT id, kind FROM snapshots WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        if self._db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (row[0],)).fetchone():
            raise FailedPrecondition(f"cannot remove snapshot {key!r}: it has children")
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (row[0],))
        return row[0], Kind(row[1])

    def update_info(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str]) -> Info:
        """Apply a field-masked label update, as containerd's storage does."""
        sid, info, _ = self.get_info(name)
        if not fieldpaths:
            new_labels = dict(labels)
        else:
            new_labels = dict(info.labels)
            for path in fieldpaths:
                if path == "labels":
                    new_labels = dict(labels)
                elif path.startswith("labels."):
                    label = path[len("labels."):]
                    if label in labels:
                        new_labels[label] = labels[label]
                    else:
                        new_labels.pop(label, None)
                else:
                    raise InvalidArgument(f"cannot update field {path!r} of snapshot {name!r}")
        info.labels = new_labels
        info.updated_at = _now()
        self._db.execute(
            "UPDATE snapshots SET labels = ?, updated_at = ? WHERE id = ?",
            (json.dumps(new_labels), info.updated_at, sid),
        )
        return info

    def walk(self) -> Iterator[tuple[int, Info]]:
        for row in self._db.execute(_INFO_SELECT + " ORDER BY s.key"):
            yield row[0], _info(row)

    def ids(self) -> set[int]:
        return {r[0] for r in self._db.execute("SELECT id FROM snapshots")}

    def last_id(self) -> int:
        """The highest id ever handed out (committed), live or removed."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'snapshots'").fetchone()
        return row[0] if row else 0


class MetaStore:
    """The SQLite database at <root>/metadata.db, used by one daemon at a time."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path}: schema version {version} is newer than this daemon's {SCHEMA_VERSION}"
            )
        with self.transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """Hold the store's lock for one transaction; commit on success, roll back on error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """Consistent reads without a transaction: the lock keeps every writer out."""
        with self._lock:
            yield Tx(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()
