"""The CRI harness end to end: a host-network pod with a busybox container, driven through
containerd's CRI plugin (Kubernetes runtime.v1) as kubelet would, on the built-in overlayfs and on
ours; then containerd's garbage collector removes the pod's snapshots and their directories.
"""

from __future__ import annotations

import pytest

from addlower.dev.devcontainerd import Binaries
from addlower.dev.ociimage import OciImage
from tests.support.cri.client import CriClient

from .conftest import CRI_NAMESPACE, Target, eventually

pytestmark = pytest.mark.e2e

GC_TIMEOUT = 15.0


def test_pod_runs_on_the_cri_snapshotter_and_gc_removes_its_snapshots(
    cri_target: Target, cri: CriClient, busybox_image: OciImage, pause_image: OciImage
) -> None:
    t = cri_target
    t.import_image(busybox_image, CRI_NAMESPACE)
    image = cri.image_status(busybox_image.ref)
    assert image is not None and busybox_image.ref in image.repo_tags
    layers = {busybox_image.chain_ids[-1], pause_image.chain_ids[-1]}
    layer_dirs = t.snapshot_dirs()

    with cri.pod("smoke") as pod:
        assert cri.pod_state(pod.id) == "SANDBOX_READY"
        app = cri.create_container(pod.id, pod.config, "app", busybox_image.ref, ["sleep", "3600"])
        cri.start(app)

        assert cri.container_state(app) == "CONTAINER_RUNNING"
        assert cri.exec_sync(app, ["echo", "ok"]) == (0, "ok\n", "")
        assert cri.exec_sync(app, ["sh", "-c", "echo written > /root/note"]) == (0, "", "")
        assert set(t.snapshots(CRI_NAMESPACE)) == layers | {pod.id, app}
        upper = t.upperdir(app, CRI_NAMESPACE)
        assert upper.parent.parent == t.snapshots_dir
        assert (upper / "root" / "note").read_text() == "written\n"

    def collected() -> bool:  # CRI removes the pod's records; the collector, run here, the rest
        t.containerd.collect_garbage(CRI_NAMESPACE)
        return set(t.snapshots(CRI_NAMESPACE)) == layers and t.snapshot_dirs() == layer_dirs

    assert eventually(collected, GC_TIMEOUT), (
        f"GC left {sorted(t.snapshots(CRI_NAMESPACE))}, dirs {t.snapshot_dirs()} (layer dirs {layer_dirs})"
    )


def test_kubelets_image_filesystem_is_where_the_snapshotter_keeps_layers(
    cri_target: Target, cri: CriClient, binaries: Binaries
) -> None:
    """ImageFsInfo (kubelet's image GC and eviction act on it) names the snapshotter's root: for a
    proxy plugin, its `exports.root` on 1.7+; containerd 1.6 ignores that and guesses a dir under
    its own root."""
    mountpoints = cri.image_fs_mountpoints()
    if cri_target.daemon is None or binaries.version < (1, 7):
        guessed = cri_target.containerd.root / f"io.containerd.snapshotter.v1.{cri_target.snapshotter}"
        assert mountpoints == [str(guessed)]
    else:
        assert mountpoints == [str(cri_target.daemon.root)]
