"""`addlower demo`: the snapshotter with a private containerd beside it, ready for `ctr`.

Starts the daemon and a containerd that uses it as a proxy plugin, both confined to one work
directory (a new private one unless told which), imports a locally built busybox image into the
snapshotter, makes it the default snapshotter of the namespace, runs one container, then keeps
both running until Ctrl-C so the operator can try `ctr` by hand. Nothing here is used by the daemon itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import stat
import tempfile
import threading
from pathlib import Path

from addlower.core.config import PLUGIN_NAME
from addlower.core.labels import EXTRA_LOWERS_LABEL
from addlower.dev.devcontainerd import PrivateContainerd, SnapshotterProcess
from addlower.dev.ociimage import BUSYBOX_REF, build_busybox_image

NAMESPACE = "default"


class DemoError(Exception):
    """The demo cannot start; nothing was started."""


def private_workdir(workdir: Path | None) -> Path:
    """The demo's own dir: a new one made by mkdtemp (0700), or `workdir` if it is this user's and
    no one else may write in it, so another user's files or symlinks never become the
    snapshotter's root or containerd's state."""
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="addlower-demo-"))
    workdir = workdir.absolute()
    with contextlib.suppress(FileExistsError):
        workdir.mkdir(mode=0o700, parents=True)
    st = os.lstat(workdir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise DemoError(
            f"{workdir} is not a directory of yours that only you may write in: "
            "give another --workdir, or none for a new private one"
        )
    return workdir


def run_demo(workdir: Path | None, log_level: str, keep_running: bool) -> int:
    workdir = private_workdir(workdir)
    lower = workdir / "host-cache"
    config = workdir / "snapshotter.toml"  # the default policy allows no dir of ours: allow this one
    config.write_text(f"[lowers]\nallowed_roots = [{json.dumps(str(lower))}]\n")
    daemon = SnapshotterProcess(workdir / "snapshotter", args=["--log-level", log_level, "--config", str(config)])
    containerd = PrivateContainerd(workdir / "containerd", proxy_plugins={PLUGIN_NAME: daemon.socket})
    try:
        daemon.start()  # before containerd, which dials its proxy plugins as it starts
        containerd.start()
        image = build_busybox_image(workdir / "busybox.tar")
        say(f"snapshotter  : {daemon.socket} (log {daemon.log_path}, config {config})")
        say(f"containerd   : {containerd.address} (log {containerd.log_path})")
        containerd.import_image(image.path, NAMESPACE, PLUGIN_NAME)
        containerd.ctr("namespaces", "create", NAMESPACE, check=False)
        containerd.ctr("namespaces", "label", NAMESPACE, f"containerd.io/defaults/snapshotter={PLUGIN_NAME}")
        out = containerd.run(
            BUSYBOX_REF,
            "addlower-demo",
            "sh",
            "-c",
            "echo hello from a container on addlower; ls /",
            snapshotter=PLUGIN_NAME,
        )
        say(out.stdout.rstrip())
        lower.mkdir(exist_ok=True)
        (lower / "from-the-host.txt").write_text("a file in a host dir, seen copy-on-write\n")
        out = containerd.run(
            BUSYBOX_REF,
            "addlower-lower-demo",
            "sh",
            "-c",
            "cat /from-the-host.txt; echo changed > /from-the-host.txt; cat /from-the-host.txt",
            options=["--snapshotter-label", f"{EXTRA_LOWERS_LABEL}={lower}"],
        )
        say(f"\nwith --snapshotter-label {EXTRA_LOWERS_LABEL}={lower}:")
        say(out.stdout.rstrip())
        say(f"on the host, still: {(lower / 'from-the-host.txt').read_text().rstrip()}\n")
        say(containerd.ctr("snapshots", "--snapshotter", PLUGIN_NAME, "ls").stdout.rstrip())
        if not keep_running:
            return 0
        ctr = f"ctr --address {shlex.quote(str(containerd.address))}"
        say("\nTry it (Ctrl-C here stops everything):")
        say(f"  {ctr} run --rm -t --runc-root {containerd.runc_root} {BUSYBOX_REF} demo1 sh")
        say(
            f"  {ctr} run --rm -t --runc-root {containerd.runc_root} --snapshotter-label "
            f"{EXTRA_LOWERS_LABEL}={lower} {BUSYBOX_REF} demo2 sh"
        )
        say(f"  {ctr} snapshots --snapshotter {PLUGIN_NAME} ls")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        assert daemon.proc is not None
        while not stop.wait(1):
            if daemon.proc.poll() is not None:
                say(f"the snapshotter exited with code {daemon.proc.returncode}")
                return 1
        return 0
    finally:
        containerd.stop()
        daemon.stop()
        say(f"the demo's files stay in {workdir} (logs, images): rm -r it when done")


def say(text: str) -> None:
    print(text, flush=True)
