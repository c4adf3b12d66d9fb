"""Our snapshotter daemon as a real process, for integration and e2e tests."""

from __future__ import annotations

from pathlib import Path

import grpc

from addlower.dev.devcontainerd import SnapshotterProcess


class Daemon(SnapshotterProcess):
    """SnapshotterProcess plus a gRPC channel to it."""

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket}")


def config_args(path: Path, toml: str) -> list[str]:
    """Daemon arguments for a config file at `path` holding `toml`."""
    path.write_text(toml)
    return ["--config", str(path)]


def allowing(path: Path, *roots: Path | str, toml: str = "") -> list[str]:
    """Daemon arguments for a config file at `path` whose lowers.allowed_roots are `roots`."""
    quoted = ", ".join(f'"{r}"' for r in roots)
    return config_args(path, f"[lowers]\nallowed_roots = [{quoted}]\n{toml}")
