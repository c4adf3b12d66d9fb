"""The gRPC face of the snapshotter: containerd.services.snapshots.v1.Snapshots.

A thin layer: it converts protobuf messages to plain values and back, calls the Snapshotter, and
maps its errors to gRPC status codes (addlower.errors holds the table). It must not hold any
snapshot logic of its own.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Iterable, Iterator, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from .api import mount_pb2, snapshots_pb2 as pb, snapshots_pb2_grpc
from .errors import SnapshotError, status_code
from .mounts import Mount
from .snapshotter import Snapshotter
from .store import Info

log = logging.getLogger(__name__)

# containerd's own service sends List results in batches of this many.
LIST_BATCH = 100

T = TypeVar("T")


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),
        created_at=_timestamp(info.created_at),
        updated_at=_timestamp(info.updated_at),
        labels=info.labels,
    )


def mounts_to_pb(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options) for m in mounts]


def _abort(context: grpc.ServicerContext, method: str, key: str, exc: Exception) -> None:
    code = status_code(exc)
    if isinstance(exc, SnapshotError):
        log.debug("%s key=%s failed: %s (%s)", method, key, exc, code.name)
    else:
        log.exception("%s key=%s failed unexpectedly", method, key)
    context.abort(code, str(exc))


def rpc(key_of: Callable[[object], str]) -> Callable:
    """Wrap a unary handler: log one debug line per call and map errors to status codes."""

    def decorate(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def wrapper(self: "SnapshotsService", request: object, context: grpc.ServicerContext):
            start = time.perf_counter()
            key = key_of(request)
            try:
                return handler(self, request, context)
            except Exception as exc:
                _abort(context, handler.__name__, key, exc)
            finally:
                log.debug("rpc method=%s key=%s duration=%.6fs", handler.__name__, key,
                          time.perf_counter() - start)

        return wrapper

    return decorate


_key = lambda r: r.key  # noqa: E731


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter):
        self.sn = snapshotter

    @rpc(_key)
    def Prepare(self, request, context):
        mounts = self.sn.prepare(request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    @rpc(_key)
    def View(self, request, context):
        mounts = self.sn.view(request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    @rpc(_key)
    def Mounts(self, request, context):
        return pb.MountsResponse(mounts=mounts_to_pb(self.sn.mounts(request.key)))

    @rpc(_key)
    def Commit(self, request, context):
        self.sn.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @rpc(_key)
    def Remove(self, request, context):
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    @rpc(_key)
    def Stat(self, request, context):
        return pb.StatSnapshotResponse(info=info_to_pb(self.sn.stat(request.key)))

    @rpc(lambda r: r.info.name)
    def Update(self, request, context):
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self.sn.update(request.info.name, dict(request.info.labels), paths)
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    @rpc(_key)
    def Usage(self, request, context):
        usage = self.sn.usage(request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    @rpc(lambda r: "")
    def Cleanup(self, request, context):
        removed = self.sn.cleanup()
        if removed:
            log.info("cleanup removed %d directories", len(removed))
        return empty_pb2.Empty()

    def List(self, request, context) -> Iterator[pb.ListSnapshotsResponse]:
        start = time.perf_counter()
        try:
            batch: list[pb.Info] = []
            for info in self.sn.list(list(request.filters)):
                batch.append(info_to_pb(info))
                if len(batch) == LIST_BATCH:
                    yield pb.ListSnapshotsResponse(info=batch)
                    batch = []
            if batch:
                yield pb.ListSnapshotsResponse(info=batch)
        except Exception as exc:
            _abort(context, "List", "", exc)
        finally:
            log.debug("rpc method=List filters=%s duration=%.6fs", list(request.filters),
                      time.perf_counter() - start)

