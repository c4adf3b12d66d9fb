"""The Snapshots API's wire form of an Info (containerd.services.snapshots.v1.Info), in one place:
the service answers Stat with it, and the store keeps each row's beside the row, so that a List
sends stored bytes instead of building every Info again. Must not import the server or the store.
"""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from addlower.api import snapshots_pb2 as pb
from addlower.core.model import Info

_INFO_FIELD = b"\x0a"  # `Info info = 1` of Stat's and List's replies, length-delimited
_LABEL_ENTRY = b"\x32"  # an entry of `map<string, string> labels = 6` of Info


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=info.kind.name,  # containerd's enum has the same names (and numbers)
        created_at=_timestamp(info.created_at),
        updated_at=_timestamp(info.updated_at),
        labels=info.labels,
    )


def encode(info: Info) -> bytes:
    """The serialized Info."""
    return info_to_pb(info).SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _delimited(tag: bytes, body: bytes) -> bytes:
    return tag + _varint(len(body)) + body


def info_field(encoded: bytes) -> bytes:
    """A serialized Info as field 1 of a reply: a StatSnapshotResponse, or one Info of a
    ListSnapshotsResponse (whose infos are that field, repeated)."""
    return _delimited(_INFO_FIELD, encoded)


def encode_field(info: Info) -> bytes:
    """An Info as field 1 of a reply: what the store keeps with each row, and a List sends."""
    return info_field(encode(info))


def with_label(field: bytes, key: str, value: str) -> bytes:
    """An Info field (info_field's) with one more label: a map entry appended to the Info
    (protobuf merges fields in any order), for a label that is never stored."""
    start = 2
    while field[start - 1] & 0x80:  # past the tag and the length's varint
        start += 1
    entry = _delimited(b"\x0a", key.encode()) + _delimited(b"\x12", value.encode())
    return info_field(field[start:] + _delimited(_LABEL_ENTRY, entry))
