"""Our snapshotter daemon as a real process, for integration and e2e tests."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc

from addlower.dev.devcontainerd import SnapshotterProcess


class Daemon(SnapshotterProcess):
    """SnapshotterProcess plus a gRPC channel to it."""

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket}")

    def hup(self, until: str) -> None:
        """Send SIGHUP and wait for the log line that says it was handled."""
        seen = self.log().count(until)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.log().count(until) == seen:
            assert time.monotonic() < deadline, self.log()[-2000:]
            assert self.proc.poll() is None, self.log()[-2000:]
            time.sleep(0.05)


def config_args(path: Path, toml: str) -> list[str]:
    """Daemon arguments for a config file at `path` holding `toml`."""
    path.write_text(toml)
    return ["--config", str(path)]


def allowing(path: Path, *roots: Path | str, toml: str = "") -> list[str]:
    """Daemon arguments for a config file at `path` whose lowers.allowed_roots are `roots`."""
    quoted = ", ".join(f'"{r}"' for r in roots)
    return config_args(path, f"[lowers]\nallowed_roots = [{quoted}]\n{toml}")
