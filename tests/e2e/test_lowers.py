"""The original's verification of extra lower dirs, step by step, through a real containerd and
`ctr`, plus what the original did not do: sharing, named lowers, refused labels."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from addlower.core.config import PLUGIN_NAME
from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.core.lowers import DEFAULT_ALLOWED_ROOTS
from addlower.dev.devcontainerd import Binaries, CtrError, PrivateContainerd
from addlower.dev.ociimage import OciImage
from tests.support.daemon import Daemon

from .conftest import Target, make_target, running_target

pytestmark = pytest.mark.e2e


@pytest.fixture
def ours(daemon: Daemon, containerd: PrivateContainerd, busybox_image: OciImage, namespace: str) -> Target:
    """Our snapshotter as the namespace's default, the image imported into it (the original's setup)."""
    t = make_target(containerd, daemon)
    t.ctr("namespaces", "create", namespace, namespace="default")
    t.ctr("namespaces", "label", namespace, f"containerd.io/defaults/snapshotter={PLUGIN_NAME}", namespace="default")
    t.containerd.import_image(busybox_image.path, namespace)  # into the namespace's default snapshotter
    return t


def start(t: Target, image: OciImage, cid: str, namespace: str, lowers: str) -> None:
    """`ctr run -d --snapshotter-label <lowers label>=<lowers>` of a container that idles."""
    t.containerd.run(
        image.ref,
        cid,
        "sleep",
        "3600",
        rm=False,
        namespace=namespace,
        options=["-d", "--snapshotter-label", f"{LOWERS}={lowers}"],
    )


def sh(t: Target, cid: str, script: str, namespace: str) -> str:
    """Run a shell script inside the running container, as `ctr tasks exec`."""
    return t.ctr(
        "tasks", "exec", "--exec-id", f"e{uuid.uuid4().hex[:8]}", cid, "sh", "-c", script, namespace=namespace
    ).stdout


def stop(t: Target, cid: str, namespace: str) -> None:
    t.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=namespace)
    t.ctr("tasks", "delete", "-f", cid, namespace=namespace)
    t.ctr("containers", "rm", cid, namespace=namespace)


@pytest.fixture
def demo_lower(namespace: str) -> Iterator[Path]:
    """A dir of the test's own under the original's demo dir, which the default policy allows."""
    lower = Path(DEFAULT_ALLOWED_ROOTS[1]) / namespace
    yield lower
    shutil.rmtree(lower, ignore_errors=True)


def test_the_originals_demo(ours: Target, busybox_image: OciImage, namespace: str, demo_lower: Path) -> None:
    lower = demo_lower
    top = busybox_image.chain_ids[-1]
    assert ours.snapshots(namespace)[top].kind == "Committed"  # the default snapshotter took the image

    start(ours, busybox_image, "nginx-with-custom-lower", namespace, str(lower))
    try:
        info = json.loads(ours.snapshots_ctr("info", "nginx-with-custom-lower", namespace=namespace).stdout)
        assert info["Labels"][LOWERS] == str(lower)
        assert lower.is_dir()  # created for the container
        assert set(sh(ours, "nginx-with-custom-lower", "ls /", namespace).split()) >= {"bin", "etc", "proc", "tmp"}

        (lower / "test_dir").mkdir()
        assert "test_dir" in sh(ours, "nginx-with-custom-lower", "ls /", namespace).split()
        sh(ours, "nginx-with-custom-lower", "touch /test_dir/incontainer", namespace)
        assert list((lower / "test_dir").iterdir()) == []  # the host never sees the container's file
        (lower / "test_dir" / "after-outcontainer").touch()
        seen = sh(ours, "nginx-with-custom-lower", "ls /test_dir", namespace).split()
        assert sorted(seen) == ["after-outcontainer", "incontainer"]
    finally:
        stop(ours, "nginx-with-custom-lower", namespace)


def test_two_containers_sharing_a_lower_do_not_see_each_others_changes(
    ours: Target, busybox_image: OciImage, namespace: str, host_dir: Path
) -> None:
    cache = host_dir
    cache.mkdir()
    (cache / "dep.jar").write_text("v1\n")
    for cid in ("ci-a", "ci-b"):
        start(ours, busybox_image, cid, namespace, str(cache))
    try:
        sh(ours, "ci-a", "echo patched-by-a > /dep.jar; echo a > /only-a", namespace)
        assert sh(ours, "ci-a", "cat /dep.jar /only-a", namespace) == "patched-by-a\na\n"
        assert sh(ours, "ci-b", "cat /dep.jar; ls /only-a 2>/dev/null || echo none", namespace) == "v1\nnone\n"
        assert (cache / "dep.jar").read_text() == "v1\n" and not (cache / "only-a").exists()
    finally:
        for cid in ("ci-a", "ci-b"):
            stop(ours, cid, namespace)


@pytest.mark.parametrize(
    "value, says",
    [
        ("{host}/x,upperdir=/etc", "character ','"),
        ("/etc", "outside the allowed roots"),
        ("{host}/link/x", "is a symlink or not a directory"),
    ],
    ids=["comma", "etc", "symlink"],
)
def test_bad_label_fails_the_container_and_leaves_nothing(
    ours: Target, busybox_image: OciImage, namespace: str, host_dir: Path, value: str, says: str
) -> None:
    host_dir.mkdir()
    (host_dir / "link").symlink_to("/etc")
    with pytest.raises(CtrError) as err:
        start(ours, busybox_image, "evil", namespace, value.format(host=host_dir))
    assert LOWERS in err.value.stderr and says in err.value.stderr
    assert "evil" not in ours.snapshots(namespace)
    assert "evil" not in ours.ctr("containers", "ls", "-q", namespace=namespace).stdout.split()
    # Our refusal comes before any dir is made: no snapshot dir of "evil", none in the host dir.
    assert not [i for i in ours_infos(ours, namespace) if i["name"].endswith("/evil")]
    assert sorted(os.listdir(host_dir)) == ["link"]


def ours_infos(t: Target, namespace: str) -> list[dict]:
    """What our daemon itself holds (not containerd's view): every snapshot's Info, as JSON."""
    assert t.daemon is not None
    out = subprocess.run(
        ["addlower", "ls", "--root-dir", str(t.daemon.root), "--json"], check=True, capture_output=True, text=True
    ).stdout
    return [i for i in json.loads(out) if i["name"].startswith(f"{namespace}/")]


def test_with_no_configuration_only_the_default_roots_are_allowed(
    tmp_path_factory: pytest.TempPathFactory, busybox_image: OciImage, binaries: Binaries
) -> None:
    """An empty config file is the defaults, as no file at all."""
    work = tmp_path_factory.mktemp("defaults")
    (work / "empty.toml").write_text("")
    with running_target(work, binaries, builtin=False, daemon_args=["--config", str(work / "empty.toml")]) as t:
        t.import_image(busybox_image, "ci")
        for path in ("/etc", "/var/lib/kubelet/pods/evil"):
            with pytest.raises(CtrError) as err:
                t.containerd.run(
                    busybox_image.ref,
                    "read-host",
                    "cat",
                    "/shadow",
                    namespace="ci",
                    snapshotter=PLUGIN_NAME,
                    options=["--snapshotter-label", f"{LOWERS}={path}"],
                )
            assert "outside the allowed roots" in err.value.stderr and "lowers.allowed_roots" in err.value.stderr
        assert not Path("/var/lib/kubelet/pods/evil").exists()


def test_named_lower(tmp_path_factory: pytest.TempPathFactory, busybox_image: OciImage, binaries: Binaries) -> None:
    work = tmp_path_factory.mktemp("named")
    m2 = work / "m2"
    m2.mkdir()
    (m2 / "settings.xml").write_text("<settings/>\n")
    config = work / "config.toml"
    gradle, npm = work / "gradle", work / "npm"  # neither there yet
    config.write_text(
        f'[lowers]\nallowed_roots = []\n[lowers.named]\nmaven = "{m2}"\ngradle = "{gradle}"\n'
        f'npm = {{ path = "{npm}", create = true }}\n'
    )
    with running_target(work, binaries, builtin=False, daemon_args=["--config", str(config)]) as t:
        t.import_image(busybox_image, "ci")
        out = t.containerd.run(
            busybox_image.ref,
            "build",
            "sh",
            "-c",
            "cat /settings.xml",
            namespace="ci",
            snapshotter=PLUGIN_NAME,
            options=["--snapshotter-label", f"{LOWERS}=maven"],
        )
        assert out.stdout == "<settings/>\n"
        with pytest.raises(CtrError) as err:  # a path is refused: no allowed roots on this node
            t.containerd.run(
                busybox_image.ref,
                "build2",
                "true",
                namespace="ci",
                snapshotter=PLUGIN_NAME,
                options=["--snapshotter-label", f"{LOWERS}={m2}"],
            )
        assert "outside the allowed roots" in err.value.stderr
        with pytest.raises(CtrError) as err:  # a missing cache is no empty dir
            t.containerd.run(
                busybox_image.ref,
                "build3",
                "true",
                namespace="ci",
                snapshotter=PLUGIN_NAME,
                options=["--snapshotter-label", f"{LOWERS}=gradle"],
            )
        assert f"named lower 'gradle' ({gradle}): {gradle} does not exist; create = true" in err.value.stderr
        assert not gradle.exists()
        t.containerd.run(
            busybox_image.ref,
            "build4",
            "ls",
            "/",
            namespace="ci",
            snapshotter=PLUGIN_NAME,
            options=["--snapshotter-label", f"{LOWERS}=npm"],
        )
        assert npm.is_dir()
        assert re.search(
            rf"named lower 'npm' \({npm}\) did not exist: made it, empty, for snapshot ci/\d+/build4",
            t.logs()["daemon log"],
        )
