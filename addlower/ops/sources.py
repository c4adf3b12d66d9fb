"""Where the operator's commands find snapshots: the daemon through its socket (containerd's
Snapshots API, like any client), or, when it does not answer, <root>/metadata.db read-only (loaded
by store.MetaStore, so the loading rules stay in store.py), with active snapshots' upper dirs
measured here. Also which root and socket a command works on, and the options every command
takes. Must never write the store or a snapshot directory.
"""

from __future__ import annotations

import functools
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import click
import grpc

from addlower.api import snapshots_pb2 as pb
from addlower.core.config import (
    DEFAULT_CONFIG,
    DEFAULT_ROOT,
    PLUGIN_NAME,
    Config,
    ConfigError,
    load_config,
)
from addlower.core.errors import NotFound, SnapshotError
from addlower.core.model import Info, Kind, Usage
from addlower.core.mounts import Layout
from addlower.engine import wire
from addlower.engine.snapshotter import measured_usage
from addlower.engine.store import DB_NAME, MetaStore, Reader, matching
from addlower.ops.client import SnapshotsClient

PROBE_TIMEOUT = 3.0  # seconds for the daemon to answer the reachability probe
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
        """The root and socket to work on. A config file that cannot be used (caught halfway
        through an edit, say) is no obstacle when --root-dir or --address says where to look."""
        try:
            return Target.of(self.load())
        except ConfigError as exc:
            if self.root_dir is None and self.address is None:
                raise click.ClickException(f"bad configuration: {exc}") from None
            click.echo(f"warning: bad configuration ({exc}); going by --root-dir/--address", err=True)
            return Target.of(self.override(Config()))


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
        store = MetaStore(db, wire.encode_field, readonly=True)
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
