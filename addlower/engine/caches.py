"""Managed caches on disk: each cache's generations at <root>/caches/<name>/<n>, immutable once
there, and the promotion that makes a job's upper the next one.

A generation is made only by rename(2) inside the store's transaction that records it (a kill
leaves either no row, and a dir start-up may delete, or a whole generation); nothing but the
daemon can reach it (the root is 0700), so containers' lowers never change under them and need
no re-check. Which chain a snapshot got is recorded with it (the store's cache_uses), so its
Mounts answer the same chain for its whole life.

Must not know about gRPC, labels or policy: callers hand it checked entries and decisions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from addlower.core.caches import FORBIDDEN_XATTRS, SEED_SOURCE, SQUASH_SOURCE, CachePolicy
from addlower.core.logformat import fields
from addlower.engine import fsutil
from addlower.engine.store import MetaStore, Tx

log = logging.getLogger(__name__)

CACHES_DIR = "caches"  # under the snapshotter's root
TEMP_PREFIX = ".new-"  # a generation being made: never a lower, deleted at start-up
MOUNT_PREFIX = ".mnt-"  # where a squash mounts the chain it copies out: unmounted at start-up
# A chain grows past its max_generations until the squash catches up; this many times that, a
# promotion is refused.
SQUASH_SLACK = 2


@dataclass(frozen=True)
class Tree:
    """What a job's writes to a cache did, seen against the chain below them: regular files'
    bytes, and entries added, changed (there below too) and deleted (whiteouts)."""

    bytes: int = 0
    added: int = 0
    changed: int = 0
    deleted: int = 0


class Refused(Exception):
    """A job's upper that must not become a generation; the message says why."""


ADDED, CHANGED, DELETED, REPLACED = "A", "C", "D", "R"  # as `docker diff` says it, and R: a replaced dir
_OPAQUE = ("trusted.overlay.opaque", "user.overlay.opaque")


def changes(upper: str, lowers: Sequence[str]) -> Iterator[tuple[str, str, os.stat_result]]:
    """(kind, path relative to `upper`, its lstat) of each change in an overlay upper dir over
    `lowers`, walked without following links; a dir is a change when it is new or replaces the
    one below (opaque), not when it only holds changes. Refuses (Refused) overlay xattrs that
    would make the upper read differently under a later overlay: redirects, metacopy-only files."""
    new_dirs = set()  # dirs with nothing below them: what is inside is added, unlooked-for
    skip = len(upper.rstrip("/")) + 1
    for top, dirs, files in os.walk(upper):
        fresh = top in new_dirs
        for name in sorted(dirs + files):
            path = f"{top}/{name}"
            rel = path[skip:]
            st = os.lstat(path)
            held = _xattrs(path)
            bad = next((x for x in held if x in FORBIDDEN_XATTRS), None)
            if bad is not None:
                raise Refused(f"{rel} carries the overlay xattr {bad}")
            below = not fresh and any(os.path.lexists(os.path.join(lower, rel)) for lower in lowers)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                yield DELETED, rel, st
            elif stat.S_ISDIR(st.st_mode):
                if any(x in held for x in _OPAQUE) and below:
                    new_dirs.add(path)  # what it held below is hidden: its entries are added
                    yield REPLACED, rel, st
                elif not below:
                    new_dirs.add(path)
                    yield ADDED, rel, st
            else:
                yield (CHANGED if below else ADDED), rel, st


def _xattrs(path: str) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError:  # a filesystem or file type without them
        return []


def measure(upper: str, lowers: Sequence[str] = ()) -> Tree:
    """What `upper` does over `lowers` (see changes)."""
    size, counts = 0, {ADDED: 0, CHANGED: 0, DELETED: 0, REPLACED: 0}
    for kind, _, st in changes(upper, lowers):
        counts[kind] += 1
        if stat.S_ISREG(st.st_mode):
            size += st.st_size
    return Tree(size, counts[ADDED], counts[CHANGED] + counts[REPLACED], counts[DELETED])


def generation_dir(root: str, name: str, gen: int) -> str:
    """Where generation `gen` of cache `name` lives under the snapshotter's `root`."""
    return f"{root}/{CACHES_DIR}/{name}/{gen}"


def chain_dirs(root: str, name: str, gens: Sequence[int]) -> list[str]:
    """The lowerdirs of a chain given bottom first: the newest on top."""
    return [generation_dir(root, name, g) for g in reversed(gens)]


class Caches:
    """The generations of every cache under `root`, recorded in `store`; `options` are the
    overlay options a squash mounts a chain with."""

    def __init__(self, root: str, store: MetaStore, options: Sequence[str]):
        self.root = root
        self.dir = f"{root}/{CACHES_DIR}"
        self.store = store
        self.options = tuple(options)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._seeding = threading.Lock()
        self._squashing: dict[str, set[int]] = {}  # cache -> the generations a squash is reading
        self._lock = threading.Lock()

    def generation(self, name: str, gen: int) -> str:
        return generation_dir(self.root, name, gen)

    def dirs(self, name: str, gens: Sequence[int]) -> list[str]:
        return chain_dirs(self.root, name, gens)

    def _base(self, name: str) -> str:
        """Cache `name`'s dir, made if it is not there yet."""
        base = f"{self.dir}/{name}"
        os.makedirs(base, mode=0o700, exist_ok=True)
        return base

    def recover(self) -> list[str]:
        """At start-up: unmount and delete what a kill left (a squash's mount, a generation being
        made, writes parked for an exit) and the dirs of generations no chain or snapshot keeps.
        Returns what went."""
        gone = []
        with self.store.read() as reader:
            kept = reader.cache_generations()
        for name in os.listdir(self.dir):
            base = f"{self.dir}/{name}"
            for entry in sorted(os.listdir(base)):
                if entry.isdigit() and (name, int(entry)) in kept:
                    continue
                path = f"{base}/{entry}"
                if entry.startswith(MOUNT_PREFIX):
                    fsutil.unmount(path)
                log.warning("removing %s, which no generation of cache %s accounts for", path, name)
                _remove_generation(path)
                gone.append(f"{name}/{entry}")
        return gone

    def seed(self, name: str, policy: CachePolicy) -> None:
        """Copy the cache's seed in as its first generation, once (never read again after)."""
        if policy.seed is None:
            return
        with self._seeding:
            with self.store.read() as reader:
                if reader.cache_log(name):
                    return
            temp = self._temp(name, "seed")
            fd = os.open(policy.seed, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:  # the dir opened, not a path that could be swapped meanwhile; links copied as links
                _copy_tree(f"/proc/self/fd/{fd}", temp, fd)
            except RuntimeError as exc:
                fsutil.remove_tree(Path(temp))
                raise RuntimeError(f"cache {name!r}: copying its seed {policy.seed} failed: {exc}") from None
            finally:
                os.close(fd)
            tree = measure(temp)
            with self.store.transaction() as tx:
                os.rename(temp, self.generation(name, 1))
                tx.add_generation(name, 1, SEED_SOURCE, tree)
                tx.set_chain(name, [1])
            log.info("seeded cache %s from %s", name, policy.seed, extra=fields(cache=name, bytes=tree.bytes))

    def chain(self, tx: Tx, sid: int, name: str, target: str, scope: str | None = None, most: int = 0) -> list[str]:
        """The generations snapshot `sid` sees of cache `name`, newest first: the ones recorded
        with it, or (recorded now) the cache's current chain, with `scope`'s on top (a scope is
        made at its first use, unless the cache holds `most` scopes already)."""
        gens = tx.cache_use(sid, name)
        if gens is None:
            gens = tx.cache_chain(name)
            if scope:
                tx.use_scope(name, scope, most)
                gens = [*gens, *tx.cache_chain(name, scope)]
            tx.use_cache(sid, name, target, gens, scope)
        return self.dirs(name, gens)

    def park(self, name: str, upper: str, sid: int) -> str:
        """Move a removed snapshot's upper aside while its job's exit status is awaited (a temp
        name: start-up deletes it, as an exit not seen is no success)."""
        parked = f"{self._base(name)}/{TEMP_PREFIX}exit-{sid}"
        os.rename(upper, parked)
        return parked

    def promote(
        self,
        tx: Tx,
        name: str,
        upper: str,
        source: str,
        policy: CachePolicy,
        pod: str | None = None,
        scope: str | None = None,
    ) -> int | None:
        """Make `upper` (no longer mounted) the next generation of cache `name`, on top of its
        chain (of `scope`, on top of the default chain), in `tx`, recorded as the writes of
        snapshot `source` (of `pod`): the generation's number, or None when it holds nothing.
        Raises Refused."""
        if not os.path.isdir(upper) or not os.listdir(upper):
            return None
        chain = tx.cache_chain(name, scope or "")
        below = [*tx.cache_chain(name), *chain] if scope else chain
        tree = measure(upper, self.dirs(name, below))
        if scope and len(chain) >= policy.max_generations:  # a scope's chain is never squashed
            raise Refused(f"its scope {scope!r} has {len(chain)} generations, its max_generations")
        if len(chain) >= policy.max_generations * SQUASH_SLACK:
            raise Refused(f"its chain has {len(chain)} generations and its squash has not caught up")
        if policy.max_bytes is not None:
            held = tx.cache_bytes(name, scope or "")
            if held + tree.bytes > policy.max_bytes:
                raise Refused(f"{held} + {tree.bytes} bytes would exceed its max_bytes of {policy.max_bytes}")
        gen = tx.next_generation(name)
        self._base(name)
        os.rename(upper, self.generation(name, gen))
        tx.add_generation(name, gen, source, tree, pod, scope or "")
        tx.set_chain(name, [*chain, gen], scope or "")
        return gen

    def expire_scopes(self, ttls: Mapping[str, int]) -> list[tuple[str, str]]:
        """Forget the scopes (of the caches in `ttls`: cache -> seconds) no container got for that
        long and none uses now; their generations go at the next collect."""
        now = time.time_ns()
        with self.store.transaction() as tx:
            used = tx.scopes_in_use()
            gone = [
                (cache, scope)
                for cache, scope, _, last_used, _ in tx.cache_scopes()
                if cache in ttls and (cache, scope) not in used and now - last_used > ttls[cache] * 1_000_000_000
            ]
            for cache, scope in gone:
                tx.drop_scope(cache, scope)
        return gone

    def squash(self, name: str) -> int | None:
        """Copy out a read-only overlay of cache `name`'s chain into one generation with the same
        visible tree (the kernel resolves whiteouts and opaque dirs), and make it the chain's
        bottom in place of the generations it holds; generations promoted meanwhile stay on top.
        None when there was nothing to squash (or the chain changed under it: a rollback)."""
        with self.store.read() as reader:
            chain = reader.cache_chain(name)
        if len(chain) < 2:
            return None
        with self._lock:
            if name in self._squashing:
                return None
            self._squashing[name] = set(chain)
        temp = mount = None
        try:
            temp, mount = self._temp(name, "squash"), self._temp(name, "", prefix=MOUNT_PREFIX)
            lowers = ":".join(self.dirs(name, chain))
            fsutil.mount_overlay(mount, [*self.options, "ro", f"lowerdir={lowers}"])
            try:
                _copy_tree(mount, temp)
            finally:
                fsutil.unmount(mount)
            os.rmdir(mount)
            mount = None
            tree = measure(temp)
            with self.store.transaction() as tx:
                current = tx.cache_chain(name)
                if current[: len(chain)] != chain:
                    log.info("cache %s changed while it was squashed: not applied", name, extra=fields(cache=name))
                    return None
                gen = tx.next_generation(name)
                os.rename(temp, self.generation(name, gen))
                temp = None
                tx.add_generation(name, gen, f"{SQUASH_SOURCE} {chain[0]}-{chain[-1]}", tree)
                tx.set_chain(name, [gen, *current[len(chain) :]])
            return gen
        finally:
            with self._lock:
                self._squashing.pop(name, None)
            if mount is not None:
                fsutil.unmount(mount)
                with contextlib.suppress(OSError):
                    os.rmdir(mount)
            if temp is not None:
                fsutil.remove_tree(Path(temp))

    def collect(self) -> list[str]:
        """Delete the generations no chain has and no snapshot got (nor a squash reads): their
        rows are marked in one transaction, then their dirs go (start-up finishes a kill's)."""
        with self.store.transaction() as tx:
            keep = {(c, g) for (c, _), gens in tx.cache_chains().items() for g in gens} | tx.cache_gens_in_use()
            with self._lock:
                keep |= {(c, g) for c, gens in self._squashing.items() for g in gens}
            doomed = sorted(tx.cache_generations() - keep)
            tx.remove_generations(doomed)
        for name, gen in doomed:
            _remove_generation(self.generation(name, gen))
        return [f"{name}/{gen}" for name, gen in doomed]

    def _temp(self, name: str, what: str, prefix: str = TEMP_PREFIX) -> str:
        temp = tempfile.mkdtemp(prefix=f"{prefix}{what}-", dir=self._base(name))
        os.chmod(temp, 0o755)
        return temp


def _remove_generation(path: str) -> None:
    """A generation's dir, or the link to the snapshot a pulled one is (the snapshot is
    containerd's to remove, once the store no longer keeps it)."""
    if os.path.islink(path):
        os.unlink(path)
    else:
        fsutil.remove_tree(Path(path))


def _copy_tree(source: str, into: str, fd: int | None = None) -> None:
    """Copy the contents of dir `source` into dir `into`, as they are: owners, modes, times,
    xattrs, links as links, special files (cp -a, reflinked where the filesystem can)."""
    done = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--no-dereference", f"{source}/.", into],
        capture_output=True,
        text=True,
        pass_fds=(fd,) if fd is not None else (),
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip())
