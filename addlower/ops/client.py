"""A small synchronous client for the Snapshots API (the daemon's socket, or containerd's with
namespace and lease metadata): what the admin commands, the tests and the benchmark call.

Errors stay grpc.RpcError; callers decide what a code means to them. Must not know the server.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2, field_mask_pb2, wrappers_pb2

from addlower.api import admin_pb2, mount_pb2, snapshots_pb2_grpc
from addlower.api import snapshots_pb2 as pb
from addlower.core.config import ADMIN_SERVICE, PLUGIN_NAME

ADMIN_TIMEOUT = 3600.0  # a squash copies a whole cache
RELOAD_TIMEOUT = 30.0  # the daemon waits up to config.SETTLE_SECONDS for a file still being written


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
        return list(
            self.stub.Mounts(pb.MountsRequest(snapshotter=self.snapshotter, key=key), metadata=self._md()).mounts
        )

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None, parent: str = "") -> None:
        req = pb.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=labels or {}, parent=parent
        )
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

    def list_batches(self, *filters: str) -> builtins.list[int]:
        req = pb.ListSnapshotsRequest(snapshotter=self.snapshotter, filters=list(filters))
        return [len(resp.info) for resp in self.stub.List(req, metadata=self._md())]

    def usage(self, key: str) -> pb.UsageResponse:
        return self.stub.Usage(pb.UsageRequest(snapshotter=self.snapshotter, key=key), metadata=self._md())

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest(snapshotter=self.snapshotter), metadata=self._md())


def reload(socket: Path) -> tuple[bool, str]:
    """Ask the daemon on `socket` to re-read its config file: (True, what it applied) or (False,
    why it refused or could not be asked)."""
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        call = channel.unary_unary(
            f"/{ADMIN_SERVICE}/Reload",
            request_serializer=empty_pb2.Empty.SerializeToString,
            response_deserializer=wrappers_pb2.StringValue.FromString,
        )
        try:
            return True, call(empty_pb2.Empty(), timeout=RELOAD_TIMEOUT).value
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return False, f"no daemon answers on {socket}: {exc.details()}"
            return False, exc.details() or str(exc.code())


def admin(socket: Path, method: str, request: Any, timeout: float = ADMIN_TIMEOUT) -> str:
    """Call addlower.v1.Admin/`method` (a CacheReply) on the daemon at `socket`: its message.
    Errors stay grpc.RpcError."""
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        call = channel.unary_unary(
            f"/{ADMIN_SERVICE}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=admin_pb2.CacheReply.FromString,
        )
        return call(request, timeout=timeout).message


_LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags


def listening_socket(pid: int) -> Path | None:
    """The unix socket (with a path) that process `pid` listens on, as the kernel says: how
    systemd's ExecReload (which gets $MAINPID) finds the daemon whatever its config file says now."""
    try:
        inodes = {
            link[len("socket:[") : -1]
            for link in (os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
            if link.startswith("socket:[")
        }
        with open(f"/proc/{pid}/net/unix") as table:
            rows = [line.split() for line in table.readlines()[1:]]
    except OSError:
        return None
    for row in rows:
        if len(row) >= 8 and int(row[3], 16) & _LISTENING and row[6] in inodes and row[7].startswith("/"):
            return Path(row[7])
    return None
