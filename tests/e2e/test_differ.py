"""A commit holds what the container changed, never its extra lowers or targets: containerd 1.7+
asks our differ first (a diff proxy plugin on the daemon's socket, configured as `addlower
install` writes it), which writes the layer from the snapshot's own dir. The same changes on the
built-in overlayfs, diffed by containerd's walking differ in the same containerd, give the same
tar, byte for byte once decompressed. containerd 1.6 has no diff proxy: there the layer holds the
extra lowers, as README says."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from addlower.api import content_pb2, content_pb2_grpc, diff_pb2, diff_pb2_grpc, leases_pb2, leases_pb2_grpc
from addlower.core.config import PLUGIN_NAME
from addlower.core.ctrdconfig import BUILTIN_SNAPSHOTTER, diff_proxy
from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.dev import ociimage
from addlower.dev.devcontainerd import Binaries
from addlower.dev.mounting import mounted
from addlower.dev.ociimage import OciImage, directory, file
from addlower.engine.content import UNCOMPRESSED_LABEL
from addlower.engine.differ import LAYER_GZIP
from addlower.ops.client import SnapshotsClient

from .conftest import Target, running_target

pytestmark = pytest.mark.e2e

NS = "differ"
EPOCH = "1700000000"  # SOURCE_DATE_EPOCH: whiteouts' mtime on 1.7, and what the script sets
# Every kind of change: added, changed and deleted files, a deleted dir, an opaque dir (removed and
# made again), a new tree, a hardlink; then the same mtimes on every path it touched. It reads the
# cache to show it is there; a write into the target lands in the target's own dir.
SCRIPT = f"""set -e
cat /cache-at-root.txt 2>/dev/null || true
echo new > /app/added
ln /app/added /app/added-link
echo changed > /etc/motd
rm /app/old
rm -r /app/logs
rm -r /cfg && mkdir /cfg && echo fresh > /cfg/fresh
mkdir -p /newdir/sub && echo deep > /newdir/sub/f
if [ -d /root/.m2 ]; then echo mine > /root/.m2/new.jar; fi
touch -d @{EPOCH} /app/added /etc/motd /cfg/fresh /newdir/sub/f /newdir/sub /newdir /cfg /app /etc
"""


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> OciImage:
    """busybox and a layer of app files, so the container has two parents (its base is an overlay)."""
    return ociimage.build_busybox_image(
        tmp_path_factory.mktemp("differ-image") / "app.tar",
        ref="local/app:1",
        extra_layers=[
            [
                directory("app"),
                file("app/keep", "k"),
                file("app/old", "o"),
                directory("app/logs"),
                file("app/logs/a", "a"),
                directory("cfg"),
                file("cfg/x", "x"),
                file("cfg/y", "y"),
                file("etc/motd", "hi"),
            ]
        ],
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, image: OciImage, binaries: Binaries) -> Iterator[Target]:
    """Our daemon with a host cache at / and one at /root/.m2, and a containerd with the image
    unpacked into both our snapshotter and the built-in overlayfs."""
    work = tmp_path_factory.mktemp("differ")
    cache = work / "cache"
    (cache / "root").mkdir(parents=True)
    (cache / "root" / "cache-at-root.txt").write_text("credentials\n")
    (cache / "root" / "app").mkdir()
    (cache / "root" / "app" / "from-cache.jar").write_text("jar\n")
    (cache / "m2").mkdir()
    (cache / "m2" / "lib.jar").write_text("lib\n")
    config = work / "config.toml"
    config.write_text(
        f'containerd_address = "{work / "containerd" / "containerd.sock"}"\n[lowers]\nallowed_roots = ["{cache}"]\n'
    )
    with running_target(work, binaries, builtin=False, daemon_args=["--config", str(config)]) as t:
        t.import_image(image, NS)
        t.containerd.import_image(image.path, NS, BUILTIN_SNAPSHOTTER)
        yield t


def run_with_lowers(node: Target, image: OciImage, cid: str, binaries: Binaries) -> str:
    """SCRIPT in container `cid` on our snapshotter, the host cache at / and, on 1.7+ (1.6 refuses
    targets), the other one at /root/.m2; left behind for its diff. Its output."""
    cache = Path(node.containerd.workdir).parent / "cache"
    lowers = str(cache / "root")
    if diff_proxy(binaries.version):
        lowers += f":{cache / 'm2'}@/root/.m2"
    options = ["--snapshotter-label", f"{LOWERS}={lowers}"]
    return node.containerd.run(
        image.ref, cid, "sh", "-c", SCRIPT, namespace=NS, snapshotter=PLUGIN_NAME, rm=False, options=options
    ).stdout


def diff(t: Target, snapshotter: str, key: str) -> bytes:
    """`ctr snapshots diff` of a container's snapshot: the layer, decompressed."""
    cmd = [
        t.containerd.binaries.command("ctr"),
        "--address",
        str(t.containerd.address),
        "-n",
        NS,
        "snapshots",
        "--snapshotter",
        snapshotter,
        "diff",
        key,
    ]
    done = subprocess.run(
        cmd, env={**t.containerd.binaries.env(), "SOURCE_DATE_EPOCH": EPOCH}, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()
    return gzip.decompress(done.stdout)


def names(layer: bytes) -> list[str]:
    return [m.name for m in tarfile.open(fileobj=io.BytesIO(layer)).getmembers()]


def test_the_layer_is_the_containers_own_changes_and_equals_the_walking_differs(
    node: Target, image: OciImage, binaries: Binaries
):
    out = run_with_lowers(node, image, "ours", binaries)
    assert out == "credentials\n"  # the container saw the cache
    node.containerd.run(
        image.ref, "builtin", "sh", "-c", SCRIPT, namespace=NS, snapshotter=BUILTIN_SNAPSHOTTER, rm=False
    )
    ours, builtin = diff(node, PLUGIN_NAME, "ours"), diff(node, BUILTIN_SNAPSHOTTER, "builtin")
    if not diff_proxy(binaries.version):  # 1.6: the walking differ sees the extra lowers
        assert "cache-at-root.txt" in names(ours) and "app/from-cache.jar" in names(ours)
        return
    assert names(ours) == [
        "app",
        "app/added",
        "app/added-link",
        "app/.wh.logs",
        "app/.wh.old",
        "cfg",
        "cfg/fresh",
        "cfg/.wh.x",
        "cfg/.wh.y",
        "etc",
        "etc/motd",
        "newdir",
        "newdir/sub",
        "newdir/sub/f",
        "run",
    ]  # runc made /run; nothing of the caches, nothing at /root/.m2
    assert ours == builtin  # every header and byte, whiteouts and hardlink included
    log = node.daemon.log() if node.daemon else ""
    assert log.count("wrote a layer from the snapshot's own dir") == 1  # ours only: the built-in's went on


def test_a_commit_through_containerds_diff_api_applies_as_the_containers_own_changes(
    node: Target, image: OciImage, binaries: Binaries, tmp_path: Path
):
    """What nerdctl commit does, without a Go client: Compare (the parent's view against the
    container's mounts) through containerd's Diff API, then the layer applied onto the parent in a
    fresh snapshot, which then holds the container's changes and nothing of its lowers."""
    ours = diff_proxy(binaries.version)  # 1.6: the walking differ, which takes the lowers in
    run_with_lowers(node, image, "api", binaries)
    metadata = [("containerd-namespace", NS)]
    with grpc.insecure_channel(f"unix://{node.containerd.address}") as channel:
        # What a client does: a lease, so containerd's GC leaves the snapshots and the blob alone.
        leases_pb2_grpc.LeasesStub(channel).Create(leases_pb2.CreateRequest(id="commit"), metadata=metadata)
        metadata.append(("containerd-lease", "commit"))
        snapshots = SnapshotsClient(channel, PLUGIN_NAME, metadata)
        differ = diff_pb2_grpc.DiffStub(channel)
        parent = snapshots.stat("api").parent
        left = snapshots.view("api-parent-view", parent)
        layer = differ.Diff(
            diff_pb2.DiffRequest(left=left, right=snapshots.mounts("api"), media_type=LAYER_GZIP), metadata=metadata
        ).diff
        info = (
            content_pb2_grpc.ContentStub(channel)
            .Info(content_pb2.InfoRequest(digest=layer.digest), metadata=metadata)
            .info
        )
        assert info.size == layer.size and info.labels[UNCOMPRESSED_LABEL].startswith("sha256:")
        fresh = snapshots.prepare("applied", parent)
        applied = differ.Apply(diff_pb2.ApplyRequest(diff=layer, mounts=fresh), metadata=metadata).applied
        assert applied.digest == info.labels[UNCOMPRESSED_LABEL]  # the applier read the same tar we wrote
        snapshots.commit("applied-layer", "applied")
        with mounted(snapshots.view("applied-view", "applied-layer"), tmp_path / "rootfs") as rootfs:
            assert (rootfs / "app" / "added").read_text() == "new\n"
            assert (rootfs / "app" / "added").stat().st_ino == (rootfs / "app" / "added-link").stat().st_ino
            assert (rootfs / "etc" / "motd").read_text() == "changed\n"
            assert {"added", "added-link", "keep"} <= set(os.listdir(rootfs / "app"))
            assert not {"old", "logs"} & set(os.listdir(rootfs / "app"))
            assert os.listdir(rootfs / "cfg") == ["fresh"]  # the opaque dir
            assert (rootfs / "newdir" / "sub" / "f").read_text() == "deep\n"
            if not ours:
                assert (rootfs / "cache-at-root.txt").exists()  # as README says of 1.6
                return
            assert not (rootfs / "cache-at-root.txt").exists()  # nothing of the lowers
            assert not (rootfs / "app" / "from-cache.jar").exists()
            assert not (rootfs / "root" / ".m2").exists()  # nor of the target
    assert node.daemon is not None and "wrote a layer from the snapshot's own dir" in node.daemon.log()
