"""Replacing the Go original on a node: stop it, start this daemon on the same root. Its images and
containers are served as they were: nothing is pulled or unpacked again, a running container keeps
running, a container restarted gets its own writes and its extra lowers back, and removing them
works as on any of our snapshots. The Go program is the one built from ../shared/peers."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from addlower.core.config import PLUGIN_NAME
from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.dev.devcontainerd import GO_ORIGINAL, Binaries, PrivateContainerd, SnapshotterProcess
from addlower.dev.ociimage import OciImage
from tests.support.daemon import Daemon, allowing

from .conftest import eventually, make_target, private_containerd

pytestmark = pytest.mark.e2e

NS = "adopt"


def infos(containerd: PrivateContainerd) -> dict[str, dict]:
    """`ctr snapshots info` of every snapshot: what containerd knows of each."""
    keys = [line.split()[0] for line in snapshots_ctr(containerd, "ls").splitlines()[1:]]
    return {key: json.loads(snapshots_ctr(containerd, "info", key)) for key in keys}


def snapshots_ctr(containerd: PrivateContainerd, *args: str) -> str:
    return containerd.ctr("snapshots", "--snapshotter", PLUGIN_NAME, *args, namespace=NS).stdout


def ls_ok(containerd: PrivateContainerd) -> bool:
    ls = containerd.ctr("snapshots", "--snapshotter", PLUGIN_NAME, "ls", namespace=NS, check=False)
    return ls.returncode == 0


def exec_cat(containerd: PrivateContainerd, exec_id: str, path: str) -> str:
    return containerd.ctr("tasks", "exec", "--exec-id", exec_id, "keep", "cat", path, namespace=NS).stdout


def test_a_go_originals_root_is_served_as_it_was(
    tmp_path_factory: pytest.TempPathFactory, busybox_image: OciImage, binaries: Binaries
):
    assert GO_ORIGINAL.exists(), f"{GO_ORIGINAL} is missing: scripts/setup.sh builds it"
    work = tmp_path_factory.mktemp("adopt")
    root, host = work / "snapshotter", work / "host"
    (host / "cache").mkdir(parents=True)
    (host / "cache" / "from-host.txt").write_text("shared\n")
    go = SnapshotterProcess(root, command=[str(GO_ORIGINAL)]).start()
    daemon = Daemon(root=root, args=allowing(work / "config.toml", host))
    try:
        # No differ on our socket: the Go program serves snapshots only, as on the node it ran on.
        with private_containerd(work / "containerd", root, binaries, differ=False) as containerd:
            make_target(containerd, None).import_image(busybox_image, NS)
            containerd.run(
                busybox_image.ref,
                "keep",
                "sh",
                "-c",
                "echo mine > /written; sleep 1000",
                namespace=NS,
                rm=False,
                snapshotter=PLUGIN_NAME,
                options=["-d", "--snapshotter-label", f"{LOWERS}={host / 'cache'}"],
            )
            assert eventually(lambda: exec_cat(containerd, "w", "/written") == "mine\n", 10)
            layer = busybox_image.chain_ids[-1]
            snapshots_ctr(containerd, "prepare", "dropped", layer)
            snapshots_ctr(containerd, "rm", "dropped")
            containerd.collect_garbage(NS)  # containerd removes it from the Go program, which leaves its dir
            before = infos(containerd)
            mounts_before = snapshots_ctr(containerd, "mounts", "/mnt", "keep")
            dirs_before = sorted(os.listdir(root / "snapshots"), key=int)
            assert len(dirs_before) == 3  # the layer, keep, and what the Go program left of dropped
            go.stop()  # as systemctl stop does: SIGTERM, which it does not handle

            daemon.start()
            assert (root / "metadata.db.bolt").is_file()
            assert "took over the Go snapshotter's root: 2 snapshots (1 committed, 1 active, 0 view)" in daemon.log()
            # containerd dials the socket again after its reconnect backoff (up to 3 s)
            assert eventually(lambda: ls_ok(containerd), 10)
            assert infos(containerd) == before  # keys, parents, kinds, labels, times
            assert sorted(os.listdir(root / "snapshots"), key=int) == dirs_before
            # The running container was never touched.
            assert exec_cat(containerd, "e1", "/written") == "mine\n"
            assert exec_cat(containerd, "e2", "/from-host.txt") == "shared\n"

            # Restarted, the container gets its upper and its lower from us: the same dirs, the host
            # dir as our pin of it.
            containerd.ctr("tasks", "kill", "-s", "SIGKILL", "keep", namespace=NS)
            assert eventually(lambda: "STOPPED" in containerd.ctr("tasks", "ls", namespace=NS).stdout, 10)
            containerd.ctr("tasks", "delete", "keep", namespace=NS)
            mounts_after = snapshots_ctr(containerd, "mounts", "/mnt", "keep")
            assert upper_and_image(mounts_after) == upper_and_image(mounts_before)
            assert str(host / "cache") in mounts_before and str(host / "cache") not in mounts_after
            containerd.ctr("tasks", "start", "-d", "keep", namespace=NS)
            assert eventually(lambda: exec_cat(containerd, "e3", "/from-host.txt") == "shared\n", 10)
            assert exec_cat(containerd, "e4", "/written") == "mine\n"

            # The image is not unpacked again: a new container gets the adopted layer as parent.
            containerd.run(busybox_image.ref, "new", "true", namespace=NS, snapshotter=PLUGIN_NAME)
            committed = {k for k, info in infos(containerd).items() if info["Kind"] == "committed"}
            assert committed == {k for k, info in before.items() if info["Kind"] == "committed"}

            # Removed like any snapshot of ours; the Go program's leftovers go at the same Cleanup.
            containerd.ctr("tasks", "kill", "-s", "SIGKILL", "keep", namespace=NS)
            assert eventually(lambda: "STOPPED" in containerd.ctr("tasks", "ls", namespace=NS).stdout, 10)
            containerd.ctr("tasks", "delete", "keep", namespace=NS)
            containerd.ctr("containers", "delete", "keep", namespace=NS)
            containerd.collect_garbage(NS)
            image_dir = layer_dir(mounts_before)
            assert eventually(lambda: os.listdir(root / "snapshots") == [image_dir], 10), os.listdir(root / "snapshots")
    finally:
        go.kill()
        daemon.stop(signal.SIGTERM)


def upper_and_image(mounts: str) -> list[str]:
    """The options of a Mounts answer but the extra lowers' (host dir or pin)."""
    options = mounts.split(" -o ", 1)[1].split()[0].split(",")
    kept = []
    for option in options:
        if option.startswith("lowerdir="):
            option = "lowerdir=" + ":".join(p for p in option[9:].split(":") if "/snapshots/" in p)
        kept.append(option)
    return kept


def layer_dir(mounts: str) -> str:
    """The name of the image layer's dir under snapshots/, from a Mounts answer on it."""
    lowers = next(o for o in upper_and_image(mounts) if o.startswith("lowerdir="))
    return Path(lowers[9:]).parent.name
