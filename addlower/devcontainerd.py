"""Run a private containerd (own config, root, state, sockets) for demos, tests and benchmarks.

It talks to containerd only through its command line (`containerd`, `ctr`) and never touches the
host's containerd state. It knows how to declare proxy snapshotter plugins and CRI settings, but
nothing about our snapshotter's internals. Standard library only.
Also here: SnapshotterProcess, a snapshotter daemon (ours or the Go original) run the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import fsutil
from .config import PLUGIN_NAME

PROXY_PLUGIN = PLUGIN_NAME
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
# sun_path is 108 bytes including the trailing NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class CriSettings:
    """CRI plugin settings that matter on our test machines (SPEC section 6)."""

    snapshotter: str = "overlayfs"
    sandbox_image: str = "localhost/addlower/pause:latest"
    pod_annotations: Sequence[str] = ()


class CtrError(subprocess.CalledProcessError):
    """A failed `ctr` command; its message carries the command's stdout and stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


class PrivateContainerd:
    """A containerd process confined to `workdir`; use as a context manager or start()/stop().

    Layout: workdir/config.toml, containerd.log, root/, state/, runc/ (runc's state, shared with
    `run()` and the CRI runtime options) and the sockets containerd.sock(.ttrpc).
    """

    def __init__(
        self,
        workdir: Path,
        proxy_plugins: Mapping[str, Path] | None = None,
        cri: CriSettings | bool = False,
        extra_config: str = "",
    ) -> None:
        self.workdir = workdir.absolute()
        self.proxy_plugins = dict(proxy_plugins or {})
        self.cri = CriSettings() if cri is True else cri or None
        self.extra_config = extra_config
        self.address = self.workdir / "containerd.sock"
        self.ttrpc_address = self.workdir / "containerd.sock.ttrpc"
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.runc_root = self.workdir / "runc"
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrivateContainerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def config(self) -> str:
        """The config.toml text (version 2, as containerd 1.6 and 1.7 read it)."""
        q = json.dumps  # a JSON string is a valid TOML basic string
        lines = [
            "version = 2",
            f"root = {q(str(self.root))}",
            f"state = {q(str(self.state))}",
            f"disabled_plugins = {json.dumps([] if self.cri else [CRI_PLUGIN])}",
            "[grpc]",
            f"  address = {q(str(self.address))}",
            "[ttrpc]",
            f"  address = {q(str(self.ttrpc_address))}",
            "[debug]",
            '  level = "debug"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {q(str(self.workdir / 'opt'))}",
        ]
        if self.cri:
            cri = f'[plugins."{CRI_PLUGIN}"'
            lines += [
                f"{cri}]",
                f"  sandbox_image = {q(self.cri.sandbox_image)}",
                # runc fails to set the sandbox's oom_score_adj on these machines without it.
                "  restrict_oom_score_adj = true",
                '  stream_server_port = "0"',
                f"{cri}.cni]",
                f"  bin_dir = {q(str(self.workdir / 'cni' / 'bin'))}",
                f"  conf_dir = {q(str(self.workdir / 'cni' / 'conf'))}",
                f"{cri}.containerd]",
                f"  snapshotter = {q(self.cri.snapshotter)}",
                '  default_runtime_name = "runc"',
                f"{cri}.containerd.runtimes.runc]",
                '  runtime_type = "io.containerd.runc.v2"',
                f"  pod_annotations = {json.dumps(list(self.cri.pod_annotations))}",
                f"{cri}.containerd.runtimes.runc.options]",
                f"  Root = {q(str(self.runc_root))}",
            ]
        for name, address in self.proxy_plugins.items():
            lines += [f"[proxy_plugins.{q(name)}]", '  type = "snapshot"', f"  address = {q(str(address))}"]
        return "\n".join(lines) + "\n" + self.extra_config

    def start(self, timeout: float = 30) -> PrivateContainerd:
        """Write the config, start containerd and wait until it answers `ctr version`."""
        if len(str(self.ttrpc_address)) > MAX_SOCKET_PATH:
            raise ValueError(f"workdir too long for a unix socket path: {self.address}")
        for d in (self.workdir, self.runc_root):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited {self.proc.returncode}:\n{self.log_tail()}")
            if self.address.exists() and self.ctr("version", check=False, timeout=5).returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"containerd did not answer on {self.address}:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 15) -> None:
        """Kill leftover tasks, stop containerd (SIGTERM, then SIGKILL) and unmount what it left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # a hung containerd gets killed below
                self._kill_tasks()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._kill_orphan_shims()
        self._unmount_leftovers()
        self.proc = None

    def ctr(
        self,
        *args: str,
        namespace: str = "default",
        check: bool = True,
        input: bytes | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run `ctr --address ... -n namespace *args`; text output; CtrError on failure if check."""
        cmd = ["ctr", "--address", str(self.address), "-n", namespace, *args]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=None if input is None else input.decode(),
            stdin=subprocess.DEVNULL if input is None else None,
        )
        if check and proc.returncode != 0:
            raise CtrError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def run(
        self,
        image: str,
        container_id: str,
        *command: str,
        snapshotter: str | None = None,
        rm: bool = True,
        options: Sequence[str] = (),
        namespace: str = "default",
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """`ctr run` with runc's state in our private runc root; `options` go before the image.

        Without `rm` the container and its snapshot (key = container id) stay after it exits.
        """
        args = ["run", *(["--rm"] if rm else []), "--runc-root", str(self.runc_root), *options]
        if snapshotter:
            args += ["--snapshotter", snapshotter]
        return self.ctr(*args, image, container_id, *command, namespace=namespace, check=check, timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _kill_tasks(self) -> None:
        """Kill and delete running tasks so their shims exit and release the rootfs mounts."""
        namespaces = self.ctr("namespaces", "ls", "-q", check=False, timeout=10).stdout.split()
        for ns in namespaces:
            for task in self.ctr("tasks", "ls", "-q", namespace=ns, check=False, timeout=10).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False, timeout=10)
                self.ctr("tasks", "delete", "-f", task, namespace=ns, check=False, timeout=30)

    def _kill_orphan_shims(self) -> None:
        """Shims outlive containerd by design; kill those that were started by this instance."""
        marker = f"\0-address\0{self.address}\0".encode()
        for pid_dir in Path("/proc").iterdir():
            try:
                cmdline = (pid_dir / "cmdline").read_bytes() if pid_dir.name.isdigit() else b""
            except OSError:  # the process exited meanwhile
                continue
            if b"containerd-shim" in cmdline.split(b"\0", 1)[0] and marker in cmdline + b"\0":
                os.kill(int(pid_dir.name), signal.SIGKILL)

    def _unmount_leftovers(self) -> None:
        """Lazily unmount anything still mounted under our root or state, deepest first."""
        unmount_under(self.root, self.state)


def unmount_under(*dirs: Path) -> None:
    """Lazily unmount anything mounted inside `dirs`, deepest first."""
    prefixes = tuple(f"{d}/" for d in dirs)
    for target in sorted((t for t in fsutil.mount_points() if t.startswith(prefixes)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


@dataclass
class SnapshotterProcess:
    """A snapshotter daemon serving on <root>/grpc.socks: ours by default, or any command that
    takes --root-dir (the Go original). Logs go to <root>.log beside the root."""

    root: Path
    args: Sequence[str] = ()
    command: Sequence[str] = (sys.executable, "-m", "addlower.cli")
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.root / "grpc.socks"

    @property
    def log_path(self) -> Path:
        return self.root.parent / f"{self.root.name}.log"

    def start(self, timeout: float = 30) -> "SnapshotterProcess":
        """Start it and wait until its socket accepts connections."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*self.command, "--root-dir", str(self.root), *self.args],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command[-1]} exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            if self._accepts():
                return self
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"{self.command[-1]} did not listen on {self.socket}:\n{self.log()[-3000:]}")

    def _accepts(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal it and wait; SIGKILL if it does not exit in time. Returns its exit code.
        Pinned lowers outlive the daemon by design; a harness unmounts them once it is done."""
        if self.proc is None:  # never started
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait()
        unmount_under(self.root)
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        unmount_under(self.root)
