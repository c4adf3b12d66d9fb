"""The metadata store: snapshots, their parents, labels and usage.

SQLite at <root>/metadata.db is the record: one transaction per operation, durable (WAL with
synchronous=FULL), ids from AUTOINCREMENT and never reused. Reads query it, as containerd's
storage reads its bolt file: opening the store reads no rows, so start-up and memory do not grow
with the number of snapshots. The rows containerd asks about again and again (Stat, Mounts) are
kept at hand, a bounded number, replaced by a writer once its COMMIT succeeded; readers use
connections of their own and never wait for a writer's SQL. The rules of containerd's snapshot
storage (which errors, in which order) and the fields List filters see live here. This module
must not touch snapshot directories or know about mounts or gRPC.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from addlower.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from addlower.core.filters import parse_filters
from addlower.core.gostorage import Storage
from addlower.core.keys import split_key
from addlower.core.model import Info, Kind, Usage

SCHEMA_VERSION = 1
DB_NAME = "metadata.db"  # under the snapshotter root

_SCHEMA = (
    """CREATE TABLE snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key         TEXT    NOT NULL UNIQUE,
    kind        INTEGER NOT NULL,
    parent_id   INTEGER REFERENCES snapshots(id),
    created_at  INTEGER NOT NULL,   -- nanoseconds since the epoch, UTC
    updated_at  INTEGER NOT NULL,
    size        INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0,
    labels      TEXT    NOT NULL DEFAULT '{}'
)""",
    "CREATE INDEX snapshots_parent ON snapshots(parent_id)",
)
# The row's Info as the service answers it (the store's `encode`), kept so that a List sends
# stored bytes. Added to a store of schema 1 without changing its version, so an older daemon can
# still open it: it ignores the column, and the trigger forgets a reply that a change made by such
# a daemon (one that did not set the reply too) left stale; the store encodes a missing one itself.
_REPLIES = (
    "ALTER TABLE snapshots ADD COLUMN reply BLOB",
    "CREATE TRIGGER snapshots_reply_stale AFTER UPDATE ON snapshots FOR EACH ROW"
    " WHEN NEW.reply IS OLD.reply AND OLD.reply IS NOT NULL"
    " BEGIN UPDATE snapshots SET reply = NULL WHERE id = NEW.id; END",
)
# Managed caches: each one's generations, and the chain each snapshot got (gens: oldest first,
# comma-separated), gone with its snapshot. Added to schema 1 as the replies were: an older
# daemon ignores them.
_CACHES = (
    """CREATE TABLE IF NOT EXISTS cache_generations (
    cache       TEXT    NOT NULL,
    gen         INTEGER NOT NULL,   -- never handed out twice per cache
    created_at  INTEGER NOT NULL,   -- nanoseconds since the epoch, UTC
    source      TEXT    NOT NULL,   -- "seed", "squash of A-B", or the key of the snapshot whose writes it holds
    pod         TEXT,               -- that snapshot's pod (namespace/name), for a pod's container
    scope       TEXT    NOT NULL DEFAULT '',  -- the chain it was made for ("": the default)
    bytes       INTEGER NOT NULL,   -- of its regular files
    added       INTEGER NOT NULL,   -- entries new to the chain below it
    changed     INTEGER NOT NULL,   -- entries there below too (files rewritten, dirs replaced)
    deleted     INTEGER NOT NULL,   -- whiteouts
    removed_at  INTEGER,            -- its dir deleted (or being deleted): no chain or container used it
    PRIMARY KEY (cache, gen)
)""",
    """CREATE TABLE IF NOT EXISTS cache_chains (
    cache       TEXT    NOT NULL,
    scope       TEXT    NOT NULL,   -- "" for the cache's default chain
    pos         INTEGER NOT NULL,   -- 0 at the bottom
    gen         INTEGER NOT NULL,
    PRIMARY KEY (cache, scope, pos)
)""",
    """CREATE TABLE IF NOT EXISTS cache_scopes (
    cache       TEXT    NOT NULL,
    scope       TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    last_used   INTEGER NOT NULL,   -- when a container last got it
    hits        INTEGER NOT NULL,   -- containers that got it
    PRIMARY KEY (cache, scope)
)""",
    """CREATE TABLE IF NOT EXISTS cache_uses (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    cache       TEXT    NOT NULL,
    target      TEXT    NOT NULL,
    gens        TEXT    NOT NULL,
    scope       TEXT,               -- the scope whose chain it got on top of the default one
    exit_status INTEGER,            -- of its container's task, once containerd said it exited
    PRIMARY KEY (snapshot_id, cache)
)""",
)
# The OCI layer of each generation a cache image holds: a pulled image's layers (the generation's
# dir is then the committed snapshot containerd unpacked the layer into: kept while the generation
# is), and the layers a push wrote once for local generations. Added to schema 1 as the caches were.
_LAYERS = (
    """CREATE TABLE IF NOT EXISTS cache_layers (
    cache       TEXT    NOT NULL,
    gen         INTEGER NOT NULL,
    media_type  TEXT    NOT NULL,
    digest      TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    diff_id     TEXT    NOT NULL,
    snapshot_id INTEGER,            -- a pulled layer's snapshot (not a foreign key: kept apart from its row)
    made_with   TEXT,               -- a written layer's: the digest of the exclude list it left out
    PRIMARY KEY (cache, gen)
)""",
    "CREATE INDEX IF NOT EXISTS cache_layers_snapshot ON cache_layers(snapshot_id)",
)
# Replies made per transaction when start-up encodes the rows that have none.
FILL_BATCH = 500


class Layer(NamedTuple):
    """An OCI layer: its descriptor and the digest of its uncompressed tar."""

    media_type: str
    digest: str
    size: int
    diff_id: str


class CacheLayer(NamedTuple):
    """The OCI layer a cache's generation is (cache_layers' row): pulled into `snapshot_id`, or
    written by a push that left out what `made_with` (the exclude list's digest) says."""

    layer: Layer
    snapshot_id: int | None
    made_with: str | None


class Generation(NamedTuple):
    """A managed cache's generation as the store records it (cache_generations' columns)."""

    cache: str
    gen: int
    created_at: int  # ns since the epoch
    source: str
    pod: str | None
    scope: str  # the chain it was made for ("": the default)
    bytes: int
    added: int
    changed: int
    deleted: int
    removed_at: int | None


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


def _create(db: sqlite3.Connection) -> None:
    """Every table of the current schema, in a new database (inside the caller's transaction)."""
    for statement in (*_SCHEMA, *_REPLIES, *_CACHES, *_LAYERS):
        db.execute(statement)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def write_adopted(path: Path, storage: Storage) -> None:
    """A new database at `path` holding `storage`'s snapshots with the same ids, keys, parents,
    kinds, labels, times and usage, and its last id as the last handed out (a removed snapshot's
    dir may still be there: its id is never given again). One transaction, with a rollback
    journal, so the file is whole and alone once this returns; the caller renames it into place.
    Replies are left to start-up, which encodes those missing."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous = FULL")
        db.execute("BEGIN IMMEDIATE")
        _create(db)
        ids = {snap.key: snap.id for snap in storage.snapshots}
        db.executemany(
            "INSERT INTO snapshots(id, key, kind, parent_id, created_at, updated_at, size, inodes, labels)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    s.id,
                    s.key,
                    int(s.kind),
                    ids.get(s.parent),
                    s.created_at,
                    s.updated_at,
                    s.size,
                    s.inodes,
                    json.dumps(dict(s.labels)),
                )
                for s in storage.snapshots
            ],
        )
        db.execute("DELETE FROM sqlite_sequence WHERE name = 'snapshots'")
        db.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('snapshots', ?)", (storage.last_id,))
        db.execute("COMMIT")
    finally:
        db.close()


@dataclass(frozen=True)
class Record:
    """One snapshot's row; replaced, never changed, when the row changes."""

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


# How many snapshots' rows (and parent chains) the store keeps at hand: the ones containerd asks
# about again and again (CRI stats every container's snapshot every 10 s, and mounts it at every
# start) are a node's running containers, well under this; a row not kept is one indexed SELECT.
RECENT = 2048
# A reader's own page cache (KiB): a List of the whole store reads every page once, and the
# kernel's page cache has them anyway; SQLite's default (2 MiB per connection) would keep them all.
READER_CACHE_KIB = 256

_COLUMNS = "s.id, s.key, s.kind, s.parent_id, p.key, s.created_at, s.updated_at, s.labels, s.size, s.inodes"
_ROWS = f"SELECT {_COLUMNS} FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"
_BY_KEY = _ROWS + " WHERE s.key = ?"
_BY_ID = _ROWS + " WHERE s.id = ?"
_IN_KEY_ORDER = _ROWS + " ORDER BY s.key"
_REPLIES_IN_KEY_ORDER = "SELECT id, reply FROM snapshots ORDER BY key"
_CHAIN = (  # the parent ids of a snapshot, nearest first
    "WITH RECURSIVE chain(id, depth) AS ("
    " SELECT parent_id, 1 FROM snapshots WHERE id = ? AND parent_id IS NOT NULL"
    " UNION ALL SELECT s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.id"
    " WHERE s.parent_id IS NOT NULL"
    ") SELECT id FROM chain ORDER BY depth"
)
_MOUNTABLE = f"kind IN ({int(Kind.ACTIVE)}, {int(Kind.VIEW)})"


Encode = Callable[[Info], bytes]


def _named_pattern(namespace: str, name: str) -> str:
    """A LIKE pattern (escape \\) for the keys `<namespace>/<anything>/<name>`."""
    escaped = [re.sub(r"([\\%_])", r"\\\1", part) for part in (namespace, name)]
    return f"{escaped[0]}/%/{escaped[1]}"


def _now() -> int:
    return time.time_ns()


def _record(row: tuple[Any, ...]) -> Record:
    sid, key, kind, parent_id, parent, created, updated, labels, size, inodes = row
    info = Info(key, parent or "", Kind(kind), created, updated, json.loads(labels))
    return Record(sid, parent_id, info, Usage(size, inodes))


class _Queries:
    """The store's SELECTs, on whatever connection `_conn` lends (a reader's, or the writer's
    inside its transaction, which then sees its own changes)."""

    def _conn(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _one(self, sql: str, args: tuple[Any, ...]) -> Any:
        with self._conn() as db:
            return db.execute(sql, args).fetchone()

    def _row(self, sql: str, arg: str | int) -> Record | None:
        row = self._one(sql, (arg,))
        return _record(row) if row is not None else None

    def _chain(self, sid: int) -> tuple[int, ...]:
        with self._conn() as db:
            return tuple(r[0] for r in db.execute(_CHAIN, (sid,)))

    def info_of(self, sid: int) -> Info | None:
        """The Info of snapshot id `sid`, or None."""
        rec = self._row(_BY_ID, sid)
        return rec.info if rec is not None else None

    def with_parents(self, sid: int) -> tuple[Info, tuple[int, ...]] | None:
        """The Info of snapshot id `sid`, any kind, and its parent ids (nearest first), or None."""
        rec = self._row(_BY_ID, sid)
        return (rec.info, self._chain(sid)) if rec is not None else None

    def ids(self) -> set[int]:
        with self._conn() as db:
            return {r[0] for r in db.execute("SELECT id FROM snapshots")}

    def ids_after(self, after: int, limit: int) -> list[int]:
        """Up to `limit` ids above `after`, in order: a store's worth of ids a page at a time."""
        with self._conn() as db:
            return [
                r[0] for r in db.execute("SELECT id FROM snapshots WHERE id > ? ORDER BY id LIMIT ?", (after, limit))
            ]

    def is_mountable(self, sid: int) -> bool:
        return self._one(f"SELECT 1 FROM snapshots WHERE id = ? AND {_MOUNTABLE}", (sid,)) is not None

    def has_id(self, sid: int) -> bool:
        return self._one("SELECT 1 FROM snapshots WHERE id = ?", (sid,)) is not None

    # --- managed caches ---

    def cache_chain(self, name: str, scope: str = "") -> list[int]:
        """Cache `name`'s chain (of `scope`; "": its default one): bottom first."""
        with self._conn() as db:
            rows = db.execute("SELECT gen FROM cache_chains WHERE cache = ? AND scope = ? ORDER BY pos", (name, scope))
            return [r[0] for r in rows]

    def cache_chains(self) -> dict[tuple[str, str], list[int]]:
        """(cache, scope) -> its chain, bottom first."""
        chains: dict[tuple[str, str], list[int]] = {}
        with self._conn() as db:
            for cache, scope, gen in db.execute(
                "SELECT cache, scope, gen FROM cache_chains ORDER BY cache, scope, pos"
            ):
                chains.setdefault((cache, scope), []).append(gen)
        return chains

    def cache_scopes(self) -> list[tuple[str, str, int, int, int]]:
        """(cache, scope, created_at, last_used, hits) of every scope."""
        with self._conn() as db:
            return list(db.execute("SELECT cache, scope, created_at, last_used, hits FROM cache_scopes ORDER BY 1, 2"))

    def cache_gens_in_use(self) -> set[tuple[str, int]]:
        """(cache, gen) of every generation some snapshot got."""
        used: set[tuple[str, int]] = set()
        with self._conn() as db:
            for cache, gens in db.execute("SELECT cache, gens FROM cache_uses"):
                used.update((cache, int(g)) for g in gens.split(",") if g)
        return used

    def cache_use(self, sid: int, name: str) -> list[int] | None:
        """The generations snapshot `sid` got of cache `name` (oldest first), or None."""
        row = self._one("SELECT gens FROM cache_uses WHERE snapshot_id = ? AND cache = ?", (sid, name))
        return None if row is None else [int(g) for g in row[0].split(",") if g]

    def cache_uses(self, sid: int) -> list[tuple[str, str, int | None, str | None]]:
        """(cache, target, its task's exit status or None, its scope or None) of each cache
        snapshot `sid` uses."""
        with self._conn() as db:
            sql = "SELECT cache, target, exit_status, scope FROM cache_uses WHERE snapshot_id = ?"
            return list(db.execute(sql, (sid,)))

    def cache_users_named(self, namespace: str, name: str) -> list[tuple[int, str]]:
        """(id, key) of the snapshots using a cache whose key is `<namespace>/<anything>/<name>`
        (a superset of containerd's `<namespace>/<n>/<name>`: the caller checks the middle)."""
        sql = (
            "SELECT DISTINCT s.id, s.key FROM cache_uses u JOIN snapshots s ON s.id = u.snapshot_id"
            " WHERE s.key LIKE ? ESCAPE '\\'"
        )
        with self._conn() as db:
            return list(db.execute(sql, (_named_pattern(namespace, name),)))

    def committed_named(self, namespace: str, name: str) -> tuple[int, int | None] | None:
        """(id, parent id) of the committed snapshot containerd named `name` in `namespace` (its
        key is `<namespace>/<n>/<name>`), the newest if there are several."""
        sql = "SELECT id, parent_id, key FROM snapshots WHERE kind = ? AND key LIKE ? ESCAPE '\\' ORDER BY id DESC"
        with self._conn() as db:
            rows = db.execute(sql, (int(Kind.COMMITTED), _named_pattern(namespace, name)))
            return next(((sid, parent) for sid, parent, key in rows if split_key(key) == (namespace, name)), None)

    def cache_bytes(self, name: str, scope: str = "") -> int:
        """What cache `name`'s chain (of `scope`) holds."""
        row = self._one(
            "SELECT COALESCE(SUM(g.bytes), 0) FROM cache_chains c JOIN cache_generations g"
            " ON g.cache = c.cache AND g.gen = c.gen WHERE c.cache = ? AND c.scope = ?",
            (name, scope),
        )
        return int(row[0])

    def cache_generations(self) -> set[tuple[str, int]]:
        """(cache, gen) of every generation whose dir is kept (not removed)."""
        with self._conn() as db:
            return {(c, g) for c, g in db.execute("SELECT cache, gen FROM cache_generations WHERE removed_at IS NULL")}

    def cache_layers(self, name: str) -> dict[int, CacheLayer]:
        """Cache `name`'s recorded layers, by generation."""
        with self._conn() as db:
            rows = db.execute(
                "SELECT gen, media_type, digest, size, diff_id, snapshot_id, made_with"
                " FROM cache_layers WHERE cache = ?",
                (name,),
            )
            return {row[0]: CacheLayer(Layer(*row[1:5]), row[5], row[6]) for row in rows}

    def cache_log(self, name: str | None = None) -> list[Generation]:
        """Every generation, or one cache's, oldest first."""
        sql = f"SELECT {', '.join(Generation._fields)} FROM cache_generations"
        with self._conn() as db:
            if name is None:
                return [Generation(*row) for row in db.execute(sql + " ORDER BY cache, gen")]
            return [Generation(*row) for row in db.execute(sql + " WHERE cache = ? ORDER BY gen", (name,))]

    def cache_users(self) -> dict[tuple[str, str], int]:
        """(cache, scope: "" for none) -> how many snapshots use it."""
        with self._conn() as db:
            sql = "SELECT cache, COALESCE(scope, ''), COUNT(*) FROM cache_uses GROUP BY 1, 2"
            return {(c, scope): n for c, scope, n in db.execute(sql)}

    def last_id(self) -> int:
        """The highest id ever handed out (committed), live or removed (AUTOINCREMENT's record)."""
        row = self._one("SELECT seq FROM sqlite_sequence WHERE name = 'snapshots'", ())
        return row[0] if row else 0


class _Recent:
    """The rows read or written lately, by key, and parent chains by id: at most RECENT of each,
    the least recently used going first. Every entry is a committed row: a writer replaces what it
    changed once its COMMIT succeeded, and a reader's fill is dropped when any change was published
    after the reader looked (`version`), so a row read before a COMMIT never lands after it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.version = 0
        self.rows: OrderedDict[str, Record] = OrderedDict()
        self.chains: OrderedDict[int, tuple[int, ...]] = OrderedDict()

    def get(self, key: str) -> tuple[Record | None, int]:
        with self.lock:
            rec = self.rows.get(key)
            if rec is not None:
                self.rows.move_to_end(key)
            return rec, self.version

    def chain(self, sid: int) -> tuple[tuple[int, ...] | None, int]:
        with self.lock:
            chain = self.chains.get(sid)
            if chain is not None:
                self.chains.move_to_end(sid)
            return chain, self.version

    def keep_row(self, seen: int, rec: Record) -> None:
        """Keep a row read after `seen` (the version get() returned before the read)."""
        self._keep(seen, self.rows, rec.info.name, rec)

    def keep_chain(self, seen: int, sid: int, chain: tuple[int, ...]) -> None:
        """Keep a parent chain read after `seen` (the version chain() returned before the read)."""
        self._keep(seen, self.chains, sid, chain)

    def _keep(self, seen: int, entries: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        with self.lock:
            if seen == self.version:
                _bounded_put(entries, key, value)

    def publish(self, changes: Sequence[_Change]) -> None:
        with self.lock:
            self.version += 1
            for change in changes:
                self.rows.pop(change.key, None)
                self.chains.pop(change.sid, None)
                if change.now is not None:
                    _bounded_put(self.rows, change.now.info.name, change.now)
                if change.chain is not None:
                    _bounded_put(self.chains, change.sid, change.chain)


def _bounded_put(entries: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    entries[key] = value
    entries.move_to_end(key)
    if len(entries) > RECENT:
        entries.popitem(last=False)


@dataclass(frozen=True)
class _Change:
    """A row a transaction changed: `key` and `sid` are forgotten, `now` (its new row, under its
    own key) and `chain` (its parent ids) kept, once the COMMIT succeeded."""

    key: str
    sid: int
    now: Record | None = None
    chain: tuple[int, ...] | None = None


class _Pool:
    """Reader connections, one per concurrent reader (SQLite's WAL lets them read while the writer
    writes), opened as needed and kept."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]):
        self._connect = connect
        self._idle: list[sqlite3.Connection] = []
        self.closed = False

    @contextmanager
    def lend(self) -> Iterator[sqlite3.Connection]:
        try:
            db = self._idle.pop()
        except IndexError:
            db = self._connect()
        try:
            yield db
        finally:
            if self.closed:
                db.close()
            else:
                self._idle.append(db)

    def close(self) -> None:
        self.closed = True
        while self._idle:
            self._idle.pop().close()


class Reader(_Queries):
    """Lookups over the committed state; what MetaStore.read() and .exclusive() hand out. Each
    lookup is one statement, so it sees one committed state; rows asked for by key come from the
    recent ones when they are there."""

    def __init__(self, pool: _Pool, recent: _Recent, encode: Encode):
        self._pool = pool
        self._recent = recent
        self._encode = encode

    def _conn(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._pool.lend()

    def _by_key(self, key: str) -> Record | None:
        rec, seen = self._recent.get(key)
        if rec is None:
            rec = self._row(_BY_KEY, key)
            if rec is not None:
                self._recent.keep_row(seen, rec)
        return rec

    def get_info(self, key: str) -> tuple[int, Info, Usage]:
        rec = self._by_key(key)
        if rec is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return rec.id, rec.info, rec.usage

    def find(self, key: str) -> Info | None:
        """The Info of `key`, or None (where a missing key is no error)."""
        rec = self._by_key(key)
        return rec.info if rec is not None else None

    def get_snapshot(self, key: str) -> Snapshot:
        """The snapshot behind an active or view key (mountable kinds only)."""
        rec = self._by_key(key)
        if rec is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        kind = rec.info.kind
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(f"snapshot {key!r} is {kind.label}, not active or view")
        chain, seen = self._recent.chain(rec.id)
        if chain is None:
            chain = self._chain(rec.id)
            self._recent.keep_chain(seen, rec.id, chain)
        return Snapshot(rec.id, kind, chain, rec.info.labels)

    def walk(self) -> Iterator[tuple[int, Info]]:
        """Every snapshot, by key, as containerd's storage walks them: one statement on a
        connection of its own for as long as the caller iterates, so a List being sent sees one
        committed state and costs no copy of the store."""
        with self._pool.lend() as db:
            for row in db.execute(_IN_KEY_ORDER):
                rec = _record(row)
                yield rec.id, rec.info

    def walk_encoded(self) -> Iterator[tuple[int, bytes]]:
        """walk()'s snapshots as their ids and stored replies; the few rows without one are
        encoded now, read on the same connection (so from the same committed state)."""
        with self._pool.lend() as db:
            for sid, reply in db.execute(_REPLIES_IN_KEY_ORDER):
                if reply is None:
                    reply = self._encode(_record(db.execute(_BY_ID, (sid,)).fetchone()).info)
                yield sid, reply


class Tx(_Queries):
    """One write transaction: SQL on the writer's connection (reads see this transaction's own
    changes); what it changed is published to the recent rows once the COMMIT succeeded."""

    def __init__(self, conn: sqlite3.Connection, encode: Encode):
        self._db = conn
        self._encode = encode
        self.changes: list[_Change] = []

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        yield self._db

    def _get(self, key: str, what: str = "snapshot") -> Record:
        rec = self._row(_BY_KEY, key)
        if rec is None:
            raise NotFound(f"{what} {key!r} does not exist")
        return rec

    def info(self, key: str) -> tuple[int, Info]:
        """The id and Info of `key`, as this transaction sees them."""
        rec = self._get(key)
        return rec.id, rec.info

    def _taken(self, key: str) -> bool:
        return self._one("SELECT 1 FROM snapshots WHERE key = ?", (key,)) is not None

    def create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> Snapshot:
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        parent_id = None
        if parent:
            prec = self._get(parent, "parent snapshot")
            if prec.info.kind != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            parent_id = prec.id
        if self._taken(key):
            raise AlreadyExists(f"snapshot {key!r} already exists")
        now = _now()
        info = Info(key, parent, kind, now, now, dict(labels))
        cur = self._db.execute(
            "INSERT INTO snapshots(key, kind, parent_id, created_at, updated_at, labels, reply)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, int(kind), parent_id, now, now, json.dumps(info.labels), self._encode(info)),
        )
        sid = cur.lastrowid
        assert sid is not None
        chain = (parent_id, *self._chain(parent_id)) if parent_id is not None else ()
        self.changes.append(_Change(key, sid, Record(sid, parent_id, info), chain))
        return Snapshot(sid, kind, chain, info.labels)

    def commit_active(self, key: str, name: str, usage: Usage, labels: Mapping[str, str], parent: str = "") -> int:
        """Commit as containerd's storage does, `parent` included (2.2's parallel unpack): an active
        made without a parent is rebased onto it; one with another parent is refused."""
        if not name:
            raise InvalidArgument("commit name must not be empty")
        if self._taken(name):
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
            " size = ?, inodes = ?, reply = ? WHERE id = ?",
            (
                name,
                int(Kind.COMMITTED),
                parent_id,
                now,
                now,
                json.dumps(info.labels),
                usage.size,
                usage.inodes,
                self._encode(info),
                rec.id,
            ),
        )
        self.changes.append(_Change(key, rec.id, replace(rec, parent_id=parent_id, info=info, usage=usage)))
        return rec.id

    def remove(self, key: str) -> tuple[int, Kind]:
        rec = self._get(key)
        if self._one("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (rec.id,)) is not None:
            raise FailedPrecondition(f"cannot remove snapshot {key!r}: it has children")
        held = self._one(
            "SELECT l.cache, l.gen FROM cache_layers l JOIN cache_generations g USING (cache, gen)"
            " WHERE l.snapshot_id = ? AND g.removed_at IS NULL LIMIT 1",
            (rec.id,),
        )
        if held is not None:
            raise FailedPrecondition(
                f"cannot remove snapshot {key!r}: it is generation {held[1]} of cache {held[0]!r} (a layer of its "
                "image), which containers or the cache's chain still use"
            )
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (rec.id,))
        self.changes.append(_Change(key, rec.id))
        return rec.id, rec.info.kind

    def use_cache(self, sid: int, name: str, target: str, gens: list[int], scope: str | None = None) -> None:
        self._db.execute(
            "INSERT INTO cache_uses (snapshot_id, cache, target, gens, scope) VALUES (?, ?, ?, ?, ?)",
            (sid, name, target, ",".join(map(str, gens)), scope),
        )

    def use_scope(self, name: str, scope: str, most: int) -> None:
        """Count a container getting `scope` of cache `name`, made now unless the cache has `most`
        scopes already (ResourceExhausted)."""
        now = time.time_ns()
        done = self._db.execute(
            "UPDATE cache_scopes SET last_used = ?, hits = hits + 1 WHERE cache = ? AND scope = ?", (now, name, scope)
        )
        if done.rowcount:
            return
        held = self._one("SELECT COUNT(*) FROM cache_scopes WHERE cache = ?", (name,))[0]
        if held >= most:
            raise ResourceExhausted(
                f"cache {name!r} has {held} scopes, its max_scopes: scope {scope!r} cannot be made (unused "
                "scopes go after scope_ttl; or raise max_scopes in the snapshotter's config)"
            )
        self._db.execute(
            "INSERT INTO cache_scopes (cache, scope, created_at, last_used, hits) VALUES (?, ?, ?, ?, 1)",
            (name, scope, now, now),
        )

    def drop_scope(self, name: str, scope: str) -> None:
        """Forget `scope` of cache `name` and its chain (its generations go once unused)."""
        self._db.execute("DELETE FROM cache_chains WHERE cache = ? AND scope = ?", (name, scope))
        self._db.execute("DELETE FROM cache_scopes WHERE cache = ? AND scope = ?", (name, scope))

    def scopes_in_use(self) -> set[tuple[str, str]]:
        with self._conn() as db:
            return set(db.execute("SELECT DISTINCT cache, scope FROM cache_uses WHERE scope IS NOT NULL"))

    def set_exit(self, sids: Sequence[int], status: int) -> None:
        self._db.executemany("UPDATE cache_uses SET exit_status = ? WHERE snapshot_id = ?", [(status, i) for i in sids])

    def next_generation(self, name: str) -> int:
        row = self._one("SELECT COALESCE(MAX(gen), 0) FROM cache_generations WHERE cache = ?", (name,))
        return int(row[0]) + 1

    def add_generation(
        self, name: str, gen: int, source: str, tree: Any, pod: str | None = None, scope: str = ""
    ) -> None:
        """Record generation `gen` of cache `name`; `tree` has bytes, added, changed, deleted."""
        self._db.execute(
            "INSERT INTO cache_generations"
            " (cache, gen, created_at, source, pod, scope, bytes, added, changed, deleted)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, gen, time.time_ns(), source, pod, scope, tree.bytes, tree.added, tree.changed, tree.deleted),
        )

    def set_layer(
        self, name: str, gen: int, layer: Layer, snapshot_id: int | None = None, made_with: str | None = None
    ) -> None:
        """Record the OCI layer generation `gen` of cache `name` is: pulled into snapshot
        `snapshot_id`, or written from the generation by a push leaving out what `made_with` says."""
        self._db.execute(
            "INSERT OR REPLACE INTO cache_layers"
            " (cache, gen, media_type, digest, size, diff_id, snapshot_id, made_with) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (name, gen, *layer, snapshot_id, made_with),
        )

    def set_chain(self, name: str, gens: Sequence[int], scope: str = "") -> None:
        """Make `gens` (bottom first) cache `name`'s chain (of `scope`)."""
        self._db.execute("DELETE FROM cache_chains WHERE cache = ? AND scope = ?", (name, scope))
        self._db.executemany(
            "INSERT INTO cache_chains (cache, scope, pos, gen) VALUES (?, ?, ?, ?)",
            [(name, scope, i, g) for i, g in enumerate(gens)],
        )

    def remove_generations(self, doomed: Iterable[tuple[str, int]]) -> None:
        self._db.executemany(
            "UPDATE cache_generations SET removed_at = ? WHERE cache = ? AND gen = ?",
            [(time.time_ns(), c, g) for c, g in doomed],
        )

    def reserve_ids(self, upto: int) -> None:
        """Never hand out ids up to `upto` (again): start-up found dirs of them that no row accounts
        for (a create killed between its dir's rename and its COMMIT)."""
        if upto <= self.last_id():
            return
        done = self._db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'snapshots'", (upto,))
        if done.rowcount == 0:  # no row was ever inserted
            self._db.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('snapshots', ?)", (upto,))

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
            "UPDATE snapshots SET labels = ?, updated_at = ?, reply = ? WHERE id = ?",
            (json.dumps(new_labels), info.updated_at, self._encode(info), rec.id),
        )
        self.changes.append(_Change(name, rec.id, replace(rec, info=info)))
        return rec.id, info

    def fill_replies(self, after: int) -> list[int]:
        """Encode up to FILL_BATCH rows without a reply, of ids above `after`; returns their ids."""
        rows = self._db.execute(
            _ROWS + " WHERE s.id > ? AND s.reply IS NULL ORDER BY s.id LIMIT ?", (after, FILL_BATCH)
        ).fetchall()
        for rec in map(_record, rows):
            self._db.execute("UPDATE snapshots SET reply = ? WHERE id = ?", (self._encode(rec.info), rec.id))
        return [row[0] for row in rows]


class MetaStore:
    """The SQLite database at <root>/metadata.db, used by one daemon at a time."""

    def __init__(self, path: Path, encode: Encode, readonly: bool = False):
        """`encode` makes the reply kept with each row (the service's wire form of its Info).
        `readonly` is for tools reading beside (or instead of) the daemon: the file is opened
        with mode=ro, never migrated or written, and (WAL) such a reader never blocks the daemon."""
        self.path = path
        self._encode = encode
        self._readonly = readonly
        self._lock = threading.Lock()  # writers: one SQL transaction at a time
        self._recent = _Recent()
        self._pool = _Pool(self._reader)
        try:
            self._open(readonly)
        except sqlite3.DatabaseError as exc:
            if disk_full(exc):
                raise
            raise RuntimeError(
                f"{path}: {exc}; it is neither this daemon's database nor the Go original's: "
                "restore it from a backup, or move the root aside and start on an empty one"
            ) from None

    def _open(self, readonly: bool) -> None:
        if readonly:
            self._db = self._reader()
        else:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
        self._migrate(readonly)

    def _reader(self) -> sqlite3.Connection:
        """A connection that only reads: with mode=ro for tools (it creates nothing), and a small
        page cache of its own."""
        if self._readonly:
            db = sqlite3.connect(
                f"{self.path.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
        else:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA cache_size = -{READER_CACHE_KIB}")
        db.execute("PRAGMA query_only = ON")
        return db

    def _migrate(self, readonly: bool) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            if not readonly:
                self._keep_replies()
            return
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema version {version} is newer than this daemon's {SCHEMA_VERSION}")
        if readonly:
            raise RuntimeError(f"{self.path}: schema version {version}, not {SCHEMA_VERSION}: start the daemon once")
        self._db.execute("BEGIN IMMEDIATE")
        _create(self._db)
        self._db.execute("COMMIT")

    def _keep_replies(self) -> None:
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(snapshots)")}
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        added = [
            *(_REPLIES if "reply" not in columns else ()),
            *(_CACHES if "cache_uses" not in tables else ()),
            *(_LAYERS if "cache_layers" not in tables else ()),
        ]
        if added:
            self._db.execute("BEGIN IMMEDIATE")
            for statement in added:
                self._db.execute(statement)
            self._db.execute("COMMIT")

    def fill_replies(self) -> int:
        """Encode the replies that rows lack (made before replies were kept, or changed by an
        older daemon since): a batch per transaction, so calls wait little; returns how many."""
        done, after = 0, 0
        while True:
            with self.transaction() as tx:
                batch = tx.fill_replies(after)
            if not batch:
                return done
            done, after = done + len(batch), batch[-1]

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """Hold the store's lock for one transaction; commit on success, roll back on error."""
        with self._lock:
            tx = Tx(self._db, self._encode)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield tx
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._recent.publish(tx.changes)

    @contextmanager
    def read(self) -> Iterator[Reader]:
        """Reads of the committed state. Readers do not wait for a writer (as bolt's readers do
        not in containerd): each reads the last COMMIT before its statement."""
        yield Reader(self._pool, self._recent, self._encode)

    @contextmanager
    def exclusive(self) -> Iterator[Reader]:
        """Reads with every writer kept out, for work on disk that must not meet a create (a new
        snapshot's temp dir is made inside its transaction)."""
        with self._lock:
            yield Reader(self._pool, self._recent, self._encode)

    def counts_by_kind(self) -> dict[str, int]:
        counts = {kind.label: 0 for kind in (Kind.ACTIVE, Kind.VIEW, Kind.COMMITTED)}
        with self._pool.lend() as db:
            for kind, count in db.execute("SELECT kind, COUNT(*) FROM snapshots GROUP BY kind"):
                counts[Kind(kind).label] = count
        return counts

    def cache_figures(self) -> list[tuple[str, str, int, int, int, int]]:
        """(cache, scope, generations in its chain, their bytes, snapshots using it, containers that
        got it) of each cache's default chain ("") and each scope."""
        with self._pool.lend() as db:
            return list(
                db.execute(
                    "SELECT c.cache, c.scope, COUNT(*), SUM(g.bytes),"
                    " (SELECT COUNT(*) FROM cache_uses u WHERE u.cache = c.cache AND COALESCE(u.scope, '') = c.scope),"
                    " COALESCE((SELECT hits FROM cache_scopes s WHERE s.cache = c.cache AND s.scope = c.scope), 0)"
                    " FROM cache_chains c JOIN cache_generations g ON g.cache = c.cache AND g.gen = c.gen"
                    " GROUP BY c.cache, c.scope ORDER BY c.cache, c.scope"
                )
            )

    def committed_usage(self) -> tuple[int, int]:
        """Bytes and inodes of the committed snapshots, as recorded at their Commit."""
        with self._pool.lend() as db:
            size, inodes = db.execute(
                "SELECT COALESCE(SUM(size), 0), COALESCE(SUM(inodes), 0) FROM snapshots WHERE kind = ?",
                (int(Kind.COMMITTED),),
            ).fetchone()
        return int(size), int(inodes)

    def active_labels(self, label: str) -> list[str]:
        """The value of `label` on each active snapshot that has it."""
        found = []
        with self._pool.lend() as db:  # the label's name, as JSON writes it, narrows the rows
            rows = db.execute(
                "SELECT labels FROM snapshots WHERE kind = ? AND instr(labels, ?) > 0",
                (int(Kind.ACTIVE), json.dumps(label)),
            )
            for (labels,) in rows:
                value = json.loads(labels).get(label)
                if value is not None:
                    found.append(value)
        return found

    def close(self) -> None:
        with self._lock:
            self._pool.close()
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
