"""Writing a blob into containerd's content store, as containerd's own content writer does through
its Content API: a Write stream (STAT, WRITE at offsets, COMMIT with the expected digest and the
labels), in the caller's namespace. A layer streams in as it is made (its digest is known only at
the end, which is when the COMMIT needs it): no copy on disk, and the walk and containerd's
ingest run on two cores. containerd does not pass a client's lease on to a proxy
plugin, so without one the blob is written under a lease of our own that expires
(containerd.io/gc.expire): its caller has that long to reference it (an image, a gc root) before
containerd's garbage collector may take it. I/O at the edge: grpcio, loaded when first used.
"""

from __future__ import annotations

import base64
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from addlower.core.errors import FailedPrecondition, Unavailable

UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
EXPIRE_LABEL = "containerd.io/gc.expire"
LEASE_SECONDS = 3600  # how long a blob written without the caller's lease is kept unreferenced
CHUNK = 1 << 20  # containerd accepts messages up to 16 MiB
QUEUED = 8  # chunks a producer may run ahead of containerd
NAMESPACE_HEADER, LEASE_HEADER = "containerd-namespace", "containerd-lease"


def unique_ref() -> str:
    """A content ingest ref as containerd's differ makes one: nanoseconds and 3 random bytes."""
    return f"{time.time_ns()}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


class Stalled(Exception):
    """containerd stopped taking a blob: raised into its producer, which stops."""


@dataclass(frozen=True)
class Blob:
    """What a producer wrote: the digest and size containerd checks at the commit, and the labels
    the blob gets."""

    digest: str
    size: int
    labels: Mapping[str, str]


class BlobWriter:
    """The file a producer writes a blob into: bytes gathered into CHUNK-sized messages, at most
    QUEUED of them ahead of containerd (bounded memory), taken by the Write stream's thread."""

    _END = b""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._queue: queue.Queue[bytes] = queue.Queue(QUEUED)
        self._held: list[bytes] = []  # joined once into a message: a growing bytearray copies again and again
        self._size = 0
        self._closed = threading.Event()

    def write(self, data: bytes) -> int:
        self._held.append(data)
        self._size += len(data)
        if self._size >= CHUNK:
            self._send(b"".join(self._held))
            self._held.clear()
            self._size = 0
        return len(data)

    def finish(self) -> None:
        """All written: the rest, then the end (an empty message is the end, so none is sent)."""
        if self._size:
            self._send(b"".join(self._held))
        self._send(self._END)

    def close(self) -> None:
        """The stream ended (committed or failed): writes from now on raise Stalled, and a
        stream thread still waiting for data is let go."""
        self._closed.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(self._END)

    def _send(self, item: bytes) -> None:
        deadline = time.monotonic() + self.timeout
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                return
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        raise Stalled()

    def chunks(self) -> Iterator[bytes]:
        """The stream's side: messages until the end (or until the stream is closed)."""
        while (item := self._queue.get()) != self._END:
            yield item


class ContentStore:
    """containerd's content store at `address` (connects on first use)."""

    def __init__(self, address: str, timeout: float = 60.0):
        self.address = address
        self.timeout = timeout
        self._channel: Any = None

    def channel(self) -> Any:
        """The gRPC channel to containerd (made on first use), for its other services too."""
        import grpc

        if self._channel is None:
            self._channel = grpc.insecure_channel(
                f"unix://{self.address}",
                options=[("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)],
            )
        return self._channel

    def _stubs(self) -> tuple[Any, Any]:
        from addlower.api import content_pb2_grpc, leases_pb2_grpc

        return content_pb2_grpc.ContentStub(self.channel()), leases_pb2_grpc.LeasesStub(self.channel())

    def put(self, blob: bytes, digest: str, labels: Mapping[str, str], namespace: str, lease: str | None) -> None:
        """Write a small document (a config, a manifest) already in memory."""

        def produce(out: BlobWriter) -> Blob:
            out.write(blob)
            return Blob(digest, len(blob), labels)

        self.write(produce, namespace, lease)

    def write(self, produce: Callable[[BlobWriter], Blob], namespace: str, lease: str | None, ref: str = "") -> Blob:
        """Stream what `produce` writes into the content store as it writes it, then commit it
        with the digest, size and labels `produce` returns. A blob that is there already keeps its
        labels and gets the uncompressed one if it lacks it. `produce`'s own errors come out
        unchanged."""
        import grpc

        from addlower.api import content_pb2 as pb

        content, _ = self._stubs()
        metadata = [(NAMESPACE_HEADER, namespace), (LEASE_HEADER, lease or self._lease(namespace))]
        out = BlobWriter(self.timeout)
        made: list[Blob] = []
        ref = ref or unique_ref()

        def requests() -> Iterator[Any]:
            yield pb.WriteContentRequest(action=pb.STAT, ref=ref)
            offset = 0
            for data in out.chunks():
                yield pb.WriteContentRequest(action=pb.WRITE, offset=offset, data=data)
                offset += len(data)
            if made:  # else the producer failed and the call is cancelled: nothing is committed
                blob = made[0]
                yield pb.WriteContentRequest(
                    action=pb.COMMIT, offset=offset, total=blob.size, expected=blob.digest, labels=blob.labels
                )

        call = content.Write(requests(), metadata=metadata)  # no deadline: BlobWriter times out a stall
        failed: list[grpc.RpcError] = []

        def take() -> None:
            try:
                for _ in call:
                    pass
            except grpc.RpcError as exc:
                failed.append(exc)
            finally:
                out.close()

        taker = threading.Thread(target=take, name="content-write", daemon=True)
        taker.start()
        try:
            try:
                made.append(produce(out))
            except Stalled:
                raise
            except BaseException:
                call.cancel()
                out.close()
                taker.join(self.timeout)
                with contextlib.suppress(grpc.RpcError):  # what was written is no garbage to leave
                    content.Abort(pb.AbortRequest(ref=ref), timeout=self.timeout, metadata=metadata)
                raise
            out.finish()
        except Stalled:
            pass  # the stream ended early or stopped taking data: `failed` or the join says which
        taker.join(self.timeout)
        if taker.is_alive():
            call.cancel()
            raise Unavailable(f"containerd's content store at {self.address} took nothing for {self.timeout} s")
        what = f"writing {made[0].digest if made else 'a blob'} to containerd's content store"
        if not failed:
            return made[0]
        if not made or failed[0].code() != grpc.StatusCode.ALREADY_EXISTS:
            raise self._error(failed[0], what)
        try:
            self._label_existing(content, made[0].digest, made[0].labels, metadata)
        except grpc.RpcError as exc:
            raise self._error(exc, what) from None
        return made[0]

    def _error(self, exc: Any, what: str) -> Exception:
        """Our error for containerd's answer `exc` (a grpc.RpcError) to `what`."""
        import grpc

        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return Unavailable(f"containerd's content store at {self.address}: {exc.details()}")
        return FailedPrecondition(f"{what}: {exc.code().name}: {exc.details()}")

    def _lease(self, namespace: str) -> str:
        """A lease of our own that expires, for a blob written without the caller's."""
        import grpc

        from addlower.api import leases_pb2

        _, leases = self._stubs()
        expires = datetime.now(UTC) + timedelta(seconds=LEASE_SECONDS)
        lease = f"addlower-differ-{unique_ref()}"
        try:
            leases.Create(
                leases_pb2.CreateRequest(id=lease, labels={EXPIRE_LABEL: expires.strftime("%Y-%m-%dT%H:%M:%SZ")}),
                timeout=self.timeout,
                metadata=[(NAMESPACE_HEADER, namespace)],
            )
        except grpc.RpcError as exc:
            raise self._error(exc, f"creating lease {lease} in containerd") from None
        return lease

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
