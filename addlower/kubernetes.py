"""Kubernetes pods: which extra lower dirs a pod's annotations ask for, found through containerd.

An unmodified kubelet and containerd pass no snapshot labels for pods, so the snapshotter asks
containerd itself, at the Mounts call CRI makes when it starts a container: the container record
names its pod sandbox, whose CRI metadata holds the pod's annotations (SPEC section 5). The pure
part turns containerd's records into a request; PodLowers does the one lookup, with a bounded
timeout, and keeps nothing between calls but its connection. Must not know the store or mounts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import InvalidArgument, Unavailable
from .lowers import LowerPolicy, parse_lowers

KIND_LABEL = "io.cri-containerd.kind"  # "sandbox" or "container"
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
CONTAINER_NAME_ANNOTATION = "io.kubernetes.cri.container-name"
CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
CONTAINER_METADATA = "io.cri-containerd.container.metadata"
SANDBOX_METADATA = "io.cri-containerd.sandbox.metadata"


@dataclass(frozen=True)
class KubernetesConfig:
    enabled: bool = False
    containerd_address: str = "/run/containerd/containerd.sock"
    namespace: str = "k8s.io"
    annotation: str = "addlower.io/lowers"
    allowed_roots: tuple[str, ...] = ()  # absolute paths pods may use; named lowers always may
    timeout: float = 3.0  # seconds a Mounts call may wait for containerd


@dataclass(frozen=True)
class AppContainer:
    """What the snapshotter needs of a CRI app container's record."""

    name: str
    sandbox_id: str
    annotations: Mapping[str, str]  # of its OCI spec (pod annotations copied by `pod_annotations`)


def container_id(key: str, namespace: str) -> str | None:
    """The container id in a snapshot key `<namespace>/<n>/<id>`, if it is in that namespace."""
    parts = key.split("/", 2)
    return parts[2] if len(parts) == 3 and parts[0] == namespace and parts[2] else None


def _json(blob: bytes) -> dict[str, Any]:
    try:
        data = json.loads(blob or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def app_container(labels: Mapping[str, str], spec: bytes, extensions: Mapping[str, bytes],
                  sandbox: str = "") -> AppContainer | None:
    """The app container behind a containerd record; None for a pod sandbox or a non-CRI record."""
    annotations = _json(spec).get("annotations") or {}
    kind = labels.get(KIND_LABEL) or annotations.get(CONTAINER_TYPE_ANNOTATION)
    if kind != "container":
        return None
    metadata = _json(extensions.get(CONTAINER_METADATA, b"")).get("Metadata") or {}
    sandbox_id = annotations.get(SANDBOX_ID_ANNOTATION) or metadata.get("SandboxID") or sandbox
    name = annotations.get(CONTAINER_NAME_ANNOTATION) or \
        ((metadata.get("Config") or {}).get("metadata") or {}).get("name", "")
    return AppContainer(name=name, sandbox_id=sandbox_id, annotations=annotations) if sandbox_id else None


def pod_annotations(sandbox_extensions: Mapping[str, bytes]) -> Mapping[str, str]:
    """The pod's annotations, from its sandbox's CRI metadata (the whole PodSandboxConfig)."""
    metadata = _json(sandbox_extensions.get(SANDBOX_METADATA, b"")).get("Metadata") or {}
    return (metadata.get("Config") or {}).get("annotations") or {}


def requested_lowers(container: AppContainer, pod: Mapping[str, str], annotation: str) -> tuple[str, str] | None:
    """(annotation key, value) that applies to the container: its own key wins over the pod's."""
    annotations = {**pod, **container.annotations}
    for key in (f"{annotation}.{container.name}", annotation):
        if key in annotations:
            return key, annotations[key]
    return None


def label_value(key: str, value: str, policy: LowerPolicy) -> str:
    """Check an annotation's value against the pods' policy; the label value to record."""
    parse_lowers(value, policy, f"pod annotation {key}")
    return ":".join(entry for entry in value.split(":") if entry)


class PodLowers:
    """Looks up a container's pod through containerd's Containers API (connects on first use)."""

    def __init__(self, config: KubernetesConfig, policy: LowerPolicy):
        self.config = config
        self.policy = policy
        self._stub: Any = None

    def _get(self, cid: str) -> Any:
        import grpc  # only daemons with Kubernetes enabled need a gRPC client

        from .api import containers_pb2, containers_pb2_grpc

        if self._stub is None:
            channel = grpc.insecure_channel(f"unix://{self.config.containerd_address}")
            self._stub = containers_pb2_grpc.ContainersStub(channel)
        try:
            return self._stub.Get(containers_pb2.GetContainerRequest(id=cid), timeout=self.config.timeout,
                                  metadata=[("containerd-namespace", self.config.namespace)]).container
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise Unavailable(f"looking up container {cid} in containerd at {self.config.containerd_address}: "
                              f"{exc.code().name}: {exc.details()}") from None

    def for_key(self, key: str) -> str | None:
        """The label value a container's pod asks for, or None (not a pod's app container, no
        record yet, or no annotation). Raises InvalidArgument when the policy refuses it."""
        cid = container_id(key, self.config.namespace)
        record = self._get(cid) if cid else None
        if record is None:
            return None
        container = app_container(record.labels, record.spec.value, {k: v.value for k, v in record.extensions.items()},
                                  record.sandbox)
        if container is None:
            return None
        sandbox = self._get(container.sandbox_id)
        pod = pod_annotations({k: v.value for k, v in sandbox.extensions.items()}) if sandbox is not None else {}
        found = requested_lowers(container, pod, self.config.annotation)
        if found is None:
            return None
        try:
            return label_value(*found, self.policy)
        except InvalidArgument as exc:
            raise InvalidArgument(f"container {container.name!r} of pod sandbox {container.sandbox_id}: {exc}") from None
