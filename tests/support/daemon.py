"""Start and stop the snapshotter daemon as a real process, for integration and e2e tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from addlower.api import snapshots_pb2_grpc


@dataclass
class Daemon:
    """One `overlay-custom-add-lower-snapshotter` process with its own root dir."""

    root: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def socket(self) -> Path:
        return self.root / "grpc.socks"

    def start(self, timeout: float = 15.0) -> "Daemon":
        self.log_path = self.root.parent / f"{self.root.name}.log"
        log = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", "addlower.cli", "--root-dir", str(self.root), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists():
                try:
                    with grpc.insecure_channel(f"unix://{self.socket}") as ch:
                        grpc.channel_ready_future(ch).result(timeout=0.5)
                    return self
                except grpc.FutureTimeoutError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not listen on {self.socket}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the daemon and wait; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket}")

    def stub(self, channel: grpc.Channel) -> snapshots_pb2_grpc.SnapshotsStub:
        return snapshots_pb2_grpc.SnapshotsStub(channel)
