"""The Snapshots API (containerd.services.snapshots.v1.Snapshots) as routes for grpcserver.

A thin layer: protobuf requests to plain values, calls on the Snapshotter, plain values back to
protobuf, and the error -> status code mapping (the codes themselves live in addlower.core.errors).
Which calls may block (tree walks and deletions) and in which thread pool they run is stated per
method in METHODS (a pool, or a method deciding from the request). Stat and List answer with bytes already serialized (a
Stat's kept as long as its Info lives, a List's kept by the store with each row; the transport
sends bytes as they are): CRI stats every snapshot every 10 s. It must not hold snapshot logic or
know how bytes reach the socket.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf import empty_pb2

from addlower.api import mount_pb2
from addlower.api import snapshots_pb2 as pb
from addlower.core.codes import Code
from addlower.core.errors import ResourceExhausted, SnapshotError, status_code
from addlower.core.model import Info
from addlower.core.mounts import Mount
from addlower.engine import wire
from addlower.engine.snapshotter import Snapshotter
from addlower.server.rpc import Route

log = logging.getLogger(__name__)

SERVICE = "containerd.services.snapshots.v1.Snapshots"

# containerd's own service sends List results in batches of this many.
LIST_BATCH = 100


class InfoCache:
    """Each Info's serialized form, as field 1 of a message (Stat and List replies carry
    `Info info = 1`), kept as long as the Info itself lives."""

    def __init__(self) -> None:
        self._fields: weakref.WeakKeyDictionary[Info, bytes] = weakref.WeakKeyDictionary()

    def field(self, info: Info) -> bytes:
        data = self._fields.get(info)
        if data is None:
            data = self._fields[info] = wire.encode_field(info)
        return data


def mounts_to_pb(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options) for m in mounts]


class SnapshotsService:
    def __init__(self, snapshotter: Snapshotter):
        self.sn = snapshotter
        self.infos = InfoCache()
        self.plain_mounts: weakref.WeakKeyDictionary[Info, bytes] = weakref.WeakKeyDictionary()

    def map_error(self, exc: BaseException) -> tuple[Code, str]:
        """The gRPC status (code number, message) for an exception raised by a handler: a full
        filesystem as RESOURCE_EXHAUSTED naming it, the unexpected with a traceback."""
        exc = self.sn.explain(exc)
        if not isinstance(exc, SnapshotError):
            log.error("call failed unexpectedly", exc_info=exc)
        elif isinstance(exc, ResourceExhausted):
            log.warning("call refused: %s", exc)
        return status_code(exc), str(exc)

    def Prepare(self, request: pb.PrepareSnapshotRequest) -> pb.PrepareSnapshotResponse:
        mounts = self.sn.prepare(request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    def View(self, request: pb.ViewSnapshotRequest) -> pb.ViewSnapshotResponse:
        mounts = self.sn.view(request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    def Mounts(self, request: pb.MountsRequest) -> pb.MountsResponse | bytes:
        """Serialized once for a snapshot whose mounts follow from the store alone (kept as long
        as its Info lives); computed each time for one with extra lowers, which are checked again."""
        info = self.sn.plain(request.key)
        data = self.plain_mounts.get(info) if info is not None else None
        if data is None:
            mounts = self.sn.mounts(request.key)
            reply = pb.MountsResponse(mounts=mounts_to_pb(mounts))
            if info is None:
                return reply
            data = self.plain_mounts[info] = reply.SerializeToString()
        return data

    def Commit(self, request: pb.CommitSnapshotRequest) -> empty_pb2.Empty:
        self.sn.commit(request.name, request.key, dict(request.labels), request.parent)
        return empty_pb2.Empty()

    def Remove(self, request: pb.RemoveSnapshotRequest) -> empty_pb2.Empty:
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    def Stat(self, request: pb.StatSnapshotRequest) -> bytes:
        """A serialized StatSnapshotResponse (CRI stats every snapshot every 10 s)."""
        return self.infos.field(self.sn.stat(request.key))

    def Update(self, request: pb.UpdateSnapshotRequest) -> pb.UpdateSnapshotResponse:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self.sn.update(request.info.name, dict(request.info.labels), paths)
        return pb.UpdateSnapshotResponse(info=wire.info_to_pb(info))

    def List(self, request: pb.ListSnapshotsRequest) -> Iterator[bytes]:
        """Serialized ListSnapshotsResponses of up to LIST_BATCH infos each, made one batch at a
        time as the transport asks for the next (a bad filter is refused at once)."""
        infos = self.sn.list(list(request.filters))
        return iter(lambda: b"".join(itertools.islice(infos, LIST_BATCH)), b"")

    def Usage(self, request: pb.UsageRequest) -> pb.UsageResponse:
        usage = self.sn.usage(request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    # --- where each call runs, decided from its request before it starts ----------------------

    def creating(self, request: Any) -> str | None:
        """Prepare and View: in the blocking pool when they walk host dirs (a filesystem under an
        allowed root may hang: it stalls only them), else on the loop."""
        return BLOCKING if self.sn.create_opens_dirs(request.key, request.labels) else None

    def mounting(self, request: pb.MountsRequest) -> str | None:
        """Mounts: a pod's container may wait for containerd (its own pool: a slow containerd must
        not starve Usage or Remove), host dirs are walked in the blocking pool, the rest (most
        calls, cached) on the loop."""
        walks, asks = self.sn.mounts_work(request.key)
        return KUBERNETES if asks else BLOCKING if walks else None

    def removing(self, request: pb.RemoveSnapshotRequest) -> str | None:
        """Remove: in the blocking pool when it walks a tree (a synchronous remove deletes the
        dir; a job's writes to a cache are checked as they are promoted), else on the loop."""
        return BLOCKING if self.sn.remove_walks(request.key) else None

    def counting(self, request: pb.UsageRequest) -> str | None:
        """Usage: an active snapshot's tree is counted in the blocking pool; the rest is stored."""
        return BLOCKING if self.sn.walks_upper(request.key) else None

    def Cleanup(self, request: pb.CleanupRequest) -> empty_pb2.Empty:
        removed = self.sn.cleanup()
        if removed:
            log.info("cleanup removed %d directories", len(removed))
        return empty_pb2.Empty()


_key: Callable[[Any], str] = lambda r: r.key  # noqa: E731

BLOCKING = "blocking"  # the pool for tree walks and deletions
KUBERNETES = "kubernetes"  # the pool for Mounts calls that may wait for containerd (its own: a slow
#                            containerd must not starve Usage or Remove)


@dataclass(frozen=True)
class Method:
    """One Snapshots method: its request type, where it runs (a pool, or the name of the service's
    method that decides it from the request), whether it streams, what to log."""

    request: Any
    pool: str | None = None  # None: on the event loop
    streams: bool = False
    describe: Callable[[Any], str] = _key
    place: str | None = None  # SnapshotsService.<place>(request) -> pool or None


METHODS: dict[str, Method] = {
    "Prepare": Method(pb.PrepareSnapshotRequest, place="creating"),
    "View": Method(pb.ViewSnapshotRequest, place="creating"),
    "Mounts": Method(pb.MountsRequest, place="mounting"),
    "Commit": Method(pb.CommitSnapshotRequest, BLOCKING),  # counts the upper dir's blocks and inodes
    "Remove": Method(pb.RemoveSnapshotRequest, place="removing"),
    "Stat": Method(pb.StatSnapshotRequest),
    "Update": Method(pb.UpdateSnapshotRequest, describe=lambda r: r.info.name),
    # On the loop, lazily: each batch is framed only once flow control lets it go out.
    "List": Method(pb.ListSnapshotsRequest, streams=True, describe=lambda r: ",".join(r.filters)),
    "Usage": Method(pb.UsageRequest, place="counting"),
    "Cleanup": Method(pb.CleanupRequest, BLOCKING, describe=lambda r: ""),
}


def routes(service: SnapshotsService) -> dict[str, Route]:
    return {
        f"/{SERVICE}/{name}": Route(
            request=m.request,
            handler=getattr(service, name),
            streaming=m.streams,
            pool=m.pool,
            describe=m.describe,
            place=getattr(service, m.place) if m.place else None,
        )
        for name, m in METHODS.items()
    }
