"""A small synchronous client for the Snapshots API (the daemon's socket, or containerd's with
namespace and lease metadata): what the admin commands, the tests and the benchmark call.

Errors stay grpc.RpcError; callers decide what a code means to them. Must not know the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import grpc
from google.protobuf import field_mask_pb2

from addlower.api import mount_pb2, snapshots_pb2 as pb, snapshots_pb2_grpc
from addlower.core.config import PLUGIN_NAME


@dataclass
class SnapshotsClient:
    channel: grpc.Channel
    snapshotter: str = PLUGIN_NAME
    metadata: Sequence[tuple[str, str]] = ()

    def __post_init__(self) -> None:
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        self._metadata = list(self.metadata) or None

    def _md(self) -> list[tuple[str, str]] | None:
        return self._metadata

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[mount_pb2.Mount]:
        req = pb.PrepareSnapshotRequest(snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {})
        return list(self.stub.Prepare(req, metadata=self._md()).mounts)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[mount_pb2.Mount]:
        req = pb.ViewSnapshotRequest(snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {})
        return list(self.stub.View(req, metadata=self._md()).mounts)

    def mounts(self, key: str) -> list[mount_pb2.Mount]:
        return list(self.stub.Mounts(pb.MountsRequest(snapshotter=self.snapshotter, key=key), metadata=self._md()).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None, parent: str = "") -> None:
        req = pb.CommitSnapshotRequest(snapshotter=self.snapshotter, name=name, key=key, labels=labels or {},
                                       parent=parent)
        self.stub.Commit(req, metadata=self._md())

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key), metadata=self._md())

    def stat(self, key: str) -> pb.Info:
        return self.stub.Stat(pb.StatSnapshotRequest(snapshotter=self.snapshotter, key=key), metadata=self._md()).info

    def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str] | None = None) -> pb.Info:
        req = pb.UpdateSnapshotRequest(snapshotter=self.snapshotter, info=pb.Info(name=name, labels=labels))
        if paths is not None:
            req.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=list(paths)))
        return self.stub.Update(req, metadata=self._md()).info

    def list(self, *filters: str) -> list[pb.Info]:
        req = pb.ListSnapshotsRequest(snapshotter=self.snapshotter, filters=list(filters))
        return [info for resp in self.stub.List(req, metadata=self._md()) for info in resp.info]

    def list_batches(self, *filters: str) -> list[int]:
        req = pb.ListSnapshotsRequest(snapshotter=self.snapshotter, filters=list(filters))
        return [len(resp.info) for resp in self.stub.List(req, metadata=self._md())]

    def usage(self, key: str) -> pb.UsageResponse:
        return self.stub.Usage(pb.UsageRequest(snapshotter=self.snapshotter, key=key), metadata=self._md())

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest(snapshotter=self.snapshotter), metadata=self._md())
