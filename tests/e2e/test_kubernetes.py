"""Pods choose extra lowers with an annotation, through an unmodified containerd 1.6 CRI: the daemon
finds the pod through containerd's Containers API at container start (SPEC section 5)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from addlower.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.ociimage import OciImage
from tests.support.cri.client import CriClient

from .conftest import CRI_NAMESPACE, CriOptions, Target, running_cri_target

pytestmark = pytest.mark.e2e

ANNOTATION = "addlower.io/lowers"
CAT = ["sh", "-c", "cat /which 2>/dev/null || echo nothing"]


@pytest.fixture(scope="module")
def cri_target(tmp_path_factory: pytest.TempPathFactory, pause_image: OciImage, busybox_image: OciImage) -> Iterator[Target]:
    """This module's CRI node (conftest's `cri` client talks to it): our snapshotter with Kubernetes
    enabled, two named lowers and one allowed root for pods."""
    work = tmp_path_factory.mktemp("k8s")
    for name in ("maven", "npm", "allowed/team"):
        (work / name).mkdir(parents=True)
        (work / name / "which").write_text(f"{name}\n")
    config = work / "config.toml"
    config.write_text(
        f'[lowers.named]\nmaven = "{work / "maven"}"\nnpm = "{work / "npm"}"\n'
        f'[kubernetes]\nenabled = true\ncontainerd_address = "{work / "containerd" / "containerd.sock"}"\n'
        f'allowed_roots = ["{work / "allowed"}"]\n'
    )
    with running_cri_target(work, CriOptions(builtin=False, daemon_args=["--config", str(config)])) as t:
        t.import_image(pause_image, CRI_NAMESPACE)
        t.import_image(busybox_image, CRI_NAMESPACE)
        yield t


def start(cri: CriClient, pod, name: str, image: OciImage) -> str:
    cid = cri.create_container(pod.id, pod.config, name, image.ref, ["sleep", "3600"])
    cri.start(cid)
    return cid


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


@pytest.mark.parametrize("value, says", [("/etc", "outside the allowed roots"),
                                         ("gradle", "'gradle' is not a named lower")])
def test_disallowed_request_fails_the_start_with_the_policy_error(
        cri_target: Target, cri: CriClient, busybox_image: OciImage, value: str, says: str):
    with cri.pod("evil", annotations={f"{ANNOTATION}.app": value}) as pod:
        cid = cri.create_container(pod.id, pod.config, "app", busybox_image.ref, ["sleep", "3600"])
        with pytest.raises(grpc.RpcError) as err:
            cri.start(cid)
        assert f"pod annotation {ANNOTATION}.app" in err.value.details() and says in err.value.details()
        assert cri.container_state(cid) != "CONTAINER_RUNNING"
        info = json.loads(cri_target.snapshots_ctr("info", cid, namespace=CRI_NAMESPACE).stdout)
        assert LOWERS not in (info.get("Labels") or {})
