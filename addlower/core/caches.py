"""Managed caches: named lowers whose contents live under the snapshotter's root as a chain of
immutable generations, grown from the writes of the jobs that use them.

Pure rules, tested without root: a cache's table in the config file, who may promote a job's
writes, the chain a new container gets, and the overlay options of a cache's upper. The
generations' dirs, their rows and the promotion itself are addlower.engine.caches' job; this
module must not touch the filesystem.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from addlower.core.cacheimage import DEFAULT_EXCLUDE, check_reference
from addlower.core.errors import InvalidArgument

# Beyond this many generations a chain is squashed into one (a cache's own max_generations is
# at most this): each is a lower layer of every container using the cache.
MAX_GENERATIONS = 64
DEFAULT_MAX_GENERATIONS = 8
DEFAULT_MAX_SCOPES = 100
# A scope's name: what a pod's annotation or a label may say (dirs are never named by it).
SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# A namespace's scope pattern: scope characters and the globs * and ?.
SCOPE_PATTERN = re.compile(r"[A-Za-z0-9._*?-]{1,64}")
SEED_SOURCE = "seed"  # a generation's source when it was copied from the cache's seed
SQUASH_SOURCE = "squash of"  # ... when it holds a squashed chain ("squash of 1-9")
# The overlay xattrs a promoted upper must not hold (besides opaque, which later overlays honour).
FORBIDDEN_XATTRS = frozenset(
    f"{namespace}.overlay.{name}" for namespace in ("trusted", "user") for name in ("redirect", "metacopy")
)

_SIZE = re.compile(r"(\d+)\s*([KMGT]i?B?|B)?", re.IGNORECASE)
_DURATION = re.compile(r"(\d+)\s*([smhd])?")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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
    scopes: Mapping[str, str] = field(default_factory=dict)  # namespace -> the scope names its pods may use
    scope_ttl: int | None = None  # seconds an unused scope lives (None: for ever)
    max_scopes: int = DEFAULT_MAX_SCOPES
    image: str | None = None  # an image (pushed by `cache push`) whose layers are the base
    refresh: int | None = None  # seconds between pulls of the image (None: at start and by hand)
    push: str | None = None  # where each promotion and squash pushes the chain
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE  # paths a pushed layer never holds

    def may_promote(self, pod_namespace: str | None, exit_status: int | None, scope: str | None = None) -> bool:
        """Whether a job's writes become a generation: `pod_namespace` is its pod's (None: a
        containerd client's own container, root-equivalent already), `exit_status` its task's
        (None: unknown, the task never ran or its exit was not seen), `scope` the scope whose
        chain they would join (None: the default chain, for promote_namespaces only; a scope,
        for a namespace that may use it)."""
        if self.promote is Promote.NEVER:
            return False
        if pod_namespace is not None:
            if scope is None and pod_namespace not in self.promote_namespaces:
                return False
            if scope is not None and not self.allows_scope(pod_namespace, scope):
                return False
        return self.promote is Promote.ALWAYS or exit_status == 0

    def allows_scope(self, namespace: str, scope: str) -> bool:
        pattern = self.scopes.get(namespace)
        return pattern is not None and fnmatch.fnmatchcase(scope, pattern)

    def check_scope(self, cache: str, namespace: str | None, scope: str) -> None:
        """Refuse a scope whose name is no scope name, or one a pod of `namespace` may not use
        (None: a containerd client's own container, which may use any)."""
        check_scope_name(scope, f"cache {cache!r}")
        if namespace is None:
            return
        pattern = self.scopes.get(namespace)
        if pattern is None:
            raise InvalidArgument(f"cache {cache!r}: pods of namespace {namespace!r} may not use scopes")
        if not self.allows_scope(namespace, scope):
            raise InvalidArgument(
                f"cache {cache!r}: scope {scope!r} is not one namespace {namespace!r} may use ({pattern!r})"
            )


def check_scope_name(scope: str, what: str) -> None:
    if not SCOPE.fullmatch(scope):
        raise InvalidArgument(
            f"{what}: scope {scope[:64]!r} is no scope name (letters, digits, '.', '_' or '-', up to 63)"
        )


def parse_scopes(value: str, what: str) -> dict[str | None, str]:
    """The scopes a label asks for: one name for every cache (key None), or `cache=scope`
    pairs separated by commas."""
    scopes: dict[str | None, str] = {}
    for item in value.split(","):
        cache, eq, scope = item.strip().rpartition("=")
        if not scope:
            continue
        check_scope_name(scope, what)
        scopes[cache if eq else None] = scope
    return scopes


def scopes_label(scopes: Mapping[str, str]) -> str:
    """The label value recording each cache's scope (parse_scopes reads it back)."""
    return ",".join(f"{cache}={scope}" for cache, scope in sorted(scopes.items()))


def parse_duration(key: str, value: object) -> int:
    """Seconds from a number or a string such as "7d", "12h", "30m" or "45s"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())) and int(m.group(1)) > 0:
        return int(m.group(1)) * _UNIT_SECONDS[m.group(2) or "s"]
    raise InvalidArgument(f'{key}: a duration such as "7d", "12h", "30m" or seconds, not {value!r}')


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
    scopes = table.get("scopes", {})
    if not isinstance(scopes, Mapping):
        raise InvalidArgument(f'{key}.scopes: a table of namespace = "pattern", not {scopes!r}')
    for namespace, pattern in scopes.items():
        if not isinstance(pattern, str) or not SCOPE_PATTERN.fullmatch(pattern):
            raise InvalidArgument(
                f"{key}.scopes.{namespace}: a pattern of scope names (letters, digits, '.', '_', '-', * and ?), "
                f"not {pattern!r}"
            )
    ttl = parse_duration(f"{key}.scope_ttl", table["scope_ttl"]) if "scope_ttl" in table else None
    most = table.get("max_scopes", DEFAULT_MAX_SCOPES)
    if not isinstance(most, int) or isinstance(most, bool) or most < 1:
        raise InvalidArgument(f"{key}.max_scopes: a positive number, not {most!r}")
    refs = {}
    for k in ("image", "push"):
        value = table.get(k)
        if value is not None and not isinstance(value, str):
            raise InvalidArgument(f"{key}.{k}: an image reference, not {value!r}")
        refs[k] = check_reference(value, f"{key}.{k}") if value is not None else None
    refresh = parse_duration(f"{key}.refresh", table["refresh"]) if "refresh" in table else None
    if refresh is not None and refs["image"] is None:
        raise InvalidArgument(f"{key}.refresh: how often the cache's image is pulled again, but it names no image")
    exclude = table.get("exclude", list(DEFAULT_EXCLUDE))
    if not isinstance(exclude, list) or not all(isinstance(p, str) and p.strip("/") for p in exclude):
        raise InvalidArgument(
            f'{key}.exclude: a list of paths such as ".npmrc" or ".docker/config.json", not {exclude!r}'
        )
    return CachePolicy(
        promote=promote,
        promote_namespaces=tuple(namespaces),
        max_generations=generations,
        max_bytes=budget,
        seed=seed,
        scopes=dict(scopes),
        scope_ttl=ttl,
        max_scopes=most,
        image=refs["image"],
        refresh=refresh,
        push=refs["push"],
        exclude=tuple(exclude),
    )
