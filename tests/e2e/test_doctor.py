"""`addlower doctor` on a node as an operator runs it: our daemon and a real containerd of each
line, configured well, then broken the ways nodes break (a named lower missing, a lower behind a
symlink, pods looked up at the wrong address, containerd without the plugin, or not restarted
since its config gained it); and `addlower info` of a container by the id ctr knows it by."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from addlower.cli import admin as GROUP
from addlower.core import ctrdconfig
from addlower.core.config import DIFFER_NAME, PLUGIN_NAME
from addlower.dev.devcontainerd import Binaries, CriSettings, PrivateContainerd
from addlower.dev.ociimage import OciImage
from addlower.ops.install import plugin_table
from tests.support.cri.client import CriClient
from tests.support.daemon import Daemon

pytestmark = pytest.mark.e2e

INFO_ONLY = {"overlay index", "userxattr", "mount targets"}  # what doctor reports without judging


def snapshotter_config(
    path: Path, root: Path, named: Mapping[str, str], roots: Sequence[Path], pods_at: Path | None
) -> Path:
    """The daemon's config file: `named` lowers (name -> TOML value), allowed `roots`, and pod
    lookups at `pods_at` (None: off)."""
    lines = [
        f"root_dir = {q(root)}",
        "[lowers]",
        f"allowed_roots = [{', '.join(q(r) for r in roots)}]",
        "[lowers.named]",
        *(f"{name} = {value}" for name, value in named.items()),
    ]
    if pods_at is not None:
        lines += ["[kubernetes]", "enabled = true", f"containerd_address = {q(pods_at)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def q(path: Path) -> str:
    """A path as a TOML string."""
    return json.dumps(str(path))


@dataclass
class Node:
    work: Path
    daemon: Daemon
    containerd: PrivateContainerd
    config: Path  # the daemon's config file

    def doctor(self, code: int, config: Path | None = None) -> dict[str, dict[str, Any]]:
        """`addlower doctor --json` with `config` (default: the daemon's), each check by name."""
        args = [
            "doctor",
            "--json",
            "--config",
            str(config or self.config),
            "--containerd-config",
            str(self.containerd.config_path),
        ]
        result = CliRunner().invoke(GROUP, args)
        assert result.exit_code == code, result.output
        shown = json.loads(result.stdout)
        assert shown["ok"] is (code == 0)
        return {c["name"]: c for c in shown["checks"]}


@contextmanager
def running_node(work: Path, binaries: Binaries, plugin: bool = True) -> Iterator[Node]:
    """Our daemon with a good config (named lowers `maven`, there, and `npm`, made when used; an
    allowed root; pod lookups at containerd's socket), then a containerd that declares it
    (`plugin`) and runs CRI's pods on it, or neither."""
    for d in ("m2", "allowed"):
        (work / d).mkdir(parents=True)
    root = work / "snapshotter"
    containerd = PrivateContainerd(
        work / "containerd",
        binaries=binaries,
        proxy_plugins={PLUGIN_NAME: root / "grpc.socks"} if plugin else {},
        cri=CriSettings(snapshotter=PLUGIN_NAME) if plugin else False,
    )
    named = {"maven": q(work / "m2"), "npm": f"{{ path = {q(work / 'npm')}, create = true }}"}
    config = snapshotter_config(
        work / "snapshotter.toml", root, named, [work / "allowed"], containerd.address if plugin else None
    )
    daemon = Daemon(root=root, args=["--config", str(config)]).start()
    try:
        with containerd:
            yield Node(work, daemon, containerd, config)
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, binaries: Binaries) -> Iterator[Node]:
    with running_node(tmp_path_factory.mktemp("doctor"), binaries) as n:
        yield n


def fails(checks: Mapping[str, Mapping[str, str]]) -> set[str]:
    return {name for name, c in checks.items() if c["status"] == "FAIL"}


def test_doctor_passes_a_good_node(node: Node, binaries: Binaries):
    checks = node.doctor(0)
    version = ".".join(map(str, binaries.version))
    # 1.6: no diff proxy, and a guessed image filesystem (test_doctor_tells_1_6s_guessed_image_filesystem)
    limits = {} if ctrdconfig.diff_proxy(binaries.version) else {"commits": "WARN", "image filesystem": "WARN"}
    assert {n: c["status"] for n, c in checks.items() if c["status"] != "PASS"} == {
        **{n: "INFO" for n in INFO_ONLY},
        "named lower npm": "INFO",
        **limits,
    }
    if limits:
        assert "holds the files of its extra lowers" in checks["commits"]["detail"]
    else:
        assert checks["differ loaded"]["detail"].endswith(f"loaded io.containerd.differ.v1 {DIFFER_NAME}: ok")
    assert f"containerd {version} answers at {node.containerd.address}" in checks["containerd"]["detail"]
    assert checks["plugin loaded"]["detail"].endswith(f"loaded io.containerd.snapshotter.v1 {PLUGIN_NAME}: ok")
    assert checks["CRI snapshotter"]["detail"] == f"CRI unpacks and runs pods on {PLUGIN_NAME}"
    assert checks["pod lookups"]["status"] == "PASS"
    assert "made, empty, when first used (create = true)" in checks["named lower npm"]["detail"]
    assert checks[f"allowed root {node.work / 'allowed'}"]["status"] == "PASS"
    assert ("unpack into it" in checks) == ctrdconfig.uses_transfer_unpack(binaries.version)  # 2.1+


def test_doctor_fails_a_missing_named_lower_a_symlinked_one_and_an_unreachable_root(node: Node):
    (node.work / "link").symlink_to(node.work / "m2")
    named = {"maven": q(node.work / "m2"), "gradle": q(node.work / "gradle"), "linked": q(node.work / "link")}
    roots = [node.work / "allowed", node.work / "no" / "such"]
    config = snapshotter_config(node.work / "broken.toml", node.daemon.root, named, roots, node.containerd.address)
    checks = node.doctor(1, config)
    assert fails(checks) == {"named lower gradle", "named lower linked", f"allowed root {node.work / 'no' / 'such'}"}
    gradle = checks["named lower gradle"]
    assert f"named lower 'gradle' ({node.work / 'gradle'}): {node.work / 'gradle'} does not exist" in gradle["detail"]
    assert "create = true" in gradle["detail"] and "create = true" in gradle["hint"]
    assert f"{node.work / 'link'} is a symlink" in checks["named lower linked"]["detail"]
    assert str(node.work / "m2") in checks["named lower linked"]["hint"]  # the dir it stands for
    assert f"{node.work / 'no'} does not exist" in checks[f"allowed root {node.work / 'no' / 'such'}"]["detail"]
    assert checks["named lower maven"]["status"] == "PASS"


def test_doctor_fails_pod_lookups_at_an_address_where_no_containerd_answers(node: Node):
    wrong = node.work / "nowhere.sock"
    config = snapshotter_config(node.work / "wrong.toml", node.daemon.root, {}, [], wrong)
    checks = node.doctor(1, config)
    assert fails(checks) == {"pod lookups"}
    assert (
        f"kubernetes.containerd_address: no answer (containerd at {wrong}: UNAVAILABLE)"
        in checks["pod lookups"]["detail"]
    )
    assert str(node.containerd.address) in checks["pod lookups"]["hint"]
    assert "a target needs containerd >= 1.7, and its version is unknown" in checks["mount targets"]["detail"]


def test_doctor_fails_a_containerd_without_the_plugin_until_it_is_declared_and_restarted(
    tmp_path_factory: pytest.TempPathFactory, binaries: Binaries
):
    with running_node(tmp_path_factory.mktemp("doctor-bare"), binaries, plugin=False) as n:
        checks = n.doctor(1)
        differ = {"commits"} if ctrdconfig.diff_proxy(binaries.version) else set()
        assert fails(checks) == {"containerd config", "plugin loaded", *differ}
        if differ:
            assert f"[proxy_plugins.{DIFFER_NAME}]" in checks["commits"]["hint"]
        assert f"has no io.containerd.snapshotter.v1 plugin {PLUGIN_NAME}" in checks["plugin loaded"]["detail"]
        assert f"[proxy_plugins.{PLUGIN_NAME}]" in checks["containerd config"]["hint"]

        with open(n.containerd.config_path, "a") as f:  # the admin edits the file, forgets the restart
            f.write(plugin_table(str(n.daemon.socket), str(n.daemon.root)))
        checks = n.doctor(1)
        assert checks["containerd config"]["status"] == "PASS"
        assert checks["plugin loaded"]["status"] == "FAIL" and "restart containerd" in checks["plugin loaded"]["hint"]

        n.containerd.stop()
        n.containerd.proxy_plugins = {PLUGIN_NAME: n.daemon.socket}  # its differ, Transfer's unpack_config
        n.containerd.start()
        checks = n.doctor(0)
        assert checks["plugin loaded"]["status"] == "PASS"


def test_info_takes_the_container_id_as_ctr_snapshots_info_does(node: Node, busybox_image: OciImage):
    namespace = "doctor-info"
    node.containerd.import_image(busybox_image.path, namespace, PLUGIN_NAME)
    node.containerd.run(busybox_image.ref, "c1", "true", rm=False, snapshotter=PLUGIN_NAME, namespace=namespace)
    ctr = json.loads(
        node.containerd.ctr("snapshots", "--snapshotter", PLUGIN_NAME, "info", "c1", namespace=namespace).stdout
    )
    result = CliRunner().invoke(GROUP, ["info", "c1", "--json", "--config", str(node.config)])
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)
    assert ours["name"].startswith(f"{namespace}/") and ours["name"].endswith("/c1")
    assert (ours["kind"], ctr["Kind"].lower()) == ("active", "active")
    assert ours["parent"].endswith("/" + ctr["Parent"])


def test_doctor_tells_1_6s_guessed_image_filesystem_and_the_symlink_fixes_it(node: Node, binaries: Binaries):
    """containerd 1.6 ignores exports.root: CRI reports a guessed path kubelet stats for image GC
    and eviction. doctor says so, and its fix (a symlink to the root) makes that path the root's."""
    cri = CriClient(node.containerd.address)
    try:
        [mountpoint] = cri.image_fs_mountpoints()
    finally:
        cri.close()
    checks = node.doctor(0)
    root = node.daemon.root
    if binaries.version >= (1, 7):
        assert mountpoint == str(root) and checks["image filesystem"]["status"] == "PASS"
        return
    guessed = Path(mountpoint)
    assert checks["image filesystem"]["status"] == "WARN"
    assert (
        f"tells kubelet the image filesystem is {guessed}, which does not exist" in checks["image filesystem"]["detail"]
    )
    fix = checks["image filesystem"]["hint"].splitlines()[-1]
    assert fix == f"ln -sfn {root} {guessed}"
    subprocess.run(["sh", "-c", fix], check=True)
    try:
        assert node.doctor(0)["image filesystem"]["status"] == "PASS"
        assert os.statvfs(guessed).f_fsid == os.statvfs(root).f_fsid  # what kubelet stats is the root's filesystem
    finally:
        guessed.unlink()
