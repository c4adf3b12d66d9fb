"""Command-line entry points: the daemon command (flag-compatible with the original Go program)
and the `addlower` admin command.

Only flag parsing and logging setup live here; serving is daemon.py's job.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import replace
from pathlib import Path

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
from addlower.core.logformat import FORMATTERS
from addlower.server.daemon import run

def _setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FORMATTERS[fmt]())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("hpack").setLevel(max(logging.INFO, logging.getLogger().level))  # ~20 lines a call


@click.command(name="overlay-custom-add-lower-snapshotter",
               context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help=f"TOML configuration file [default: {DEFAULT_CONFIG}, if it exists]. Flags override it.")
@click.option("--root-dir", type=click.Path(path_type=Path), default=None,
              help=f"Directory for snapshots and metadata; the socket is <root-dir>/grpc.socks [default: {DEFAULT_ROOT}].")
@click.option("--async-remove", type=click.BOOL, default=None, is_flag=False, flag_value=True,
              help="Defer deleting removed snapshots' directories until Cleanup; --async-remove=false deletes "
                   "at once [default: true].")
@click.option("--upperdir-label", type=click.BOOL, default=None, is_flag=False, flag_value=True,
              help='Add the label "containerd.io/snapshot/overlay.upperdir" to every snapshot\'s info '
                   "[default: false].")
@click.option("--address", type=click.Path(path_type=Path), default=None,
              help="Listen on this unix socket instead of <root-dir>/grpc.socks.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default=None, help="[default: info]")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default=None, help="[default: text]")
@click.option("--metrics-address", default=None,
              help="Serve Prometheus metrics on this host:port (e.g. 127.0.0.1:9101) [default: off].")
@click.version_option(__version__, "--version", "-v", prog_name="overlay-custom-add-lower-snapshotter")
def serve(config_path: Path | None, **flags: object) -> None:
    """Run the snapshotter, serving containerd's Snapshots API as a proxy plugin. SIGHUP re-reads
    the config file and applies its policy (lowers, kubernetes roots) and log level."""
    try:
        check_metrics_address(flags["metrics_address"])  # type: ignore[arg-type]
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--metrics-address") from None

    def read() -> Config:
        """The file (or the defaults), flags on top: at start and at each SIGHUP."""
        config = replace(load_config(config_path), **{k: v for k, v in flags.items() if v is not None})
        return replace(config, root_dir=config.root_dir.absolute(),
                       address=config.address.absolute() if config.address else None)

    try:
        config = read()
    except ConfigError as exc:
        _setup_logging("info")
        logging.getLogger("addlower").error("bad configuration: %s", exc)
        sys.exit(1)
    _setup_logging(config.log_level, config.log_format)
    sys.exit(run(config, read))


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
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/addlower-demo"), show_default=True,
              help="Where the demo keeps the snapshotter root, containerd's state and logs.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@click.option("--exit", "exit_after", is_flag=True, help="Stop after the first container instead of waiting.")
def demo(workdir: Path, log_level: str, exit_after: bool) -> None:
    """Run the snapshotter with a private containerd beside it and start a container on it."""
    from addlower.dev.demo import run_demo

    sys.exit(run_demo(workdir, log_level, keep_running=not exit_after))


def _go_style_flags(argv: list[str]) -> list[str]:
    """Accept the original's single-dash long flags (-root-dir=X) as well as --root-dir=X."""
    return [("-" + a) if re.match(r"^-[a-z][a-z-]+(=.*)?$", a) else a for a in argv]


def snapshotter_main() -> None:
    serve.main(args=_go_style_flags(sys.argv[1:]), prog_name="overlay-custom-add-lower-snapshotter")


if __name__ == "__main__":
    snapshotter_main()


@admin.command()
@click.option("--host-root", type=click.Path(path_type=Path, file_okay=False), default=Path("/host"), show_default=True,
              help="Where the node's / is mounted.")
@click.option("--socket", default=str(DEFAULT_ROOT / SOCKET_NAME), show_default=True,
              help="The snapshotter's socket, as containerd on the node will dial it.")
@click.option("--unit", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=Path("/deploy/systemd/overlay-custom-add-lower-snapshotter.service"), show_default=True,
              help="systemd unit template to install.")
@click.option("--wheels", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="Directory of wheels (addlower and its dependencies) to install on the node.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help=f"Daemon config file to install as {DEFAULT_CONFIG} (checked first).")
@click.option("--start/--no-start", default=True, show_default=True,
              help="Build the venv, start the unit and restart containerd in the node's namespaces.")
@click.option("--containerd-version", default=None, metavar="X.Y.Z",
              help="The node's containerd version [default: asked of <host-root>/usr/bin/containerd].")
def install(host_root: Path, socket: str, unit: Path, wheels: Path | None, config_path: Path | None,
            start: bool, containerd_version: str | None) -> None:
    """Put the daemon on a node and point its containerd at it (the DaemonSet's init container)."""
    from addlower.core.ctrdconfig import parse_version
    from addlower.ops.install import InstallError, containerd_version as node_containerd, install as run_install

    try:
        config = load_config(config_path) if config_path is not None else Config()  # a bad file stops here
        config_text = config_path.read_text() if config_path else None
        version = parse_version(f" {containerd_version}") if containerd_version else node_containerd(host_root)
        for line in run_install(host_root, socket, str(config.root_dir), unit.read_text(), wheels, start, version,
                                config_text):
            click.echo(line)
    except (InstallError, ConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
