"""Pods choose extra lowers with an annotation, through an unmodified containerd 1.6 CRI: the daemon
finds the pod through containerd's Containers API at container start."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from addlower.cli import admin
from addlower.core.config import PLUGIN_NAME
from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.core.labels import POD_LABEL
from addlower.core.pods import SCOPE_ANNOTATION
from addlower.dev import ociimage
from addlower.dev.devcontainerd import Binaries
from addlower.dev.ociimage import OciImage
from tests.support.cri.client import CriClient

from .conftest import CRI_NAMESPACE, CriOptions, Target, running_cri_target

pytestmark = pytest.mark.e2e

ANNOTATION = "addlower.io/lowers"
CAT = ["sh", "-c", "cat /which 2>/dev/null || echo nothing"]


@pytest.fixture(scope="module")
def cri_target(
    tmp_path_factory: pytest.TempPathFactory, pause_image: OciImage, busybox_image: OciImage, binaries: Binaries
) -> Iterator[Target]:
    """This module's CRI node (conftest's `cri` client talks to it): our snapshotter with Kubernetes
    enabled, two named lowers and one allowed root for pods."""
    work = tmp_path_factory.mktemp("k8s")
    for name in ("maven", "npm", "allowed/team", "teamb", "team-a/cache", "secret"):
        (work / name).mkdir(parents=True)
        (work / name / "which").write_text(f"{name}\n")
    (work / "allowed" / "link").symlink_to(work / "secret")
    config = work / "config.toml"
    config.write_text(
        f'[lowers.named]\nmaven = "{work / "maven"}"\nnpm = "{work / "npm"}"\n'
        f'teamb = {{ path = "{work / "teamb"}", namespaces = ["team-b"] }}\n'
        f'm2 = {{ path = "{work / "maven"}", target = "/root/.m2" }}\n'
        'ci-m2 = { cache = true, target = "/root/.m2", promote = "on-success", promote_namespaces = ["ci"] }\n'
        'scoped-m2 = { cache = true, target = "/root/.m2", promote = "on-success", promote_namespaces = ["ci-main"],'
        ' scopes = { "ci-pr" = "pr-*", "ci-main" = "*" } }\n'
        'brief-m2 = { cache = true, target = "/root/.m2", promote = "always", scopes = { "ci-pr" = "pr-*" },'
        " scope_ttl = 1 }\n"
        f'[kubernetes]\nenabled = true\ncontainerd_address = "{work / "containerd" / "containerd.sock"}"\n'
        f'allowed_roots = ["{work / "allowed"}"]\n'
        f'[kubernetes.namespaces.team-a]\nallowed_roots = ["{work / "team-a"}"]\n'
    )
    with running_cri_target(work, binaries, CriOptions(builtin=False, daemon_args=["--config", str(config)])) as t:
        t.import_image(pause_image, CRI_NAMESPACE)
        t.import_image(busybox_image, CRI_NAMESPACE)
        yield t


def start(cri: CriClient, pod, name: str, image: OciImage, annotations: dict[str, str] | None = None) -> str:
    cid = cri.create_container(pod.id, pod.config, name, image.ref, ["sleep", "3600"], annotations)
    cri.start(cid)
    return cid


def work_dir(t: Target) -> Path:
    return Path(t.containerd.workdir).parent


def labels(t: Target, cid: str) -> dict[str, str]:
    return json.loads(t.snapshots_ctr("info", cid, namespace=CRI_NAMESPACE).stdout).get("Labels") or {}


def refused_start(cri: CriClient, pod, image: OciImage, annotations: dict[str, str] | None = None) -> str:
    """Create the container `app` in `pod` and start it; the start must fail. Its error text."""
    cid = cri.create_container(pod.id, pod.config, "app", image.ref, ["sleep", "3600"], annotations)
    with pytest.raises(grpc.RpcError) as err:
        cri.start(cid)
    assert cri.container_state(cid) != "CONTAINER_RUNNING"
    return err.value.details() or ""


def test_annotated_pod_sees_the_host_dir_copy_on_write(cri_target: Target, cri: CriClient, busybox_image: OciImage):
    host = Path(cri_target.containerd.workdir).parent / "maven"
    with cri.pod("build", annotations={ANNOTATION: "maven"}) as pod:
        app = start(cri, pod, "app", busybox_image)
        assert cri.exec_sync(app, CAT) == (0, "maven\n", "")
        assert cri.exec_sync(app, ["sh", "-c", "echo mine > /which; echo new > /added"])[0] == 0
        assert cri.exec_sync(app, ["cat", "/which", "/added"]) == (0, "mine\nnew\n", "")
        assert (host / "which").read_text() == "maven\n" and not (host / "added").exists()
        info = json.loads(cri_target.snapshots_ctr("info", app, namespace=CRI_NAMESPACE).stdout)
        assert info["Labels"][LOWERS] == "maven"  # what the container got, recorded


def test_the_pod_is_found_where_this_containerd_keeps_it(
    cri_target: Target, cri: CriClient, busybox_image: OciImage, binaries: Binaries
):
    """2.x keeps every pod in its sandbox store (pause container or not); 1.x only as the pause
    container's record."""
    with cri.pod("where", annotations={ANNOTATION: "maven"}) as pod:
        app = start(cri, pod, "app", busybox_image)
        assert cri.exec_sync(app, CAT) == (0, "maven\n", "")
    where = "found in containerd's sandbox store" if binaries.version >= (2, 0) else "looked up as a container"
    assert cri_target.daemon is not None
    assert f"pod sandbox {pod.id}: {where}" in cri_target.daemon.log()


def test_an_image_volume_gets_the_images_files_and_the_container_its_lowers(
    cri_target: Target, cri: CriClient, tmp_path: Path
):
    """CRI copies an image's VOLUME contents through a Mounts call made before the container
    record exists: that call carries no host dir, so the volume holds the image's files only."""
    maven = work_dir(cri_target) / "maven"
    (maven / "data").mkdir(exist_ok=True)
    (maven / "data" / "from-host").write_text("host\n")
    image = ociimage.build_busybox_image(
        tmp_path / "vol.tar",
        ref="localhost/addlower/volume:latest",
        extra_layers=[[ociimage.directory("data"), ociimage.file("data/from-image", "image\n")]],
        volumes=["/data"],
    )
    cri_target.import_image(image, CRI_NAMESPACE)
    with cri.pod("volumes", annotations={ANNOTATION: "maven"}) as pod:
        app = start(cri, pod, "app", image)
        assert cri.exec_sync(app, CAT) == (0, "maven\n", "")
        assert cri.exec_sync(app, ["ls", "/data"]) == (0, "from-image\n", "")


def test_a_pod_gets_a_named_lower_at_its_target(
    cri_target: Target, cri: CriClient, busybox_image: OciImage, binaries: Binaries
):
    with cri.pod("target", annotations={ANNOTATION: "m2"}) as pod:
        if binaries.version < (1, 7):
            says = refused_start(cri, pod, busybox_image)
            assert "a target needs containerd >= 1.7" in says
            return
        app = start(cri, pod, "app", busybox_image)
        assert cri.exec_sync(app, ["cat", "/root/.m2/which"]) == (0, "maven\n", "")
        assert cri.exec_sync(app, CAT) == (0, "nothing\n", "")  # not at /
        assert cri.exec_sync(app, ["stat", "-c", "%a", "/root"]) == (0, "700\n", "")


def test_pod_without_the_annotation_is_untouched(cri_target: Target, cri: CriClient, busybox_image: OciImage):
    with cri.pod("plain") as pod:
        app = start(cri, pod, "app", busybox_image)
        assert cri.exec_sync(app, CAT) == (0, "nothing\n", "")
        info = json.loads(cri_target.snapshots_ctr("info", app, namespace=CRI_NAMESPACE).stdout)
        assert LOWERS not in (info.get("Labels") or {})


def test_path_under_the_pods_allowed_root_works(cri_target: Target, cri: CriClient, busybox_image: OciImage):
    team = Path(cri_target.containerd.workdir).parent / "allowed" / "team"
    with cri.pod("team", annotations={ANNOTATION: str(team)}) as pod:
        app = start(cri, pod, "app", busybox_image)
        assert cri.exec_sync(app, CAT) == (0, "allowed/team\n", "")


def test_per_container_key_wins_over_the_pod_wide_one(cri_target: Target, cri: CriClient, busybox_image: OciImage):
    annotations = {ANNOTATION: "npm", f"{ANNOTATION}.build": "maven"}
    with cri.pod("mixed", annotations=annotations) as pod:
        build = start(cri, pod, "build", busybox_image)
        other = start(cri, pod, "other", busybox_image)
        assert cri.exec_sync(build, CAT) == (0, "maven\n", "")
        assert cri.exec_sync(other, CAT) == (0, "npm\n", "")


@pytest.mark.parametrize(
    "value, says",
    [
        ("/etc", "outside the allowed roots"),
        ("gradle", "'gradle' is not a named lower"),
        ("maven@/a/b:npm@/a", "at '/a/b' lies inside entry named lower 'npm'"),
    ],
)
def test_disallowed_request_fails_the_start_with_the_policy_error(
    cri_target: Target, cri: CriClient, busybox_image: OciImage, value: str, says: str
):
    with cri.pod("evil", annotations={f"{ANNOTATION}.app": value}) as pod:
        cid = cri.create_container(pod.id, pod.config, "app", busybox_image.ref, ["sleep", "3600"])
        with pytest.raises(grpc.RpcError) as err:
            cri.start(cid)
        details = err.value.details() or ""
        assert f"pod annotation {ANNOTATION}.app" in details and says in details
        assert cri.container_state(cid) != "CONTAINER_RUNNING"
        info = json.loads(cri_target.snapshots_ctr("info", cid, namespace=CRI_NAMESPACE).stdout)
        assert LOWERS not in (info.get("Labels") or {})


def test_a_symlink_under_the_pods_root_is_refused_wherever_it_points(
    cri_target: Target, cri: CriClient, busybox_image: OciImage
):
    link = work_dir(cri_target) / "allowed" / "link"
    with cri.pod("sneaky", namespace="team-a", annotations={ANNOTATION: str(link)}) as pod:
        says = refused_start(cri, pod, busybox_image)
        assert "namespace 'team-a' pod 'sneaky' container 'app'" in says
        assert f"pod annotation {ANNOTATION}" in says and f"{link} is a symlink or not a directory" in says


@pytest.mark.parametrize(
    "namespace, value, outcome",
    [
        ("team-b", "teamb", "teamb"),
        ("team-a", "teamb", "named lower 'teamb' is not available to namespace 'team-a'"),
        ("team-a", "{work}/team-a/cache", "team-a/cache"),
        ("team-b", "{work}/team-a/cache", "outside the allowed roots"),
    ],
)
def test_named_lowers_and_roots_of_one_namespace_are_that_namespaces_own(
    cri_target: Target, cri: CriClient, busybox_image: OciImage, namespace: str, value: str, outcome: str
):
    value = value.format(work=work_dir(cri_target))
    with cri.pod("ns-pod", namespace=namespace, annotations={ANNOTATION: value}) as pod:
        if "/" in outcome or outcome == "teamb":  # allowed: the container sees the dir
            app = start(cri, pod, "app", busybox_image)
            assert cri.exec_sync(app, CAT) == (0, f"{outcome}\n", "")
            assert labels(cri_target, app)[POD_LABEL] == f"{namespace}/ns-pod"
        else:
            says = refused_start(cri, pod, busybox_image)
            assert f"namespace {namespace!r} pod 'ns-pod'" in says and outcome in says


def test_a_direct_cri_clients_label_is_held_to_the_pods_policy(
    cri_target: Target, cri: CriClient, busybox_image: OciImage, binaries: Binaries
):
    work = work_dir(cri_target)
    with cri.pod("direct", namespace="team-b") as pod:
        # Allowed to label users (the default roots), to no pod: refused as the container is created.
        demo = {LOWERS: "/tmp/overlayfs-custom-lower/direct"}
        if binaries.version < (1, 7):  # 1.6's CRI turns containerd.io/snapshot/* annotations into labels
            with pytest.raises(grpc.RpcError) as err:
                cri.create_container(pod.id, pod.config, "a", busybox_image.ref, ["true"], demo)
            assert "outside the allowed roots" in (err.value.details() or "")
            assert not Path("/tmp/overlayfs-custom-lower/direct").exists()
            # Another namespace's root: refused at the start, once the pod is known.
            says = refused_start(cri, pod, busybox_image, {LOWERS: str(work / "team-a" / "cache")})
            assert "namespace 'team-b' pod 'direct'" in says and "outside the allowed roots" in says
            # The pods' own root: the container gets it, and the snapshot records whose policy held.
            app = start(cri, pod, "ok", busybox_image, {LOWERS: str(work / "allowed" / "team")})
            assert cri.exec_sync(app, CAT) == (0, "allowed/team\n", "")
            assert labels(cri_target, app)[POD_LABEL] == "team-b/direct"
        else:  # newer CRI drops such annotations: the container gets nothing
            app = start(cri, pod, "ok", busybox_image, {LOWERS: str(work / "team-a" / "cache")})
            assert cri.exec_sync(app, CAT) == (0, "nothing\n", "")


@pytest.fixture
def runtime_class_node(
    tmp_path_factory: pytest.TempPathFactory, pause_image: OciImage, busybox_image: OciImage, binaries: Binaries
) -> Iterator[Target]:
    """A node whose default stays the built-in overlayfs, with a runtime handler `addlower` (a
    RuntimeClass's handler) whose pods run on our snapshotter, pods' lowers on."""
    work = tmp_path_factory.mktemp("rtc")
    (work / "m2").mkdir()
    (work / "m2" / "which").write_text("m2\n")
    config = work / "config.toml"
    config.write_text(
        f'[lowers.named]\nmaven = "{work / "m2"}"\n[kubernetes]\nenabled = true\n'
        f'containerd_address = "{work / "containerd" / "containerd.sock"}"\n'
    )
    options = CriOptions(
        builtin=True, daemon_args=["--config", str(config)], runtime_snapshotters={RUNTIME_HANDLER: PLUGIN_NAME}
    )
    with running_cri_target(work, binaries, options) as t:
        for image in (pause_image, busybox_image):
            t.import_image(image, CRI_NAMESPACE)  # into the node's default, overlayfs
        yield t


RUNTIME_HANDLER = "addlower"


def test_only_pods_of_the_runtime_class_use_the_snapshotter(
    runtime_class_node: Target, busybox_image: OciImage, tmp_path: Path, binaries: Binaries
):
    """containerd 1.7+ honours a runtime handler's snapshotter; 1.6 ignores it (all on the default)."""
    t = runtime_class_node
    scoped = binaries.version >= (1, 7)
    cri = CriClient(t.containerd.address, log_root=tmp_path / "logs")

    def ours() -> set[str]:
        return set(t.ctr("snapshots", "--snapshotter", PLUGIN_NAME, "ls", namespace=CRI_NAMESPACE).stdout.split())

    try:
        with cri.pod("plain") as pod:
            plain = start(cri, pod, "app", busybox_image)
            assert cri.exec_sync(plain, CAT) == (0, "nothing\n", "")
            assert plain not in ours()
        with cri.pod("cached", annotations={ANNOTATION: "maven"}, runtime_handler=RUNTIME_HANDLER) as pod:
            cached = start(cri, pod, "app", busybox_image)
            assert cri.exec_sync(cached, CAT) == (0, "m2\n" if scoped else "nothing\n", "")
            assert (cached in ours()) == scoped
    finally:
        cri.close()


def run_job(
    cri: CriClient,
    t: Target,
    namespace: str,
    name: str,
    image: OciImage,
    script: str,
    annotations: dict[str, str] | None = None,
) -> str:
    """A CI job as a pod with the cache `ci-m2` (or `annotations`): its container runs `script` to
    its end and is removed; returns what the daemon said of its writes to the cache once it said
    it (containerd removes the snapshot in its own time)."""
    with cri.pod(name, namespace=namespace, annotations=annotations or {ANNOTATION: "ci-m2"}) as pod:
        cid = cri.create_container(pod.id, pod.config, "job", image.ref, ["sh", "-c", script])
        cri.start(cid)
        deadline = time.monotonic() + 60
        while cri.container_state(cid) != "CONTAINER_EXITED":
            assert time.monotonic() < deadline, f"job {name} never ended"
            time.sleep(0.1)
        cri.remove(cid)
    assert t.daemon is not None
    said = re.compile(rf'msg="((?:promoted|not promoting)[^"]*)".*key={CRI_NAMESPACE}/\d+/{cid}\b')
    deadline = time.monotonic() + 60
    while not (found := said.search(t.daemon.log())):
        assert time.monotonic() < deadline, f"the daemon never said what became of job {name}'s writes"
        time.sleep(0.1)
    return found[1]


def test_a_cache_grows_from_trusted_namespaces_jobs_only(
    cri_target: Target, cri: CriClient, busybox_image: OciImage, binaries: Binaries
):
    if binaries.version < (1, 7):
        with cri.pod("cache-16", namespace="ci", annotations={ANNOTATION: "ci-m2"}) as pod:
            assert "a target needs containerd >= 1.7" in refused_start(cri, pod, busybox_image)
        return
    said = run_job(cri, cri_target, "ci", "build-1", busybox_image, "echo built > /root/.m2/built.jar")
    assert said == "promoted a job's writes"
    assert cri_target.daemon is not None
    config = ["--root-dir", str(cri_target.daemon.root), "--config", str(work_dir(cri_target) / "config.toml")]
    [generation] = json.loads(CliRunner().invoke(admin, ["cache", "log", "ci-m2", "--json", *config]).output)
    assert (generation["pod"], generation["added"], generation["state"]) == ("ci/build-1", 1, "chain")
    said = run_job(
        cri, cri_target, "pr", "pr-1", busybox_image, "cat /root/.m2/built.jar; echo evil > /root/.m2/evil.jar"
    )
    assert said == "not promoting a job's writes: its namespace may not promote to this cache"
    said = run_job(cri, cri_target, "ci", "build-2", busybox_image, "ls /root/.m2; echo x > /root/.m2/x; exit 3")
    assert said.startswith("not promoting")  # a failed job
    with cri.pod("check", namespace="ci", annotations={ANNOTATION: "ci-m2"}) as pod:
        app = start(cri, pod, "app", busybox_image)
        assert cri.exec_sync(app, ["ls", "/root/.m2"]) == (0, "built.jar\n", "")


def scoped(scope: str | None = None) -> dict[str, str]:
    return {ANNOTATION: "scoped-m2", **({SCOPE_ANNOTATION: scope} if scope else {})}


def test_a_pr_scope_sees_mains_cache_and_keeps_its_writes_to_itself(
    cri_target: Target, cri: CriClient, busybox_image: OciImage, binaries: Binaries
):
    if binaries.version < (1, 7):  # no mount targets: a cache is refused, scope or not
        with cri.pod("scoped-16", namespace="ci-pr", annotations=scoped("pr-1")) as pod:
            assert "a target needs containerd >= 1.7" in refused_start(cri, pod, busybox_image)
        return
    said = run_job(cri, cri_target, "ci-main", "main-1", busybox_image, "echo main > /root/.m2/main.jar", scoped())
    assert said == "promoted a job's writes"
    said = run_job(cri, cri_target, "ci-pr", "pr-1", busybox_image, "echo one > /root/.m2/pr1.jar", scoped("pr-1"))
    assert said == "promoted a job's writes"  # into its scope: ci-pr may not promote to the default chain
    for namespace, scope, sees in (
        ("ci-pr", "pr-1", "main.jar\npr1.jar\n"),
        ("ci-pr", "pr-2", "main.jar\n"),  # another PR never sees pr-1's writes
        ("ci-main", None, "main.jar\n"),  # nor does main
    ):
        with cri.pod(f"check-{scope or 'main'}", namespace=namespace, annotations=scoped(scope)) as pod:
            app = start(cri, pod, "app", busybox_image)
            assert cri.exec_sync(app, ["ls", "/root/.m2"]) == (0, sees, ""), (namespace, scope)
    with cri.pod("sneaky", namespace="ci-pr", annotations=scoped("main")) as pod:
        assert "scope 'main' is not one namespace 'ci-pr' may use ('pr-*')" in refused_start(cri, pod, busybox_image)
    with cri.pod("outsider", namespace="other", annotations=scoped("pr-1")) as pod:
        assert "pods of namespace 'other' may not use scopes" in refused_start(cri, pod, busybox_image)


def test_an_expired_scopes_generations_go_once_unused(
    cri_target: Target, cri: CriClient, busybox_image: OciImage, binaries: Binaries
):
    """scope_ttl 1 s: once no container got the scope for that long, the next Cleanup (which
    containerd calls after its garbage collection) drops it and deletes its generations."""
    brief = {ANNOTATION: "brief-m2", SCOPE_ANNOTATION: "pr-9"}
    if binaries.version < (1, 7):  # no mount targets: refused
        with cri.pod("brief-16", namespace="ci-pr", annotations=brief) as pod:
            assert "a target needs containerd >= 1.7" in refused_start(cri, pod, busybox_image)
        return
    said = run_job(cri, cri_target, "ci-pr", "brief-1", busybox_image, "echo x > /root/.m2/x.jar", brief)
    assert said == "promoted a job's writes"
    assert cri_target.daemon is not None
    generations = cri_target.daemon.root / "caches" / "brief-m2"
    assert os.listdir(generations) == ["1"]
    time.sleep(1.5)
    with cri.pod("after", namespace="ci") as pod:  # a container's removal makes containerd collect
        cid = cri.create_container(pod.id, pod.config, "app", busybox_image.ref, ["true"])
        cri.start(cid)
        deadline = time.monotonic() + 60
        while cri.container_state(cid) != "CONTAINER_EXITED":
            assert time.monotonic() < deadline, "the container never ended"
            time.sleep(0.1)
        cri.remove(cid)
    deadline = time.monotonic() + 60
    while "a cache's scope expired" not in cri_target.daemon.log():
        assert time.monotonic() < deadline, "the scope never expired"
        time.sleep(0.1)
    assert os.listdir(generations) == []
