"""Finding a pod's extra lowers from containerd's records (shapes as containerd 1.6-2.x write them)."""

from __future__ import annotations

import json

import pytest

from addlower.core.errors import InvalidArgument
from addlower.core.lowers import Lower, NamedLower
from addlower.core.pods import (
    AppContainer,
    KubernetesConfig,
    PodContainer,
    PodSandbox,
    app_container,
    check_for_pod,
    container_id,
    normalised_value,
    pod_sandbox,
    requested_lowers,
)

SPEC = json.dumps(
    {
        "annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "sb1",
            "io.kubernetes.cri.container-name": "build",
        }
    }
).encode()
CONTAINER_META = json.dumps(
    {"Version": "v1", "Metadata": {"ID": "c1", "SandboxID": "sb2", "Config": {"metadata": {"name": "test"}}}}
).encode()
SANDBOX_META = json.dumps(
    {
        "Version": "v1",
        "Metadata": {
            "ID": "sb1",
            "Config": {
                "metadata": {"name": "pod", "namespace": "team-a", "uid": "u1"},
                "annotations": {"addlower.io/lowers": "maven"},
            },
        },
    }
).encode()


def test_container_id_is_the_last_key_segment_in_the_namespace():
    assert container_id("k8s.io/6/abc123", "k8s.io") == "abc123"
    assert container_id("default/6/abc123", "k8s.io") is None
    assert container_id("k8s.io/extract-1", "k8s.io") is None


def test_app_container_from_spec_annotations():
    c = app_container({"io.cri-containerd.kind": "container"}, SPEC, {})
    assert c == AppContainer("build", "sb1", json.loads(SPEC)["annotations"])


def test_app_container_from_cri_metadata_when_the_spec_says_nothing():
    c = app_container(
        {"io.cri-containerd.kind": "container"}, b"{}", {"io.cri-containerd.container.metadata": CONTAINER_META}
    )
    assert c is not None
    assert (c.name, c.sandbox_id) == ("test", "sb2")


def test_sandboxes_and_foreign_records_are_not_app_containers():
    assert app_container({"io.cri-containerd.kind": "sandbox"}, b"{}", {}) is None
    assert app_container({}, b"{}", {}) is None
    assert app_container({"io.cri-containerd.kind": "container"}, b"not json", {}) is None  # no sandbox id


def test_pod_from_sandbox_metadata():
    assert pod_sandbox({"io.cri-containerd.sandbox.metadata": SANDBOX_META}) == PodSandbox(
        "team-a", "pod", {"addlower.io/lowers": "maven"}
    )


@pytest.mark.parametrize(
    "extensions",
    [
        {},
        {"io.cri-containerd.sandbox.metadata": b"[]"},
        {"io.cri-containerd.sandbox.metadata": b'{"Metadata": {"Config": {}}}'},
    ],
)
def test_a_sandbox_without_a_namespace_is_no_pod(extensions):
    assert pod_sandbox(extensions) is None


def test_per_container_annotation_wins_over_the_pod_wide_one():
    c = AppContainer("build", "sb1", {})
    pod = {"addlower.io/lowers": "npm", "addlower.io/lowers.build": "maven", "addlower.io/lowers.other": "pip"}
    assert requested_lowers(c, pod, "addlower.io/lowers") == ("addlower.io/lowers.build", "maven")
    assert requested_lowers(AppContainer("x", "sb1", {}), pod, "addlower.io/lowers") == ("addlower.io/lowers", "npm")
    assert requested_lowers(c, {}, "addlower.io/lowers") is None


ROOT = "/var/lib/addlower"
NAMED = {"maven": NamedLower("/var/cache/m2"), "teamb": NamedLower("/var/cache/teamb", ("team-b",))}
K8S = KubernetesConfig(enabled=True, allowed_roots=("/srv/ci",), namespaces={"team-a": ("/srv/team-a",)})
BUILD = PodContainer("team-a", "web-1", "build", None)


def pod_policy(namespace):
    return K8S.policy(ROOT, NAMED, namespace)


def test_values_are_recorded_without_empty_entries():
    assert normalised_value("maven::/srv/ci/npm:") == "maven:/srv/ci/npm"


def test_a_namespace_gets_the_pod_roots_its_own_roots_and_the_named_lowers_meant_for_it():
    assert check_for_pod(BUILD, "a", "maven:/srv/ci/x:/srv/team-a/y", pod_policy("team-a")) == (
        Lower("/var/cache/m2", None, name="maven"),
        Lower("/srv/ci/x", "/srv/ci"),
        Lower("/srv/team-a/y", "/srv/team-a"),
    )
    check_for_pod(BUILD, "a", "teamb", pod_policy("team-b"))


@pytest.mark.parametrize(
    "namespace, value, says",
    [
        ("team-a", "/etc", "outside the allowed roots"),
        ("team-a", "gradle", "not a named lower"),
        ("team-a", "/srv/ci/x,upperdir=/", "character ','"),
        ("team-a", "teamb", "named lower 'teamb' is not available to namespace 'team-a'"),
        ("team-b", "/srv/team-a/cache", "outside the allowed roots"),
    ],
)
def test_refusal_names_namespace_pod_container_annotation_and_entry(namespace, value, says):
    found = PodContainer(namespace, "web-1", "build", None)
    with pytest.raises(InvalidArgument) as err:
        check_for_pod(found, "pod annotation addlower.io/lowers.build", value, pod_policy(namespace))
    text = str(err.value)
    assert text.startswith(
        f"namespace {namespace!r} pod 'web-1' container 'build': pod annotation addlower.io/lowers.build"
    )
    assert says in text


def test_before_the_pod_is_known_anything_some_pod_may_use_passes():
    check_for_pod(BUILD, "a", "teamb:/srv/team-a/x:/srv/ci/y", pod_policy(None))
    with pytest.raises(InvalidArgument, match="outside the allowed roots"):
        check_for_pod(BUILD, "a", "/srv/other", pod_policy(None))
