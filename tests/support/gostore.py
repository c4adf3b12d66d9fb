"""A root as the Go original leaves it, made through its own Snapshots API: chains of committed
layers with usage, containers, views, removed snapshots (whose dirs it leaves), unicode and long
labels (a labels bucket past a page, so bolt gives it pages of its own and overflow pages)."""

from __future__ import annotations

from pathlib import Path

from addlower.ops.client import SnapshotsClient

LAYERS = 20
REMOVED = 5
BIG_LABEL = "containerd.io/snapshot/big"
BIG_VALUE = "x" * 6000


def layer_key(n: int) -> str:
    return f"ns/{n}/sha256:{n:064x}"


def _upper(mounts: list) -> Path:
    """Where a new snapshot's writes go: its overlay's upperdir, or the bind mount's source."""
    mount = mounts[0]
    if mount.type == "bind":
        return Path(mount.source)
    return Path(next(o for o in mount.options if o.startswith("upperdir="))[9:])


def populate(client: SnapshotsClient) -> None:
    parent = ""
    for n in range(LAYERS):
        key = layer_key(n)
        upper = _upper(client.prepare(f"extract-{n}", parent, {"containerd.io/snapshot.ref": key}))
        (upper / f"file-{n}").write_bytes(b"y" * (n * 1000))
        client.commit(key, f"extract-{n}", {"containerd.io/snapshot.ref": key, "layer": f"n°{n} ✓"}, parent)
        client.prepare(f"ns/c{n}/container-{n}", key, {"containerd.io/snapshot/overlay.upperdir": f"{n}"})
        client.view(f"ns/v{n}/view-{n}", key)
        parent = key
    client.prepare("ns/big/labelled", parent, {BIG_LABEL: BIG_VALUE})
    for n in range(REMOVED):  # the last ids handed out are no live snapshot's
        client.prepare(f"ns/r{n}/removed-{n}", parent)
        client.remove(f"ns/r{n}/removed-{n}")
