"""Extra lower dirs: what the label `containerd.io/snapshot/overlay-custom-add-lower.paths` may
name, and the limits of the mount it produces.

Pure rules, tested without root: parsing the colon-separated value, the path policy (absolute,
normalised, no characters that could splice options into the mount, not inside the
snapshotter's root, under an allowed root), named lowers, and the kernel's limits. Whatever a
container creator writes in the label is untrusted. Resolving symlinks and creating directories
is the snapshotter's job; this module must not touch the filesystem.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .errors import InvalidArgument
from .mounts import Mount

# overlayfs stacks at most this many lower layers (OVL_MAX_STACK).
MAX_OVERLAY_LAYERS = 500
# mount(2) takes the option string in one page.
MAX_OPTIONS_BYTES = 4096

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# Characters that would split or extend overlay options, or that no sane cache path needs.
FORBIDDEN = re.compile(r"[,:\\=\s\x00-\x1f\x7f]")


@dataclass(frozen=True)
class LowerPolicy:
    """What the node's admin allows: roots label paths must lie under, and named lowers."""

    root: str  # the snapshotter's own root: never usable
    allowed_roots: tuple[str, ...] = ("/",)
    named: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for r in self.allowed_roots:
            check_path(r, "allowed root")
        for name, path in self.named.items():
            if not NAME.fullmatch(name):
                raise InvalidArgument(f"named lower {name!r}: a name is letters, digits, '.', '_' or '-'")
            check_path(path, f"named lower {name!r}")
            self.check_outside_root(path, f"named lower {name!r}")

    def allows(self, path: str) -> bool:
        return any(is_within(path, r) for r in self.allowed_roots)

    def check_outside_root(self, path: str, what: str) -> None:
        if is_within(path, self.root) or is_within(self.root, path):
            raise InvalidArgument(f"{what} {path!r}: overlaps the snapshotter's root {self.root}")


def is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_path(path: str, what: str) -> None:
    """An absolute, normalised path with no character that could change the mount options."""
    bad = FORBIDDEN.search(path)
    if bad:
        raise InvalidArgument(f"{what} {path!r}: character {bad.group()!r} is not allowed")
    if not path.startswith("/"):
        raise InvalidArgument(f"{what} {path!r}: must be an absolute path")
    if ".." in path.split("/"):
        raise InvalidArgument(f"{what} {path!r}: must not contain '..'")
    if posixpath.normpath(path) != path or path.startswith("//"):
        raise InvalidArgument(f"{what} {path!r}: must be normalised (no '.', '//' or trailing '/')")


def parse_lowers(value: str, policy: LowerPolicy, source: str) -> tuple[str, ...]:
    """The host dirs a label value asks for, leftmost on top; empty segments are ignored.

    Each entry is a named lower or an absolute path under an allowed root. `source` names where
    the value came from (a label, an annotation) in error messages.
    """
    dirs = []
    for entry in value.split(":"):
        if not entry:
            continue
        if entry in policy.named:
            dirs.append(policy.named[entry])
            continue
        if not entry.startswith("/") and NAME.fullmatch(entry):
            raise InvalidArgument(f"{source}: {entry!r} is not a named lower of this node")
        what = f"{source}: entry"
        check_path(entry, what)
        policy.check_outside_root(entry, what)
        if not policy.allows(entry):
            raise InvalidArgument(f"{what} {entry!r}: outside the allowed roots {list(policy.allowed_roots)}")
        dirs.append(entry)
    return tuple(dirs)


def check_mount_limits(mounts: Sequence[Mount], source: str) -> None:
    """Refuse a mount with extra lowers that the kernel would refuse, saying why."""
    for m in mounts:
        if m.type != "overlay":
            continue
        options = ",".join(m.options)
        if len(options.encode()) > MAX_OPTIONS_BYTES:
            raise InvalidArgument(f"{source}: the overlay options would be {len(options.encode())} bytes, "
                                  f"more than the {MAX_OPTIONS_BYTES} bytes mount accepts")
        lowers = next(o for o in m.options if o.startswith("lowerdir=")).count(":") + 1
        if lowers > MAX_OVERLAY_LAYERS:
            raise InvalidArgument(f"{source}: {lowers} lower layers, more than overlayfs's "
                                  f"{MAX_OVERLAY_LAYERS}")
