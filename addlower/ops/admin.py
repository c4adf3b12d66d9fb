"""The operator's commands of `addlower` that look at snapshots: ls, info, tree, du and cleanup
(sources.py finds the snapshots, render.py shows them); doctor is doctor.py's. They must not know
snapshot rules (errors, mounts, removal), must never write the store or a snapshot directory, and
must not import the daemon or its server. The commands are listed in COMMANDS, for cli.py to
register.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import click

from addlower.core.keys import resolve_key
from addlower.core.labels import EXTRA_LOWERS_LABEL
from addlower.core.model import Usage
from addlower.ops.caches import cache
from addlower.ops.doctor import doctor
from addlower.ops.render import (
    Column,
    age_text,
    build_forest,
    draw_tree,
    fit_width,
    human_size,
    iso_time,
    kind_text,
    print_json,
    render_table,
    shown,
    size_text,
    snapshot_json,
    tree_json,
    wide_option,
)
from addlower.ops.sources import Invocation, admin_command, connect, measure, open_source

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
        print_json([snapshot_json(info, usage) for info, usage in measured])
        return
    rows = [
        [
            info.name,
            kind_text(info),
            info.parent or "-",
            size_text(usage),
            info.labels.get(EXTRA_LOWERS_LABEL) or "-",
            age_text(info.created_at),
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
        print_json(snapshot_json(snapshot, usage))
        return
    fields = [
        ("name", snapshot.name),
        ("kind", kind_text(snapshot)),
        ("parent", snapshot.parent or "-"),
        ("created", f"{iso_time(snapshot.created_at)} ({age_text(snapshot.created_at)} ago)"),
        ("updated", f"{iso_time(snapshot.updated_at)} ({age_text(snapshot.updated_at)} ago)"),
        ("size", size_text(usage)),
        ("inodes", str(usage.inodes) if usage is not None else "?"),
        ("labels", "" if snapshot.labels else "-"),
    ]
    lines = [f"{name + ':':<9}{shown(value)}".rstrip() for name, value in fields]
    lines += [shown(f"  {k}={v}") for k, v in sorted(snapshot.labels.items())]
    click.echo("\n".join(lines))


@admin_command("tree")
@wide_option
def tree(inv: Invocation, wide: bool) -> None:
    """Draw the snapshots' parent chains as trees."""
    with open_source(inv.target()) as source:
        roots = build_forest(source.list(()))
    if inv.as_json:
        print_json([tree_json(root) for root in roots])
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
        print_json({"snapshots": [snapshot_json(info, usage) for info, usage in measured], "total": asdict(total)})
        return
    rows = [
        [info.name, kind_text(info), size_text(usage), str(usage.inodes) if usage is not None else "?"]
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
        print_json({"removed": len(removed), "directories": removed})
        return
    click.echo(
        f"removed {len(removed)} director{'y' if len(removed) == 1 else 'ies'} from {snapshots_dir}"
        + (f": {', '.join(removed)}" if removed else "")
    )


COMMANDS: list[click.Command] = [ls, info, tree, du, cleanup, doctor, cache]
