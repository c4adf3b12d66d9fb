"""`addlower install` and `addlower uninstall`: put the snapshotter on a node under its systemd and
point the node's containerd at it, or take both back, without breaking the node's config.

The config edit uses tomlkit, which keeps every comment, spelling and table order the node's admin
wrote: it adds the proxy plugin (with `exports.root`, where CRI reports the image filesystem),
sets CRI's snapshotter in the table the config version uses, and on containerd 2.1+ lists the
snapshotter in the Transfer service's `unpack_config` (addlower.core.ctrdconfig holds those
facts). It refuses, changing nothing, when the result would not parse or not say what it must.

Both commands first make a plan (files to write or remove, commands to run on the node), checking
everything they can before anything changes, then print it (`--dry-run`) or carry it out. Files
go under the host root only; commands run on the node only when the host root is / or through
nsenter into PID 1's namespaces when asked, never on whatever machine the installer runs on.
Must not know the daemon.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError

from addlower.core import ctrdconfig
from addlower.core.config import DEFAULT_CONFIG, DIFFER_NAME, PLUGIN_NAME, Config, load_config
from addlower.core.ctrdconfig import get_path, set_path
from addlower.engine import fsutil, wire
from addlower.engine.store import DB_NAME, MetaStore

Version = tuple[int, int, int]


class InstallError(Exception):
    """The config cannot be changed safely; nothing was written."""


def plugin_table(socket: str, root: str) -> str:
    """The config table that declares the snapshotter to containerd, as TOML text."""
    return tomlkit.dumps({"proxy_plugins": {PLUGIN_NAME: ctrdconfig.proxy_plugin(socket, root)}})


def new_config(containerd: Version) -> str:
    """The start of a config for a node that has none: the version its containerd reads natively
    (containerd 2.3 drops CRI's snapshotter when it migrates a version 2 file without runtimes)."""
    return f"version = {ctrdconfig.config_version(containerd)}\n"


# A CRI runtime handler's name, as a RuntimeClass's `handler` is: a DNS label.
RUNTIME_HANDLER = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def configure(
    text: str,
    socket: str,
    root: str,
    containerd: Version,
    cri: bool = True,
    differ: bool = True,
    runtime_handler: str | None = None,
) -> str:
    """The config `text` with our proxy plugin (and, with `cri`, CRI's default snapshotter; with
    `runtime_handler`, a runc runtime handler of that name whose pods use us (1.7+); Transfer's
    unpack entries on 2.1+; with `differ`, our differ first on 1.7+) set for a containerd of
    version `containerd`; unchanged if already so."""
    if runtime_handler is not None:
        if not RUNTIME_HANDLER.fullmatch(runtime_handler):
            raise InstallError(f"runtime handler {runtime_handler!r}: a DNS label (a-z, 0-9, '-'), as RuntimeClass's")
        if containerd < (1, 7):
            raise InstallError("a runtime handler with its own snapshotter needs containerd >= 1.7")
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise InstallError(f"the current config does not parse: {exc}") from None
    version = int(doc.get("version", 1))
    if version < 2:
        raise InstallError("config version 1 is not supported: migrate it with `containerd config migrate`")
    plugin = get_path(doc, ("proxy_plugins", PLUGIN_NAME))
    if plugin is not None and plugin.get("address") != socket:
        raise InstallError(f"proxy_plugins.{PLUGIN_NAME} already points at {plugin.get('address')!r}, not {socket!r}")
    if plugin is None:
        set_path(doc, ("proxy_plugins",), PLUGIN_NAME, ctrdconfig.proxy_plugin(socket, root))
    else:
        plugin["type"] = "snapshot"
        set_path(plugin, ("exports",), "root", root)
    if cri:
        images = ctrdconfig.cri_images_table(version)
        if get_path(doc, (*images, "snapshotter")) != PLUGIN_NAME:
            set_path(doc, images, "snapshotter", PLUGIN_NAME)
        runtimes = ctrdconfig.cri_runtimes_table(version)
        if version == 2 and containerd[0] >= 2 and get_path(doc, runtimes) is None:
            set_path(doc, (*runtimes, "runc"), "runtime_type", "io.containerd.runc.v2")
    if runtime_handler is not None:
        handler = (*ctrdconfig.cri_runtimes_table(version), runtime_handler)
        if get_path(doc, (*handler, "runtime_type")) is None:
            set_path(doc, handler, "runtime_type", "io.containerd.runc.v2")
        if get_path(doc, (*handler, "snapshotter")) != PLUGIN_NAME:
            set_path(doc, handler, "snapshotter", PLUGIN_NAME)
    if differ and ctrdconfig.diff_proxy(containerd):  # commits of our containers through our differ
        table = get_path(doc, ("proxy_plugins", DIFFER_NAME))
        if table is None or table.get("address") != socket or table.get("type") != "diff":
            set_path(doc, ("proxy_plugins",), DIFFER_NAME, ctrdconfig.differ_plugin(socket))
        order = get_path(doc, (*ctrdconfig.DIFF_SERVICE, "default"))
        if order is None or list(order) != ctrdconfig.differ_order(list(order)):
            set_path(doc, ctrdconfig.DIFF_SERVICE, "default", ctrdconfig.differ_order(list(order or [])))
    if ctrdconfig.uses_transfer_unpack(containerd):
        entries = get_path(doc, (*ctrdconfig.TRANSFER, "unpack_config"))
        if entries is None:
            entries = tomlkit.aot()
            set_path(doc, ctrdconfig.TRANSFER, "unpack_config", entries)
        present = {(e.get("platform"), e.get("snapshotter")) for e in entries}
        wanted = ctrdconfig.unpack_config() if not present else ctrdconfig.unpack_config((PLUGIN_NAME,))
        for entry in wanted:
            if (entry["platform"], entry["snapshotter"]) not in present:
                entries.append(entry)
    out = tomlkit.dumps(doc)
    _check(out, socket, root, version, containerd, cri, differ)
    if runtime_handler is not None:
        handler = (*ctrdconfig.cri_runtimes_table(version), runtime_handler, "snapshotter")
        if get_path(tomllib.loads(out), handler) != PLUGIN_NAME:
            raise InstallError("the edited config would not say what it must; nothing written")
    return out


def _check(text: str, socket: str, root: str, version: int, containerd: Version, cri: bool, differ: bool) -> None:
    """Read the result back as containerd would (tomllib) and refuse it unless it says all of it."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InstallError(f"the edited config would not parse ({exc}); nothing written") from None
    plugin = get_path(doc, ("proxy_plugins", PLUGIN_NAME)) or {}
    unpack = get_path(doc, (*ctrdconfig.TRANSFER, "unpack_config")) or []
    if (
        (plugin.get("address"), get_path(plugin, ("exports", "root"))) != (socket, root)
        or (cri and get_path(doc, (*ctrdconfig.cri_images_table(version), "snapshotter")) != PLUGIN_NAME)
        or (
            ctrdconfig.uses_transfer_unpack(containerd) and not any(e.get("snapshotter") == PLUGIN_NAME for e in unpack)
        )
        or (
            differ
            and ctrdconfig.diff_proxy(containerd)
            and (
                (get_path(doc, ("proxy_plugins", DIFFER_NAME)) or {}).get("address") != socket
                or (get_path(doc, (*ctrdconfig.DIFF_SERVICE, "default")) or [None])[0] != DIFFER_NAME
            )
        )
    ):
        raise InstallError("the edited config would not say what it must; nothing written")


UNIT_NAME = f"{PLUGIN_NAME}.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
SOCKET_UNIT = f"{PLUGIN_NAME}.socket"  # holds the daemon's socket across its restarts
SOCKET_UNIT_PATH = f"/etc/systemd/system/{SOCKET_UNIT}"
DAEMON_COMMAND = PLUGIN_NAME  # the console script
DAEMON_CONFIG = str(DEFAULT_CONFIG)
CONTAINERD_CONFIG = "/etc/containerd/config.toml"
BACKUP = f"{CONTAINERD_CONFIG}.bak-addlower"  # the node's config from before the first install
HOST_PREFIX = "/opt/addlower"  # on the node, with --wheels: wheels/ and venv/
WHEELS = f"{HOST_PREFIX}/wheels"
VENV = f"{HOST_PREFIX}/venv"
NSENTER = ("nsenter", "--target", "1", "--mount", "--uts", "--ipc", "--net", "--pid", "--")
# ExecStart= is written as is: no quoting, no %-specifiers, no $-expansion to get wrong.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._+@/-]+")


def containerd_version(host: Host) -> Version:
    """The node's containerd version: asked of `containerd --version` on the node (through
    nsenter), or of the binary under the host root."""
    if host.nsenter:
        candidates = [list(host.command(["containerd", "--version"], "asking containerd's version"))]
    else:
        candidates = [[str(host.path(d) / "containerd"), "--version"] for d in ("/usr/local/bin", "/usr/bin")]
        candidates = [c for c in candidates if Path(c[0]).exists()]
        if not candidates:
            raise InstallError(
                f"no containerd under {host.root}/usr/bin or /usr/local/bin: give its version with --containerd-version"
            )
    try:
        out = subprocess.run(candidates[0], capture_output=True, text=True, check=True).stdout
        return ctrdconfig.parse_version(out)
    except (OSError, subprocess.CalledProcessError, ValueError) as exc:
        raise InstallError(
            f"cannot tell containerd's version ({' '.join(candidates[0])}: {exc}): give it with --containerd-version"
        ) from None


def node(root: Path, nsenter: bool, containerd: str | None, config: Path | None = None) -> tuple[Host, Version, Config]:
    """The node, its containerd version (`containerd` if given) and the daemon config that
    applies: `config`, else the node's installed one, else the defaults."""
    host = Host(root, nsenter)
    installed = host.path(DAEMON_CONFIG)
    daemon = config or (installed if installed.exists() else None)
    version = ctrdconfig.parse_version(f" {containerd}") if containerd else containerd_version(host)
    return host, version, load_config(daemon) if daemon is not None else Config()


def render_unit(exec_start: str) -> str:
    """The systemd unit (package data, so a pip install has it) running `exec_start`."""
    if not _PLAIN_PATH.fullmatch(exec_start):
        raise InstallError(f"the daemon's path {exec_start!r} must be absolute and plain (letters, digits, ._+@-)")
    template = resources.files("addlower.ops").joinpath(UNIT_NAME).read_text()
    return template.replace("@EXEC_START@", exec_start)


def render_socket_unit(socket: str) -> str:
    """The .socket unit listening at `socket` (the daemon's, as containerd's config names it)."""
    if not _PLAIN_PATH.fullmatch(socket):
        raise InstallError(f"the socket path {socket!r} must be absolute and plain (letters, digits, ._+@-)")
    return resources.files("addlower.ops").joinpath(SOCKET_UNIT).read_text().replace("@SOCKET@", socket)


def this_installation() -> str:
    """The daemon command installed beside this addlower (its scheme's scripts dir, or PATH)."""
    beside = Path(sysconfig.get_path("scripts")) / DAEMON_COMMAND
    found = str(beside) if beside.exists() else shutil.which(DAEMON_COMMAND)
    if found is None:
        raise InstallError(f"no {DAEMON_COMMAND} beside this addlower nor on PATH: give --exec-start")
    return str(Path(found).absolute())


def wheel_pythons(names: Sequence[str]) -> list[str] | None:
    """The Python versions ("3.12") that every CPython-specific wheel among `names` is built for;
    None when all are pure or abi3 (any Python addlower supports will do)."""
    per_dist: dict[str, set[str]] = {}
    for name in names:
        dist, *_, pythons, abi, _platform = name.removesuffix(".whl").split("-")
        if re.fullmatch(r"cp3\d+", abi):
            per_dist.setdefault(dist.lower(), set()).update(
                f"3.{tag[3:]}" for tag in pythons.split(".") if re.fullmatch(r"cp3\d+", tag)
            )
    if not per_dist:
        return None
    return sorted(set.intersection(*per_dist.values()), key=lambda v: int(v.split(".")[1]))


def venv_commands(python: str, venv: str, wheels: str, pythons: list[str] | None) -> list[list[str]]:
    """Build the daemon's venv with the node's `python` from a wheelhouse, no index: first a check
    that the wheels fit that Python (pip's own message would only say "no matching distribution")."""
    check: list[list[str]] = []
    if pythons is not None:
        check = [
            [
                python,
                "-c",
                "import sys; v = '%d.%d' % sys.version_info[:2]; "
                f"ok = {' '.join(pythons)!r}; "
                f"sys.exit(None if v in ok.split() else '%s is Python %s; the wheels in {wheels} are for ' "
                "'Python %s: install one of those on the node (or give --python)' % (sys.executable, v, ok))",
            ]
        ]
    return [
        *check,
        [python, "-m", "venv", venv],
        [
            f"{venv}/bin/pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-index",
            "--only-binary=:all:",
            "--find-links",
            wheels,
            "--force-reinstall",
            "addlower",
        ],
    ]


class Step(ABC):
    """One change on the node, said before (`--dry-run`) or after it is made."""

    @abstractmethod
    def text(self, done: bool) -> str: ...

    def details(self) -> list[str]:
        """What `--dry-run` shows beside the step's line (a diff, the file names)."""
        return []

    @abstractmethod
    def apply(self, host: Host) -> None: ...


def _say(done: bool, present: str, past: str, rest: str) -> str:
    return f"{past if done else 'would ' + present} {rest}"


@dataclass(frozen=True)
class Write(Step):
    """Write a file (new text None: remove it), in one rename that keeps its mode: containerd and
    systemd never read half a file."""

    path: str
    old: str | None
    new: str | None
    note: str = ""

    def text(self, done: bool) -> str:
        verb = (
            ("remove", "removed")
            if self.new is None
            else ("create", "created")
            if self.old is None
            else ("write", "wrote")
        )
        return _say(done, *verb, self.path + self.note)

    def details(self) -> list[str]:
        return list(
            difflib.unified_diff(
                (self.old or "").splitlines(),
                (self.new or "").splitlines(),
                "a" + self.path if self.old is not None else "/dev/null",
                "b" + self.path if self.new is not None else "/dev/null",
                lineterm="",
            )
        )

    def apply(self, host: Host) -> None:
        target = host.path(self.path)
        if self.new is None:
            target.unlink(missing_ok=True)
            return
        mode = target.stat().st_mode & 0o7777 if target.exists() else 0o644
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.new)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise


@dataclass(frozen=True)
class Backup(Step):
    """Copy a file aside with its mode (a containerd config may hold registry credentials)."""

    path: str
    to: str

    def text(self, done: bool) -> str:
        return _say(done, "back up", "backed up", f"{self.path} to {self.to}")

    def apply(self, host: Host) -> None:
        shutil.copy2(host.path(self.path), host.path(self.to))


@dataclass(frozen=True)
class CopyWheels(Step):
    """Replace the node's wheelhouse with `source`'s wheels."""

    source: Path
    to: str
    names: tuple[str, ...]

    def text(self, done: bool) -> str:
        return _say(done, "copy", "copied", f"{len(self.names)} wheels from {self.source} to {self.to}")

    def details(self) -> list[str]:
        return list(self.names)

    def apply(self, host: Host) -> None:
        target = host.path(self.to)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for name in self.names:
            shutil.copy2(self.source / name, target / name)


@dataclass(frozen=True)
class RemoveTree(Step):
    """Remove a directory of ours (the venv and wheels under /opt/addlower)."""

    path: str

    def text(self, done: bool) -> str:
        return _say(done, "remove", "removed", f"{self.path} and all it holds")

    def apply(self, host: Host) -> None:
        shutil.rmtree(host.path(self.path))


@dataclass(frozen=True)
class UnmountUnder(Step):
    """Detach every mount below a dir of ours (the pins a stopped daemon leaves mounted by design)."""

    path: str

    def text(self, done: bool) -> str:
        return _say(done, "unmount", "unmounted", f"every mount under {self.path}")

    def apply(self, host: Host) -> None:
        top = str(host.path(self.path)).rstrip("/") + "/"
        for point in sorted((p for p in fsutil.mount_points() if p.startswith(top)), key=len, reverse=True):
            fsutil.unmount(point)


@dataclass(frozen=True)
class Run(Step):
    """A command on the node, as `Host.command` made it."""

    argv: tuple[str, ...]

    def text(self, done: bool) -> str:
        return _say(done, "run", "ran", " ".join(self.argv))

    def apply(self, host: Host) -> None:
        code = subprocess.run(self.argv, stdin=subprocess.DEVNULL).returncode
        if code != 0:
            raise InstallError(f"{' '.join(self.argv)} failed (exit code {code}); the lines above say what was done")


@dataclass(frozen=True)
class Host:
    """The node acted on: where its / is mounted here, and whether its commands run through nsenter
    into PID 1's namespaces (the DaemonSet's pod shares the node's PID namespace)."""

    root: Path
    nsenter: bool = False

    @property
    def local(self) -> bool:
        return self.root.resolve() == Path("/")

    def path(self, on_node: str) -> Path:
        return self.root / on_node.lstrip("/")

    def command(self, argv: Sequence[str], why: str) -> tuple[str, ...]:
        """`argv` as run on the node; refused when the node is not this machine and no nsenter."""
        if self.nsenter:
            return (*NSENTER, *argv)
        if self.local:
            return tuple(argv)
        raise InstallError(
            f"{why} runs commands on the node, and --host-root {self.root} is not this machine's /: "
            "add --nsenter to run them in PID 1's namespaces (the DaemonSet does), or leave it out"
        )

    def read(self, on_node: str) -> str | None:
        path = self.path(on_node)
        return path.read_text() if path.exists() else None


@dataclass
class Plan:
    """The steps, in order, and notes printed last (what is left for the operator to do)."""

    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def carry_out(self, host: Host, dry_run: bool, echo: Callable[[str], None]) -> None:
        if dry_run:
            echo("dry run: nothing is changed")
        if not self.steps:
            echo("nothing to change")
        for step in self.steps:
            if dry_run:
                echo(step.text(done=False))
                for line in step.details():
                    echo("    " + line)
            else:
                step.apply(host)
                echo(step.text(done=True))
        for line in self.notes:
            echo(line)


@dataclass(frozen=True)
class Install:
    """What `addlower install` is asked to do. `root` is the daemon's root (containerd's
    `exports.root`); `exec_start` the daemon's path on the node (default: the venv built from
    `wheels`, else this installation's)."""

    socket: str
    root: str
    containerd: Version
    exec_start: str | None = None
    wheels: Path | None = None
    python: str = "python3"
    daemon_config: str | None = None
    start: bool = False
    restart_containerd: bool = False
    differ: bool = True  # containerd 1.7+ asks our differ first (commits without the extra lowers)
    cri_default: bool | None = None  # CRI's default snapshotter: None means yes, unless runtime_handler
    runtime_handler: str | None = None  # a CRI runtime handler whose pods use us (RuntimeClass)

    @property
    def cri(self) -> bool:
        return self.cri_default if self.cri_default is not None else self.runtime_handler is None


def plan_install(host: Host, req: Install) -> Plan:
    """Every change `install` makes, checked before any is made: the daemon's config, the venv from
    the wheels, the unit, containerd's config (backed up once), then, when asked, the unit enabled
    and (re)started and containerd restarted, in that order so containerd finds the socket."""
    plan = Plan()
    daemon_changed = False
    if req.daemon_config is not None and host.read(DAEMON_CONFIG) != req.daemon_config:
        plan.steps.append(Write(DAEMON_CONFIG, host.read(DAEMON_CONFIG), req.daemon_config))
        daemon_changed = True
    if req.wheels is not None:
        names = tuple(sorted(p.name for p in req.wheels.glob("*.whl")))
        if not any(n.startswith("addlower-") for n in names):
            raise InstallError(f"no addlower wheel in {req.wheels}")
        installed = host.path(WHEELS)
        current = {(p.name, p.stat().st_size) for p in installed.iterdir()} if installed.is_dir() else set()
        copy = current != {(n, (req.wheels / n).stat().st_size) for n in names}
        if copy:
            plan.steps.append(CopyWheels(req.wheels, WHEELS, names))
        if copy or not host.path(f"{VENV}/bin/{DAEMON_COMMAND}").exists():
            plan.steps += [
                Run(host.command(c, "building the venv with the node's python"))
                for c in venv_commands(req.python, VENV, WHEELS, wheel_pythons(names))
            ]
            daemon_changed = True
    exec_start = req.exec_start or (f"{VENV}/bin/{DAEMON_COMMAND}" if req.wheels else None)
    if exec_start is None:
        if not host.local:
            raise InstallError(
                f"this addlower is not the node's at --host-root {host.root}: give --exec-start "
                "(the daemon's path on the node) or --wheels (a venv is built on the node)"
            )
        exec_start = this_installation()
    unit = render_unit(exec_start)
    if not (req.wheels and exec_start == f"{VENV}/bin/{DAEMON_COMMAND}") and not os.access(
        host.path(exec_start), os.X_OK
    ):
        raise InstallError(f"{exec_start} is not an executable file on the node: systemd could not start it")
    if host.read(UNIT_PATH) != unit:
        plan.steps.append(Write(UNIT_PATH, host.read(UNIT_PATH), unit))
        daemon_changed = True
    socket_unit = render_socket_unit(req.socket)
    socket_changed = host.read(SOCKET_UNIT_PATH) != socket_unit
    if socket_changed:
        plan.steps.append(Write(SOCKET_UNIT_PATH, host.read(SOCKET_UNIT_PATH), socket_unit))
    old = host.read(CONTAINERD_CONFIG)
    new = configure(
        new_config(req.containerd) if old is None else old,
        req.socket,
        req.root,
        req.containerd,
        cri=req.cri,
        differ=req.differ,
        runtime_handler=req.runtime_handler,
    )
    containerd_changed = new != old
    if containerd_changed:
        if old is not None and host.read(BACKUP) is None:
            plan.steps.append(Backup(CONTAINERD_CONFIG, BACKUP))
        plan.steps.append(Write(CONTAINERD_CONFIG, old, new, "" if old is None else f" (the original is in {BACKUP})"))
    commands = [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", SOCKET_UNIT, UNIT_NAME],
        # A new socket unit takes the path over from a daemon serving its own: stop that one first.
        *([["systemctl", "stop", UNIT_NAME], ["systemctl", "restart", SOCKET_UNIT]] if socket_changed else []),
        ["systemctl", "restart" if daemon_changed else "start", UNIT_NAME],
    ]
    if req.start:
        plan.steps += [Run(host.command(c, "--start")) for c in commands]
    elif daemon_changed:
        plan.notes.append("next: " + " && ".join(" ".join(c) for c in commands) + "  (or add --start)")
    if containerd_changed and req.restart_containerd:
        plan.steps.append(Run(host.command(["systemctl", "restart", "containerd"], "--restart-containerd")))
    elif containerd_changed:
        plan.notes.append(
            "next: systemctl restart containerd  (it reads its config only when it starts; or add --restart-containerd)"
        )
    return plan


@dataclass(frozen=True)
class Uninstall:
    """What `addlower uninstall` is asked to do; `socket`, `root` and `containerd` as install had them,
    to tell whether containerd's config is still what install made of the backup."""

    socket: str
    root: str
    containerd: Version
    stop: bool = False
    restart_containerd: bool = False
    force: bool = False


def snapshots_in_use(host: Host, root: str) -> dict[str, int]:
    """Snapshots by kind in the store under `root` on the node (read-only), those there are only."""
    db = host.path(root) / DB_NAME
    if not db.is_file():
        return {}
    store = MetaStore(db, wire.encode_field, readonly=True)
    try:
        return {kind: n for kind, n in store.counts_by_kind().items() if n}
    finally:
        store.close()


def _counted(kinds: Mapping[str, int]) -> str:
    names = {"active": "containers (active snapshots)", "committed": "image layers", "view": "views"}
    return ", ".join(f"{n} {names.get(kind, kind)}" for kind, n in sorted(kinds.items()))


def _made_by_install(current: str | None, original: str, req: Uninstall) -> bool:
    """Whether `current` is what some `addlower install` made of `original`: with or without CRI's
    default, with or without a runtime handler of ours (the one `current` names), with or without
    the differ."""
    if current is None:
        return False
    try:
        version = int(tomllib.loads(current).get("version", 1))
        runtimes = get_path(tomllib.loads(current), ctrdconfig.cri_runtimes_table(version)) or {}
    except tomllib.TOMLDecodeError:
        return False
    ours = [
        name for name, table in runtimes.items() if isinstance(table, dict) and table.get("snapshotter") == PLUGIN_NAME
    ]
    for cri in (True, False):
        for handler in (None, *ours):
            for differ in (True, False):
                try:
                    made = configure(original, req.socket, req.root, req.containerd, cri, differ, handler)
                except InstallError:
                    continue
                if made == current:
                    return True
    return False


def plan_uninstall(host: Host, req: Uninstall) -> Plan:
    """Every change `uninstall` makes: containerd's config restored from the backup install wrote
    (refused, unless forced, when it changed since), containerd restarted if asked, then the unit
    stopped and removed and the venv removed. The daemon's config and its snapshots are kept."""
    plan = Plan()
    in_use = snapshots_in_use(host, req.root)
    if in_use and not req.force:
        raise InstallError(
            f"{_counted(in_use)} still live on the snapshotter (root {req.root}): once it is gone containerd "
            "cannot remove them (snapshotter not loaded), and their pinned lowers stay mounted. Remove them "
            "first (crictl rmp -a, crictl rmi --prune; ctr -n NS containers rm ..., ctr -n NS images rm ...), "
            "or add --force to leave them behind"
        )
    if in_use:
        plan.notes.append(
            f"left behind: {_counted(in_use)} under {req.root}, which containerd cannot remove without the "
            "snapshotter (install it again to remove them)"
        )
    current, original = host.read(CONTAINERD_CONFIG), host.read(BACKUP)
    if original is not None:
        if not _made_by_install(current, original, req) and not req.force:
            raise InstallError(
                f"{CONTAINERD_CONFIG} is not what addlower install made of {BACKUP} (edited since, or another "
                "containerd version or socket): restoring the backup would undo that. See the difference with "
                "--dry-run --force, then add --force to restore it anyway"
            )
        plan.steps += [
            Write(CONTAINERD_CONFIG, current, original, f" (restored from {BACKUP})"),
            Write(BACKUP, original, None),
        ]
    elif current is not None and current == configure(new_config(req.containerd), req.socket, req.root, req.containerd):
        plan.steps.append(Write(CONTAINERD_CONFIG, current, None, " (addlower install created it)"))
    elif current is not None and _declares_plugin(current):
        raise InstallError(
            f"{CONTAINERD_CONFIG} declares the snapshotter but there is no backup {BACKUP} to restore: "
            f'remove [proxy_plugins.{PLUGIN_NAME}], CRI\'s snapshotter = "{PLUGIN_NAME}" and its '
            "unpack_config entries by hand, then run uninstall again"
        )
    containerd_changed = bool(plan.steps)
    if containerd_changed and req.restart_containerd:
        plan.steps.append(Run(host.command(["systemctl", "restart", "containerd"], "--restart-containerd")))
    elif containerd_changed:
        plan.notes.append(
            "next: systemctl restart containerd  (it still dials the snapshotter until then; "
            "or add --restart-containerd)"
        )
    unit = host.read(UNIT_PATH)
    wanted = f"/etc/systemd/system/multi-user.target.wants/{UNIT_NAME}"  # what `systemctl enable` made
    socket_unit = host.read(SOCKET_UNIT_PATH)
    socket_wanted = f"/etc/systemd/system/sockets.target.wants/{SOCKET_UNIT}"
    units = [u for u, text in ((UNIT_NAME, unit), (SOCKET_UNIT, socket_unit)) if text is not None]
    if units and req.stop:
        plan.steps += [
            Run(host.command(["systemctl", "disable", "--now", *units], "--stop")),
            *([UnmountUnder(f"{req.root}/lowers")] if in_use else []),
            *([Write(UNIT_PATH, unit, None)] if unit is not None else []),
            *([Write(SOCKET_UNIT_PATH, socket_unit, None)] if socket_unit is not None else []),
            Run(host.command(["systemctl", "daemon-reload"], "--stop")),
        ]
    elif units:
        plan.steps += [Write(w, None, None) for w in (wanted, socket_wanted) if os.path.lexists(host.path(w))]
        plan.steps += [Write(UNIT_PATH, unit, None)] if unit is not None else []
        plan.steps += [Write(SOCKET_UNIT_PATH, socket_unit, None)] if socket_unit is not None else []
        plan.notes.append(f"next: systemctl stop {' '.join(units)} && systemctl daemon-reload  (or add --stop)")
    if host.path(HOST_PREFIX).exists() and req.stop:
        plan.steps.append(RemoveTree(HOST_PREFIX))
    elif host.path(HOST_PREFIX).exists():
        plan.notes.append(f"next: rm -r {HOST_PREFIX} once the daemon is stopped (it runs from there; or add --stop)")
    kept = [p for p in (DAEMON_CONFIG, req.root) if host.path(p).exists()]
    if plan.steps and kept:
        plan.notes.append(f"kept: {' and '.join(kept)} (the daemon's config and snapshots)")
    return plan


def _declares_plugin(text: str) -> bool:
    try:
        return get_path(tomllib.loads(text), ("proxy_plugins", PLUGIN_NAME)) is not None
    except tomllib.TOMLDecodeError:
        return True  # cannot tell: do not pretend there is nothing to undo
