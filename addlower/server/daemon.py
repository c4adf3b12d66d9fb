"""The daemon: owns the socket, the gRPC server, signals and the start-up checks.

Turns a Config into a serving process and back into exit codes. Must not know snapshot
rules (snapshotter.py) or flag parsing (cli.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import uvloop
from google.protobuf import empty_pb2, wrappers_pb2

from addlower import __version__
from addlower.api import admin_pb2
from addlower.core.config import ADMIN_SERVICE, Config, ConfigError
from addlower.core.errors import FailedPrecondition, SnapshotError
from addlower.core.labels import EXTRA_LOWERS_LABEL
from addlower.core.logformat import fields
from addlower.engine import metrics
from addlower.engine.content import ContentStore
from addlower.engine.snapshotter import Snapshotter
from addlower.server.diffservice import DiffService
from addlower.server.diffservice import routes as diff_routes
from addlower.server.grpcserver import GrpcServer
from addlower.server.rpc import Route
from addlower.server.service import BLOCKING, KUBERNETES, METHODS, SnapshotsService, routes

log = logging.getLogger("addlower")

SOCKET_MODE = 0o660
STOP_GRACE_SECONDS = 30.0
BLOCKING_WORKERS = 16
KUBERNETES_WORKERS = 4  # Mounts calls waiting for containerd's answer about a pod
RELOAD = "reload"  # one thread for reloads: one at a time, and never a blocking-pool thread


def _named(config: Config) -> str:
    return ",".join(f"{name}={lower.path}" for name, lower in config.named_lowers.items()) or "-"


class StartupError(Exception):
    """The daemon cannot start; the message says why and is shown to the operator."""


def _claim_socket(path: Path) -> None:
    """Remove a stale socket file; refuse when a live process still answers on it. Called before
    the root is touched: another daemon serving (ours, or the Go original on a root it is to hand
    over) must not see its root recovered or converted under it."""
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise StartupError(f"cannot listen on {path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("removed stale socket %s", path)
        return
    finally:
        probe.close()
    raise StartupError(f"cannot listen on {path}: another process is serving on it")


def notify_systemd(state: bytes) -> None:
    """Tell systemd (Type=notify units) how we are, when it asked by setting NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state, address)
        except OSError as exc:
            log.warning("could not notify systemd at %s: %s", address, exc)


SD_LISTEN_FDS_START = 3  # the first fd systemd passes (sd_listen_fds(3))


def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation: LISTEN_FDS, LISTEN_PID naming this
    process), or None; the variables are unset so that nothing this process starts takes it."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not count.isdigit() or int(count) < 1:
        return None
    if int(count) > 1:
        log.warning("systemd passed %s sockets: serving on the first, ignoring the rest", count)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    os.set_inheritable(SD_LISTEN_FDS_START, False)
    if (
        sock.family != socket.AF_UNIX
        or sock.type != socket.SOCK_STREAM
        or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    ):
        raise StartupError("the socket systemd passed is no listening unix stream socket: check the .socket unit")
    return sock


class Daemon:
    """The snapshotter and its server; serve() runs until SIGTERM or SIGINT, and applies a
    re-read config (`reread`) on SIGHUP."""

    def __init__(self, config: Config, reread: Callable[[], Config]):
        self.config = config
        self.reread = reread
        self.inherited = inherited_socket()
        if self.inherited is None:
            try:
                _claim_socket(config.socket_path)
            except OSError as exc:
                raise StartupError(f"cannot listen on {config.socket_path}: {exc}") from exc
        elif self.inherited.getsockname() != str(config.socket_path):
            log.warning(
                "systemd's socket is %s, the config says %s: serving on systemd's",
                self.inherited.getsockname(),
                config.socket_path,
            )
        try:
            self.snapshotter = Snapshotter(config.root_dir, config)
        except (OSError, RuntimeError, SnapshotError) as exc:
            raise StartupError(f"root {config.root_dir} is unusable: {exc}") from exc
        if self.inherited is None:
            config.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.pools = {
            BLOCKING: futures.ThreadPoolExecutor(max_workers=BLOCKING_WORKERS, thread_name_prefix="blocking"),
            KUBERNETES: futures.ThreadPoolExecutor(max_workers=KUBERNETES_WORKERS, thread_name_prefix="kubernetes"),
            RELOAD: futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reload"),
        }
        self._hup_pending = False
        differ = DiffService(self.snapshotter, ContentStore(config.kubernetes.containerd_address))
        service = SnapshotsService(self.snapshotter)
        admin = {
            f"/{ADMIN_SERVICE}/Reload": Route(request=empty_pb2.Empty, handler=self.Reload, pool=RELOAD),
            **{
                f"/{ADMIN_SERVICE}/{handler.__name__}": Route(request=request, handler=handler, pool=BLOCKING)
                for handler, request in (
                    (self.SquashCache, admin_pb2.CacheRequest),
                    (self.RollbackCache, admin_pb2.CacheRequest),
                    (self.PromoteWrites, admin_pb2.PromoteRequest),
                    (self.PushCache, admin_pb2.CacheRequest),
                    (self.PullCache, admin_pb2.CacheRequest),
                )
            },
        }
        calls = metrics.CallStats(
            [*METHODS, *(route.name for route in admin.values()), differ.Diff.__name__, differ.Apply.__name__]
        )
        self.server = GrpcServer(
            {**routes(service), **diff_routes(differ, BLOCKING), **admin}, self.pools, service.map_error, calls.observe
        )
        if config.metrics_address:
            sn = self.snapshotter
            store = sn.store
            try:
                metrics.serve(
                    config.metrics_address,
                    calls,
                    metrics.StoreView(
                        store.counts_by_kind,
                        lambda: store.active_labels(EXTRA_LOWERS_LABEL),
                        store.path,
                        config.root_dir,
                        lambda: (sn.pins.host_mounts, sn.config.max_host_mounts),
                        store.cache_figures,
                        store.committed_usage,
                    ),
                )
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {config.metrics_address}: {exc}") from exc

    def reload(self) -> str:
        """Re-read the config file and swap the policy, in the RELOAD pool's one thread (it may
        wait for a file still being written); returns what it applied. A file that cannot be used
        changes nothing: FailedPrecondition with the reason."""
        try:
            config = self.reread()
        except ConfigError as exc:
            metrics.CONFIG_RELOADS.inc("failure")
            log.error("reload refused, the running config stays: %s", exc)
            raise FailedPrecondition(f"reload refused, the running config stays: {exc}") from None
        later = self.snapshotter.reload(config)
        logging.getLogger().setLevel(config.log_level.upper())
        metrics.CONFIG_RELOADS.inc("success")
        c = self.snapshotter.config
        applied = {
            "allowed_roots": ",".join(c.allowed_roots),
            "named_lowers": _named(c),
            "max_host_mounts": c.max_host_mounts,
            "log_level": c.log_level,
            "kubernetes_allowed_roots": ",".join(c.kubernetes.allowed_roots) or "-",
            "kubernetes_namespaces": ",".join(c.kubernetes.namespaces) or "-",
        }
        log.info("reloaded the config", extra=fields(**applied))
        text = "reloaded the config: " + " ".join(f"{k}={v}" for k, v in applied.items())
        if later:
            log.warning("changed keys take effect only after a restart", extra=fields(keys=",".join(later)))
            text += f"\nchanged keys that take effect only after a restart: {', '.join(later)}"
        return text

    def Reload(self, request: empty_pb2.Empty) -> wrappers_pb2.StringValue:
        """addlower.v1.Admin/Reload, what `--reload` (systemd's ExecReload) calls."""
        return wrappers_pb2.StringValue(value=self.reload())

    def SquashCache(self, request: admin_pb2.CacheRequest) -> admin_pb2.CacheReply:
        """`addlower cache squash NAME`."""
        gen = self.snapshotter.squash(request.cache)
        said = (
            f"cache {request.cache}: squashed into generation {gen}"
            if gen
            else f"cache {request.cache}: nothing to squash"
        )
        return admin_pb2.CacheReply(message=said)

    def RollbackCache(self, request: admin_pb2.CacheRequest) -> admin_pb2.CacheReply:
        """`addlower cache rollback NAME [GEN] [--scope S]`."""
        return admin_pb2.CacheReply(message=self.snapshotter.rollback(request.cache, request.generation, request.scope))

    def PromoteWrites(self, request: admin_pb2.PromoteRequest) -> admin_pb2.CacheReply:
        """`addlower cache promote [--to-default] CONTAINER`."""
        if request.to_default:
            return admin_pb2.CacheReply(message=self.snapshotter.promote_to_default(request.key))
        return admin_pb2.CacheReply(message=self.snapshotter.promote_writes(request.key))

    def PushCache(self, request: admin_pb2.CacheRequest) -> admin_pb2.CacheReply:
        """`addlower cache push NAME [IMAGE]`."""
        return admin_pb2.CacheReply(message=self.snapshotter.push_cache(request.cache, request.image))

    def PullCache(self, request: admin_pb2.CacheRequest) -> admin_pb2.CacheReply:
        """`addlower cache pull NAME [IMAGE]`."""
        return admin_pb2.CacheReply(message=self.snapshotter.pull_cache(request.cache, request.image))

    def _hup(self) -> None:
        """SIGHUP (on the loop): a reload in the RELOAD pool, its refusal in the log and the
        metrics. A storm of signals queues at most one reload behind the one running."""
        if self._hup_pending:
            return
        self._hup_pending = True

        def reload() -> None:
            self._hup_pending = False  # a signal from now on reads the file again
            with contextlib.suppress(FailedPrecondition):
                self.reload()

        self.pools[RELOAD].submit(reload)

    async def serve(self) -> None:
        path = self.config.socket_path
        try:
            if self.inherited is not None:  # systemd holds it, and its mode: calls wait in its backlog across restarts
                path = Path(self.inherited.getsockname())
                await self.server.listen(sock=self.inherited)
            else:
                await self.server.listen(str(path))
                os.chmod(path, SOCKET_MODE)
        except OSError as exc:
            raise StartupError(f"cannot listen on {path}: {exc}") from exc
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.pools[BLOCKING].submit(self.snapshotter.after_listening)  # a stat per snapshot: not before listening
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._hup)
        c = self.config
        log.info(
            "serving",
            extra=fields(
                version=__version__,
                root=str(c.root_dir),
                socket=str(path),
                socket_from="systemd" if self.inherited is not None else "itself",
                async_remove=c.async_remove,
                upperdir_label=c.upperdir_label,
                mount_options=",".join(self.snapshotter.overlay_options) or "-",
                allowed_roots=",".join(c.allowed_roots),
                named_lowers=_named(c),
                kubernetes=f"{c.kubernetes.containerd_address}/{c.kubernetes.namespace}"
                if c.kubernetes.enabled
                else "off",
                metrics=c.metrics_address or "off",
            ),
        )
        notify_systemd(b"READY=1")
        await stopping.wait()
        notify_systemd(b"STOPPING=1")
        log.info("shutting down: no new calls, waiting up to %.0fs for those in flight", STOP_GRACE_SECONDS)
        await self.server.shutdown(STOP_GRACE_SECONDS)

    def close(self) -> None:
        for pool in self.pools.values():  # the server has let its calls finish: only reloads may be queued
            pool.shutdown(wait=True, cancel_futures=True)
        self.snapshotter.close()
        if self.inherited is None:  # systemd's socket stays, listening, for the next start
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.socket_path)


def run(config: Config, reread: Callable[[], Config]) -> int:
    """Serve until SIGTERM or SIGINT, re-reading the config with `reread` on SIGHUP; returns the
    process exit code."""
    os.umask(0o022)  # dirs made for missing lowers are 0755, whatever umask started the daemon
    try:
        daemon = Daemon(config, reread)
        try:
            uvloop.run(daemon.serve())
        finally:
            daemon.close()
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    log.info("stopped")
    return 0
