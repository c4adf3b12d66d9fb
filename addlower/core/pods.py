"""Kubernetes pods, the pure part: what a pod's annotations ask for, read from containerd's records.

An unmodified kubelet and containerd pass no snapshot labels for pods, so the snapshotter asks
containerd itself, at the Mounts call CRI makes when it starts a container: the container record
names its pod sandbox, whose CRI metadata holds the pod's annotations. Here:
the settings, turning containerd's records into a request, and holding it to the policy of the
pod's Kubernetes namespace. addlower.engine.podlookup asks containerd. Must not do any I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from addlower.core.errors import InvalidArgument
from addlower.core.keys import split_key
from addlower.core.lowers import Lower, LowerPolicy, NamedLower, parse_lowers, with_scopes

KIND_LABEL = "io.cri-containerd.kind"  # "sandbox" or "container"
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
CONTAINER_NAME_ANNOTATION = "io.kubernetes.cri.container-name"
CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
CONTAINER_METADATA = "io.cri-containerd.container.metadata"
SANDBOX_METADATA = "io.cri-containerd.sandbox.metadata"  # on the pause container's record
STORE_METADATA = "metadata"  # the same JSON, on containerd 2.x's sandbox Store entry
CONTAINERD_ADDRESS = "/run/containerd/containerd.sock"  # containerd's own default grpc.address
SCOPE_ANNOTATION = "addlower.io/cache-scope"  # the scope of a pod's caches; .<cache> for one of them


@dataclass(frozen=True)
class KubernetesConfig:
    enabled: bool = False
    containerd_address: str = CONTAINERD_ADDRESS
    namespace: str = "k8s.io"  # containerd's CRI namespace
    annotation: str = "addlower.io/lowers"
    allowed_roots: tuple[str, ...] = ()  # absolute paths every pod may use
    # Kubernetes namespace -> further roots its pods may use.
    namespaces: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    timeout: float = 3.0  # seconds a Mounts call may wait for containerd

    def policy(self, root: str, named: Mapping[str, NamedLower], namespace: str | None) -> LowerPolicy:
        """What pods of `namespace` may use; with None, what some pod may use (a first check
        before the pod is known)."""
        extra = (
            self.namespaces.get(namespace, ())
            if namespace is not None
            else tuple(r for roots in self.namespaces.values() for r in roots)
        )
        return LowerPolicy(root, (*self.allowed_roots, *extra), named, namespace)


@dataclass(frozen=True)
class AppContainer:
    """What the snapshotter needs of a CRI app container's record."""

    name: str
    sandbox_id: str
    annotations: Mapping[str, str]  # of its OCI spec (pod annotations copied by `pod_annotations`)


@dataclass(frozen=True)
class PodSandbox:
    """A pod as its sandbox's CRI metadata describes it."""

    namespace: str
    name: str
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class PodContainer:
    """A pod's app container found at Mounts time, and the annotation that applies to it."""

    namespace: str
    pod: str
    container: str
    request: tuple[str, str] | None  # (annotation key, value)
    scopes: Mapping[str | None, str] = field(default_factory=dict)  # cache (None: every cache) -> scope

    def describe(self) -> str:
        return f"namespace {self.namespace!r} pod {self.pod!r} container {self.container!r}"


class Lookup(Enum):
    """Why a Mounts call found no pod's container behind a snapshot key."""

    NO_RECORD = "no container record (yet)"
    NOT_A_POD = "a container that is not a pod's"


def container_id(key: str, namespace: str) -> str | None:
    """The container id in a snapshot key `<namespace>/<n>/<id>`, if it is in that namespace."""
    split = split_key(key)
    return split[1] if split is not None and split[0] == namespace else None


def in_namespace(key: str, namespace: str) -> bool:
    return key.startswith(namespace + "/")


def _json(blob: bytes) -> dict[str, Any]:
    try:
        data = json.loads(blob or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> dict[str, str]:
    return {k: v for k, v in _dict(value).items() if isinstance(k, str) and isinstance(v, str)}


def app_container(
    labels: Mapping[str, str], spec: bytes, extensions: Mapping[str, bytes], sandbox: str = ""
) -> AppContainer | None:
    """The app container behind a containerd record; None for a pod sandbox or a non-CRI record."""
    annotations = _strings(_json(spec).get("annotations"))
    kind = labels.get(KIND_LABEL) or annotations.get(CONTAINER_TYPE_ANNOTATION)
    if kind != "container":
        return None
    metadata = _dict(_json(extensions.get(CONTAINER_METADATA, b"")).get("Metadata"))
    sandbox_id = annotations.get(SANDBOX_ID_ANNOTATION) or metadata.get("SandboxID") or sandbox
    name = annotations.get(CONTAINER_NAME_ANNOTATION) or _dict(_dict(metadata.get("Config")).get("metadata")).get(
        "name", ""
    )
    if not isinstance(sandbox_id, str) or not sandbox_id or not isinstance(name, str):
        return None
    return AppContainer(name=name, sandbox_id=sandbox_id, annotations=annotations)


def pod_sandbox(sandbox_extensions: Mapping[str, bytes]) -> PodSandbox | None:
    """The pod, from its sandbox's CRI metadata (the whole PodSandboxConfig); None without one."""
    config = _dict(_dict(_json(sandbox_extensions.get(SANDBOX_METADATA, b"")).get("Metadata")).get("Config"))
    meta = _dict(config.get("metadata"))
    namespace, name = meta.get("namespace"), meta.get("name")
    if not isinstance(namespace, str) or not namespace or not isinstance(name, str):
        return None
    return PodSandbox(namespace, name, _strings(config.get("annotations")))


def requested_scopes(container: AppContainer, pod: Mapping[str, str]) -> dict[str | None, str]:
    """The caches' scopes the pod's (or the container's own) annotations ask for: SCOPE_ANNOTATION
    for every cache, SCOPE_ANNOTATION.<cache> for one; the container's win over the pod's."""
    annotations = {**pod, **container.annotations}
    prefix = SCOPE_ANNOTATION + "."
    scopes: dict[str | None, str] = {k[len(prefix) :]: v for k, v in annotations.items() if k.startswith(prefix)}
    if SCOPE_ANNOTATION in annotations:
        scopes[None] = annotations[SCOPE_ANNOTATION]
    return scopes


def requested_lowers(container: AppContainer, pod: Mapping[str, str], annotation: str) -> tuple[str, str] | None:
    """(annotation key, value) that applies to the container: its own key wins over the pod's."""
    annotations = {**pod, **container.annotations}
    for key in (f"{annotation}.{container.name}", annotation):
        if key in annotations:
            return key, annotations[key]
    return None


def normalised_value(value: str) -> str:
    """A lowers value as recorded in the label: empty segments dropped."""
    return ":".join(entry for entry in value.split(":") if entry)


def check_for_pod(found: PodContainer, source: str, value: str, policy: LowerPolicy) -> tuple[Lower, ...]:
    """The entries of `value` (from `source`) that the pod's policy allows, with the scopes its
    annotations ask for (held to its namespace); the refusal names the namespace, pod,
    container, source and entry."""
    try:
        return with_scopes(parse_lowers(value, policy, source), found.scopes, found.namespace, policy.named)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{found.describe()}: {exc}") from None
