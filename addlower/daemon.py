"""The daemon: owns the socket, the gRPC server, signals and the start-up checks.

Turns a DaemonConfig into a serving process and back into exit codes. Must not know snapshot
rules (snapshotter.py) or flag parsing (cli.py).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from . import __version__
from .api import snapshots_pb2_grpc
from .service import SnapshotsService
from .snapshotter import Options, Snapshotter

log = logging.getLogger("addlower")

DEFAULT_ROOT = Path("/var/lib/containerd/cn.rectcircle.containerd.overlay-custom-add-lower-snapshotter")
SOCKET_NAME = "grpc.socks"
SOCKET_MODE = 0o660
STOP_GRACE_SECONDS = 30.0


class StartupError(Exception):
    """The daemon cannot start; the message says why and is shown to the operator."""


@dataclass(frozen=True)
class DaemonConfig:
    root: Path = DEFAULT_ROOT
    address: Path | None = None  # default: <root>/grpc.socks
    options: Options = Options()
    workers: int = 16

    @property
    def socket_path(self) -> Path:
        return self.address or self.root / SOCKET_NAME


def _claim_socket(path: Path) -> None:
    """Remove a stale socket file; refuse when a live process still answers on it."""
    if not os.path.lexists(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise StartupError(f"cannot listen on {path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("removed stale socket %s", path)
        return
    finally:
        probe.close()
    raise StartupError(f"cannot listen on {path}: another process is serving on it")


class Daemon:
    """A started snapshotter service; stop() drains in-flight calls."""

    def __init__(self, config: DaemonConfig):
        self.config = config
        try:
            self.snapshotter = Snapshotter(config.root, config.options)
        except (OSError, RuntimeError) as exc:
            raise StartupError(f"root {config.root} is unusable: {exc}") from exc
        path = config.socket_path
        try:
            _claim_socket(path)
        except OSError as exc:
            raise StartupError(f"cannot listen on {path}: {exc}") from exc
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers))
        snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(self.snapshotter), self.server)
        try:
            self.server.add_insecure_port(f"unix:{path}")
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {path}: {exc}") from exc
        self.server.start()
        os.chmod(path, SOCKET_MODE)
        opts = config.options
        log.info(
            "addlower %s serving root=%s socket=%s async_remove=%s upperdir_label=%s mount_options=%s",
            __version__, config.root, path, opts.async_remove, opts.upperdir_label,
            ",".join(self.snapshotter.overlay_options) or "-",
        )

    def stop(self) -> None:
        self.server.stop(STOP_GRACE_SECONDS).wait()
        self.snapshotter.close()
        try:
            os.unlink(self.config.socket_path)
        except FileNotFoundError:
            pass


def run(config: DaemonConfig) -> int:
    """Serve until SIGTERM or SIGINT; returns the process exit code."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.set())
    try:
        daemon = Daemon(config)
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    # A signal may land on a gRPC worker thread; Python runs the handler only when the main thread
    # wakes up, so wake it up regularly instead of blocking for good.
    while not stopping.wait(0.2):
        pass
    log.info("shutting down: no new calls, waiting up to %.0fs for in-flight ones", STOP_GRACE_SECONDS)
    daemon.stop()
    log.info("stopped")
    return 0
