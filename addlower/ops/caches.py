"""`addlower cache`: the managed caches as the store records them (ls, log), read-only, so they
work while the daemon runs and when it is down. Must not write the store or a cache's dirs, and
must not import the daemon or its server.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import click

from addlower.core.caches import SEED_SOURCE, SQUASH_SOURCE
from addlower.ops.render import Column, age_text, human_size, iso_time, print_json, render_table
from addlower.ops.sources import Invocation, admin_command, read_only_store

LS_COLUMNS = (
    Column("CACHE", flexible=True),
    Column("TARGET", flexible=True),
    Column("PROMOTE"),
    Column("GENERATIONS", right=True),
    Column("SIZE", right=True),
    Column("CONTAINERS", right=True),
    Column("LAST PROMOTION", right=True),
)
LOG_COLUMNS = (
    Column("GEN", right=True),
    Column("CREATED"),
    Column("SIZE", right=True),
    Column("ENTRIES", right=True),
    Column("STATE"),
    Column("FROM", flexible=True),
)


@dataclass(frozen=True)
class CacheRow:
    cache: str
    target: str | None  # None: generations of a cache no longer configured
    promote: str | None
    generations: int
    bytes: int
    containers: int
    last_promotion: int | None  # ns since the epoch


@admin_command("ls")
def cache_ls(inv: Invocation) -> None:
    """List the managed caches: generations, size, containers using each, last promotion."""
    config = inv.load()
    caches = {name: named for name, named in config.named_lowers.items() if named.cache is not None}
    with read_only_store(inv.target().db) as reader:
        log = reader.cache_log()
        users = reader.cache_users()
        chains = reader.cache_chains()
    rows = []
    for name in sorted({*caches, *(g[0] for g in log)}):
        gens = [g for g in log if g[0] == name and g[1] in chains.get(name, ())]
        promoted = [g[2] for g in log if g[0] == name and g[3] != SEED_SOURCE and not g[3].startswith(SQUASH_SOURCE)]
        named = caches.get(name)
        policy = named.cache if named is not None else None
        rows.append(
            CacheRow(
                name,
                named.target if named is not None else None,
                policy.promote.value if policy is not None else None,
                len(gens),
                sum(g[4] for g in gens),
                users.get(name, 0),
                promoted[-1] if promoted else None,
            )
        )
    if inv.as_json:
        print_json([asdict(r) for r in rows])
        return
    table = [
        [
            r.cache,
            r.target or "(not configured)",
            r.promote or "-",
            str(r.generations),
            human_size(r.bytes),
            str(r.containers),
            age_text(r.last_promotion) if r.last_promotion else "-",
        ]
        for r in rows
    ]
    click.echo("\n".join(render_table(LS_COLUMNS, table, None)))


@dataclass(frozen=True)
class GenerationRow:
    generation: int
    created: str
    source: str  # "seed", "squash of A-B", or the snapshot key whose writes it holds
    bytes: int
    entries: int
    state: str  # "chain" (new containers get it), "kept" (containers got it), "removed"


@admin_command("log")
@click.argument("name")
def cache_log(inv: Invocation, name: str) -> None:
    """Show a cache's generations, oldest first: when, from which container, size, and whether
    new containers get it (chain), only containers that got it earlier (kept), or it is gone."""
    with read_only_store(inv.target().db) as reader:
        gens = reader.cache_log(name)
        chain = set(reader.cache_chain(name))
    if not gens:
        raise click.ClickException(f"cache {name!r} has no generations")
    rows = [
        GenerationRow(g, iso_time(t), src, b, n, "removed" if gone else "chain" if g in chain else "kept")
        for _, g, t, src, b, n, gone in gens
    ]
    if inv.as_json:
        print_json([asdict(r) for r in rows])
        return
    table = [[str(r.generation), r.created, human_size(r.bytes), str(r.entries), r.state, r.source] for r in rows]
    click.echo("\n".join(render_table(LOG_COLUMNS, table, None)))


cache = click.Group("cache", commands={"ls": cache_ls, "log": cache_log}, help="Managed caches: their generations.")
