"""Images pulled the way kubelet pulls them: CRI PullImage from a real registry on loopback, into our
snapshotter, on a containerd whose config `addlower install` edited (proxy plugin, exports.root,
CRI's snapshotter, and on 2.1+ the Transfer service's unpack_config) on each containerd line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from addlower.core.config import PLUGIN_NAME
from addlower.dev.devcontainerd import Binaries, CriSettings, PrivateContainerd
from addlower.dev.ociimage import OciImage
from addlower.ops import install
from tests.support.cri.client import CriClient
from tests.support.daemon import Daemon
from tests.support.registry import Registry, push_oci_layout

from .conftest import CRI_NAMESPACE, Target, make_target

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("registry")) as r:
        yield r


@pytest.fixture
def node(
    tmp_path_factory: pytest.TempPathFactory,
    binaries: Binaries,
    registry: Registry,
    busybox_image: OciImage,
    pause_image: OciImage,
) -> Iterator[tuple[Target, str]]:
    """Our daemon and a CRI containerd on overlayfs whose config the installer then pointed at it;
    the sandbox image and busybox are in the registry only. Yields the node and busybox's ref."""
    work = tmp_path_factory.mktemp("pull")
    busybox = push_oci_layout(registry.host, busybox_image.path, "addlower/busybox", "v1")
    pause = push_oci_layout(registry.host, pause_image.path, "addlower/pause", "v1")
    daemon = Daemon(root=work / "snapshotter").start()
    try:
        cri = CriSettings(snapshotter="overlayfs", sandbox_image=pause, registries=[registry.host])
        node = PrivateContainerd(
            work / "containerd",
            proxy_plugins={PLUGIN_NAME: daemon.socket},
            cri=cri,
            binaries=binaries,
            configure=lambda text: install.configure(text, str(daemon.socket), str(daemon.root), binaries.version),
        )
        with node:
            yield make_target(node, daemon), busybox
    finally:
        daemon.stop()


def test_kubelets_pull_unpacks_into_the_snapshotter_and_pods_run_from_it(
    node: tuple[Target, str], busybox_image: OciImage, tmp_path: Path
):
    t, busybox = node
    cri = CriClient(t.containerd.address, log_root=tmp_path / "logs")
    try:
        assert cri.pull_image(busybox).startswith("sha256:")
        layer = busybox_image.chain_ids[-1]
        assert t.snapshots(CRI_NAMESPACE)[layer].kind == "Committed"  # unpacked into ours, by the pull
        with cri.pod("pulled") as pod:  # its sandbox image comes from the registry too
            app = cri.create_container(pod.id, pod.config, "app", busybox, ["sleep", "3600"])
            cri.start(app)
            assert cri.exec_sync(app, ["sh", "-c", "echo from-registry"]) == (0, "from-registry\n", "")
            assert app in t.snapshots(CRI_NAMESPACE)
    finally:
        cri.close()
