"""`addlower demo`: the snapshotter with a private containerd beside it, ready for `ctr`.

Starts the daemon and a containerd that uses it as a proxy plugin, both confined to one work
directory, imports a locally built busybox image into the snapshotter, makes it the default
snapshotter of the namespace, runs one container, then keeps both running until Ctrl-C so the
operator can try `ctr` by hand. Nothing here is used by the daemon itself.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from .devcontainerd import PROXY_PLUGIN, PrivateContainerd
from .ociimage import BUSYBOX_REF, build_busybox_image

NAMESPACE = "default"


def _wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the snapshotter exited with code {proc.returncode}")
        if path.exists():
            with grpc.insecure_channel(f"unix://{path}") as ch:
                try:
                    grpc.channel_ready_future(ch).result(timeout=1)
                    return
                except grpc.FutureTimeoutError:
                    pass
        time.sleep(0.1)
    raise TimeoutError(f"the snapshotter did not listen on {path}")


def run_demo(workdir: Path, log_level: str, keep_running: bool) -> int:
    workdir = workdir.absolute()
    root = workdir / "snapshotter"
    socket = root / "grpc.socks"
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "snapshotter.log", "ab")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "addlower.cli", "--root-dir", str(root), "--log-level", log_level],
        stdout=log, stderr=subprocess.STDOUT,
    )
    containerd = PrivateContainerd(workdir / "containerd", proxy_plugins={PROXY_PLUGIN: socket})
    try:
        _wait_for_socket(socket, daemon)
        containerd.start()
        image = build_busybox_image(workdir / "busybox.tar")
        say(f"snapshotter  : {socket} (log {workdir / 'snapshotter.log'})")
        say(f"containerd   : {containerd.address} (log {containerd.log_path})")
        containerd.ctr("images", "import", "--snapshotter", PROXY_PLUGIN, str(image.path))
        containerd.ctr("namespaces", "create", NAMESPACE, check=False)
        containerd.ctr("namespaces", "label", NAMESPACE, f"containerd.io/defaults/snapshotter={PROXY_PLUGIN}")
        out = containerd.run(BUSYBOX_REF, "addlower-demo", "sh", "-c", "echo hello from a container on addlower; ls /",
                             snapshotter=PROXY_PLUGIN)
        say(out.stdout.rstrip())
        say(containerd.ctr("snapshots", "--snapshotter", PROXY_PLUGIN, "ls").stdout.rstrip())
        if not keep_running:
            return 0
        ctr = f"ctr --address {shlex.quote(str(containerd.address))}"
        say("\nTry it (Ctrl-C here stops everything):")
        say(f"  {ctr} run --rm -t --runc-root {containerd.runc_root} {BUSYBOX_REF} demo1 sh")
        say(f"  {ctr} snapshots --snapshotter {PROXY_PLUGIN} ls")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1):
            if daemon.poll() is not None:
                say(f"the snapshotter exited with code {daemon.returncode}")
                return 1
        return 0
    finally:
        containerd.stop()
        daemon.terminate()
        daemon.wait(timeout=30)
        log.close()


def say(text: str) -> None:
    print(text, flush=True)
