"""Blobs streamed into containerd's content store as they are made (a layer of the differ or of a
cache push): what containerd holds is what was written, a producer's failure leaves nothing
behind, and a containerd that stops taking data fails the write instead of hanging it."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from addlower.core.errors import Unavailable
from addlower.dev.devcontainerd import Binaries, PrivateContainerd
from addlower.engine.content import CHUNK, QUEUED, UNCOMPRESSED_LABEL, Blob, BlobWriter, ContentStore

PIECE = os.urandom(10_000)  # about a small file's tar entry


@pytest.fixture
def containerd(tmp_path: Path, binaries: Binaries) -> Iterator[PrivateContainerd]:
    with PrivateContainerd(tmp_path / "c", binaries=binaries) as c:
        yield c


def pieces(count: int) -> list[bytes]:
    return [PIECE[:-4] + i.to_bytes(4, "big") for i in range(count)]


def blob_of(data: list[bytes], labels: dict[str, str] | None = None) -> Blob:
    whole = b"".join(data)
    return Blob(f"sha256:{hashlib.sha256(whole).hexdigest()}", len(whole), labels or {})


def content_get(c: PrivateContainerd, digest: str) -> bytes:
    cmd = [c.binaries.command("ctr"), "--address", str(c.address), "-n", "ns", "content", "get", digest]
    return subprocess.run(cmd, capture_output=True, check=True, env=c.binaries.env(), timeout=60).stdout


def active_ingests(c: PrivateContainerd) -> list[str]:
    return c.ctr("content", "active", namespace="ns").stdout.splitlines()[1:]


def test_a_blob_written_in_pieces_is_committed_whole_with_its_labels(containerd: PrivateContainerd):
    data = pieces(500)  # 5 MB: several messages
    labels = {UNCOMPRESSED_LABEL: "sha256:" + "a" * 64}

    def produce(out: BlobWriter) -> Blob:
        for piece in data:
            out.write(piece)
        return blob_of(data, labels)

    store = ContentStore(str(containerd.address))
    blob = store.write(produce, "ns", None)
    assert content_get(containerd, blob.digest) == b"".join(data)
    assert f"{UNCOMPRESSED_LABEL}=sha256:{'a' * 64}" in containerd.ctr("content", "ls", namespace="ns").stdout
    assert store.write(produce, "ns", None) == blob  # there already: the same answer, no error


def test_a_producers_failure_comes_out_unchanged_and_leaves_no_ingest(containerd: PrivateContainerd):
    data = pieces(2000)

    def produce(out: BlobWriter) -> Blob:
        for n, piece in enumerate(data):
            if n == 1500:
                raise FileNotFoundError("a file of the layer went away")
            out.write(piece)
        return blob_of(data)

    with pytest.raises(FileNotFoundError, match="went away"):
        ContentStore(str(containerd.address)).write(produce, "ns", None)
    assert active_ingests(containerd) == []
    assert blob_of(data).digest not in containerd.ctr("content", "ls", namespace="ns").stdout


def test_a_containerd_that_stops_taking_data_fails_the_write_and_stops_the_producer(containerd: PrivateContainerd):
    assert containerd.proc is not None
    written = 0

    def produce(out: BlobWriter) -> Blob:
        nonlocal written
        for n, piece in enumerate(pieces(20_000)):  # 200 MB, far more than is queued
            if n == 100:
                os.kill(containerd.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
            out.write(piece)
            written += len(piece)
        raise AssertionError("the producer ran to its end")

    try:
        with pytest.raises(Unavailable, match="took nothing for 3"):
            ContentStore(str(containerd.address), timeout=3).write(produce, "ns", None)
    finally:
        os.kill(containerd.proc.pid, signal.SIGCONT)
    # What containerd had taken, what the socket buffers held, and the queue: far from the end.
    assert written < 100 * len(PIECE) + (QUEUED + 16) * CHUNK


def test_a_containerd_that_dies_fails_the_write_as_unavailable(containerd: PrivateContainerd):
    assert containerd.proc is not None

    def produce(out: BlobWriter) -> Blob:
        for n, piece in enumerate(pieces(20_000)):
            if n == 100:
                containerd.proc.kill()  # type: ignore[union-attr]
            out.write(piece)
        raise AssertionError("the producer ran to its end")

    with pytest.raises(Unavailable, match="content store"):
        ContentStore(str(containerd.address)).write(produce, "ns", None)
