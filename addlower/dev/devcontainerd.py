"""Run a private containerd (own config, root, state, sockets) for demos, tests and benchmarks.

It talks to containerd only through its command line (`containerd`, `ctr`) and never touches the
host's containerd state. It knows how to declare proxy snapshotter plugins and CRI settings in the
config version the containerd at hand reads (addlower.core.ctrdconfig), but nothing about our
snapshotter's internals. Which containerd: the one on PATH, or the binaries in
$ADDLOWER_CONTAINERD_BIN_DIR (scripts/containerd-versions.sh unpacks other Debian suites' there).
Also here: SnapshotterProcess, a snapshotter daemon (ours or the Go original) run the same way.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import tomlkit

from addlower.core import ctrdconfig
from addlower.core.config import DIFFER_NAME, PLUGIN_NAME
from addlower.engine import fsutil

# sun_path is 108 bytes including the trailing NUL.
MAX_SOCKET_PATH = 107
BIN_DIR_ENV = "ADDLOWER_CONTAINERD_BIN_DIR"
# Where scripts/containerd-versions.sh unpacks other Debian suites' containerd.
VERSIONS_CACHE = Path(os.environ.get("ADDLOWER_CONTAINERD_CACHE", "/var/cache/addlower-ci/containerd"))
# The Go original, as ../shared/peers/seedsnap/build.sh builds it (scripts/setup.sh does, once).
GO_ORIGINAL = Path("/tmp/peers-bin/overlay-custom-add-lower-snapshotter")
GO_ORIGINAL_BUILD = Path(__file__).resolve().parents[3] / "shared" / "peers" / "seedsnap" / "build.sh"
# The line our daemon logs once it serves, in the text (msg=serving) or the JSON format.
SERVING = re.compile(r'\bmsg"?\s*[=:]\s*"?serving\b')

# ctr 2.2+ warns about cgroup v1 on stderr, which would mix into what tests read.
CTR_ENV = {"CONTAINERD_SUPPRESS_DEPRECATION_WARNINGS": "1"}


def unpacked_lines() -> list[Path]:
    """The bin dirs of the containerd lines unpacked under VERSIONS_CACHE, by suite name."""
    return sorted(d for d in VERSIONS_CACHE.glob("*/usr/bin") if (d / "containerd").exists())


@dataclass(frozen=True)
class Binaries:
    """One containerd line: containerd, ctr and containerd-shim-runc-v2 from `bin_dir`, or from
    PATH when it is None."""

    bin_dir: Path | None = None

    @classmethod
    def from_env(cls) -> Binaries:
        value = os.environ.get(BIN_DIR_ENV)
        return cls(Path(value)) if value else cls()

    def command(self, name: str) -> str:
        return str(self.bin_dir / name) if self.bin_dir else name

    def env(self) -> dict[str, str]:
        """The environment to run them in: containerd finds its shims on PATH."""
        path = os.environ.get("PATH", "/usr/bin:/bin")
        return {**os.environ, **CTR_ENV, "PATH": f"{self.bin_dir}:{path}" if self.bin_dir else path}

    @functools.cached_property
    def version(self) -> tuple[int, int, int]:
        out = subprocess.run(
            [self.command("containerd"), "--version"], capture_output=True, text=True, check=True
        ).stdout
        return ctrdconfig.parse_version(out)

    @property
    def label(self) -> str:
        return "containerd-" + ".".join(map(str, self.version))


@dataclass(frozen=True)
class CriSettings:
    """CRI plugin settings that matter on our test machines."""

    snapshotter: str = "overlayfs"
    sandbox_image: str = "localhost/addlower/pause:latest"
    pod_annotations: Sequence[str] = ()
    # RuntimeClass handlers (besides runc, the default) -> the snapshotter their pods use (1.7+).
    runtime_snapshotters: Mapping[str, str] = field(default_factory=dict)
    # Registries (host:port) CRI pulls from over plain HTTP.
    registries: Sequence[str] = ()


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
        binaries: Binaries | None = None,
        configure: Callable[[str], str] | None = None,
        differ: bool = True,
    ) -> None:
        """`configure`, when given, gets the config text without the proxy plugins' tables and
        Transfer's unpack entries, and must add them, as `addlower install` does on a node.
        `differ`: our snapshotter's socket is also containerd's first differ (1.7+), as installed;
        only where the daemon runs: while it is down, containerd's diff service cannot unpack."""
        self.workdir = workdir.absolute()
        self.proxy_plugins = dict(proxy_plugins or {})  # name -> socket, in the snapshotter's root
        self.cri = CriSettings() if cri is True else cri or None
        self.binaries = binaries or Binaries.from_env()
        self.configure = configure
        self.differ = differ
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

    @property
    def config_version(self) -> int:
        return ctrdconfig.config_version(self.binaries.version)

    def config(self) -> str:
        """The config.toml text, in the version this containerd reads."""
        version = self.config_version
        doc: dict = {
            "version": version,
            "root": str(self.root),
            "state": str(self.state),
            "disabled_plugins": [] if self.cri else [ctrdconfig.CRI_SERVICE],
            "grpc": {"address": str(self.address)},
            "ttrpc": {"address": str(self.ttrpc_address)},
            "debug": {"level": "debug"},
            "plugins": {"io.containerd.internal.v1.opt": {"path": str(self.workdir / "opt")}},
        }
        if self.configure is None:
            doc["proxy_plugins"] = {
                name: ctrdconfig.proxy_plugin(str(address), str(address.parent))
                for name, address in self.proxy_plugins.items()
            }
            ours = self.proxy_plugins.get(PLUGIN_NAME)
            if ours is not None and self.differ and ctrdconfig.diff_proxy(self.binaries.version):
                doc["proxy_plugins"][DIFFER_NAME] = ctrdconfig.differ_plugin(str(ours))
                ctrdconfig.set_path(doc, ctrdconfig.DIFF_SERVICE, "default", ctrdconfig.differ_order(None))
            if ctrdconfig.uses_transfer_unpack(self.binaries.version):
                ctrdconfig.set_path(
                    doc,
                    ctrdconfig.TRANSFER,
                    "unpack_config",
                    ctrdconfig.unpack_config((ctrdconfig.BUILTIN_SNAPSHOTTER, *self.proxy_plugins)),
                )
        if self.cri:
            self._cri_config(doc, version)
        text = tomlkit.dumps(doc)
        return self.configure(text) if self.configure is not None else text

    def _cri_config(self, doc: dict, version: int) -> None:
        assert self.cri is not None
        runc = {
            "runtime_type": "io.containerd.runc.v2",
            "pod_annotations": list(self.cri.pod_annotations),
            "options": {"Root": str(self.runc_root)},
        }
        handlers = {"runc": runc}
        for handler, snapshotter in self.cri.runtime_snapshotters.items():  # RuntimeClass handlers
            handlers[handler] = {**runc, "snapshotter": snapshotter}
        ctrdconfig.set_path(doc, ctrdconfig.cri_images_table(version), "snapshotter", self.cri.snapshotter)
        ctrdconfig.set_path(doc, ctrdconfig.cri_runtimes_table(version)[:-1], "default_runtime_name", "runc")
        ctrdconfig.set_path(doc, ctrdconfig.cri_runtimes_table(version)[:-1], "runtimes", handlers)
        cni = {"conf_dir": str(self.workdir / "cni" / "conf")}
        if self.cri.registries:  # CRI's (and, on 2.x, Transfer's) per-registry hosts.toml files
            ctrdconfig.set_path(doc, (*ctrdconfig.cri_registry_table(version),), "config_path", str(self.hosts_dir))
            if version >= 3:
                ctrdconfig.set_path(doc, ctrdconfig.TRANSFER, "config_path", str(self.hosts_dir))
        if version >= 3:
            images = ctrdconfig.get_path(doc, ctrdconfig.cri_images_table(version))
            images["pinned_images"] = {"sandbox": self.cri.sandbox_image}
            runtime = doc["plugins"]["io.containerd.cri.v1.runtime"]
            # runc fails to set the sandbox's oom_score_adj on these machines without it.
            runtime.update(restrict_oom_score_adj=True, cni={**cni, "bin_dirs": [str(self.workdir / "cni" / "bin")]})
            doc["plugins"][ctrdconfig.CRI_SERVICE] = {"stream_server_port": "0"}
        else:
            doc["plugins"][ctrdconfig.CRI_SERVICE].update(
                sandbox_image=self.cri.sandbox_image,
                restrict_oom_score_adj=True,
                stream_server_port="0",
                cni={**cni, "bin_dir": str(self.workdir / "cni" / "bin")},
            )

    @property
    def hosts_dir(self) -> Path:
        return self.workdir / "certs.d"

    def _write_hosts(self) -> None:
        """A hosts.toml per plain-HTTP registry (containerd's registry host configuration)."""
        for host in self.cri.registries if self.cri else ():
            (self.hosts_dir / host).mkdir(parents=True, exist_ok=True)
            (self.hosts_dir / host / "hosts.toml").write_text(
                tomlkit.dumps(
                    {"server": f"http://{host}", "host": {f"http://{host}": {"capabilities": ["pull", "resolve"]}}}
                )
            )

    def start(self, timeout: float = 30) -> Self:
        """Write the config, start containerd and wait until it answers `ctr version`."""
        if len(str(self.ttrpc_address)) > MAX_SOCKET_PATH:
            raise ValueError(f"workdir too long for a unix socket path: {self.address}")
        for d in (self.workdir, self.runc_root):
            d.mkdir(parents=True, exist_ok=True)
        self._write_hosts()
        self.config_path.write_text(self.config())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binaries.command("containerd"), "--config", str(self.config_path)],
                env=self.binaries.env(),
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
        cmd = [self.binaries.command("ctr"), "--address", str(self.address), "-n", namespace, *args]
        proc = subprocess.run(
            cmd,
            env=self.binaries.env(),
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

    def import_image(self, tar: Path, namespace: str = "default", snapshotter: str | None = None) -> None:
        """`ctr images import` into `snapshotter`, or into the namespace's default snapshotter: on
        2.1+ only the local importer (`--local`) honours that label; the Transfer service does not."""
        args = (
            ["--snapshotter", snapshotter]
            if snapshotter
            else ["--local"]
            if ctrdconfig.uses_transfer_unpack(self.binaries.version)
            else []
        )
        self.ctr("images", "import", *args, str(tar), namespace=namespace)

    def collect_garbage(self, namespace: str = "default") -> None:
        """Run containerd's garbage collector now and wait for it (snapshot removals and the
        snapshotters' Cleanup included): deleting a lease with --sync does exactly that."""
        lease = self.ctr("leases", "create", namespace=namespace).stdout.split()[0]
        self.ctr("leases", "delete", "--sync", lease, namespace=namespace)

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
    # A listening socket handed over as systemd's socket activation does (fd 3, LISTEN_FDS=1,
    # LISTEN_PID the daemon's own): the caller holds it across the daemon's restarts.
    listening: socket.socket | None = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.root / "grpc.socks"

    @property
    def log_path(self) -> Path:
        return self.root.parent / f"{self.root.name}.log"

    def start(self, timeout: float = 30) -> Self:
        """Start it and wait until its socket accepts connections."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        command = [*self.command, "--root-dir", str(self.root), *self.args]
        fds: tuple[int, ...] = ()
        if self.listening is not None:  # bash's exec keeps its pid: LISTEN_PID names the daemon
            fd = self.listening.fileno()
            fds = (fd,)
            moved = f" 3<&{fd} {fd}<&-" if fd != 3 else ""
            command = ["bash", "-c", f'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"{moved}', "bash", *command]
        served = self._served()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=fds
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command[-1]} exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            # connect() succeeds before the daemon serves (a handed-over socket listens all along; its
            # own, before the mode is set): ours says when in its log, the Go original does not.
            if self._served() > served if self._ours else self._accepts():
                return self
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"{self.command[-1]} did not listen on {self.socket}:\n{self.log()[-3000:]}")

    @property
    def _ours(self) -> bool:
        return tuple(self.command) == SnapshotterProcess.command

    def _served(self) -> int:
        """How many times its log says it started serving, in the text or the JSON format."""
        return len(SERVING.findall(self.log()))

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
