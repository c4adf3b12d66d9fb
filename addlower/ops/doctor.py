"""`addlower doctor`: checks the host, the root, the lowers, the daemon and containerd (its config
and what it loaded), each with a fix. It walks the configured lowers with the daemon's own walk
(engine.pinning.probe, which makes nothing) and asks containerd what it runs (Version,
Introspection). Reads only; never writes anything of the node's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import grpc
import tomlkit

from addlower.api import introspection_pb2, introspection_pb2_grpc
from addlower.core import ctrdconfig
from addlower.core.config import (
    DEFAULT_CONFIG,
    DIFFER_NAME,
    PLUGIN_NAME,
    SOCKET_NAME,
    Config,
    ConfigError,
    read_toml,
)
from addlower.core.errors import InvalidArgument
from addlower.core.lowers import Lower, NamedLower
from addlower.core.pods import CONTAINERD_ADDRESS
from addlower.engine import adopt, fsutil, pinning
from addlower.engine.ctrdversion import TargetSupport, ask_version
from addlower.ops.install import UNIT_NAME, UNIT_PATH, plugin_table
from addlower.ops.render import print_json, terminal_columns
from addlower.ops.sources import PROBE_TIMEOUT, Invocation, Target, admin_command, connect

DEFAULT_CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
DEFAULT_CONTAINERD_ROOT = "/var/lib/containerd"  # containerd's root when its config names none
SNAPSHOTTER_PLUGIN_TYPE = "io.containerd.snapshotter.v1"  # containerd's plugin type of snapshotters, proxies too
DIFFER_PLUGIN_TYPE = "io.containerd.differ.v1"  # and of differs


# --- doctor ---------------------------------------------------------------------------------------

PASS, FAIL, WARN, INFO = "PASS", "FAIL", "WARN", "INFO"  # WARN: works, with a limit to know


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    hint: str = ""  # how to fix a FAIL; may span lines


def check_config(inv: Invocation) -> tuple[Config, Check]:
    """The configuration the daemon would read; the defaults (with the flags) if it is bad."""
    shown = inv.config_path or DEFAULT_CONFIG
    try:
        config = inv.load()
    except ConfigError as exc:
        return inv.override(Config()), Check(
            "config file",
            FAIL,
            str(exc),
            f"fix the key the message names in {shown} ({PLUGIN_NAME} --help lists the flags that override it), "
            f"then {restart_hint()}",
        )
    found = inv.config_path is not None or DEFAULT_CONFIG.exists()
    return config, Check("config file", PASS, f"{shown} is valid" if found else f"no {shown}: defaults")


def restart_hint(by_hand: str = PLUGIN_NAME, start: bool = False, unit: Path = Path(UNIT_PATH)) -> str:
    """How to (re)start the daemon on this node: through its `unit` when `addlower install` put it
    there, and where its log is; else the command to run by hand."""
    if unit.exists():
        verb = "start" if start else "restart"
        return f"systemctl {verb} {UNIT_NAME}, and see why it stopped: journalctl -u {UNIT_NAME} -n 50"
    return f"start the daemon: {by_hand} (its log is on its stderr)"


def check_kernel_overlay() -> Check:
    try:
        filesystems = {line.split()[-1] for line in Path("/proc/filesystems").read_text().splitlines() if line.strip()}
    except OSError as exc:
        return Check("kernel overlay", FAIL, f"cannot read /proc/filesystems: {exc}", "is /proc mounted?")
    if "overlay" in filesystems:
        return Check("kernel overlay", PASS, "overlay is in /proc/filesystems")
    return Check(
        "kernel overlay",
        FAIL,
        "overlay is not in /proc/filesystems",
        "modprobe overlay (and add overlay to /etc/modules-load.d/ to load it at boot)",
    )


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_dtype(root: Path) -> Check:
    where = _nearest_existing(root)  # the filesystem the daemon would create the root on
    hint = f"put {root} on a filesystem with d_type (ext4; xfs made with mkfs.xfs -n ftype=1)"
    try:
        supported = fsutil.supports_dtype(where)
    except OSError as exc:
        return Check("d_type", FAIL, f"cannot test {where}: {exc}", hint)
    if supported:
        return Check("d_type", PASS, f"the filesystem of {where} supports d_type")
    return Check("d_type", FAIL, f"the filesystem of {where} does not support d_type", hint)


def check_overlay_options(config: Config) -> list[Check]:
    param = Path("/sys/module/overlay/parameters/index")
    index = param.read_text().strip() if param.exists() else "absent"
    options = fsutil.overlay_options(config.mount_options)
    userxattr = "needed (user namespace, kernel >= 5.11)" if "userxattr" in options else "not needed"
    return [
        Check(
            "overlay index",
            INFO,
            f"module parameter index={index}; mounts use {','.join(options) or 'no extra options'}",
        ),
        Check("userxattr", INFO, userxattr),
    ]


def check_root(root: Path) -> Check:
    try:
        st = root.stat()
    except FileNotFoundError:
        return Check("root dir", FAIL, f"{root} does not exist", "start the daemon: it creates the root")
    if not root.is_dir():
        return Check("root dir", FAIL, f"{root} is not a directory", "move it away, or choose another --root-dir")
    mode = st.st_mode & 0o7777
    problems = ([f"mode {mode:04o}, not 0700"] if mode != 0o700 else []) + (
        [f"owner uid {st.st_uid}, not root"] if st.st_uid != 0 else []
    )
    if problems:
        return Check("root dir", FAIL, f"{root}: {'; '.join(problems)}", f"chown root:root {root} && chmod 0700 {root}")
    return Check("root dir", PASS, f"{root} exists, mode 0700, owned by root")


def check_go_root(root: Path) -> list[Check]:
    """A root the Go original left: what start-up will take over, read without its lock (the Go
    program may still run), or why it cannot."""
    if not adopt.holds_bolt(root):
        return []
    what = "Go original's root"
    try:
        found = adopt.read(root, locked=False)
    except (OSError, adopt.AdoptError) as exc:
        hint = f"stop the Go program, run doctor again; if it still fails, restore {adopt.DB_NAME} from a backup"
        return [Check(what, FAIL, str(exc), hint)]
    return [
        Check(
            what,
            INFO,
            f"{root / adopt.DB_NAME} is the Go program's bolt database: {found.summary()}; the daemon takes it "
            f"over at its next start (same snapshots, no dir changes) and keeps it as {adopt.KEPT_NAME}",
        )
    ]


def check_socket(socket: Path, root: Path) -> Check:
    with connect(socket) as daemon:
        reason = daemon.probe()
    if reason is not None:
        address = "" if socket == root / SOCKET_NAME else f" --address {socket}"
        by_hand = f"{PLUGIN_NAME} --root-dir {root}{address}"
        return Check("socket", FAIL, f"the snapshotter does not answer: {reason}", restart_hint(by_hand, start=True))
    return Check("socket", PASS, f"the snapshotter answers on {socket}")


def check_lowers(config: Config) -> list[Check]:
    """Every named lower and allowed root, walked as the daemon walks them: a FAIL is what the
    daemon would refuse; a dir it would make, empty, is INFO."""
    checks = [_check_named(name, named) for name, named in config.named_lowers.items()]
    k8s = config.kubernetes
    roots = [
        *(("lowers.allowed_roots", r) for r in config.allowed_roots),
        *(("kubernetes.allowed_roots", r) for r in k8s.allowed_roots),
        *((f'kubernetes.namespaces."{ns}".allowed_roots', r) for ns, rs in k8s.namespaces.items() for r in rs),
    ]
    return checks + [_check_root(key, root) for key, root in roots]


def _check_named(name: str, named: NamedLower) -> Check:
    what, key = f"named lower {name}", f"lowers.named.{name}"
    try:
        there = pinning.probe(named.entry(name), "the daemon refuses")
    except InvalidArgument as exc:
        hint = (
            _dir_hint(named.path, key)
            if os.path.lexists(named.path)
            else f"mkdir -p {named.path} and fill it, or set create = true in {key} to have it made empty"
        )
        return Check(what, FAIL, str(exc), hint)
    if there:
        return Check(what, PASS, f"{named.path} is a directory")
    return Check(what, INFO, f"{named.path} does not exist: made, empty, when first used (create = true)")


def _check_root(key: str, root: str) -> Check:
    what = f"allowed root {root}"
    try:
        there = pinning.probe(Lower(root, root), "every path under")
    except InvalidArgument as exc:
        return Check(
            what,
            FAIL,
            f"{exc} ({key})",
            _dir_hint(root, key) if os.path.lexists(root) else f"mkdir -p {root}, or change {key}",
        )
    if there:
        return Check(what, PASS, f"{root} is a directory ({key})")
    return Check(what, INFO, f"{root} does not exist ({key}): the first path under it makes it, empty")


def _dir_hint(path: str, key: str) -> str:
    return f"set {key} to the directory itself, {os.path.realpath(path)} if that is it: the daemon opens no symlink"


@dataclass(frozen=True)
class ContainerdFile:
    """containerd's config file as doctor read it; `error` says why it could not be."""

    path: Path
    document: dict[str, Any]
    error: str | None = None

    @classmethod
    def read(cls, path: Path) -> ContainerdFile:
        try:
            return cls(path, read_toml(path))
        except ConfigError as exc:
            return cls(path, {}, str(exc))

    @property
    def address(self) -> str:
        """Where containerd listens: its grpc.address, or containerd's default."""
        return str(ctrdconfig.get_path(self.document, ("grpc", "address")) or CONTAINERD_ADDRESS)

    @property
    def version(self) -> int:
        return int(self.document.get("version", 1))

    def proxy_plugins(self) -> dict[str, dict[str, Any]]:
        plugins = self.document.get("proxy_plugins", {})
        return {n: p for n, p in plugins.items() if isinstance(p, dict)} if isinstance(plugins, dict) else {}


def installed_containerd() -> tuple[int, int, int] | None:
    """The version of the containerd on PATH, if there is one that answers."""
    try:
        out = subprocess.run(["containerd", "--version"], capture_output=True, text=True, timeout=10).stdout
        return ctrdconfig.parse_version(out)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


def _version_text(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def check_containerd_answers(address: str, version: tuple[int, int, int] | None, why: str) -> Check:
    if version is None:
        return Check(
            "containerd",
            FAIL,
            f"no answer to containerd's Version API: {why}",
            "start containerd, or name its socket with --containerd-address (its config's grpc.address)",
        )
    return Check("containerd", PASS, f"containerd {_version_text(version)} answers at {address}")


def guessed_image_fs(guessed: Path, root: Path) -> Check:
    """containerd 1.6 ignores exports.root: CRI tells kubelet the image filesystem is at `guessed`
    (its root dir and the plugin's id), where no snapshotter of ours keeps anything. A symlink
    there to `root` makes the path kubelet stats (image GC, imagefs eviction signals) the root's."""
    if guessed.is_symlink() and guessed.resolve() == root.resolve():
        return Check(
            "image filesystem",
            PASS,
            f"containerd 1.6 reports {guessed}, a symlink to {root}: kubelet sees its filesystem",
        )
    return Check(
        "image filesystem",
        WARN,
        f"containerd 1.6 ignores exports.root and tells kubelet the image filesystem is {guessed}"
        + (", which does not exist" if not os.path.lexists(guessed) else ", which is not the snapshotter's root")
        + ": image GC and imagefs eviction look at the wrong filesystem",
        f"point that path at the root (containerd 1.7+ honours exports.root):\nln -sfn {root} {guessed}",
    )


def check_containerd(
    file: ContainerdFile, socket: Path, root: Path, containerd: tuple[int, int, int] | None, pods: bool
) -> tuple[str, list[Check]]:
    """containerd's config declares the snapshotter at `socket` (its exports.root at `root`), and,
    for a containerd of version `containerd` (None: unknown), lets CRI (which `pods` lookups
    need) and pulls use it. Also the name containerd knows it by (PLUGIN_NAME if none)."""
    path = file.path
    hint = f"add to {path}, then restart containerd:\n" + plugin_table(str(socket), str(root)).rstrip("\n")
    if file.error is not None:
        return PLUGIN_NAME, [Check("containerd config", FAIL, file.error, f"make {path} readable TOML, then:\n" + hint)]
    found = [
        (n, p)
        for n, p in file.proxy_plugins().items()
        if p.get("type") == "snapshot" and os.path.normpath(str(p.get("address", ""))) == str(socket)
    ]
    if not found:
        return PLUGIN_NAME, [Check("containerd config", FAIL, f"{path} has no snapshot proxy plugin at {socket}", hint)]
    name, plugin = found[0]
    checks = [Check("containerd config", PASS, f"{path}: [proxy_plugins.{name}] is this snapshotter")]
    exported = ctrdconfig.get_path(plugin, ("exports", "root"))
    guessed = Path(str(file.document.get("root", DEFAULT_CONTAINERD_ROOT))) / f"{SNAPSHOTTER_PLUGIN_TYPE}.{name}"
    checks.append(
        guessed_image_fs(guessed, root)
        if exported == str(root) and containerd is not None and containerd < (1, 7)
        else Check("image filesystem", PASS, f"exports.root is {root}: kubelet's ImageFsInfo sees the layers")
        if exported == str(root)
        else Check(
            "image filesystem",
            FAIL,
            f"[proxy_plugins.{name}] exports.root is {exported!r}, not {root}: "
            "kubelet's image GC and ImageFsInfo look at the wrong filesystem",
            hint,
        )
    )
    checks.append(check_cri(file, name, pods))
    if containerd is None:
        checks.append(
            Check(
                "containerd version",
                INFO,
                "unknown (containerd does not answer, none on PATH "
                "answered --version): the Transfer service's unpack_config was not checked",
            )
        )
    elif ctrdconfig.uses_transfer_unpack(containerd):
        unpack = ctrdconfig.get_path(file.document, (*ctrdconfig.TRANSFER, "unpack_config")) or []
        listed = any(isinstance(e, dict) and e.get("snapshotter") == name for e in unpack)
        table = tomlkit.dumps(
            {
                "plugins": {
                    ctrdconfig.TRANSFER[1]: {
                        "unpack_config": ctrdconfig.unpack_config((ctrdconfig.BUILTIN_SNAPSHOTTER, name))
                    }
                }
            }
        ).rstrip("\n")
        checks.append(
            Check("unpack into it", PASS, f"unpack_config lists {name} for containerd {_version_text(containerd)}")
            if listed
            else Check(
                "unpack into it",
                FAIL,
                f"containerd {_version_text(containerd)} pulls and imports "
                f"through the Transfer service, whose unpack_config does not list {name}: "
                "'no unpack platforms defined'",
                f"add to {path}, then restart containerd:\n{table}",
            )
        )
    return name, checks


def check_cri(file: ContainerdFile, name: str, pods: bool) -> Check:
    """CRI runs pods on `name`, by default or for a runtime handler; a FAIL only when pod lookups
    (`pods`) are on, as a node may keep CRI elsewhere on purpose."""
    cri = ctrdconfig.cri_use(file.document, name)
    status = FAIL if pods else INFO
    unused = "; kubernetes.enabled is on, yet no pod runs here" if pods else ""
    if not cri.enabled:
        return Check(
            "CRI snapshotter",
            status,
            f"CRI is disabled in {file.path} (disabled_plugins){unused}",
            f"take {ctrdconfig.CRI_SERVICE} out of disabled_plugins, then restart containerd",
        )
    if cri.default == name:
        return Check("CRI snapshotter", PASS, f"CRI unpacks and runs pods on {name}")
    if cri.handlers:
        return Check(
            "CRI snapshotter",
            PASS,
            f"CRI runs pods on {cri.default!r}, those of runtime handler "
            f"{', '.join(cri.handlers)} (a RuntimeClass) on {name}",
        )
    images = ".".join(f'"{part}"' if "." in part else part for part in ctrdconfig.cri_images_table(file.version))
    return Check(
        "CRI snapshotter",
        status,
        f"CRI unpacks and runs pods on {cri.default!r}, and no runtime handler names {name}{unused}",
        f'set snapshotter = "{name}" in [{images}] of {file.path} '
        "(or in a runtime handler's table, for a RuntimeClass), then restart containerd",
    )


def check_plugin_loaded(
    address: str, name: str, answers: bool, kind: str = SNAPSHOTTER_PLUGIN_TYPE, what: str = "plugin loaded"
) -> Check:
    """containerd loaded the proxy plugin `name` of type `kind` and it started: what `ctr plugins
    ls` shows."""
    if not answers:
        return Check(what, INFO, f"not checked: containerd does not answer at {address}")
    try:
        with grpc.insecure_channel(f"unix://{address}") as channel:
            reply = introspection_pb2_grpc.IntrospectionStub(channel).Plugins(
                introspection_pb2.PluginsRequest(), timeout=PROBE_TIMEOUT
            )
    except grpc.RpcError as exc:
        return Check(
            what,
            FAIL,
            f"containerd's Introspection API at {address}: {exc.code().name}: {exc.details()}",
            "read containerd's log",
        )
    found = [p for p in reply.plugins if p.type == kind and p.id == name]
    if not found:
        return Check(
            what,
            FAIL,
            f"containerd at {address} has no {kind} plugin {name} (ctr plugins ls)",
            f"declare [proxy_plugins.{name}] in containerd's config (see the "
            "containerd config check), then restart containerd",
        )
    if found[0].HasField("init_err"):
        return Check(
            what,
            FAIL,
            f"containerd could not start its plugin {name}: {found[0].init_err.message}",
            "read containerd's log; restart containerd once the snapshotter answers",
        )
    return Check(what, PASS, f"containerd at {address} loaded {kind} {name}: ok")


def check_differ(file: ContainerdFile, socket: Path, containerd: tuple[int, int, int] | None) -> tuple[str, Check]:
    """containerd asks this daemon's differ first, so commits of containers hold no extra lowers;
    containerd 1.6 cannot (a WARN). Also the name containerd knows the differ by."""
    what = "commits"
    if containerd is None:
        return DIFFER_NAME, Check(what, INFO, "containerd's version is unknown: the differ was not checked")
    if not ctrdconfig.diff_proxy(containerd):
        return DIFFER_NAME, Check(
            what,
            WARN,
            f"containerd {_version_text(containerd)} loads no diff proxy plugin: a commit of a container "
            "(ctr snapshots diff, nerdctl commit) holds the files of its extra lowers, as its walking differ sees "
            "the whole mount",
            "upgrade containerd to 1.7 or later; until then, commit only containers without extra lowers",
        )
    found = [
        n
        for n, p in file.proxy_plugins().items()
        if p.get("type") in ("diff", DIFFER_PLUGIN_TYPE) and os.path.normpath(str(p.get("address", ""))) == str(socket)
    ]
    name = found[0] if found else DIFFER_NAME
    order = list(ctrdconfig.get_path(file.document, (*ctrdconfig.DIFF_SERVICE, "default")) or [ctrdconfig.WALKING])
    table = {
        "proxy_plugins": {name: ctrdconfig.differ_plugin(str(socket))},
        "plugins": {ctrdconfig.DIFF_SERVICE[1]: {"default": ctrdconfig.differ_order(order)}},
    }
    hint = f"add to {file.path}, then restart containerd:\n" + tomlkit.dumps(table).rstrip("\n")
    if not found:
        return name, Check(
            what,
            FAIL,
            f"{file.path} has no diff proxy plugin at {socket}: commits of containers would hold their extra lowers",
            hint,
        )
    if order[0] != name:
        return name, Check(
            what,
            FAIL,
            f"the diff service asks {order[0]!r} first (default = {order}), not {name}: "
            "commits of containers would hold their extra lowers",
            hint,
        )
    return name, Check(
        what, PASS, f"the diff service asks {name} (this daemon) first: commits hold a container's own changes"
    )


def check_containerd_address(config: Config, containerd: str) -> list[Check]:
    """The containerd the daemon asks (kubernetes.containerd_address): with pod lookups on, it must
    answer and be the `containerd` doctor checked; with mount_targets = "auto", it decides whether
    lowers may sit at a container path."""
    k8s = config.kubernetes
    address = k8s.containerd_address
    checks: list[Check] = []
    if config.mount_targets == "auto":
        what = "lowers at a container path"
        try:
            TargetSupport(config.mount_targets, address, k8s.timeout).check(what)
            checks.append(Check("mount targets", INFO, f"{what} are allowed: containerd at {address} is 1.7+"))
        except InvalidArgument as exc:
            checks.append(Check("mount targets", INFO, f"{exc} (kubernetes.containerd_address)"))
    if not k8s.enabled:
        return checks
    version, why = ask_version(address, k8s.timeout)
    hint = f"set kubernetes.containerd_address to containerd's socket ({containerd}) in the config file"
    if version is None:
        checks.append(
            Check(
                "pod lookups",
                FAIL,
                f"kubernetes.containerd_address: no answer ({why}): pods' lowers cannot be looked up",
                hint,
            )
        )
    elif os.path.realpath(address) != os.path.realpath(containerd):
        checks.append(
            Check(
                "pod lookups",
                FAIL,
                f"kubernetes.containerd_address {address} answers, but containerd "
                f"listens at {containerd}: pods are looked up in another containerd",
                hint,
            )
        )
    else:
        checks.append(
            Check(
                "pod lookups",
                PASS,
                f"kubernetes.containerd_address {address} answers: containerd {_version_text(version)}",
            )
        )
    return checks


def print_check(check: Check) -> None:
    indent = " " * 6
    click.echo(_fill(check.detail, f"{check.status:<6}{check.name}: ", indent))
    if check.status in (FAIL, WARN) and check.hint:
        advice, *verbatim = check.hint.splitlines()  # verbatim: text to copy, such as TOML
        click.echo(_fill(advice, indent + "fix: ", indent + "  "))
        for line in verbatim:
            click.echo(indent + "  " + line)


def _fill(text: str, first: str, rest: str) -> str:
    """Wrapped to the terminal, except for words (paths) longer than a line."""
    return textwrap.fill(
        text,
        terminal_columns(),
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,
    )


@admin_command("doctor")
@click.option(
    "--containerd-config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_CONTAINERD_CONFIG,
    show_default=True,
    help="containerd's configuration file, which must declare the proxy plugin.",
)
@click.option(
    "--containerd-address",
    default=None,
    help=f"containerd's socket [default: the config's grpc.address, or {CONTAINERD_ADDRESS}].",
)
def doctor(inv: Invocation, containerd_config: Path, containerd_address: str | None) -> None:
    """Check the host, the root, the lowers, the daemon, and containerd: its config and what it
    loaded; exit 1 on a FAIL."""
    config, config_check = check_config(inv)
    target = Target.of(config)
    file = ContainerdFile.read(containerd_config)
    address = containerd_address or file.address
    version, why = ask_version(address, PROBE_TIMEOUT)
    known = version or installed_containerd()
    name, containerd_checks = check_containerd(file, target.socket, target.root, known, config.kubernetes.enabled)
    differ, differ_check = check_differ(file, target.socket, known)
    checks = [
        config_check,
        *check_lowers(config),
        check_kernel_overlay(),
        check_dtype(target.root),
        *check_overlay_options(config),
        check_root(target.root),
        *check_go_root(target.root),
        check_socket(target.socket, target.root),
        check_containerd_answers(address, version, why),
        *containerd_checks,
        check_plugin_loaded(address, name, version is not None),
        differ_check,
        *(
            [check_plugin_loaded(address, differ, version is not None, DIFFER_PLUGIN_TYPE, "differ loaded")]
            if differ_check.status == PASS
            else []
        ),
        *check_containerd_address(config, address),
    ]
    ok = all(c.status != FAIL for c in checks)
    if inv.as_json:
        print_json({"ok": ok, "checks": [asdict(c) for c in checks]})
    else:
        for check in checks:
            print_check(check)
    if not ok:
        sys.exit(1)
