"""containerd's Diff API (containerd.services.diff.v1.Diff) for our snapshots, as routes for
grpcserver: the differ containerd asks first (a diff proxy plugin on this socket), so a commit of
a container (ctr snapshots diff, nerdctl commit, BuildKit's containerd worker) holds what the
container changed and never its extra lowers or targets.

Diff (containerd's Compare) of one of our active snapshots against its parent is written from the
snapshot's own dir (addlower.engine.differ) into containerd's content store
(addlower.engine.content), in the caller's namespace; anything else answers UNIMPLEMENTED, and
containerd's diff service asks its next differ (the walking one). Apply is never ours. A thin
layer: protobuf to plain values and back.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from addlower.api import descriptor_pb2
from addlower.api import diff_pb2 as pb
from addlower.core.errors import FailedPrecondition, Unimplemented
from addlower.core.logformat import fields
from addlower.core.mounts import Mount
from addlower.engine.content import (
    LEASE_HEADER,
    NAMESPACE_HEADER,
    UNCOMPRESSED_LABEL,
    Blob,
    BlobWriter,
    ContentStore,
)
from addlower.engine.differ import LAYER_GZIP, MEDIA_TYPES, write_layer
from addlower.engine.snapshotter import Snapshotter
from addlower.server.rpc import Route, call_metadata

log = logging.getLogger(__name__)

SERVICE = "containerd.services.diff.v1.Diff"
# containerd 2.x writes whiteouts with mtime 0; 1.7 with SOURCE_DATE_EPOCH, else the time of the diff.
ZERO_WHITEOUTS_FROM = (2, 0)


def _mounts(mounts: Any) -> list[Mount]:
    return [Mount(m.type, m.source, tuple(m.options), m.target) for m in mounts]


class DiffService:
    def __init__(self, snapshotter: Snapshotter, content: ContentStore):
        self.sn = snapshotter
        self.content = content

    def Diff(self, request: pb.DiffRequest) -> pb.DiffResponse:
        found = self.sn.diff_layers(_mounts(request.left), _mounts(request.right))
        if found is None:
            raise Unimplemented(
                "not an active snapshot of this snapshotter against its parent: the next differ compares it"
            )
        media_type = request.media_type or LAYER_GZIP
        if media_type not in MEDIA_TYPES:
            raise FailedPrecondition(
                f"media type {media_type!r}: this snapshotter's differ writes "
                f"{' and '.join(MEDIA_TYPES)} (another differ would put the extra lowers "
                "in the layer)"
            )
        layers, key = found
        metadata = call_metadata()
        # containerd 2.x passes the caller's namespace on; 1.7 does not, and containerd keys a
        # proxy snapshotter's snapshots <namespace>/<id>/<name>.
        namespace = metadata.get(NAMESPACE_HEADER) or key.partition("/")[0]
        epoch = request.source_date_epoch.ToNanoseconds() if request.HasField("source_date_epoch") else None
        whiteout_time = self._whiteout_time(epoch)

        def produce(out: BlobWriter) -> Blob:
            layer = write_layer(layers, out, media_type, whiteout_time, epoch)
            labels = dict(request.labels)
            if MEDIA_TYPES[media_type]:
                labels[UNCOMPRESSED_LABEL] = layer.diff_id
            return Blob(layer.digest, layer.size, labels)

        layer = self.content.write(produce, namespace, metadata.get(LEASE_HEADER), request.ref)
        log.info(
            "wrote a layer from the snapshot's own dir",
            extra=fields(
                upper=layers.upper.decode(errors="replace"), digest=layer.digest, size=layer.size, namespace=namespace
            ),
        )
        return pb.DiffResponse(
            diff=descriptor_pb2.Descriptor(media_type=media_type, digest=layer.digest, size=layer.size)
        )

    def _whiteout_time(self, epoch: int | None) -> int:
        version = self.sn.targets.version()
        if version is not None and version[:2] >= ZERO_WHITEOUTS_FROM:
            return 0
        return round((epoch if epoch is not None else time.time_ns()) / 10**9)

    def Apply(self, request: pb.ApplyRequest) -> pb.ApplyResponse:
        raise Unimplemented("this snapshotter's differ does not apply layers: the next differ does")


def routes(service: DiffService, blocking: str) -> dict[str, Route]:
    """Diff walks and uploads (in the `blocking` pool); Apply answers at once."""
    return {
        f"/{SERVICE}/Diff": Route(request=pb.DiffRequest, handler=service.Diff, pool=blocking),
        f"/{SERVICE}/Apply": Route(request=pb.ApplyRequest, handler=service.Apply),
    }
