"""Snapshot keys as containerd hands them to a proxy snapshotter: `<namespace>/<n>/<name>`, where
<name> is the key containerd's clients use (`ctr snapshots info <container id>`, a container's
rootfs) and <n> a number containerd's metadata picks. Operators know the name, the backend only
the whole key: here is how one leads to the other. Pure.
"""

from __future__ import annotations

from collections.abc import Collection

from addlower.core.errors import InvalidArgument, NotFound


def split_key(key: str) -> tuple[str, str] | None:
    """(namespace, name) of a key in containerd's form; None for any other key."""
    parts = key.split("/", 2)
    if len(parts) == 3 and parts[0] and parts[1].isdigit() and parts[2]:
        return parts[0], parts[2]
    return None


def resolve_key(wanted: str, keys: Collection[str], namespace: str | None = None) -> str:
    """The key `wanted` means among `keys`: itself, when it is a key and no namespace is given;
    else the one key whose containerd name is `wanted` (in `namespace`, when given). Several
    matches are refused, saying how to choose, rather than guessed."""
    if namespace is None and wanted in keys:
        return wanted
    found = {
        k: split[0]
        for k in keys
        if (split := split_key(k)) is not None and split[1] == wanted and namespace in (None, split[0])
    }
    where = f" in namespace {namespace!r}" if namespace is not None else ""
    if not found:
        raise NotFound(
            f"snapshot {wanted!r} does not exist{where} (neither as a key nor as the name in "
            "containerd's <namespace>/<n>/<name>)"
        )
    if len(found) == 1:
        return next(iter(found))
    namespaces = sorted(set(found.values()))
    if len(namespaces) > 1:
        raise InvalidArgument(
            f"{wanted!r} names snapshots in several namespaces ({', '.join(namespaces)}): choose one with --namespace"
        )
    raise InvalidArgument(f"{wanted!r} names several snapshots{where}: {', '.join(sorted(found))}; give the whole key")
