"""`addlower cache`: the managed caches as the store records them (ls, log, diff: read-only, so
they work while the daemon runs and when it is down), and an operator's hand on them (squash,
rollback, promote: asked of the running daemon, which alone writes the store and the caches'
dirs). Must not write either itself, and must not import the daemon or its server.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import click
import grpc

from addlower.api import admin_pb2
from addlower.core.caches import SEED_SOURCE, SQUASH_SOURCE
from addlower.core.errors import SnapshotError
from addlower.core.keys import resolve_key
from addlower.engine.caches import Refused, chain_dirs, changes, generation_dir
from addlower.engine.store import Reader
from addlower.ops import client
from addlower.ops.render import Column, age_text, human_size, iso_time, print_json, render_table, shown
from addlower.ops.sources import Invocation, admin_command, read_only_store

LS_COLUMNS = (
    Column("CACHE", flexible=True),
    Column("SCOPE", flexible=True),
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
    Column("ADDED ~CHANGED -DELETED", right=True),
    Column("STATE"),
    Column("FROM", flexible=True),
)


@dataclass(frozen=True)
class CacheRow:
    cache: str
    scope: str  # "" for the cache's default chain
    target: str | None  # None: generations of a cache no longer configured
    promote: str | None
    generations: int
    bytes: int
    containers: int
    last_promotion: int | None  # ns since the epoch


@admin_command("ls")
def cache_ls(inv: Invocation) -> None:
    """List the managed caches and their scopes: generations, size, containers using each, last
    promotion."""
    config = inv.load()
    caches = {name: config.named_lowers[name] for name in config.caches}
    with read_only_store(inv.target().db) as reader:
        log = reader.cache_log()
        users = reader.cache_users()
        chains = reader.cache_chains()
        scopes = {(c, scope) for c, scope, *_ in reader.cache_scopes()}
    rows = []
    for name, scope in sorted({*((c, "") for c in caches), *((g.cache, "") for g in log), *chains, *scopes}):
        gens = [g for g in log if g.cache == name and g.gen in chains.get((name, scope), ())]
        promoted = [
            g.created_at
            for g in log
            if g.cache == name
            and g.scope == scope
            and g.source != SEED_SOURCE
            and not g.source.startswith(SQUASH_SOURCE)
        ]
        named = caches.get(name)
        policy = named.cache if named is not None else None
        rows.append(
            CacheRow(
                name,
                scope,
                named.target if named is not None else None,
                policy.promote.value if policy is not None else None,
                len(gens),
                sum(g.bytes for g in gens),
                users.get((name, scope), 0),
                promoted[-1] if promoted else None,
            )
        )
    if inv.as_json:
        print_json([asdict(r) for r in rows])
        return
    table = [
        [
            r.cache,
            r.scope or "-",
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
    pod: str | None  # that snapshot's pod, namespace/name
    bytes: int
    added: int
    changed: int
    deleted: int
    state: str  # "chain" (new containers get it), "kept" (containers got it), "removed"


@admin_command("log")
@click.argument("name")
@click.option("--scope", default="", help="Show which generations are in this scope's chain.")
def cache_log(inv: Invocation, name: str, scope: str) -> None:
    """Show a cache's generations, oldest first: when, from which container, size, and whether
    new containers get it (chain), only containers that got it earlier (kept), or it is gone."""
    with read_only_store(inv.target().db) as reader:
        gens = reader.cache_log(name)
        chain = set(reader.cache_chain(name, scope))
    if not gens:
        raise click.ClickException(f"cache {name!r} has no generations")
    rows = [
        GenerationRow(
            g.gen,
            iso_time(g.created_at),
            g.source,
            g.pod,
            g.bytes,
            g.added,
            g.changed,
            g.deleted,
            "removed" if g.removed_at else "chain" if g.gen in chain else "kept",
        )
        for g in gens
    ]
    if inv.as_json:
        print_json([asdict(r) for r in rows])
        return
    table = [
        [
            str(r.generation),
            r.created,
            human_size(r.bytes),
            f"+{r.added} ~{r.changed} -{r.deleted}",
            r.state,
            r.source + (f" (pod {r.pod})" if r.pod else ""),
        ]
        for r in rows
    ]
    click.echo("\n".join(render_table(LOG_COLUMNS, table, None)))


def _ask(inv: Invocation, method: str, request: Any) -> None:
    """An Admin call to the running daemon (it alone writes the store); its answer printed."""
    try:
        click.echo(client.admin(inv.target().socket, method, request))
    except grpc.RpcError as exc:
        raise click.ClickException(f"{exc.code().name}: {exc.details()}") from None


def _key(reader: Reader, container: str, namespace: str | None) -> str:
    return resolve_key(container, [info.name for _, info in reader.walk()], namespace)


namespace_option = click.option(
    "--namespace", "-n", default=None, help="containerd namespace of CONTAINER, when it is containerd's name."
)


@admin_command("squash")
@click.argument("name")
def cache_squash(inv: Invocation, name: str) -> None:
    """Squash a cache's chain into one generation now (containers created afterwards get it)."""
    _ask(inv, "SquashCache", admin_pb2.CacheRequest(cache=name))


@admin_command("push")
@click.argument("name")
@click.argument("image", required=False, default="")
def cache_push(inv: Invocation, name: str, image: str) -> None:
    """Push a cache's chain to the registry as IMAGE (default: the cache's push), one layer per
    generation; layers the registry has are not sent again. Credential files (its exclude) stay out."""
    _ask(inv, "PushCache", admin_pb2.CacheRequest(cache=name, image=image))


@admin_command("pull")
@click.argument("name")
@click.argument("image", required=False, default="")
def cache_pull(inv: Invocation, name: str, image: str) -> None:
    """Pull IMAGE (default: the cache's image) and make its layers the cache's chain for
    containers created afterwards; running ones keep theirs."""
    _ask(inv, "PullCache", admin_pb2.CacheRequest(cache=name, image=image))


@admin_command("rollback")
@click.argument("name")
@click.argument("generation", type=int, required=False, default=0)
@click.option("--scope", default="", help="Roll this scope's chain back, not the default one.")
def cache_rollback(inv: Invocation, name: str, generation: int, scope: str) -> None:
    """End a cache's chain (or a scope's) at GENERATION (default: drop its newest) for containers
    created afterwards; running ones keep theirs."""
    _ask(inv, "RollbackCache", admin_pb2.CacheRequest(cache=name, generation=generation, scope=scope))


@admin_command("promote")
@click.argument("container")
@namespace_option
@click.option(
    "--to-default", is_flag=True, help="Move the generations of the scopes it got onto the caches' default chains."
)
def cache_promote(inv: Invocation, container: str, namespace: str | None, to_default: bool) -> None:
    """Make a stopped container's writes to its caches their next generations now, whatever the
    caches' promote says; or, with --to-default, move its scopes' results into the caches'
    default chains. CONTAINER is a snapshot key or containerd's name for it."""
    with read_only_store(inv.target().db) as reader:
        key = _key(reader, container, namespace)
    _ask(inv, "PromoteWrites", admin_pb2.PromoteRequest(key=key, to_default=to_default))


@dataclass(frozen=True)
class ChangeRow:
    cache: str
    kind: str  # A added, C changed, D deleted, R a dir replaced
    path: str  # in the container


@admin_command("diff")
@click.argument("container")
@namespace_option
def cache_diff(inv: Invocation, container: str, namespace: str | None) -> None:
    """What a container changed in its caches (A added, C changed, D deleted, R a dir replaced):
    its writes while it lives, the generations they became once it was removed."""
    target = inv.target()
    rows = []
    with read_only_store(target.db) as reader:
        try:
            key = _key(reader, container, namespace)
        except SnapshotError:
            key = None
        if key is not None:
            sid = reader.get_info(key)[0]
            for name, at, _, _ in reader.cache_uses(sid):
                lowers = chain_dirs(str(target.root), name, reader.cache_use(sid, name) or [])
                upper = f"{target.layout.target_dir(sid, at)}/fs"
                rows += [ChangeRow(name, kind, f"{at}/{rel}") for kind, rel, _ in _changes(upper, lowers)]
        else:  # removed: the generations its writes became
            made = [g for g in reader.cache_log() if g.source == container or g.source.endswith(f"/{container}")]
            if not made:
                raise click.ClickException(f"no container {container!r}, and no generation holds its writes")
            for g in made:
                name, gen = g.cache, g.gen
                below = [b.gen for b in reader.cache_log(name) if b.gen < gen and b.removed_at is None]
                lowers = chain_dirs(str(target.root), name, below)
                generation = generation_dir(str(target.root), name, gen)
                rows += [ChangeRow(name, kind, rel) for kind, rel, _ in _changes(generation, lowers)]
    if inv.as_json:
        print_json([asdict(r) for r in rows])
        return
    for r in rows:
        click.echo(shown(f"{r.kind} {r.path}  ({r.cache})"))


def _changes(upper: str, lowers: list[str]) -> list[tuple[str, str, object]]:
    try:
        return list(changes(upper, lowers)) if os.path.isdir(upper) else []
    except Refused as exc:
        raise click.ClickException(str(exc)) from None


cache = click.Group(
    "cache",
    commands={
        "ls": cache_ls,
        "log": cache_log,
        "diff": cache_diff,
        "promote": cache_promote,
        "rollback": cache_rollback,
        "squash": cache_squash,
        "push": cache_push,
        "pull": cache_pull,
    },
    help="Managed caches: their generations, and an operator's hand on them.",
)
