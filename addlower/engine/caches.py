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
import shutil
import stat
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from addlower.core.caches import FORBIDDEN_XATTRS, SEED_SOURCE, CachePolicy
from addlower.engine import fsutil
from addlower.engine.store import MetaStore, Tx

log = logging.getLogger(__name__)

CACHES_DIR = "caches"  # under the snapshotter's root
TEMP_PREFIX = ".new-"  # a generation being made: never a lower, deleted at start-up


@dataclass(frozen=True)
class Tree:
    """What a promoted upper holds: regular files' bytes, and entries (files, dirs, links, whiteouts)."""

    bytes: int
    entries: int


class Refused(Exception):
    """A job's upper that must not become a generation; the message says why."""


def measure(upper: str) -> Tree:
    """Walk `upper` without following links: its size, and a refusal of overlay xattrs that
    would make it read differently under a later overlay (redirects, metacopy-only files)."""
    size = entries = 0
    for top, dirs, files in os.walk(upper):
        for name in dirs + files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            entries += 1
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
            with contextlib.suppress(OSError):  # a symlink or a special file carries none we check
                held = os.listxattr(path, follow_symlinks=False)
                bad = next((x for x in held if x in FORBIDDEN_XATTRS), None)
                if bad is not None:
                    raise Refused(f"{os.path.relpath(path, upper)} carries the overlay xattr {bad}")
    return Tree(size, entries)


class Caches:
    """The generations of every cache under `root`, recorded in `store`."""

    def __init__(self, root: str, store: MetaStore):
        self.dir = f"{root}/{CACHES_DIR}"
        self.store = store
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._seeding = threading.Lock()

    def generation(self, name: str, gen: int) -> str:
        return f"{self.dir}/{name}/{gen}"

    def recover(self) -> list[str]:
        """At start-up: delete what no row accounts for (a promotion or seed cut short by a kill).
        Returns what went."""
        gone = []
        with self.store.read() as reader:
            known = reader.cache_generations()
        for name in os.listdir(self.dir):
            base = f"{self.dir}/{name}"
            for entry in os.listdir(base):
                if entry.isdigit() and (name, int(entry)) in known:
                    continue
                log.warning("removing %s/%s, a generation no record accounts for", base, entry)
                fsutil.remove_tree(Path(f"{base}/{entry}"))
                gone.append(f"{name}/{entry}")
        return gone

    def seed(self, name: str, policy: CachePolicy) -> None:
        """Copy the cache's seed in as its first generation, once (never read again after)."""
        if policy.seed is None:
            return
        with self._seeding:
            with self.store.read() as reader:
                if reader.cache_chain(name):
                    return
            os.makedirs(f"{self.dir}/{name}", mode=0o700, exist_ok=True)
            temp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=f"{self.dir}/{name}")
            fd = os.open(policy.seed, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:  # the dir opened, not a path that could be swapped meanwhile; links copied as links
                subprocess.run(
                    ["cp", "-a", "--reflink=auto", "--no-dereference", f"/proc/self/fd/{fd}/.", temp],
                    check=True,
                    capture_output=True,
                    pass_fds=(fd,),
                )
            except subprocess.CalledProcessError as exc:
                shutil.rmtree(temp, ignore_errors=True)
                raise RuntimeError(
                    f"cache {name!r}: copying its seed {policy.seed} failed: {exc.stderr.decode()}"
                ) from None
            finally:
                os.close(fd)
            os.chmod(temp, 0o755)
            tree = measure(temp)
            with self.store.transaction() as tx:
                os.rename(temp, self.generation(name, 1))
                tx.add_generation(name, 1, SEED_SOURCE, tree.bytes, tree.entries)
            log.info("seeded cache %s from %s", name, policy.seed, extra={"bytes": tree.bytes})

    def chain(self, tx: Tx, sid: int, name: str, target: str) -> list[str]:
        """The generations snapshot `sid` sees of cache `name`, newest first: the ones recorded
        with it, or (recorded now) the cache's current chain."""
        gens = tx.cache_use(sid, name)
        if gens is None:
            gens = tx.cache_chain(name)
            tx.use_cache(sid, name, target, gens)
        return [self.generation(name, g) for g in reversed(gens)]

    def park(self, name: str, upper: str, sid: int) -> str:
        """Move a removed snapshot's upper aside while its job's exit status is awaited (a temp
        name: start-up deletes it, as an exit not seen is no success)."""
        os.makedirs(f"{self.dir}/{name}", mode=0o700, exist_ok=True)
        parked = f"{self.dir}/{name}/{TEMP_PREFIX}exit-{sid}"
        os.rename(upper, parked)
        return parked

    def promote(self, tx: Tx, name: str, upper: str, source: str, policy: CachePolicy) -> int | None:
        """Make `upper` (no longer mounted) the next generation of cache `name`, in `tx`: the
        generation's number, or None when it holds nothing. Raises Refused."""
        if not os.path.isdir(upper) or not os.listdir(upper):
            return None
        tree = measure(upper)
        chain = tx.cache_chain(name)
        if len(chain) >= policy.max_generations:
            raise Refused(f"it has {len(chain)} generations, its max_generations")
        if policy.max_bytes is not None:
            held = tx.cache_bytes(name)
            if held + tree.bytes > policy.max_bytes:
                raise Refused(f"{held} + {tree.bytes} bytes would exceed its max_bytes of {policy.max_bytes}")
        gen = tx.next_generation(name)
        os.makedirs(f"{self.dir}/{name}", mode=0o700, exist_ok=True)
        os.rename(upper, self.generation(name, gen))
        tx.add_generation(name, gen, source, tree.bytes, tree.entries)
        return gen
