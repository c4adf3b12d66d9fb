"""Our snapshotter daemon as a real process, for integration and e2e tests."""

from __future__ import annotations

import grpc

from addlower.devcontainerd import SnapshotterProcess


class Daemon(SnapshotterProcess):
    """SnapshotterProcess plus a gRPC channel to it."""

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket}")
