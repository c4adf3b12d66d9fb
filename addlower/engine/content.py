"""Writing a blob into containerd's content store, as containerd's own content writer does through
its Content API: a Write stream (STAT, WRITE at offsets, COMMIT with the expected digest and the
labels), in the caller's namespace. containerd does not pass a client's lease on to a proxy
plugin, so without one the blob is written under a lease of our own that expires
(containerd.io/gc.expire): its caller has that long to reference it (an image, a gc root) before
containerd's garbage collector may take it. I/O at the edge: grpcio, loaded when first used.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

from addlower.core.errors import FailedPrecondition, Unavailable

UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
EXPIRE_LABEL = "containerd.io/gc.expire"
LEASE_SECONDS = 3600  # how long a blob written without the caller's lease is kept unreferenced
CHUNK = 1 << 20  # containerd accepts messages up to 16 MiB
NAMESPACE_HEADER, LEASE_HEADER = "containerd-namespace", "containerd-lease"


def unique_ref() -> str:
    """A content ingest ref as containerd's differ makes one: nanoseconds and 3 random bytes."""
    return f"{time.time_ns()}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


class ContentStore:
    """containerd's content store at `address` (connects on first use)."""

    def __init__(self, address: str, timeout: float = 60.0):
        self.address = address
        self.timeout = timeout
        self._channel: Any = None

    def _stubs(self) -> tuple[Any, Any]:
        import grpc

        from addlower.api import content_pb2_grpc, leases_pb2_grpc

        if self._channel is None:
            self._channel = grpc.insecure_channel(
                f"unix://{self.address}",
                options=[("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)],
            )
        return content_pb2_grpc.ContentStub(self._channel), leases_pb2_grpc.LeasesStub(self._channel)

    def put(
        self,
        blob: BinaryIO,
        digest: str,
        size: int,
        labels: Mapping[str, str],
        namespace: str,
        lease: str | None,
        ref: str = "",
    ) -> None:
        """Write `blob` (at its start, `size` bytes, `digest`) with `labels`; a blob that is there
        already keeps its labels and gets the uncompressed one if it lacks it."""
        import grpc

        from addlower.api import content_pb2 as pb
        from addlower.api import leases_pb2

        content, leases = self._stubs()
        try:
            if not lease:
                expires = datetime.now(UTC) + timedelta(seconds=LEASE_SECONDS)
                lease = f"addlower-differ-{unique_ref()}"
                leases.Create(
                    leases_pb2.CreateRequest(id=lease, labels={EXPIRE_LABEL: expires.strftime("%Y-%m-%dT%H:%M:%SZ")}),
                    timeout=self.timeout,
                    metadata=[(NAMESPACE_HEADER, namespace)],
                )
            metadata = [(NAMESPACE_HEADER, namespace), (LEASE_HEADER, lease)]

            def requests() -> Iterator[Any]:
                yield pb.WriteContentRequest(action=pb.STAT, ref=ref or unique_ref())
                offset = 0
                while offset < size:
                    data = blob.read(min(CHUNK, size - offset))
                    if not data:
                        raise OSError(f"the layer file ended at {offset} of {size} bytes")
                    yield pb.WriteContentRequest(action=pb.WRITE, offset=offset, data=data)
                    offset += len(data)
                yield pb.WriteContentRequest(
                    action=pb.COMMIT, offset=offset, total=size, expected=digest, labels=labels
                )

            try:
                for _ in content.Write(requests(), timeout=self.timeout, metadata=metadata):
                    pass
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                self._label_existing(content, digest, labels, metadata)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"containerd's content store at {self.address}: {exc.details()}") from None
            raise FailedPrecondition(
                f"writing {digest} to containerd's content store: {exc.code().name}: {exc.details()}"
            ) from None

    def exists(self, digest: str, namespace: str) -> bool:
        """Whether the blob is in the content store (of `namespace`)."""
        import grpc

        from addlower.api import content_pb2 as pb

        content, _ = self._stubs()
        try:
            content.Info(pb.InfoRequest(digest=digest), timeout=self.timeout, metadata=[(NAMESPACE_HEADER, namespace)])
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise Unavailable(f"containerd's content store at {self.address}: {exc.details()}") from None
        return True

    def read(self, digest: str, namespace: str, limit: int) -> bytes:
        """A whole blob of at most `limit` bytes (a manifest, a config: what a peer wrote)."""
        import grpc

        from addlower.api import content_pb2 as pb

        content, _ = self._stubs()
        metadata = [(NAMESPACE_HEADER, namespace)]
        try:
            size = content.Info(pb.InfoRequest(digest=digest), timeout=self.timeout, metadata=metadata).info.size
            if size > limit:
                raise FailedPrecondition(f"blob {digest} is {size} bytes, more than {limit}")
            chunks = content.Read(pb.ReadContentRequest(digest=digest), timeout=self.timeout, metadata=metadata)
            data = b"".join(chunk.data for chunk in chunks)
        except grpc.RpcError as exc:
            raise FailedPrecondition(f"reading {digest} from containerd: {exc.code().name}: {exc.details()}") from None
        if len(data) != size:
            raise FailedPrecondition(f"blob {digest}: read {len(data)} of its {size} bytes")
        return data

    @staticmethod
    def _label_existing(content: Any, digest: str, labels: Mapping[str, str], metadata: list[tuple[str, str]]) -> None:
        """As containerd's differ: an existing blob gets the uncompressed label if it has none."""
        from google.protobuf import field_mask_pb2

        from addlower.api import content_pb2 as pb

        wanted = labels.get(UNCOMPRESSED_LABEL)
        info = content.Info(pb.InfoRequest(digest=digest), metadata=metadata).info
        if wanted and UNCOMPRESSED_LABEL not in info.labels:
            info.labels[UNCOMPRESSED_LABEL] = wanted
            content.Update(
                pb.UpdateRequest(
                    info=info, update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{UNCOMPRESSED_LABEL}"])
                ),
                metadata=metadata,
            )
