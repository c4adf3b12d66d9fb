"""Command-line entry points: the daemon command (flag-compatible with the original Go program)
and the `addlower` admin command.

Only flag parsing and logging setup live here; serving is daemon.py's job.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from addlower import __version__
from addlower.core.config import (
    DEFAULT_CONFIG,
    DEFAULT_ROOT,
    LOG_FORMATS,
    LOG_LEVELS,
    SOCKET_NAME,
    Config,
    ConfigError,
    check_metrics_address,
    load_config,
)
from addlower.core.logformat import FORMATTERS, JournalPrefix
from addlower.server.daemon import run

EX_CONFIG = 78  # sysexits.h: a configuration error


def _to_journal() -> bool:
    """Whether stderr is systemd's journal stream (JOURNAL_STREAM names its device and inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def _setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = FORMATTERS[fmt]()
    handler.setFormatter(JournalPrefix(formatter) if _to_journal() else formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("hpack").setLevel(max(logging.INFO, logging.getLogger().level))  # ~20 lines a call


@click.command(name="overlay-custom-add-lower-snapshotter", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help=f"TOML configuration file [default: {DEFAULT_CONFIG}, if it exists]. Flags override it.",
)
@click.option(
    "--root-dir",
    type=click.Path(path_type=Path),
    default=None,
    help=f"Directory for snapshots and metadata; the socket is <root-dir>/grpc.socks [default: {DEFAULT_ROOT}].",
)
@click.option(
    "--async-remove",
    type=click.BOOL,
    default=None,
    is_flag=False,
    flag_value=True,
    help="Defer deleting removed snapshots' directories until Cleanup; --async-remove=false deletes "
    "at once [default: true].",
)
@click.option(
    "--upperdir-label",
    type=click.BOOL,
    default=None,
    is_flag=False,
    flag_value=True,
    help='Add the label "containerd.io/snapshot/overlay.upperdir" to every snapshot\'s info [default: false].',
)
@click.option(
    "--address",
    type=click.Path(path_type=Path),
    default=None,
    help="Listen on this unix socket instead of <root-dir>/grpc.socks.",
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default=None, help="[default: info]")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default=None, help="[default: text]")
@click.option(
    "--metrics-address",
    default=None,
    help="Serve Prometheus metrics on this host:port (e.g. 127.0.0.1:9101) [default: off].",
)
@click.option(
    "--reload",
    is_flag=True,
    help="Do not serve: have the daemon serving on this configuration's socket re-read its config file, "
    "print its answer and exit 1 if it refused the file (systemd's ExecReload).",
)
@click.version_option(__version__, "--version", "-v", prog_name="overlay-custom-add-lower-snapshotter")
def serve(config_path: Path | None, **flags: Any) -> None:
    """Run the snapshotter, serving containerd's Snapshots API as a proxy plugin. SIGHUP re-reads
    the config file and applies its policy (lowers, kubernetes roots) and log level."""
    try:
        check_metrics_address(flags["metrics_address"])
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--metrics-address") from None

    reload_ = flags.pop("reload")

    def flagged(config: Config) -> Config:
        """`config` with the flags on top, its paths absolute."""
        config = replace(config, **{k: v for k, v in flags.items() if v is not None})
        return replace(
            config, root_dir=config.root_dir.absolute(), address=config.address.absolute() if config.address else None
        )

    def read(reload: bool = False) -> Config:
        """The file (or the defaults), flags on top: at start, and at each reload (`reload`)."""
        return flagged(load_config(config_path, reload))

    if reload_:
        sys.exit(_ask_reload(read, lambda: flagged(Config())))
    try:
        config = read()
    except ConfigError as exc:
        _setup_logging("info")
        logging.getLogger("addlower").error("bad configuration: %s", exc)
        sys.exit(EX_CONFIG)  # the unit does not restart on it (RestartPreventExitStatus): fix the file
    _setup_logging(config.log_level, config.log_format)
    sys.exit(run(config, lambda: read(reload=True)))


def _ask_reload(read: Callable[[], Config], defaults: Callable[[], Config]) -> int:
    """--reload: the daemon re-reads its file; its answer, and 1 when it refused. The daemon is
    $MAINPID's socket under systemd; by hand, this configuration's (`defaults`, the flags on the
    defaults, when the file is the broken one)."""
    from addlower.ops.client import listening_socket, reload

    pid = os.environ.get("MAINPID", "")
    socket = listening_socket(int(pid)) if pid.isdigit() else None
    if socket is None:
        try:
            socket = read().socket_path
        except ConfigError:
            socket = defaults().socket_path
    ok, text = reload(socket)
    click.echo(text, err=not ok)
    return 0 if ok else 1


class AdminGroup(click.Group):
    """Loads the admin subcommands, and the gRPC client they use, only when one is asked for:
    the daemon shares this module and need not carry them."""

    @staticmethod
    def _admin() -> dict[str, click.Command]:
        from addlower.ops.admin import COMMANDS

        return {command.name: command for command in COMMANDS if command.name}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._admin()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or self._admin().get(name)


@click.group(cls=AdminGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="addlower")
def admin() -> None:
    """Administer the addlower snapshotter."""


admin.add_command(serve, name="serve")


@admin.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where the demo keeps the snapshotter root, containerd's state and logs: a dir of yours that only "
    "you may write in [default: a new private one under $TMPDIR].",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@click.option("--exit", "exit_after", is_flag=True, help="Stop after the first container instead of waiting.")
def demo(workdir: Path | None, log_level: str, exit_after: bool) -> None:
    """Run the snapshotter with a private containerd beside it and start a container on it."""
    from addlower.dev.demo import DemoError, run_demo

    try:
        sys.exit(run_demo(workdir, log_level, keep_running=not exit_after))
    except DemoError as exc:
        raise click.ClickException(str(exc)) from None


def _go_style_flags(argv: list[str]) -> list[str]:
    """Accept the original's single-dash long flags (-root-dir=X) as well as --root-dir=X."""
    return [("-" + a) if re.match(r"^-[a-z][a-z-]+(=.*)?$", a) else a for a in argv]


def snapshotter_main() -> None:
    serve.main(args=_go_style_flags(sys.argv[1:]), prog_name="overlay-custom-add-lower-snapshotter")


if __name__ == "__main__":
    snapshotter_main()


def _node_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options install and uninstall share: which node, how commands reach it, dry run."""
    for option in reversed(
        [
            click.option(
                "--host-root",
                type=click.Path(path_type=Path, file_okay=False),
                default=Path("/"),
                show_default=True,
                help="Where the node's / is mounted; files are written under it only.",
            ),
            click.option(
                "--nsenter",
                is_flag=True,
                help="Run the node's commands (systemctl, python3, containerd --version) in PID 1's namespaces "
                "(a pod with hostPID). Without it they run here, and only when --host-root is /.",
            ),
            click.option("--dry-run", is_flag=True, help="Print every change (files with diffs, commands), make none."),
            click.option(
                "--socket",
                default=str(DEFAULT_ROOT / SOCKET_NAME),
                show_default=True,
                help="The snapshotter's socket, as containerd on the node dials it.",
            ),
            click.option(
                "--containerd-version",
                default=None,
                metavar="X.Y.Z",
                help="The node's containerd version [default: asked of its containerd].",
            ),
        ]
    ):
        command = option(command)
    return command


@admin.command()
@_node_options
@click.option(
    "--exec-start",
    default=None,
    metavar="PATH",
    help="The daemon's path on the node for the unit's ExecStart [default: the venv --wheels builds, "
    "else this installation's overlay-custom-add-lower-snapshotter].",
)
@click.option(
    "--wheels",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Wheelhouse (addlower and its dependencies) to build a venv from on the node, in /opt/addlower.",
)
@click.option(
    "--python",
    "python",
    default="python3",
    show_default=True,
    help="The node's python (3.11 to 3.13) for the venv --wheels builds.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help=f"Daemon config file to install as {DEFAULT_CONFIG} (checked first).",
)
@click.option("--start", is_flag=True, help="Enable and (re)start the unit (systemctl, on the node).")
@click.option("--restart-containerd", is_flag=True, help="Restart containerd if its config changed.")
@click.option(
    "--differ/--no-differ",
    default=True,
    show_default=True,
    help="Make the daemon containerd's first differ (1.7+), so commits of containers never hold their extra "
    "lowers; while the daemon is down, containerd 1.7 then unpacks no image at all.",
)
@click.option(
    "--cri-default/--no-cri-default",
    default=None,
    help="Make the snapshotter CRI's default, so every pod uses it (and every image is unpacked again) "
    "[default: yes, unless --runtime-handler].",
)
@click.option(
    "--runtime-handler",
    metavar="NAME",
    default=None,
    help="Add a CRI runtime handler NAME (runc) whose pods use the snapshotter: pods of a RuntimeClass with "
    "handler NAME do, others keep containerd's default (1.7+).",
)
def install(
    host_root: Path,
    nsenter: bool,
    dry_run: bool,
    socket: str,
    containerd_version: str | None,
    exec_start: str | None,
    wheels: Path | None,
    python: str,
    config_path: Path | None,
    start: bool,
    restart_containerd: bool,
    differ: bool,
    cri_default: bool | None,
    runtime_handler: str | None,
) -> None:
    """Put the daemon on a node under systemd and point its containerd at it.

    On a node: `addlower install --start --restart-containerd`. The DaemonSet's init container adds
    `--host-root /host --nsenter --wheels /wheels`.
    """
    from addlower.ops.install import Install, InstallError, node, plan_install

    try:
        host, version, config = node(host_root, nsenter, containerd_version, config_path)
        request = Install(
            socket,
            str(config.root_dir),
            version,
            exec_start,
            wheels,
            python,
            config_path.read_text() if config_path else None,
            start,
            restart_containerd,
            differ,
            cri_default,
            runtime_handler,
        )
        plan_install(host, request).carry_out(host, dry_run, click.echo)
    except (InstallError, ConfigError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@admin.command()
@_node_options
@click.option("--stop", is_flag=True, help="Stop and disable the unit, then remove the venv under /opt/addlower.")
@click.option("--restart-containerd", is_flag=True, help="Restart containerd once its config is restored.")
@click.option("--force", is_flag=True, help="Restore containerd's backup config even if the config changed since.")
def uninstall(
    host_root: Path,
    nsenter: bool,
    dry_run: bool,
    socket: str,
    containerd_version: str | None,
    stop: bool,
    restart_containerd: bool,
    force: bool,
) -> None:
    """Undo `addlower install`: containerd's config from its backup, the unit, the venv.

    The daemon's config and the snapshots under its root are kept.
    """
    from addlower.ops.install import InstallError, Uninstall, node, plan_uninstall

    try:
        host, version, config = node(host_root, nsenter, containerd_version)
        request = Uninstall(socket, str(config.root_dir), version, stop, restart_containerd, force)
        plan_uninstall(host, request).carry_out(host, dry_run, click.echo)
    except (InstallError, ConfigError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
