"""Command-line entry points: the daemon command (flag-compatible with the original Go program)
and the `addlower` admin command.

Only flag parsing and logging setup live here; serving is daemon.py's job.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import click

from . import __version__
from .daemon import DEFAULT_ROOT, DaemonConfig, run
from .snapshotter import Options

LOG_FORMAT = "time=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)


@click.command(name="overlay-custom-add-lower-snapshotter",
               context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root-dir", type=click.Path(path_type=Path), default=DEFAULT_ROOT, show_default=True,
              help="Directory for snapshots and metadata; the socket is <root-dir>/grpc.socks.")
@click.option("--async-remove", type=click.BOOL, default=True, is_flag=False, flag_value=True,
              show_default=True,
              help="Defer deleting removed snapshots' directories until Cleanup (--async-remove=false to delete at once).")
@click.option("--upperdir-label", type=click.BOOL, default=False, is_flag=False, flag_value=True,
              show_default=True,
              help='Add the label "containerd.io/snapshot/overlay.upperdir" to active snapshots\' info.')
@click.option("--address", type=click.Path(path_type=Path), default=None,
              help="Listen on this unix socket instead of <root-dir>/grpc.socks.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.version_option(__version__, "--version", "-v", prog_name="overlay-custom-add-lower-snapshotter")
def serve(root_dir: Path, async_remove: bool, upperdir_label: bool, address: Path | None,
          log_level: str) -> None:
    """Run the snapshotter, serving containerd's Snapshots API as a proxy plugin."""
    _setup_logging(log_level)
    config = DaemonConfig(
        root=root_dir.absolute(),
        address=address.absolute() if address else None,
        options=Options(async_remove=async_remove, upperdir_label=upperdir_label),
    )
    sys.exit(run(config))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    from .demo import run_demo

    sys.exit(run_demo(workdir, log_level, keep_running=not exit_after))


def _go_style_flags(argv: list[str]) -> list[str]:
    """Accept the original's single-dash long flags (-root-dir=X) as well as --root-dir=X."""
    return [("-" + a) if re.match(r"^-[a-z][a-z-]+(=.*)?$", a) else a for a in argv]


def snapshotter_main() -> None:
    serve.main(args=_go_style_flags(sys.argv[1:]), prog_name="overlay-custom-add-lower-snapshotter")


if __name__ == "__main__":
    snapshotter_main()
