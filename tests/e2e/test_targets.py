"""Lowers at a container path (`SOURCE@TARGET`): a flat host cache appears at /root/.m2, copy-on-write,
through a real containerd. containerd 1.7+ mounts a snapshotter's extra mounts at their target;
1.6 would mount them over the rootfs, so there the snapshotter refuses them."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from addlower.core.config import PLUGIN_NAME
from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.dev.devcontainerd import Binaries, CtrError
from addlower.dev.ociimage import OciImage
from addlower.engine import fsutil

from .conftest import Target, running_target

pytestmark = pytest.mark.e2e

NS = "targets"
BUDGET = 4  # lowers.max_host_mounts: the tests below take at most 4 at once


@pytest.fixture
def node(tmp_path_factory: pytest.TempPathFactory, busybox_image: OciImage, binaries: Binaries) -> Iterator[Target]:
    """Our daemon (host dirs under `host/`, a named lower `maven` at /root/.m2, containerd's address
    known for its version) and a containerd with busybox imported."""
    work = tmp_path_factory.mktemp("tgt")
    host = work / "host"
    for name, file in (("m2", "repository/a.jar"), ("npm", "cache/b.tgz")):
        (host / name / file).parent.mkdir(parents=True)
        (host / name / file).write_text(f"{name}\n")
    config = work / "config.toml"
    config.write_text(
        f'[lowers]\nallowed_roots = ["{host}"]\n'
        f"max_host_mounts = {BUDGET}\n"
        f'[lowers.named]\nmaven = {{ path = "{host / "m2"}", target = "/root/.m2" }}\n'
        f'[kubernetes]\ncontainerd_address = "{work / "containerd" / "containerd.sock"}"\n'
    )
    with running_target(work, binaries, builtin=False, daemon_args=["--config", str(config)]) as t:
        t.import_image(busybox_image, NS)
        yield t


def run(t: Target, image: OciImage, cid: str, lowers: str, script: str) -> str:
    return t.containerd.run(
        image.ref,
        cid,
        "sh",
        "-c",
        script,
        namespace=NS,
        snapshotter=PLUGIN_NAME,
        options=["--snapshotter-label", f"{LOWERS}={lowers}"],
    ).stdout


def host(t: Target) -> Path:
    return Path(t.containerd.workdir).parent / "host"


def honours_targets(binaries: Binaries) -> bool:
    return binaries.version >= (1, 7)


def test_a_flat_cache_at_its_target_is_copy_on_write_and_the_image_keeps_its_modes(
    node: Target, busybox_image: OciImage, binaries: Binaries
):
    m2 = host(node) / "m2"
    script = (
        "cat /root/.m2/repository/a.jar; echo mine > /root/.m2/repository/a.jar; touch /root/.m2/new; "
        "cat /root/.m2/repository/a.jar; stat -c %a /root /tmp; ls /"
    )
    if not honours_targets(binaries):
        with pytest.raises(CtrError) as err:
            run(node, busybox_image, "m2", f"{m2}@/root/.m2", script)
        assert "a target needs containerd >= 1.7" in err.value.stderr
        return
    out = run(node, busybox_image, "m2", f"{m2}@/root/.m2", script).split()
    assert out[:2] == ["m2", "mine"]
    assert out[2:4] == ["700", "1777"]  # the image's modes for /root and /tmp, not the cache's
    assert "repository" not in out[4:]  # nothing of the cache at /
    assert (m2 / "repository" / "a.jar").read_text() == "m2\n" and not (m2 / "new").exists()
    again = run(node, busybox_image, "m2b", f"{m2}@/root/.m2", "cat /root/.m2/repository/a.jar; ls /root/.m2")
    assert again.split() == ["m2", "repository"]  # another container: the host's files, not the first's


def test_two_targets_and_a_named_lowers_own_target(node: Target, busybox_image: OciImage, binaries: Binaries):
    npm = host(node) / "npm"
    lowers, script = f"maven:{npm}@/root/.npm", "cat /root/.m2/repository/a.jar /root/.npm/cache/b.tgz"
    if not honours_targets(binaries):  # the name alone carries a target: refused all the same
        with pytest.raises(CtrError) as err:
            run(node, busybox_image, "two", lowers, script)
        assert "a target needs containerd >= 1.7" in err.value.stderr
        return
    assert run(node, busybox_image, "two", lowers, script).split() == ["m2", "npm"]


def test_targets_that_nest_are_refused_naming_both_and_nothing_is_left(node: Target, busybox_image: OciImage):
    """Nested targets: the outer mount would hide the inner one (keeping it busy) or lack its
    mountpoint. Refused before anything is made, on every containerd line."""
    m2, npm = host(node) / "m2", host(node) / "npm"
    with pytest.raises(CtrError) as err:
        run(node, busybox_image, "nest", f"{m2}@/root/.m2/repository:{npm}@/root", "true")
    assert (
        f"entry '{m2}' at '/root/.m2/repository' lies inside entry '{npm}' at '/root': targets must not nest"
    ) in err.value.stderr
    assert "nest" not in node.snapshots(NS)


def test_past_the_host_mount_budget_a_container_is_refused_naming_it_and_shared_dirs_count_once(
    node: Target, busybox_image: OciImage
):
    dirs = [host(node) / f"b{n}" for n in range(BUDGET + 1)]
    for d in dirs:
        d.mkdir(exist_ok=True)
    with pytest.raises(CtrError) as err:
        run(node, busybox_image, "over", ":".join(map(str, dirs)), "true")  # a pin each: 5 > 4
    assert (
        f"lowers.max_host_mounts: this snapshot's extra lowers need {BUDGET + 1} more host mounts (a pin per "
        f"host dir not pinned yet, a mount per target) and 0 of the node's budget of {BUDGET} are in use"
    ) in err.value.stderr
    assert "over" not in node.snapshots(NS)
    within = ":".join(map(str, dirs[:BUDGET]))
    with ThreadPoolExecutor(1) as pool:  # a container holding the whole budget, running
        holder = pool.submit(run, node, busybox_image, "holder", within, "sleep 600")
        deadline = time.monotonic() + 60
        while "holder" not in node.ctr("tasks", "ls", namespace=NS).stdout and time.monotonic() < deadline:
            time.sleep(0.1)
        try:  # the same dirs again: their pins are shared, so it fits
            assert run(node, busybox_image, "within", within, "echo ok").split() == ["ok"]
        finally:
            node.ctr("tasks", "kill", "-s", "SIGKILL", "holder", namespace=NS)
            with contextlib.suppress(CtrError):  # killed: ctr says so
                holder.result(timeout=60)


def test_removing_the_containers_and_the_image_leaves_no_dir_and_no_mount(
    node: Target, busybox_image: OciImage, binaries: Binaries
):
    if honours_targets(binaries):
        run(node, busybox_image, "gone", f"maven:{host(node) / 'npm'}@/root/.npm", "true")
    node.ctr("images", "rm", "--sync", busybox_image.ref, namespace=NS)
    assert node.snapshots(NS) == {} and node.snapshot_dirs() == []
    assert node.daemon is not None
    assert [m for m in fsutil.mount_points() if m.startswith(f"{node.daemon.root}/")] == []
    assert (host(node) / "m2" / "repository" / "a.jar").read_text() == "m2\n"
