"""The wire form of an Info: what Stat and List send, and a label added to stored bytes (whose
length prefix grows from one byte to several as labels grow)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from addlower.api import snapshots_pb2 as pb
from addlower.core.model import Info, Kind
from addlower.engine import wire

texts = st.text(max_size=300)
infos = st.builds(
    Info,
    name=texts,
    parent=texts,
    kind=st.sampled_from([Kind.ACTIVE, Kind.VIEW, Kind.COMMITTED]),
    created_at=st.integers(0, 2**62),
    updated_at=st.integers(0, 2**62),
    labels=st.dictionaries(texts, texts, max_size=5),
)


@given(infos, texts, texts)
def test_a_label_appended_to_the_encoded_info_is_one_more_label(info: Info, key: str, value: str):
    decoded = pb.StatSnapshotResponse.FromString(wire.with_label(wire.encode_field(info), key, value)).info
    assert dict(decoded.labels) == {**info.labels, key: value}
    assert (decoded.name, decoded.parent, decoded.kind) == (info.name, info.parent, int(info.kind))
    assert decoded.created_at.ToNanoseconds() == info.created_at


@given(st.lists(infos, max_size=4))
def test_info_fields_joined_are_a_list_reply_and_one_is_a_stat_reply(items: list[Info]):
    fields = [wire.encode_field(i) for i in items]
    listed = pb.ListSnapshotsResponse.FromString(b"".join(fields))
    assert [i.name for i in listed.info] == [i.name for i in items]
    for info, field in zip(items, fields, strict=True):
        assert pb.StatSnapshotResponse.FromString(field).info.name == info.name
