"""Finding a pod's extra lowers from containerd's records (shapes as containerd 1.6-2.x write them)."""

from __future__ import annotations

import json

import pytest

from addlower.errors import InvalidArgument
from addlower.kubernetes import (
    AppContainer,
    app_container,
    container_id,
    label_value,
    pod_annotations,
    requested_lowers,
)
from addlower.lowers import LowerPolicy

SPEC = json.dumps({"annotations": {"io.kubernetes.cri.container-type": "container",
                                   "io.kubernetes.cri.sandbox-id": "sb1",
                                   "io.kubernetes.cri.container-name": "build"}}).encode()
CONTAINER_META = json.dumps({"Version": "v1", "Metadata": {"ID": "c1", "SandboxID": "sb2",
                                                           "Config": {"metadata": {"name": "test"}}}}).encode()
SANDBOX_META = json.dumps({"Version": "v1", "Metadata": {"ID": "sb1", "Config": {
    "metadata": {"name": "pod"}, "annotations": {"addlower.io/lowers": "maven"}}}}).encode()


def test_container_id_is_the_last_key_segment_in_the_namespace():
    assert container_id("k8s.io/6/abc123", "k8s.io") == "abc123"
    assert container_id("default/6/abc123", "k8s.io") is None
    assert container_id("k8s.io/extract-1", "k8s.io") is None


def test_app_container_from_spec_annotations():
    c = app_container({"io.cri-containerd.kind": "container"}, SPEC, {})
    assert c == AppContainer("build", "sb1", json.loads(SPEC)["annotations"])


def test_app_container_from_cri_metadata_when_the_spec_says_nothing():
    c = app_container({"io.cri-containerd.kind": "container"}, b"{}", {"io.cri-containerd.container.metadata": CONTAINER_META})
    assert (c.name, c.sandbox_id) == ("test", "sb2")


def test_sandboxes_and_foreign_records_are_not_app_containers():
    assert app_container({"io.cri-containerd.kind": "sandbox"}, b"{}", {}) is None
    assert app_container({}, b"{}", {}) is None
    assert app_container({"io.cri-containerd.kind": "container"}, b"not json", {}) is None  # no sandbox id


def test_pod_annotations_from_sandbox_metadata():
    assert pod_annotations({"io.cri-containerd.sandbox.metadata": SANDBOX_META}) == {"addlower.io/lowers": "maven"}
    assert pod_annotations({}) == {}


def test_per_container_annotation_wins_over_the_pod_wide_one():
    c = AppContainer("build", "sb1", {})
    pod = {"addlower.io/lowers": "npm", "addlower.io/lowers.build": "maven", "addlower.io/lowers.other": "pip"}
    assert requested_lowers(c, pod, "addlower.io/lowers") == ("addlower.io/lowers.build", "maven")
    assert requested_lowers(AppContainer("x", "sb1", {}), pod, "addlower.io/lowers") == ("addlower.io/lowers", "npm")
    assert requested_lowers(c, {}, "addlower.io/lowers") is None


POLICY = LowerPolicy("/var/lib/addlower", ("/srv/ci",), {"maven": "/var/cache/m2"})


def test_label_value_keeps_names_and_allowed_paths():
    assert label_value("addlower.io/lowers", "maven::/srv/ci/npm", POLICY) == "maven:/srv/ci/npm"


@pytest.mark.parametrize("value, says", [("/etc", "outside the allowed roots"), ("gradle", "not a named lower"),
                                         ("/srv/ci/x,upperdir=/", "character ','")])
def test_refused_annotation_names_the_annotation_and_the_entry(value, says):
    with pytest.raises(InvalidArgument) as err:
        label_value("addlower.io/lowers.build", value, POLICY)
    assert "pod annotation addlower.io/lowers.build" in str(err.value) and says in str(err.value)
