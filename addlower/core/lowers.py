"""Extra lower dirs: what the label `containerd.io/snapshot/overlay-custom-add-lower.paths` (or a
pod's annotation) may name, and the limits of the mount it produces.

Pure rules, tested without root: parsing the colon-separated value, the path policy (absolute,
normalised, bounded, no character that could splice options into the mount or forge a log line,
never a system dir or the snapshotter's root, under an allowed root), named lowers and who may
use them, and the kernel's limits. Whatever a container creator writes is untrusted. Opening,
creating and pinning the dirs is addlower.engine.pinning's job; this module must not touch the
filesystem.
"""

from __future__ import annotations

import posixpath
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from addlower.core.caches import CachePolicy
from addlower.core.errors import InvalidArgument
from addlower.core.mounts import Mount

# overlayfs stacks at most this many lower layers (OVL_MAX_STACK).
MAX_OVERLAY_LAYERS = 500
# Extra lowers one snapshot may ask for: each is a bind mount on the host (a pin), and a pod must
# not fill the host's mount table (fs.mount-max) with them.
MAX_EXTRA_LOWERS = 128
# mount(2) takes its option string in one page.
PAGE_SIZE = 4096
# containerd shortens a lowerdir= list once the options come this close to a page (mount_linux.go).
COMPACT_THRESHOLD = PAGE_SIZE - 512
# PATH_MAX counts the trailing NUL; NAME_MAX bounds one component.
MAX_PATH_BYTES = 4095
MAX_NAME_BYTES = 255

# With no configuration: a root for caches and the original's demo dir.
DEFAULT_ALLOWED_ROOTS = ("/var/cache/addlower", "/tmp/overlayfs-custom-lower")
# Never an extra lower, whatever the configuration says: the host's system dirs and other
# workloads' state (pod volumes and secrets under kubelet's dir, container runtimes' data, logs).
# A root that is one of these, lies inside one or contains one is refused.
PROTECTED_DIRS = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/lib/containerd",
    "/var/lib/docker",
    "/var/lib/kubelet",
    "/var/log",
    "/var/run",
)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# Container paths a lower may not be mounted at: the kernel's and the runtime's own filesystems.
RESERVED_TARGETS = ("/proc", "/sys", "/dev")
ROOT_TARGET = "/"  # an entry without @TARGET: stacked under the container's rootfs
TARGET_SEPARATOR = "@"

# Kubernetes namespace names (RFC 1123 labels).
NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# Characters that would split or extend overlay options: `,` separates options, `:` lowerdirs,
# `\` escapes both, `=` ends a key.
OPTION_SYNTAX = frozenset(",:\\=")


@dataclass(frozen=True)
class NamedLower:
    """A host dir the admin named; `namespaces` limits which Kubernetes namespaces' pods may use
    it (None: every pod; label users are trusted with all of them). A missing dir is refused
    unless `create` says the admin wants it made: a cache that is not there would otherwise give
    containers an empty dir and nobody would know."""

    path: str  # "" for a cache: its contents live under the snapshotter's root
    namespaces: tuple[str, ...] | None = None
    target: str = ROOT_TARGET  # where the name alone puts it in the container
    create: bool = False
    cache: CachePolicy | None = None  # a managed cache (addlower.core.caches), not a host dir

    def entry(self, name: str, target: str | None = None) -> Lower:
        """This named lower as one entry, at `target` (None: its own)."""
        create = self.path if self.create else None
        return Lower(self.path, create, self.target if target is None else target, name, self.cache is not None)


@dataclass(frozen=True)
class Lower:
    """One checked entry: the host dir, the dir at and below which missing dirs may be created
    (None: none may), the container path it is overlaid at (ROOT_TARGET: under the rootfs itself)
    and the named lower it stands for, if any."""

    path: str
    create_root: str | None
    target: str = ROOT_TARGET
    name: str | None = None
    cache: bool = False  # the named lower is a managed cache: its generations, no host dir
    scope: str | None = None  # a cache's scope: its own generations stacked on the cache's default chain

    @property
    def shown(self) -> str:
        """The entry as messages name it: a named lower by its name and its dir."""
        if self.cache:
            return f"cache {self.name!r}" + (f" scope {self.scope!r}" if self.scope else "")
        return repr(self.path) if self.name is None else f"named lower {self.name!r} ({self.path})"

    def may_create(self, missing: str) -> bool:
        """Whether the missing dir `missing`, on the way to this entry, may be made."""
        return self.create_root is not None and is_within(missing, self.create_root)

    def missing_text(self, missing: str) -> str:
        """Why the missing dir `missing` on the way to this entry is refused, and what would allow it."""
        if self.name is None:
            return f"{missing} does not exist"
        if self.create_root is None:
            return (
                f"{missing} does not exist; create = true in its table (lowers.named.{self.name} = "
                f'{{ path = "{self.path}", create = true }}) lets the snapshotter make it, empty'
            )
        return f"{missing} does not exist (create = true makes only the named dir itself)"


@dataclass(frozen=True)
class LowerPolicy:
    """What the node's admin allows one kind of requester: the roots paths must lie under, and the
    named lowers. `namespace` is the requesting pod's namespace (None for label users)."""

    root: str  # the snapshotter's own root: never usable
    allowed_roots: tuple[str, ...] = DEFAULT_ALLOWED_ROOTS
    named: Mapping[str, NamedLower] = field(default_factory=dict)
    namespace: str | None = None

    def __post_init__(self) -> None:
        for r in self.allowed_roots:
            check_host_dir(r, "allowed root", self.root)
        for name, lower in self.named.items():
            if not NAME.fullmatch(name):
                raise InvalidArgument(f"named lower {name!r}: a name is letters, digits, '.', '_' or '-'")
            if lower.cache is None:
                check_host_dir(lower.path, f"named lower {name!r}", self.root)
            elif lower.target == ROOT_TARGET:
                raise InvalidArgument(f"cache {name!r}: a cache needs a target, the container path it is at")
            elif lower.cache.seed is not None:
                check_host_dir(lower.cache.seed, f"cache {name!r}: seed", self.root)
            if lower.target != ROOT_TARGET:
                check_target(lower.target, f"named lower {name!r}: target")

    def allowing_root(self, path: str) -> str | None:
        """The allowed root `path` lies in (the deepest one), if any."""
        roots = [r for r in self.allowed_roots if is_within(path, r)]
        return max(roots, key=len) if roots else None

    def named_lower(self, name: str) -> NamedLower | None:
        """The named lower this requester may use, or None; refuses one kept for other namespaces."""
        lower = self.named.get(name)
        if (
            lower is not None
            and self.namespace is not None
            and lower.namespaces is not None
            and self.namespace not in lower.namespaces
        ):
            raise InvalidArgument(f"named lower {name!r} is not available to namespace {self.namespace!r}")
        return lower

    def allowed_text(self) -> str:
        return f"outside the allowed roots {list(self.allowed_roots)}"


def is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def forbidden_character(text: str) -> str | None:
    """The first character that must not appear in a path: option syntax, whitespace, and every
    control, format, unassigned or private-use character (Unicode categories Z and C)."""
    for ch in text:
        if ch in OPTION_SYNTAX or unicodedata.category(ch)[0] in "CZ":
            return ch
    return None


def check_path(path: str, what: str) -> None:
    """An absolute, normalised, bounded path with no character that could change the mount options."""
    bad = forbidden_character(path)
    if bad:
        raise InvalidArgument(f"{what} {path!r}: character {bad!r} is not allowed")
    if not path.startswith("/"):
        raise InvalidArgument(f"{what} {path!r}: must be an absolute path")
    if ".." in path.split("/"):
        raise InvalidArgument(f"{what} {path!r}: must not contain '..'")
    if posixpath.normpath(path) != path or path.startswith("//"):
        raise InvalidArgument(f"{what} {path!r}: must be normalised (no '.', '//' or trailing '/')")
    if len(path.encode()) > MAX_PATH_BYTES:
        raise InvalidArgument(f"{what} {path[:64]!r}...: longer than {MAX_PATH_BYTES} bytes")
    long = next((c for c in path.split("/") if len(c.encode()) > MAX_NAME_BYTES), None)
    if long is not None:
        raise InvalidArgument(f"{what} {path!r}: component {long[:32]!r}... is longer than {MAX_NAME_BYTES} bytes")


def check_target(target: str, what: str) -> None:
    """A container path a lower may be mounted at: checked like a host path, and below / but not
    in the kernel's or the runtime's own filesystems."""
    check_path(target, what)
    if target == ROOT_TARGET:
        raise InvalidArgument(f"{what} '/': leave the target out to stack a lower under the whole rootfs")
    reserved = next((r for r in RESERVED_TARGETS if is_within(target, r)), None)
    if reserved is not None:
        raise InvalidArgument(f"{what} {target!r}: not under {reserved}")


def check_host_dir(path: str, what: str, root: str) -> None:
    """A dir an admin may offer: a checked path that is no system dir and does not overlap the
    snapshotter's root."""
    check_path(path, what)
    for protected in (*PROTECTED_DIRS, root):
        if is_within(path, protected) or is_within(protected, path):
            whose = "the snapshotter's root" if protected == root else "the system dir"
            raise InvalidArgument(f"{what} {path!r}: overlaps {whose} {protected}")


def parse_lowers(value: str, policy: LowerPolicy, source: str) -> tuple[Lower, ...]:
    """The host dirs a label value asks for, leftmost on top; empty segments are ignored.

    Each entry is a named lower or an absolute path under an allowed root. `source` names where
    the value came from (a label, an annotation) in error messages.
    """
    dirs: list[Lower] = []
    for item in value.split(":"):
        if not item:
            continue
        if len(dirs) == MAX_EXTRA_LOWERS:
            raise InvalidArgument(f"{source}: more than {MAX_EXTRA_LOWERS} entries")
        what = f"{source}: entry"
        entry, at, target = item.partition(TARGET_SEPARATOR)
        if at:
            if TARGET_SEPARATOR in target:
                raise InvalidArgument(f"{what} {item!r}: one {TARGET_SEPARATOR!r} separates source and target")
            check_target(target, f"{what} {item!r}: target")
        if not entry.startswith("/") and NAME.fullmatch(entry):
            try:
                named = policy.named_lower(entry)
            except InvalidArgument as exc:
                raise InvalidArgument(f"{source}: {exc}") from None
            if named is None:
                raise InvalidArgument(f"{source}: {entry!r} is not a named lower of this node")
            dirs.append(named.entry(entry, target if at else None))
            continue
        check_path(entry, what)
        root = policy.allowing_root(entry)
        if root is None:
            raise InvalidArgument(
                f"{what} {entry!r}: {policy.allowed_text()}; the node's admin allows more "
                "with lowers.allowed_roots (or kubernetes.allowed_roots for pods) in the "
                "snapshotter's config file"
            )
        dirs.append(Lower(entry, root, target if at else ROOT_TARGET))
    refuse_nested_targets(dirs, source)
    return tuple(dirs)


def with_scopes(
    lowers: tuple[Lower, ...], asked: Mapping[str | None, str], namespace: str | None, named: Mapping[str, NamedLower]
) -> tuple[Lower, ...]:
    """`lowers` with each cache's scope from `asked` (by cache name, or None for every cache),
    each checked against the cache's scopes for pods of `namespace` (None: a containerd
    client's own container)."""
    if not asked:
        return lowers
    scoped = []
    for lower in lowers:
        scope = asked.get(lower.name, asked.get(None)) if lower.cache and lower.name else None
        policy = named[lower.name].cache if scope and lower.name and lower.name in named else None
        if scope and policy is not None and lower.name is not None:
            policy.check_scope(lower.name, namespace, scope)
            lower = replace(lower, scope=scope)
        scoped.append(lower)
    return tuple(scoped)


def target_count(value: str, named: Mapping[str, NamedLower]) -> int:
    """How many container paths (targets) a label value that was accepted before puts lowers at;
    unchecked, for accounting what is pinned already (a name no longer configured counts at /)."""
    targets = set()
    for item in value.split(":"):
        entry, at, target = item.partition(TARGET_SEPARATOR)
        if at:
            targets.add(target)
        elif entry in named:
            targets.add(named[entry].target)
    return len(targets - {ROOT_TARGET})


def refuse_nested_targets(lowers: Sequence[Lower], source: str) -> None:
    """Refuse targets one of which lies inside another: the outer mount, made after the inner one,
    hides it (and keeps it busy), or, made before it, has no mountpoint for it. The same target
    twice is fine: those entries stack into one mount."""
    first: dict[str, Lower] = {}
    for lower in lowers:
        if lower.target != ROOT_TARGET:
            first.setdefault(lower.target, lower)
    for outer, a in first.items():
        for inner, b in first.items():
            if inner != outer and is_within(inner, outer):
                raise InvalidArgument(
                    f"{source}: entry {b.shown} at {inner!r} lies inside entry {a.shown} at "
                    f"{outer!r}: targets must not nest; mount them side by side"
                )


def compact_lowerdirs(options: Sequence[str]) -> tuple[list[str], str | None]:
    """The options and working dir containerd mounts an overlay with: when the options come near a
    page, it mounts from the lowerdirs' common parent with relative paths (mount_linux.go)."""
    opts = list(options)
    if len(",".join(opts)) < COMPACT_THRESHOLD:
        return opts, None
    i = next((n for n, o in enumerate(opts) if o.startswith("lowerdir=")), None)
    dirs = opts[i].removeprefix("lowerdir=").split(":") if i is not None else []
    if i is None or len(dirs) <= 1:
        return opts, None
    common = posixpath.dirname(posixpath.commonprefix(dirs))  # by characters, as containerd does
    if common in ("", "/"):
        return opts, None
    common += "/"
    opts[i] = "lowerdir=" + ":".join(d[len(common) :] for d in dirs)
    return opts, common


def check_mount_limits(mounts: Sequence[Mount], source: str) -> None:
    """Refuse a mount with extra lowers that the kernel would refuse, saying why."""
    for m in mounts:
        if m.type != "overlay":
            continue
        compacted, _ = compact_lowerdirs(m.options)
        size = len(",".join(compacted).encode())
        if size > PAGE_SIZE:
            raise InvalidArgument(
                f"{source}: the overlay options would be {size} bytes, more than the {PAGE_SIZE} bytes mount accepts"
            )
        lowers = next(o for o in m.options if o.startswith("lowerdir=")).count(":") + 1
        if lowers > MAX_OVERLAY_LAYERS:
            raise InvalidArgument(f"{source}: {lowers} lower layers, more than overlayfs's {MAX_OVERLAY_LAYERS}")
