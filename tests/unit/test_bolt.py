"""The bolt reader and the decoding of containerd's snapshot storage, on a metadata.db the Go
original wrote (tests/unit/data/go-metadata.db, made by tests/support/gostore.populate through its
Snapshots API), on damaged copies of it, and on the store it becomes."""

from __future__ import annotations

import contextlib
import struct
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addlower.core import bolt, gostorage
from addlower.core.model import Kind
from addlower.engine import adopt, store
from tests.support import gostore

GO_DB = (Path(__file__).parent / "data" / "go-metadata.db").read_bytes()


def decoded(data: bytes | bytearray) -> gostorage.Storage:
    return gostorage.decode(bolt.read(bytes(data)))


def test_the_go_programs_file_reads_whole():
    storage = decoded(GO_DB)
    by_key = {snap.key: snap for snap in storage.snapshots}
    kinds = Counter(snap.kind for snap in storage.snapshots)
    assert kinds == {Kind.COMMITTED: gostore.LAYERS, Kind.ACTIVE: gostore.LAYERS + 1, Kind.VIEW: gostore.LAYERS}
    # Every id was handed out once; the last ones went to the removed snapshots.
    assert storage.last_id == len(storage.snapshots) + gostore.REMOVED
    assert sorted(snap.id for snap in storage.snapshots) == list(range(1, len(storage.snapshots) + 1))
    for n in range(1, gostore.LAYERS):
        layer = by_key[gostore.layer_key(n)]
        assert layer.parent == gostore.layer_key(n - 1)
        assert layer.labels["layer"] == f"n°{n} ✓"
        assert layer.size >= by_key[gostore.layer_key(n - 1)].size >= 4096 and layer.inodes == 2  # n * 1000 bytes
        assert by_key[f"ns/c{n}/container-{n}"].parent == layer.key
    assert by_key[gostore.layer_key(gostore.LAYERS - 1)].size > by_key[gostore.layer_key(1)].size
    assert by_key["ns/big/labelled"].labels[gostore.BIG_LABEL] == gostore.BIG_VALUE
    seen: set[str] = set()
    for snap in storage.snapshots:  # parents first
        assert not snap.parent or snap.parent in seen
        seen.add(snap.key)
        assert snap.created_at <= snap.updated_at and snap.created_at > 1_700_000_000 * 10**9


def page_kinds(data: bytes) -> Counter[str]:
    """The kinds of pages the reader walks in `data`: branches, leaves, and pages with overflow."""
    meta = bolt.read_meta(data)
    reader = bolt._Reader(data, meta)
    reader.walk(bolt.Bucket(), meta.root, 0, 0)
    kinds: Counter[str] = Counter()
    for pgid in reader.seen:
        _, flags, _, overflow = struct.unpack_from("<QHHI", data, pgid * meta.page_size)
        kinds["branch" if flags & bolt.BRANCH_PAGE else "leaf" if flags & bolt.LEAF_PAGE else "other"] += 1
        kinds["overflowing"] += overflow > 0
    return kinds


def test_the_file_exercises_branches_and_overflow_pages():
    kinds = page_kinds(GO_DB)
    assert kinds["branch"] >= 1 and kinds["overflowing"] >= 1 and kinds["leaf"] > 10


def test_a_damaged_meta_page_falls_back_to_the_other_one():
    meta = bolt.read_meta(GO_DB)
    data = bytearray(GO_DB)
    current = (meta.txid % 2) * meta.page_size  # bbolt writes meta txid % 2
    data[current + bolt.PAGE_HEADER + 24] ^= 0xFF  # inside the checksummed fields
    older = bolt.read_meta(bytes(data))
    assert older.txid == meta.txid - 1


def test_a_page_referenced_twice_is_refused():
    meta = bolt.read_meta(GO_DB)
    data = bytearray(GO_DB)
    size = meta.page_size
    root_page = data[meta.root * size : (meta.root + 1) * size]
    _, flags, count, _ = struct.unpack_from("<QHHI", root_page)
    assert flags & bolt.LEAF_PAGE  # the root bucket holds "v1" only; its leaf names v1's root page
    eflags, pos, ksize, _ = struct.unpack_from("<IIII", root_page, bolt.PAGE_HEADER)
    assert eflags & bolt.BUCKET_LEAF and count == 1
    value_at = meta.root * size + bolt.PAGE_HEADER + pos + ksize
    struct.pack_into("<Q", data, value_at, meta.root)  # v1's tree is the root page itself
    with pytest.raises(bolt.BoltError, match=f"page {meta.root} is referenced twice"):
        bolt.read(bytes(data))


def test_not_bolt_at_all():
    assert not bolt.is_bolt(b"SQLite format 3\0" + bytes(64))
    assert bolt.is_bolt(GO_DB[:64])
    with pytest.raises(bolt.BoltError, match="no valid meta page"):
        bolt.read(bytes(8192))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(GO_DB) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_damaged_files_end_in_a_refusal_or_a_reading(edits):
    data = bytearray(GO_DB)
    for at, value in edits:
        data[at] = value
    with contextlib.suppress(bolt.BoltError, gostorage.StorageError):
        decoded(data)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(2 * 4096, len(GO_DB) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_a_damaged_root_is_refused_by_name(edits):
    """Through the file, as start-up reads it: a refusal, never another error."""
    data = bytearray(GO_DB)
    for at, value in edits:
        data[at] = value
    with tempfile.TemporaryDirectory() as root:
        Path(root, store.DB_NAME).write_bytes(data)
        with contextlib.suppress(adopt.AdoptError):
            adopt.read(Path(root))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(GO_DB) - 1))
def test_truncated_files_end_in_a_refusal_or_a_reading(length):
    with contextlib.suppress(bolt.BoltError, gostorage.StorageError):
        decoded(GO_DB[:length])


def test_go_encodings():
    epoch = bytes.fromhex("01" + "0000000e7791f700" + "00000000" + "ffff")  # time.Unix(0, 0).UTC()
    assert gostorage.go_time(epoch) == 0
    assert gostorage.go_time(bytes.fromhex("02" + "0000000e7791f701" + "00000005" + "0000" + "00")) == 10**9 + 5
    assert gostorage.go_time(None) == 0
    assert gostorage.uvarint(bytes([0xAC, 0x02])) == 300
    assert gostorage.varint(bytes([0x03])) == -2 and gostorage.varint(bytes([0x04])) == 2
    for bad in (b"", bytes([0x80]), bytes([0x01, 0x02]), bytes([0xFF] * 10 + [0x01])):
        with pytest.raises(ValueError, match="not a varint"):
            gostorage.uvarint(bad)
    with pytest.raises(ValueError, match="not a Go time"):
        gostorage.go_time(epoch[:-1])


def snapshot_bucket(sid: int, kind: int, parent: str = "") -> bolt.Bucket:
    values = {b"id": bytes([sid]), b"kind": bytes([kind])}
    if parent:
        values[b"parent"] = parent.encode()
    return bolt.Bucket(values=values)


def tree(**snapshots: bolt.Bucket) -> bolt.Bucket:
    table = bolt.Bucket(sequence=9, buckets={k.encode(): v for k, v in snapshots.items()})
    return bolt.Bucket(buckets={b"v1": bolt.Bucket(buckets={b"snapshots": table})})


@pytest.mark.parametrize(
    "snapshots, message",
    [
        ({"a": snapshot_bucket(1, 2, "gone")}, "snapshot 'a': its parent 'gone' is not recorded"),
        (
            {"p": snapshot_bucket(1, 2), "a": snapshot_bucket(2, 2, "p")},
            "snapshot 'a': its parent 'p' is not committed",
        ),
        ({"p": snapshot_bucket(1, 3), "a": snapshot_bucket(1, 2)}, "snapshots 'p' and 'a' share id 1"),
        ({"a": snapshot_bucket(1, 7)}, "snapshot 'a': kind 07 is no view, active or committed"),
        ({"a": snapshot_bucket(0, 2)}, "snapshot 'a' has id 0"),
    ],
)
def test_storage_that_cannot_be_taken_over_is_refused_by_name(snapshots, message):
    with pytest.raises(gostorage.StorageError, match=message.replace("(", r"\(")):
        gostorage.decode(tree(**snapshots))


def test_a_non_utf8_label_is_refused_by_name():
    bad = snapshot_bucket(1, 2)
    bad.buckets[b"labels"] = bolt.Bucket(values={b"name": b"\xff\xfe"})
    with pytest.raises(gostorage.StorageError, match="snapshot 'a': label b'name' is not UTF-8"):
        gostorage.decode(tree(a=bad))


def test_parents_out_of_id_order_are_written_first():
    found = gostorage.decode(tree(child=snapshot_bucket(1, 3, "parent"), parent=snapshot_bucket(2, 3)))
    assert [s.key for s in found.snapshots] == ["parent", "child"]
    assert found.last_id == 9


def test_the_store_it_becomes(tmp_path: Path):
    storage = decoded(GO_DB)
    store.write_adopted(tmp_path / "metadata.db", storage)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.db"]  # no journal left beside it
    meta = store.MetaStore(tmp_path / "metadata.db", lambda info: b"")
    try:
        with meta.read() as reader:
            assert reader.last_id() == storage.last_id
            walked = {info.name: (sid, info) for sid, info in reader.walk()}
        assert len(walked) == len(storage.snapshots)
        for snap in storage.snapshots:
            sid, info = walked[snap.key]
            assert (sid, info.parent, info.kind, dict(info.labels)) == (snap.id, snap.parent, snap.kind, snap.labels)
            assert (info.created_at, info.updated_at) == (snap.created_at, snap.updated_at)
    finally:
        meta.close()
