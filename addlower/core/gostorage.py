"""The snapshots a Go snapshotter recorded with containerd's snapshots/storage package (the Go
original's bolt metadata.db), decoded from the bolt tree into what our store keeps.

containerd's layout: bucket "v1" holds bucket "snapshots", one bucket per snapshot key with "id"
(uvarint), "kind" (one byte, the API's numbering), "parent" (the parent's key), "createdat" and
"updatedat" (Go's time.MarshalBinary), bucket "labels", and for committed ones "size" and
"inodes" (zigzag varints); the snapshots bucket's sequence is the last id handed out. "parents"
(parent id, child id -> child key) only indexes the same links and is not read.

Pure: the bolt tree in, records out; everything found is checked and a refusal names the key and
the part that is wrong, because the file is a root's only record of which dir is which snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .bolt import Bucket
from .model import Kind

VERSION_BUCKET, SNAPSHOTS_BUCKET = b"v1", b"snapshots"
LABELS_BUCKET = b"labels"
# Seconds from Go's zero time (January 1, year 1, UTC) to the Unix epoch.
GO_EPOCH_OFFSET = 62_135_596_800
MAX_VARINT = 10  # bytes of a 64-bit varint
# A key, label name or value. containerd itself passes at most 4096 bytes per label, but the Go
# program took whatever reached its socket: what it kept is taken over, up to this.
MAX_TEXT_BYTES = 1 << 20


class StorageError(ValueError):
    """The bolt file does not hold containerd snapshot storage we can take over as it is."""


@dataclass(frozen=True)
class Stored:
    """One snapshot as the Go snapshotter recorded it."""

    id: int
    key: str
    kind: Kind
    parent: str
    created_at: int  # nanoseconds since the epoch, UTC
    updated_at: int
    labels: Mapping[str, str]
    size: int
    inodes: int


@dataclass(frozen=True)
class Storage:
    """All snapshots, parents before children, and the last id handed out (live or removed: the
    dirs of removed ones may still be there)."""

    snapshots: tuple[Stored, ...]
    last_id: int


def uvarint(data: bytes) -> int:
    """Go's binary.Uvarint, refusing what it would (empty, overlong, more than 64 bits)."""
    value, shift = 0, 0
    for n, byte in enumerate(data[:MAX_VARINT]):
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if n + 1 != len(data) or value >> 64:
                break
            return value
        shift += 7
    raise ValueError(f"not a varint: {data.hex()}")


def varint(data: bytes) -> int:
    """Go's binary.Varint (zigzag)."""
    raw = uvarint(data)
    return (raw >> 1) ^ -(raw & 1)


def go_time(data: bytes | None) -> int:
    """Go's time.MarshalBinary (version 1, or 2 with seconds in the zone offset) as nanoseconds
    since the epoch; 0 when absent, as containerd leaves a zero time."""
    if data is None:
        return 0
    if len(data) not in (15, 16) or data[0] not in (1, 2) or (data[0] == 2) != (len(data) == 16):
        raise ValueError(f"not a Go time: {data.hex()}")
    seconds = int.from_bytes(data[1:9], "big", signed=True)
    nanos = int.from_bytes(data[9:13], "big")
    if nanos >= 1_000_000_000:
        raise ValueError(f"not a Go time: {nanos} nanoseconds")
    return (seconds - GO_EPOCH_OFFSET) * 1_000_000_000 + nanos


def _text(raw: bytes, what: str) -> str:
    if len(raw) > MAX_TEXT_BYTES:
        raise ValueError(f"{what} is {len(raw)} bytes, more than {MAX_TEXT_BYTES}")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8: {raw[:64]!r}") from None


def _snapshot(key: str, bucket: Bucket) -> Stored:
    values = bucket.values
    sid = uvarint(values.get(b"id", b""))
    kind_byte = values.get(b"kind", b"")
    if len(kind_byte) != 1 or kind_byte[0] not in (Kind.VIEW, Kind.ACTIVE, Kind.COMMITTED):
        raise ValueError(f"kind {kind_byte.hex() or 'missing'} is no view, active or committed")
    kind = Kind(kind_byte[0])
    labels_bucket = bucket.buckets.get(LABELS_BUCKET, Bucket())
    if labels_bucket.buckets:
        raise ValueError("its labels bucket holds buckets")
    labels = {_text(k, "a label's name"): _text(v, f"label {k[:64]!r}") for k, v in labels_bucket.values.items()}
    committed = kind is Kind.COMMITTED
    return Stored(
        id=sid,
        key=key,
        kind=kind,
        parent=_text(values.get(b"parent", b""), "its parent"),
        created_at=go_time(values.get(b"createdat")),
        updated_at=go_time(values.get(b"updatedat")),
        labels=labels,
        size=varint(values[b"size"]) if committed and b"size" in values else 0,
        inodes=varint(values[b"inodes"]) if committed and b"inodes" in values else 0,
    )


def decode(root: Bucket) -> Storage:
    """The snapshots of a containerd snapshot storage bolt tree; StorageError names what is wrong."""
    if not root.buckets and not root.values:  # a database opened and never written
        return Storage((), 0)
    version = root.buckets.get(VERSION_BUCKET)
    if version is None or SNAPSHOTS_BUCKET not in version.buckets:
        names = sorted(k.decode(errors="replace") for k in root.buckets)
        raise StorageError(f"no v1/snapshots bucket (top-level buckets: {names}): not containerd snapshot storage")
    table = version.buckets[SNAPSHOTS_BUCKET]
    if table.values:
        raise StorageError(f"the snapshots bucket holds plain values ({len(table.values)}), not only snapshots")
    found: dict[str, Stored] = {}
    for raw_key, bucket in table.buckets.items():
        shown = raw_key[:200].decode(errors="replace")
        try:
            key = _text(raw_key, "the key")
            if not key:
                raise ValueError("the key is empty")
            found[key] = _snapshot(key, bucket)
        except ValueError as exc:
            raise StorageError(f"snapshot {shown!r}: {exc}") from None
    return Storage(_ordered(found), max(table.sequence, max((s.id for s in found.values()), default=0)))


def _ordered(found: dict[str, Stored]) -> tuple[Stored, ...]:
    """The snapshots with each parent before its children, after checking ids and parents."""
    owners: dict[int, str] = {}
    for snap in found.values():
        if snap.id == 0:
            raise StorageError(f"snapshot {snap.key!r} has id 0")
        if snap.id in owners:
            raise StorageError(f"snapshots {owners[snap.id]!r} and {snap.key!r} share id {snap.id}")
        owners[snap.id] = snap.key
        if snap.parent:
            parent = found.get(snap.parent)
            if parent is None:
                raise StorageError(f"snapshot {snap.key!r}: its parent {snap.parent!r} is not recorded")
            if parent.kind is not Kind.COMMITTED:
                raise StorageError(f"snapshot {snap.key!r}: its parent {snap.parent!r} is not committed")
    done: dict[str, Stored] = {}
    for snap in sorted(found.values(), key=lambda s: s.id):
        chain = []
        while snap.key not in done:
            chain.append(snap)
            if not snap.parent:
                break
            snap = found[snap.parent]
            if len(chain) > len(found):
                raise StorageError(f"snapshot {chain[0].key!r}: its parents form a cycle")
        for link in reversed(chain):
            done[link.key] = link
    return tuple(done.values())
