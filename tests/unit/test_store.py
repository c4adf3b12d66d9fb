"""The metadata store read straight from SQLite: rows kept at hand stay the committed ones, rows
written by an older daemon (no reply kept, or a stale one) are answered right, nothing is read
into memory at opening."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from addlower.api import snapshots_pb2 as pb
from addlower.core.model import Kind
from addlower.engine import store as store_module
from addlower.engine import wire
from addlower.engine.store import MetaStore


@pytest.fixture
def store(tmp_path: Path):
    s = MetaStore(tmp_path / "metadata.db", wire.encode_field)
    yield s
    s.close()


def listed(s: MetaStore) -> dict[str, dict[str, str]]:
    with s.read() as reader:
        rows = list(reader.walk_encoded())
    return {i.name: dict(i.labels) for i in pb.ListSnapshotsResponse.FromString(b"".join(f for _, f in rows)).info}


def test_a_row_read_before_a_commit_is_not_kept_after_it(store: MetaStore):
    """A reader that looked before a writer published may not put back what it read then."""
    with store.transaction() as tx:
        tx.create(Kind.ACTIVE, "k", "", {"v": "1"})
    store._recent.rows.clear()
    _, seen = store._recent.get("k")
    with store.read() as reader:
        old = reader._row(store_module._BY_KEY, "k")
    assert old is not None
    with store.transaction() as tx:
        tx.update_info("k", {"v": "2"}, [])
    store._recent.keep_row(seen, old)
    with store.read() as reader:
        assert reader.find("k").labels == {"v": "2"}  # type: ignore[union-attr]


def test_a_row_read_before_a_commit_is_not_kept_with_its_parent_chain(store: MetaStore, monkeypatch):
    """A Mounts' lookup reads the row, then the parent chain: a change published in between may
    not be undone by keeping the chain (the chain is kept alone, with its own look at the version)."""
    with store.transaction() as tx:
        tx.create(Kind.COMMITTED, "base", "", {})
        tx.create(Kind.ACTIVE, "k", "base", {"v": "1"})
    store._recent.rows.clear()
    store._recent.chains.clear()
    read_row = store_module.Reader._row

    def row_then_a_commit(reader, sql, arg):
        rec = read_row(reader, sql, arg)
        if arg == "k":
            with store.transaction() as tx:
                tx.update_info("k", {"v": "2"}, [])
        return rec

    monkeypatch.setattr(store_module.Reader, "_row", row_then_a_commit)
    with store.read() as reader:
        assert reader.get_snapshot("k").parent_ids == (1,)
    monkeypatch.undo()
    with store.read() as reader:
        assert reader.find("k").labels == {"v": "2"}  # type: ignore[union-attr]


def test_reads_see_every_commit_and_the_kept_rows_are_bounded(store: MetaStore, monkeypatch):
    monkeypatch.setattr(store_module, "RECENT", 8)
    with store.transaction() as tx:
        tx.create(Kind.COMMITTED, "base", "", {})
        for i in range(20):
            tx.create(Kind.ACTIVE, f"a{i}", "base", {"n": str(i)})
    with store.read() as reader:
        for i in range(20):
            assert reader.get_snapshot(f"a{i}").parent_ids == (1,)
    with store.transaction() as tx:
        tx.commit_active("a3", "c3", store_module.Usage(5, 1), {})
        tx.remove("a4")
    assert len(store._recent.rows) <= 8 and len(store._recent.chains) <= 8
    with store.read() as reader:
        assert reader.find("a3") is None and reader.find("a4") is None
        assert reader.get_info("c3")[2] == store_module.Usage(5, 1)
        names = [info.name for _, info in reader.walk()]
    assert names == sorted(names) and set(names) == {"base", "c3"} | {f"a{i}" for i in range(20)} - {"a3", "a4"}


def test_labels_an_older_daemon_changed_are_listed_not_the_stale_reply(store: MetaStore, tmp_path: Path):
    """An older daemon updates labels without knowing the reply column: the trigger forgets it."""
    with store.transaction() as tx:
        tx.create(Kind.ACTIVE, "k", "", {"v": "1"})
    with sqlite3.connect(tmp_path / "metadata.db") as older:
        older.execute("UPDATE snapshots SET labels = ?, updated_at = updated_at + 1 WHERE key = 'k'", ('{"v": "2"}',))
    assert listed(store) == {"k": {"v": "2"}}


def test_a_store_made_before_replies_were_kept_is_read_then_filled(tmp_path: Path):
    db = tmp_path / "metadata.db"
    with sqlite3.connect(db) as older:  # schema 1 as it was: no reply column
        for statement in store_module._SCHEMA:
            older.execute(statement)
        older.execute("PRAGMA user_version = 1")
        for i in range(3):
            older.execute(
                "INSERT INTO snapshots(key, kind, created_at, updated_at, labels) VALUES (?, 3, 1, 1, ?)",
                (f"s{i}", json.dumps({"i": str(i)})),
            )
    s = MetaStore(db, wire.encode_field)
    try:
        assert listed(s) == {f"s{i}": {"i": str(i)} for i in range(3)}
        assert s.fill_replies() == 3 and s.fill_replies() == 0
        with sqlite3.connect(db) as check:
            assert check.execute("SELECT COUNT(*) FROM snapshots WHERE reply IS NULL").fetchone() == (0,)
        assert listed(s) == {f"s{i}": {"i": str(i)} for i in range(3)}
    finally:
        s.close()
