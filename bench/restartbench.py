#!/usr/bin/env python3
"""restartbench: container starts that fail while the snapshotter restarts, with and without
systemd's socket activation, in one run.

A private containerd (perfbench's) with our daemon as its proxy snapshotter; a thread runs
`ctr run --rm` of busybox `true` one after the other, while the daemon is restarted R times
(--restarts, default 5), a second apart: `restart` stops it with SIGTERM and starts it again
(what `systemctl restart` does), `kill` sends SIGKILL and starts it again (a crash that systemd
restarts). `own-socket`: the daemon makes its socket itself, as when started by hand. `activated`:
the bench holds the listening socket as a .socket unit does and hands it over as fd 3 with
LISTEN_FDS and LISTEN_PID (addlower.dev's SnapshotterProcess(listening=...)), so it outlives
every daemon. Printed per mode and way: containers run, failed, and the first error.

Needs root, containerd, ctr and runc. Usage: python3 bench/restartbench.py [--restarts R]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perfbench  # noqa: E402

from addlower.core.config import PLUGIN_NAME  # noqa: E402
from addlower.dev import ociimage  # noqa: E402
from addlower.dev.devcontainerd import Binaries, PrivateContainerd, SnapshotterProcess  # noqa: E402

NS = "restartbench"


def turn(work: Path, image: ociimage.OciImage, activated: bool, way: str, restarts: int) -> tuple[int, list[str]]:
    root = work / "snapshotter"
    held = None
    if activated:
        root.mkdir(mode=0o700, parents=True)
        held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.bind(str(root / "grpc.socks"))
        held.listen(128)
    daemon = SnapshotterProcess(root, listening=held).start()
    failed: list[str] = []
    runs = [0]
    try:
        with PrivateContainerd(
            work / "containerd", proxy_plugins={PLUGIN_NAME: daemon.socket}, binaries=Binaries()
        ) as c:
            c.import_image(image.path, NS, PLUGIN_NAME)
            done = threading.Event()

            def loop() -> None:
                while not done.is_set():
                    runs[0] += 1
                    r = c.run(image.ref, f"r{runs[0]}", "true", namespace=NS, snapshotter=PLUGIN_NAME, check=False)
                    if r.returncode != 0:
                        failed.append((r.stderr.strip().splitlines() or ["?"])[-1])

            worker = threading.Thread(target=loop, daemon=True)
            worker.start()
            for _ in range(restarts):
                time.sleep(1.0)
                daemon.stop(signal.SIGTERM if way == "restart" else signal.SIGKILL)
                daemon.start()
            time.sleep(2.0)
            done.set()
            worker.join()
    finally:
        daemon.stop()
        if held is not None:
            held.close()
    return runs[0], failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="restartbench-", dir="/tmp"))
    image = ociimage.build_busybox_image(work / "busybox.tar")
    lines = [f"restartbench: ctr run --rm in a loop across {args.restarts} daemon restarts, a second apart"]
    for activated in (False, True):
        for way in ("restart", "kill"):
            name = f"{'activated' if activated else 'own-socket'}-{way}"
            runs, failed = turn(work / name, image, activated, way, args.restarts)
            first = failed[0][:100] if failed else "-"
            lines.append(f"{name:<20} {runs:>4} containers, {len(failed):>3} failed   first error: {first}")
            perfbench.log(lines[-1])
    print("\n".join(lines))
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
