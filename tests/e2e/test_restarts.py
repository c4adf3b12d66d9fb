"""Restarting the snapshotter under a busy containerd: with systemd's socket activation the
listening socket outlives the daemon (here the test holds it, as systemd does, and hands it over
as fd 3 with LISTEN_FDS and LISTEN_PID), so containerd's calls wait in its backlog while the
daemon restarts instead of failing. Without it, the same restart fails container starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from addlower.core.config import PLUGIN_NAME
from addlower.dev.devcontainerd import Binaries
from addlower.dev.ociimage import OciImage
from tests.support.daemon import Daemon

from .conftest import make_target, private_containerd

pytestmark = pytest.mark.e2e

NS = "restarts"
RESTARTS = 3


def held_socket(root: Path) -> socket.socket:
    """The daemon's socket as a .socket unit would hold it: bound, listening, 0660."""
    root.mkdir(mode=0o700, parents=True)
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.bind(str(root / "grpc.socks"))
    held.listen(128)
    os.chmod(root / "grpc.socks", 0o660)
    return held


@contextmanager
def busy(containerd_run: Callable[[str], subprocess.CompletedProcess[str]]) -> Iterator[list[str]]:
    """`ctr run --rm` one container after the other for the duration of the block; the errors of
    those that failed, once the block ends."""
    failed: list[str] = []
    done = threading.Event()
    runs = [0]

    def loop() -> None:
        while not done.is_set():
            runs[0] += 1
            result = containerd_run(f"r{runs[0]}")
            if result.returncode != 0:
                failed.append(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "?")

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    try:
        yield failed
    finally:
        done.set()
        worker.join(timeout=120)
    assert runs[0] > RESTARTS * 2, f"only {runs[0]} containers ran: the loop did not keep containerd busy"


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["restart", "crash"])
def test_no_container_start_fails_across_a_socket_activated_restart(
    tmp_path_factory: pytest.TempPathFactory, busybox_image: OciImage, binaries: Binaries, how: signal.Signals
):
    """SIGTERM and a start: `systemctl restart`. SIGKILL and a start at once: a crash, restarted
    after the unit's RestartSec=100ms."""
    work = tmp_path_factory.mktemp("restarts")
    root = work / "snapshotter"
    held = held_socket(root)
    daemon = Daemon(root=root, listening=held).start()
    try:
        with private_containerd(work / "containerd", root, binaries) as containerd:
            make_target(containerd, daemon).import_image(busybox_image, NS)

            def run(cid: str) -> subprocess.CompletedProcess[str]:
                return containerd.run(
                    busybox_image.ref, cid, "true", namespace=NS, snapshotter=PLUGIN_NAME, check=False, timeout=60
                )

            with busy(run) as failed:
                for _ in range(RESTARTS):
                    time.sleep(1.0)
                    daemon.stop(how)
                    daemon.start()
                time.sleep(1.0)
        if how == signal.SIGTERM:  # a graceful stop lets the calls in flight finish
            assert failed == [], f"{len(failed)} container starts failed across {RESTARTS} restarts: {failed[:3]}"
        else:  # a crash loses the calls in flight at that instant, and no more: none waits for a daemon in vain
            assert len(failed) <= RESTARTS, f"{len(failed)} container starts failed across {RESTARTS} crashes"
            waited = [f for f in failed if "connection refused" in f or "handshake" in f]
            assert waited == [], failed  # a call that found no daemon (the own-socket failures)
        assert daemon.log().count("socket_from=systemd") == RESTARTS + 1
    finally:
        daemon.stop()
        held.close()
