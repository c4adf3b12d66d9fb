"""The metadata store: snapshots, their parents, labels and usage.

SQLite at <root>/metadata.db is the record: one transaction per operation, durable (WAL with
synchronous=FULL), ids from AUTOINCREMENT and never reused. Every committed row is mirrored in
memory, and reads are served from the mirror only: Stat, Mounts and List are the hot paths (CRI
stats every snapshot every 10 s), and this daemon is the database's only writer, so the mirror
cannot drift. The mirror changes only after a COMMIT succeeds, published under its own lock, so
readers never wait for a writer's SQL. The rules of containerd's snapshot storage (which errors,
in which order) and the fields List filters see live here. This module must not touch snapshot
directories or know about mounts or gRPC.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from addlower.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from addlower.core.filters import parse_filters
from addlower.core.model import Info, Kind, Usage

SCHEMA_VERSION = 1
DB_NAME = "metadata.db"  # under the snapshotter root

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


def disk_full(exc: BaseException) -> bool:
    """Whether SQLite failed for want of space (SQLITE_FULL) on the database's filesystem."""
    return isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def stored_schema_version(path: Path) -> int:
    """The schema version of the database at `path`: 0 when it is missing, empty or was never
    initialised; -1 when it is no SQLite database (MetaStore says more). Opens it read-only, so it
    creates nothing."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            return db.execute("PRAGMA user_version").fetchone()[0]
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return -1


@dataclass(frozen=True)
class Record:
    """One snapshot as the mirror holds it; replaced, never changed, when the row changes."""

    id: int
    parent_id: int | None
    info: Info
    usage: Usage = Usage()


@dataclass(frozen=True)
class Snapshot:
    """What mount computation needs: the id, the parent ids (nearest first) and the labels."""

    id: int
    kind: Kind
    parent_ids: tuple[int, ...]
    labels: Mapping[str, str]


class _Mirror:
    """The committed rows, indexed the ways the operations look them up."""

    def __init__(self) -> None:
        self.by_key: dict[str, Record] = {}
        self.by_id: dict[int, Record] = {}
        self.children: dict[int, int] = {}  # parent id -> number of children
        self.last_id = 0
        self._sorted: list[Record] | None = None

    def put(self, rec: Record) -> None:
        old = self.by_id.get(rec.id)
        if old is not None:
            del self.by_key[old.info.name]
        if rec.parent_id is not None and (old is None or old.parent_id != rec.parent_id):
            self.children[rec.parent_id] = self.children.get(rec.parent_id, 0) + 1
        self.by_key[rec.info.name] = rec
        self.by_id[rec.id] = rec
        self.last_id = max(self.last_id, rec.id)
        self._sorted = None

    def drop(self, rec: Record) -> None:
        del self.by_key[rec.info.name]
        del self.by_id[rec.id]
        if rec.parent_id is not None:
            left = self.children[rec.parent_id] - 1
            if left:
                self.children[rec.parent_id] = left
            else:
                del self.children[rec.parent_id]
        self._sorted = None

    def in_key_order(self) -> list[Record]:
        if self._sorted is None:
            self._sorted = sorted(self.by_key.values(), key=lambda r: r.info.name)
        return self._sorted


def _now() -> int:
    return time.time_ns()


class Reader:
    """Lookups over the committed state; what MetaStore.read() and .transaction() hand out."""

    def __init__(self, mirror: _Mirror):
        self._m = mirror

    def _get(self, key: str, what: str = "snapshot") -> Record:
        rec = self._m.by_key.get(key)
        if rec is None:
            raise NotFound(f"{what} {key!r} does not exist")
        return rec

    def get_info(self, key: str) -> tuple[int, Info, Usage]:
        rec = self._get(key)
        return rec.id, rec.info, rec.usage

    def find(self, key: str) -> Info | None:
        """The Info of `key`, or None (where a missing key is no error)."""
        rec = self._m.by_key.get(key)
        return rec.info if rec is not None else None

    def info_of(self, sid: int) -> Info | None:
        """The Info of snapshot id `sid`, or None."""
        rec = self._m.by_id.get(sid)
        return rec.info if rec is not None else None

    def snapshot_of(self, sid: int) -> Snapshot:
        """The snapshot with id `sid` (which must exist), any kind."""
        rec = self._m.by_id[sid]
        return Snapshot(rec.id, rec.info.kind, self._parent_ids(rec.parent_id), rec.info.labels)

    def get_snapshot(self, key: str) -> Snapshot:
        """The snapshot behind an active or view key (mountable kinds only)."""
        rec = self._get(key)
        kind = rec.info.kind
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(f"snapshot {key!r} is {kind.label}, not active or view")
        return Snapshot(rec.id, kind, self._parent_ids(rec.parent_id), rec.info.labels)

    def _parent_ids(self, parent_id: int | None) -> tuple[int, ...]:
        chain = []
        while parent_id is not None:
            chain.append(parent_id)
            parent_id = self._m.by_id[parent_id].parent_id
        return tuple(chain)

    def walk(self) -> Iterator[tuple[int, Info]]:
        """Every snapshot, by key, as containerd's storage walks them: over the mirror's sorted
        list as it is now (a change replaces that list, never edits it), so a List that is still
        being sent costs no copy of the store."""
        return ((r.id, r.info) for r in self._m.in_key_order())

    def ids(self) -> set[int]:
        return set(self._m.by_id)

    def mountable_ids(self) -> set[int]:
        """The active and view snapshots': the only ones whose lowers stay pinned."""
        return {sid for sid, rec in self._m.by_id.items() if rec.info.kind in (Kind.ACTIVE, Kind.VIEW)}

    def is_mountable(self, sid: int) -> bool:
        rec = self._m.by_id.get(sid)
        return rec is not None and rec.info.kind in (Kind.ACTIVE, Kind.VIEW)

    def has_id(self, sid: int) -> bool:
        return sid in self._m.by_id

    def last_id(self) -> int:
        """The highest id ever handed out (committed), live or removed."""
        return self._m.last_id


class Tx(Reader):
    """One write transaction: SQL now, mirror changes queued until COMMIT succeeds."""

    def __init__(self, mirror: _Mirror, conn: sqlite3.Connection):
        super().__init__(mirror)
        self._db = conn
        self.pending: list[Callable[[], None]] = []

    def create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> Snapshot:
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        parent_id = None
        if parent:
            prec = self._get(parent, "parent snapshot")
            if prec.info.kind != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            parent_id = prec.id
        if key in self._m.by_key:
            raise AlreadyExists(f"snapshot {key!r} already exists")
        now = _now()
        info = Info(key, parent, kind, now, now, dict(labels))
        cur = self._db.execute(
            "INSERT INTO snapshots(key, kind, parent_id, created_at, updated_at, labels) VALUES (?, ?, ?, ?, ?, ?)",
            (key, int(kind), parent_id, now, now, json.dumps(info.labels)),
        )
        sid = cur.lastrowid
        assert sid is not None
        rec = Record(sid, parent_id, info)
        self.pending.append(lambda: self._m.put(rec))
        return Snapshot(sid, kind, self._parent_ids(parent_id), info.labels)

    def commit_active(self, key: str, name: str, usage: Usage, labels: Mapping[str, str], parent: str = "") -> int:
        """Commit as containerd's storage does, `parent` included (2.2's parallel unpack): an active
        made without a parent is rebased onto it; one with another parent is refused."""
        if not name:
            raise InvalidArgument("commit name must not be empty")
        if name in self._m.by_key:
            raise AlreadyExists(f"snapshot {name!r} already exists")
        rec = self._get(key)
        if rec.info.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is {rec.info.kind.label}, not active")
        parent_id = rec.parent_id
        if parent and parent != rec.info.parent:
            if rec.info.parent:
                raise InvalidArgument(
                    f"cannot change the parent of active snapshot {key!r} from "
                    f"{rec.info.parent!r} to {parent!r} on commit"
                )
            prec = self._get(parent, "parent snapshot")
            if prec.info.kind != Kind.COMMITTED:
                raise FailedPrecondition(f"parent {parent!r} is {prec.info.kind.label}, not committed")
            parent_id = prec.id
        now = _now()
        info = replace(
            rec.info,
            name=name,
            parent=parent or rec.info.parent,
            kind=Kind.COMMITTED,
            created_at=now,
            updated_at=now,
            labels=dict(labels),
        )
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, parent_id = ?, created_at = ?, updated_at = ?, labels = ?,"
            " size = ?, inodes = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), parent_id, now, now, json.dumps(info.labels), usage.size, usage.inodes, rec.id),
        )
        new = replace(rec, parent_id=parent_id, info=info, usage=usage)
        self.pending.append(lambda: self._m.put(new))
        return rec.id

    def remove(self, key: str) -> tuple[int, Kind]:
        rec = self._get(key)
        if rec.id in self._m.children:
            raise FailedPrecondition(f"cannot remove snapshot {key!r}: it has children")
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (rec.id,))
        self.pending.append(lambda: self._m.drop(rec))
        return rec.id, rec.info.kind

    def reserve_ids(self, upto: int) -> None:
        """Never hand out ids up to `upto` (again): start-up found dirs of them that no row accounts
        for (a create killed between its dir's rename and its COMMIT)."""
        if upto <= self._m.last_id:
            return
        done = self._db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'snapshots'", (upto,))
        if done.rowcount == 0:  # no row was ever inserted
            self._db.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('snapshots', ?)", (upto,))
        self.pending.append(lambda: setattr(self._m, "last_id", max(self._m.last_id, upto)))

    def update_info(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str]) -> tuple[int, Info]:
        """Apply a field-masked label update, as containerd's storage does."""
        rec = self._get(name)
        if not fieldpaths:
            new_labels = dict(labels)
        else:
            new_labels = dict(rec.info.labels)
            for path in fieldpaths:
                if path == "labels":
                    new_labels = dict(labels)
                elif path.startswith("labels."):
                    label = path[len("labels.") :]
                    if label in labels:
                        new_labels[label] = labels[label]
                    else:
                        new_labels.pop(label, None)
                else:
                    raise InvalidArgument(f"cannot update field {path!r} of snapshot {name!r}")
        info = replace(rec.info, labels=new_labels, updated_at=_now())
        self._db.execute(
            "UPDATE snapshots SET labels = ?, updated_at = ? WHERE id = ?",
            (json.dumps(new_labels), info.updated_at, rec.id),
        )
        new = replace(rec, info=info)
        self.pending.append(lambda: self._m.put(new))
        return rec.id, info


class MetaStore:
    """The SQLite database at <root>/metadata.db, used by one daemon at a time."""

    def __init__(self, path: Path, readonly: bool = False):
        """`readonly` is for tools reading beside (or instead of) the daemon: the file is opened
        with mode=ro, never migrated or written, and (WAL) such a reader never blocks the daemon."""
        self.path = path
        self._lock = threading.Lock()  # writers: one SQL transaction at a time
        self._mirror_lock = threading.Lock()  # readers, and publishing a committed change
        try:
            self._open(readonly)
        except sqlite3.DatabaseError as exc:
            if disk_full(exc):
                raise
            raise RuntimeError(
                f"{path}: {exc}; if this root was the Go original's (a bolt database), "
                "move it aside or use another root: its snapshots cannot be read"
            ) from None

    def _open(self, readonly: bool) -> None:
        path = self.path
        if readonly:
            self._db = sqlite3.connect(
                f"{path.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
        else:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
        self._migrate(readonly)
        self._mirror = self._load()

    def _migrate(self, readonly: bool) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema version {version} is newer than this daemon's {SCHEMA_VERSION}")
        if readonly:
            raise RuntimeError(f"{self.path}: schema version {version}, not {SCHEMA_VERSION}: start the daemon once")
        self._db.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self._db.execute(statement)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._db.execute("COMMIT")

    def _load(self) -> _Mirror:
        mirror = _Mirror()
        rows = self._db.execute(
            "SELECT s.id, s.key, s.kind, s.parent_id, p.key, s.created_at, s.updated_at, s.labels, s.size, s.inodes"
            " FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id ORDER BY s.id"
        )
        for sid, key, kind, parent_id, parent, created, updated, labels, size, inodes in rows:
            info = Info(key, parent or "", Kind(kind), created, updated, json.loads(labels))
            mirror.put(Record(sid, parent_id, info, Usage(size, inodes)))
        seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'snapshots'").fetchone()
        mirror.last_id = max(mirror.last_id, seq[0] if seq else 0)
        return mirror

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """Hold the store's lock for one transaction; commit on success, roll back on error."""
        with self._lock:
            tx = Tx(self._mirror, self._db)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield tx
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            with self._mirror_lock:  # published whole: a reader sees it all or none of it
                for change in tx.pending:
                    change()

    @contextmanager
    def read(self) -> Iterator[Reader]:
        """Consistent reads of the committed state. Readers do not wait for a writer's SQL (as
        bolt's readers do not in containerd), only for the instant its change is published."""
        with self._mirror_lock:
            yield Reader(self._mirror)

    @contextmanager
    def exclusive(self) -> Iterator[Reader]:
        """Reads with every writer kept out, for work on disk that must not meet a create (a new
        snapshot's temp dir is made inside its transaction)."""
        with self._lock:
            yield Reader(self._mirror)

    def counts_by_kind(self) -> dict[str, int]:
        counts = {kind.label: 0 for kind in (Kind.ACTIVE, Kind.VIEW, Kind.COMMITTED)}
        with self._mirror_lock:
            for rec in self._mirror.by_id.values():
                counts[rec.info.kind.label] += 1
        return counts

    def active_labels(self, label: str) -> list[str]:
        """The value of `label` on each active snapshot that has it."""
        with self._mirror_lock:
            infos = [rec.info for rec in self._mirror.by_id.values()]
        return [info.labels[label] for info in infos if info.kind == Kind.ACTIVE and label in info.labels]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --- List filters over the store (containerd keeps its adaptor beside its storage) -------------


def snapshot_fields(info: Info):  # -> filters.Adaptor
    """The fields a List filter can test on a snapshot, as containerd names them."""

    def field(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return info.kind.label, True
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels" and len(path) > 1:
            value = info.labels.get(".".join(path[1:]))
            return (value, True) if value is not None else ("", False)
        return "", False

    return field


def matching(rows: Iterable[tuple[int, Info]], filters: Sequence[str]) -> Iterator[tuple[int, Info]]:
    """The (id, info) rows a List with these filters returns, as they are asked for; the filters
    are parsed (and refused) at once."""
    matcher = parse_filters(filters)
    return ((sid, info) for sid, info in rows if matcher.match(snapshot_fields(info)))
