"""The operator's commands of `addlower`: ls, info, tree, du, cleanup and doctor.

They talk to the daemon through its socket with containerd's Snapshots API, like any client. When
the daemon does not answer, ls, info, tree and du read <root>/metadata.db read-only instead
(loaded by store.MetaStore, so the loading rules stay in store.py) and measure active snapshots'
upper dirs themselves. doctor walks the configured lowers with the daemon's own walk
(engine.pinning.probe, which makes nothing) and asks containerd what it runs (Version,
Introspection). This module is presentation and plumbing: it must not know snapshot rules
(errors, mounts, removal), must never write the store or a snapshot directory, and must not import
the daemon or its server. The commands are listed in COMMANDS, for cli.py to register.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import click
import grpc
import tomlkit

from addlower.api import introspection_pb2, introspection_pb2_grpc
from addlower.api import snapshots_pb2 as pb
from addlower.core import ctrdconfig
from addlower.core.config import (
    DEFAULT_CONFIG,
    DEFAULT_ROOT,
    DIFFER_NAME,
    PLUGIN_NAME,
    SOCKET_NAME,
    Config,
    ConfigError,
    load_config,
    read_toml,
)
from addlower.core.errors import InvalidArgument, NotFound, SnapshotError
from addlower.core.keys import resolve_key
from addlower.core.labels import EXTRA_LOWERS_LABEL
from addlower.core.lowers import Lower, NamedLower
from addlower.core.model import Info, Kind, Usage
from addlower.core.mounts import Layout
from addlower.core.pods import CONTAINERD_ADDRESS
from addlower.engine import fsutil, pinning
from addlower.engine.ctrdversion import TargetSupport, ask_version
from addlower.engine.snapshotter import measured_usage
from addlower.engine.store import DB_NAME, MetaStore, Reader, matching
from addlower.ops.client import SnapshotsClient
from addlower.ops.install import plugin_table

DEFAULT_CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
PROBE_TIMEOUT = 3.0  # seconds for the daemon to answer the reachability probe
SNAPSHOTTER_PLUGIN_TYPE = "io.containerd.snapshotter.v1"  # containerd's plugin type of snapshotters, proxies too
DIFFER_PLUGIN_TYPE = "io.containerd.differ.v1"  # and of differs
WIDTH = 80  # columns of a terminal that does not say
GAP = "  "  # between table columns
MIN_FLEXIBLE = 8  # a shrinking column keeps at least this many characters
INDENT = 4  # tree: characters per level
PROGRESS_THRESHOLD = 50  # measure more snapshots than this with a progress bar (on a terminal)

T = TypeVar("T")


# --- where the snapshotter lives -----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The snapshotter's root and socket, as the daemon would resolve them."""

    root: Path
    socket: Path

    @classmethod
    def of(cls, config: Config) -> Target:
        return cls(config.root_dir.absolute(), config.socket_path.absolute())

    @property
    def db(self) -> Path:
        return self.root / DB_NAME

    @property
    def layout(self) -> Layout:
        return Layout(str(self.root))


@dataclass(frozen=True)
class Invocation:
    """The options every admin command takes."""

    config_path: Path | None
    root_dir: Path | None
    address: Path | None
    as_json: bool

    def load(self) -> Config:
        """The daemon's configuration file (or the defaults) with this command's overrides."""
        return self.override(load_config(self.config_path))

    def override(self, config: Config) -> Config:
        flags: dict[str, Any] = {"root_dir": self.root_dir, "address": self.address}
        return replace(config, **{k: v for k, v in flags.items() if v is not None})

    def target(self) -> Target:
        try:
            return Target.of(self.load())
        except ConfigError as exc:
            raise click.ClickException(f"bad configuration: {exc}") from None


def admin_command(name: str) -> Callable[[Callable[..., None]], click.Command]:
    """A click command with the common options, handed to the function as an Invocation."""

    def decorate(fn: Callable[..., None]) -> click.Command:
        @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
        @click.option(
            "--address",
            type=click.Path(path_type=Path, dir_okay=False),
            default=None,
            help="The daemon's socket [default: the config file's, or <root-dir>/grpc.socks].",
        )
        @click.option(
            "--root-dir",
            type=click.Path(path_type=Path, file_okay=False),
            default=None,
            help=f"The snapshotter's root [default: the config file's, or {DEFAULT_ROOT}].",
        )
        @click.option(
            "--config",
            "config_path",
            type=click.Path(path_type=Path, dir_okay=False),
            default=None,
            help=f"The daemon's configuration file [default: {DEFAULT_CONFIG}, if it exists].",
        )
        @functools.wraps(fn)
        def command(
            config_path: Path | None, root_dir: Path | None, address: Path | None, as_json: bool, **kwargs: Any
        ) -> None:
            try:
                fn(Invocation(config_path, root_dir, address, as_json), **kwargs)
            except SnapshotError as exc:
                raise click.ClickException(str(exc)) from None

        return click.command(name, context_settings={"help_option_names": ["-h", "--help"]})(command)

    return decorate


# --- where snapshots come from: the daemon, or its store read-only -------------------------------


class Source(Protocol):
    def list(self, filters: Sequence[str]) -> list[Info]: ...

    def stat(self, key: str) -> Info: ...

    def usage(self, key: str) -> Usage | None:
        """None when the snapshot went away (or its directory did) after it was listed."""


_ERRORS = {cls.code.value: cls for cls in SnapshotError.__subclasses__()}


def _call(thunk: Callable[[], T]) -> T:
    """Run RPCs, raising the daemon's errors as the addlower.core.errors types its codes stand for."""
    try:
        return thunk()
    except grpc.RpcError as exc:
        raise _ERRORS.get(exc.code().value[0], SnapshotError)(exc.details()) from None


def _info(msg: pb.Info) -> Info:
    return Info(
        msg.name,
        msg.parent,
        Kind(msg.kind),
        msg.created_at.ToNanoseconds(),
        msg.updated_at.ToNanoseconds(),
        dict(msg.labels),
    )


@dataclass
class DaemonSource:
    """The daemon, through containerd's Snapshots API on its socket."""

    socket: Path
    client: SnapshotsClient

    def probe(self) -> str | None:
        """None if the snapshotter answers, else why not. The empty key, which no snapshot can
        have, must give NOT_FOUND."""
        if not self.socket.exists():
            return f"no socket at {self.socket}"
        try:
            self.client.stub.Stat(pb.StatSnapshotRequest(snapshotter=PLUGIN_NAME, key=""), timeout=PROBE_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                return f"{exc.code().name}: {exc.details()}"
        return None

    def list(self, filters: Sequence[str]) -> list[Info]:
        return _call(lambda: [_info(i) for i in self.client.list(*filters)])

    def stat(self, key: str) -> Info:
        return _info(_call(lambda: self.client.stat(key)))

    def usage(self, key: str) -> Usage | None:
        try:
            reply = _call(lambda: self.client.usage(key))
        except NotFound:
            return None
        return Usage(reply.size, reply.inodes)

    def cleanup(self) -> None:
        _call(self.client.cleanup)


@dataclass
class StoreSource:
    """The committed metadata, read from the store; active snapshots measured on disk."""

    reader: Reader
    layout: Layout

    def list(self, filters: Sequence[str]) -> list[Info]:
        return [info for _, info in matching(self.reader.walk(), filters)]

    def stat(self, key: str) -> Info:
        return self.reader.get_info(key)[1]

    def usage(self, key: str) -> Usage | None:
        try:
            return measured_usage(self.layout, *self.reader.get_info(key))
        except FileNotFoundError:
            return None


@contextmanager
def connect(socket: Path) -> Iterator[DaemonSource]:
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        yield DaemonSource(socket, SnapshotsClient(channel))


@contextmanager
def read_only_store(db: Path) -> Iterator[Reader]:
    """The committed metadata in `db`, read without writing it or blocking its daemon."""
    if not db.is_file():
        raise click.ClickException(f"no metadata at {db}")
    try:
        store = MetaStore(db, readonly=True)
    except (sqlite3.Error, RuntimeError) as exc:
        raise click.ClickException(f"cannot read {db}: {exc}") from None
    try:
        with store.read() as reader:
            yield reader
    finally:
        store.close()


@contextmanager
def open_source(target: Target) -> Iterator[Source]:
    """The daemon if it answers on its socket, else its store read-only (said on stderr)."""
    with connect(target.socket) as daemon:
        if daemon.probe() is None:
            yield daemon
            return
    click.echo(f"daemon not reachable; reading {target.db} read-only", err=True)
    with read_only_store(target.db) as reader:
        yield StoreSource(reader, target.layout)


def measure(source: Source, infos: Sequence[Info]) -> list[tuple[Info, Usage | None]]:
    """Each snapshot's usage; a progress bar on stderr for many snapshots on a terminal."""
    shown = len(infos) > PROGRESS_THRESHOLD and sys.stderr.isatty()
    bar = click.progressbar(infos, label="measuring", file=sys.stderr) if shown else nullcontext(infos)
    with bar as items:
        return [(info, source.usage(info.name)) for info in items]


# --- presentation --------------------------------------------------------------------------------


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


_AGE_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def human_age(seconds: float) -> str:
    for suffix, length in _AGE_UNITS:
        if seconds >= length:
            return f"{int(seconds // length)}{suffix}"
    return "0s"


def terminal_columns() -> int:
    """COLUMNS, else the terminal's width, else WIDTH (shutil's rule)."""
    return shutil.get_terminal_size((WIDTH, 24)).columns


def fit_width(wide: bool) -> int | None:
    """How wide tables and trees may be: the terminal's width (or COLUMNS); None, nothing cut, with
    --wide or when stdout is no terminal and COLUMNS is unset (a pipe into grep gets whole names)."""
    if wide or ("COLUMNS" not in os.environ and not sys.stdout.isatty()):
        return None
    return terminal_columns()


wide_option = click.option("--wide", is_flag=True, help="Never cut names to fit the terminal.")


def ellipsize(text: str, width: int) -> str:
    """`text` cut to `width` characters by an ellipsis in the middle."""
    if len(text) <= width:
        return text
    keep = max(width - 1, 0)
    head = (keep + 1) // 2
    return text[:head] + "…" + text[len(text) - (keep - head) :]


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="seconds")


def _age(ns: int) -> str:
    return human_age((time.time_ns() - ns) / 1e9)


def _kind(info: Info) -> str:
    return info.kind.label


@dataclass(frozen=True)
class Column:
    header: str
    flexible: bool = False  # shrinks, by an ellipsis in the middle, for the table to fit
    right: bool = False


def render_table(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None) -> list[str]:
    """Rows under headers, fitting `width` (None: any) by shrinking the widest flexible column first."""
    table = [[c.header for c in columns], *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    excess = 0 if width is None else sum(widths) + len(GAP) * (len(columns) - 1) - width
    while excess > 0:
        shrinkable = [i for i, c in enumerate(columns) if c.flexible and widths[i] > MIN_FLEXIBLE]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
        excess -= 1
    return [
        GAP.join(
            ellipsize(cell, w).rjust(w) if c.right else ellipsize(cell, w).ljust(w)
            for cell, w, c in zip(row, widths, columns, strict=True)
        ).rstrip()
        for row in table
    ]


def snapshot_json(info: Info, usage: Usage | None) -> dict[str, Any]:
    return {
        "name": info.name,
        "kind": _kind(info),
        "parent": info.parent,
        "created_at": _iso(info.created_at),
        "updated_at": _iso(info.updated_at),
        "size": usage.size if usage is not None else None,
        "inodes": usage.inodes if usage is not None else None,
        "extra_lowers": info.labels.get(EXTRA_LOWERS_LABEL, ""),
        "labels": dict(info.labels),
    }


def _size(usage: Usage | None) -> str:
    return human_size(usage.size) if usage is not None else "?"


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


# --- ls, info, tree, du, cleanup -----------------------------------------------------------------

LS_COLUMNS = (
    Column("NAME", flexible=True),
    Column("KIND"),
    Column("PARENT", flexible=True),
    Column("SIZE", right=True),
    Column("EXTRA LOWERS", flexible=True),
    Column("AGE", right=True),
)


@admin_command("ls")
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="FILTER",
    help='containerd filter, e.g. kind==active or labels."a.b"~=x; repeated: any may match.',
)
@wide_option
def ls(inv: Invocation, filters: tuple[str, ...], wide: bool) -> None:
    """List snapshots: kind, parent, size, extra lower dirs, age."""
    with open_source(inv.target()) as source:
        measured = measure(source, source.list(filters))
    if inv.as_json:
        _print_json([snapshot_json(info, usage) for info, usage in measured])
        return
    rows = [
        [
            info.name,
            _kind(info),
            info.parent or "-",
            _size(usage),
            info.labels.get(EXTRA_LOWERS_LABEL) or "-",
            _age(info.created_at),
        ]
        for info, usage in measured
    ]
    click.echo("\n".join(render_table(LS_COLUMNS, rows, fit_width(wide))))


@admin_command("info")
@click.argument("name")
@click.option(
    "--namespace", "-n", default=None, help="containerd namespace of NAME, when it is containerd's name (as ctr's -n)."
)
def info(inv: Invocation, name: str, namespace: str | None) -> None:
    """Show one snapshot: every field, its usage and its labels. NAME is its key, or the name
    containerd's clients use (`ctr snapshots info` takes, e.g. a container id)."""
    with open_source(inv.target()) as source:
        key = resolve_key(name, [i.name for i in source.list(())], namespace)
        snapshot = source.stat(key)
        usage = source.usage(key)
    if inv.as_json:
        _print_json(snapshot_json(snapshot, usage))
        return
    fields = [
        ("name", snapshot.name),
        ("kind", _kind(snapshot)),
        ("parent", snapshot.parent or "-"),
        ("created", f"{_iso(snapshot.created_at)} ({_age(snapshot.created_at)} ago)"),
        ("updated", f"{_iso(snapshot.updated_at)} ({_age(snapshot.updated_at)} ago)"),
        ("size", _size(usage)),
        ("inodes", str(usage.inodes) if usage is not None else "?"),
        ("labels", "" if snapshot.labels else "-"),
    ]
    lines = [f"{name + ':':<9}{value}".rstrip() for name, value in fields]
    lines += [f"  {k}={v}" for k, v in sorted(snapshot.labels.items())]
    click.echo("\n".join(lines))


@dataclass
class Node:
    info: Info
    children: list[Node] = field(default_factory=list)


def build_forest(infos: Sequence[Info]) -> list[Node]:
    """Parent chains as trees: roots have no parent (or one not listed), children sorted by name."""
    nodes = {info.name: Node(info) for info in sorted(infos, key=lambda i: i.name)}
    roots: list[Node] = []
    for node in nodes.values():
        parent = nodes.get(node.info.parent)
        (parent.children if parent else roots).append(node)
    return roots


def _tree_line(prefix: str, info: Info, width: int | None) -> str:
    suffix = "" if info.kind == Kind.COMMITTED else f" ({_kind(info)})"
    if width is None:
        return prefix + info.name + suffix
    most = width // 2  # deeper indentation is cut on the left, keeping the innermost levels whole
    if len(prefix) > most:
        prefix = "…" + prefix[len(prefix) - (most - 1) // INDENT * INDENT :]
    return prefix + ellipsize(info.name, max(width - len(prefix) - len(suffix), MIN_FLEXIBLE)) + suffix


def draw_tree(node: Node, width: int | None, prefix: str = "", continuation: str = "") -> list[str]:
    """`node` and its descendants in box-drawing characters, `width` columns wide (None: any)."""
    lines = [_tree_line(prefix, node.info, width)]
    for i, child in enumerate(node.children):
        last = i == len(node.children) - 1
        lines += draw_tree(
            child, width, continuation + ("└── " if last else "├── "), continuation + ("    " if last else "│   ")
        )
    return lines


def tree_json(node: Node) -> dict[str, Any]:
    return {"name": node.info.name, "kind": _kind(node.info), "children": [tree_json(c) for c in node.children]}


@admin_command("tree")
@wide_option
def tree(inv: Invocation, wide: bool) -> None:
    """Draw the snapshots' parent chains as trees."""
    with open_source(inv.target()) as source:
        roots = build_forest(source.list(()))
    if inv.as_json:
        _print_json([tree_json(root) for root in roots])
        return
    for root in roots:
        click.echo("\n".join(draw_tree(root, fit_width(wide))))


DU_COLUMNS = (Column("NAME", flexible=True), Column("KIND"), Column("SIZE", right=True), Column("INODES", right=True))


@admin_command("du")
@wide_option
def du(inv: Invocation, wide: bool) -> None:
    """Disk usage of every snapshot, largest first, and the total."""
    with open_source(inv.target()) as source:
        measured = measure(source, source.list(()))
    measured.sort(key=lambda m: (-(m[1].size if m[1] is not None else 0), m[0].name))
    known = [usage for _, usage in measured if usage is not None]
    total = Usage(sum(u.size for u in known), sum(u.inodes for u in known))
    if inv.as_json:
        _print_json({"snapshots": [snapshot_json(info, usage) for info, usage in measured], "total": asdict(total)})
        return
    rows = [
        [info.name, _kind(info), _size(usage), str(usage.inodes) if usage is not None else "?"]
        for info, usage in measured
    ]
    rows.append(["total", "", human_size(total.size), str(total.inodes)])
    click.echo("\n".join(render_table(DU_COLUMNS, rows, fit_width(wide))))


def _entries(directory: str) -> set[str]:
    try:
        return set(os.listdir(directory))
    except FileNotFoundError:
        return set()


@admin_command("cleanup")
def cleanup(inv: Invocation) -> None:
    """Have the daemon delete directories no snapshot owns (needs the daemon)."""
    target = inv.target()
    snapshots_dir = target.layout.snapshots
    with connect(target.socket) as daemon:
        reason = daemon.probe()
        if reason is not None:
            raise click.ClickException(f"cleanup needs the daemon, which does not answer: {reason}")
        before = _entries(snapshots_dir)
        daemon.cleanup()
    removed = sorted(before - _entries(snapshots_dir))
    if inv.as_json:
        _print_json({"removed": len(removed), "directories": removed})
        return
    click.echo(
        f"removed {len(removed)} director{'y' if len(removed) == 1 else 'ies'} from {snapshots_dir}"
        + (f": {', '.join(removed)}" if removed else "")
    )


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
        return inv.override(Config()), Check("config file", FAIL, str(exc), f"fix {shown}: see README.md")
    found = inv.config_path is not None or DEFAULT_CONFIG.exists()
    return config, Check("config file", PASS, f"{shown} is valid" if found else f"no {shown}: defaults")


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


def check_socket(socket: Path, root: Path) -> Check:
    with connect(socket) as daemon:
        reason = daemon.probe()
    if reason is not None:
        address = "" if socket == root / SOCKET_NAME else f" --address {socket}"
        return Check(
            "socket",
            FAIL,
            f"the snapshotter does not answer: {reason}",
            f"start the daemon: {PLUGIN_NAME} --root-dir {root}{address} (and read its log)",
        )
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
    checks.append(
        Check("image filesystem", PASS, f"exports.root is {root}: kubelet's ImageFsInfo sees the layers")
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
        _print_json({"ok": ok, "checks": [asdict(c) for c in checks]})
    else:
        for check in checks:
            print_check(check)
    if not ok:
        sys.exit(1)


COMMANDS: list[click.Command] = [ls, info, tree, du, cleanup, doctor]
