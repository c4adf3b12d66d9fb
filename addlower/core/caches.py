"""Managed caches: named lowers whose contents live under the snapshotter's root as a chain of
immutable generations, grown from the writes of the jobs that use them.

Pure rules, tested without root: a cache's table in the config file, who may promote a job's
writes, the chain a new container gets, and the overlay options of a cache's upper. The
generations' dirs, their rows and the promotion itself are addlower.engine.caches' job; this
module must not touch the filesystem.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from addlower.core.errors import InvalidArgument

# Beyond this many generations a chain is squashed into one (a cache's own max_generations is
# at most this): each is a lower layer of every container using the cache.
MAX_GENERATIONS = 64
DEFAULT_MAX_GENERATIONS = 8
SEED_SOURCE = "seed"  # a generation's source when it was copied from the cache's seed
SQUASH_SOURCE = "squash of"  # ... when it holds a squashed chain ("squash of 1-9")
# The overlay xattrs a promoted upper must not hold (besides opaque, which later overlays honour).
FORBIDDEN_XATTRS = frozenset(
    f"{namespace}.overlay.{name}" for namespace in ("trusted", "user") for name in ("redirect", "metacopy")
)

_SIZE = re.compile(r"(\d+)\s*([KMGT]i?B?|B)?", re.IGNORECASE)


class Promote(enum.Enum):
    """When a job's writes to a cache become its next generation."""

    NEVER = "never"
    ON_SUCCESS = "on-success"  # the container's task exited with status 0
    ALWAYS = "always"  # whenever its snapshot is removed (runners that kill their build container)


@dataclass(frozen=True)
class CachePolicy:
    """A cache's table: where containers see it, who may grow it, and its bounds."""

    promote: Promote = Promote.NEVER
    promote_namespaces: tuple[str, ...] = ()  # Kubernetes namespaces whose pods may promote
    max_generations: int = DEFAULT_MAX_GENERATIONS
    max_bytes: int | None = None  # a promotion past it is refused
    seed: str | None = None  # a host dir copied in once, as the first generation

    def may_promote(self, pod_namespace: str | None, exit_status: int | None) -> bool:
        """Whether a job's writes become a generation: `pod_namespace` is its pod's (None: a
        containerd client's own container, root-equivalent already), `exit_status` its task's
        (None: unknown, the task never ran or its exit was not seen)."""
        if self.promote is Promote.NEVER:
            return False
        if pod_namespace is not None and pod_namespace not in self.promote_namespaces:
            return False
        return self.promote is Promote.ALWAYS or exit_status == 0


def parse_size(key: str, value: object) -> int:
    """Bytes from a number or a string such as "20GiB", "500M" or "1T" (powers of 1024 with i)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        unit = (m.group(2) or "").lower()
        base = 1024 if "i" in unit else 1000
        scale = 1 if unit in ("", "b") else base ** ("kmgt".index(unit[0]) + 1)
        size = int(m.group(1)) * scale
    else:
        raise InvalidArgument(f'{key}: a size in bytes, or a string such as "20GiB", not {value!r}')
    if size <= 0:
        raise InvalidArgument(f"{key}: must be positive, not {value!r}")
    return size


def promote_of(key: str, value: object) -> Promote:
    try:
        return Promote(value)
    except ValueError:
        raise InvalidArgument(f"{key}: one of {', '.join(p.value for p in Promote)}, not {value!r}") from None


def policy_of(key: str, table: Mapping[str, object], namespaces: Sequence[str]) -> CachePolicy:
    """A cache's policy from the keys of its table (already typed: strings, ints, lists)."""
    promote = promote_of(f"{key}.promote", table.get("promote", Promote.NEVER.value))
    generations = table.get("max_generations", DEFAULT_MAX_GENERATIONS)
    if not isinstance(generations, int) or isinstance(generations, bool) or not 1 <= generations <= MAX_GENERATIONS:
        raise InvalidArgument(f"{key}.max_generations: a number from 1 to {MAX_GENERATIONS}, not {generations!r}")
    budget = parse_size(f"{key}.max_bytes", table["max_bytes"]) if "max_bytes" in table else None
    seed = table.get("seed")
    if seed is not None and not isinstance(seed, str):
        raise InvalidArgument(f"{key}.seed: a host path, not {seed!r}")
    return CachePolicy(promote, tuple(namespaces), generations, budget, seed)
