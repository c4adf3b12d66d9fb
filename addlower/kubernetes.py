"""Kubernetes pods: which extra lower dirs a pod's annotations ask for, found through containerd.

An unmodified kubelet and containerd pass no snapshot labels for pods, so the snapshotter asks
containerd itself, at the Mounts call CRI makes when it starts a container: the container record
names its pod sandbox, whose CRI metadata holds the pod's annotations (SPEC section 5). The pure
part turns containerd's records into a request and holds it to the policy of the pod's
Kubernetes namespace; PodLowers does the lookup, with a bounded timeout, and keeps nothing
between calls but its connection. Must not know the store, mounts or the filesystem.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from .errors import InvalidArgument, Unavailable
from .lowers import Lower, LowerPolicy, NamedLower, parse_lowers

KIND_LABEL = "io.cri-containerd.kind"  # "sandbox" or "container"
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
CONTAINER_NAME_ANNOTATION = "io.kubernetes.cri.container-name"
CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
CONTAINER_METADATA = "io.cri-containerd.container.metadata"
SANDBOX_METADATA = "io.cri-containerd.sandbox.metadata"  # on the pause container's record
STORE_METADATA = "metadata"  # the same JSON, on containerd 2.x's sandbox Store entry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KubernetesConfig:
    enabled: bool = False
    containerd_address: str = "/run/containerd/containerd.sock"
    namespace: str = "k8s.io"  # containerd's CRI namespace
    annotation: str = "addlower.io/lowers"
    allowed_roots: tuple[str, ...] = ()  # absolute paths every pod may use
    # Kubernetes namespace -> further roots its pods may use.
    namespaces: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    timeout: float = 3.0  # seconds a Mounts call may wait for containerd

    def policy(self, root: str, named: Mapping[str, NamedLower], namespace: str | None) -> LowerPolicy:
        """What pods of `namespace` may use; with None, what some pod may use (a first check
        before the pod is known)."""
        extra = self.namespaces.get(namespace, ()) if namespace is not None else \
            tuple(r for roots in self.namespaces.values() for r in roots)
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

    def describe(self) -> str:
        return f"namespace {self.namespace!r} pod {self.pod!r} container {self.container!r}"


class Lookup(Enum):
    """Why a Mounts call found no pod's container behind a snapshot key."""

    NO_RECORD = "no container record (yet)"
    NOT_A_POD = "a container that is not a pod's"


def container_id(key: str, namespace: str) -> str | None:
    """The container id in a snapshot key `<namespace>/<n>/<id>`, if it is in that namespace."""
    parts = key.split("/", 2)
    return parts[2] if len(parts) == 3 and parts[0] == namespace and parts[2] else None


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


def app_container(labels: Mapping[str, str], spec: bytes, extensions: Mapping[str, bytes],
                  sandbox: str = "") -> AppContainer | None:
    """The app container behind a containerd record; None for a pod sandbox or a non-CRI record."""
    annotations = _strings(_json(spec).get("annotations"))
    kind = labels.get(KIND_LABEL) or annotations.get(CONTAINER_TYPE_ANNOTATION)
    if kind != "container":
        return None
    metadata = _dict(_json(extensions.get(CONTAINER_METADATA, b"")).get("Metadata"))
    sandbox_id = annotations.get(SANDBOX_ID_ANNOTATION) or metadata.get("SandboxID") or sandbox
    name = annotations.get(CONTAINER_NAME_ANNOTATION) or \
        _dict(_dict(metadata.get("Config")).get("metadata")).get("name", "")
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
    """The entries of `value` (from `source`) that the pod's policy allows; the refusal names the
    namespace, pod, container, source and entry."""
    try:
        return parse_lowers(value, policy, source)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{found.describe()}: {exc}") from None


class PodLowers:
    """Looks up a container's pod through containerd's Containers API and, on 2.x, its sandbox
    Store (connects on first use)."""

    def __init__(self, config: KubernetesConfig):
        self.config = config
        self._channel: Any = None
        self._store_serves = True  # until containerd says it has no sandbox Store (1.6)

    def _call(self, what: str, method: str, request: Any) -> Any:
        """One call to containerd in the CRI namespace; None when containerd has no such thing."""
        import grpc  # only daemons with Kubernetes enabled need a gRPC client

        from .api import containers_pb2_grpc, sandbox_pb2_grpc

        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.config.containerd_address}")
            self._containers = containers_pb2_grpc.ContainersStub(self._channel)
            self._store = sandbox_pb2_grpc.StoreStub(self._channel)
        stub = self._store if method == "store" else self._containers
        try:
            return stub.Get(request, timeout=self.config.timeout,
                            metadata=[("containerd-namespace", self.config.namespace)])
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and method == "store":
                self._store_serves = False
                return None
            raise Unavailable(f"looking up {what} in containerd at {self.config.containerd_address}: "
                              f"{exc.code().name}: {exc.details()}") from None

    def _get(self, cid: str) -> Any:
        from .api import containers_pb2

        found = self._call(f"container {cid}", "containers", containers_pb2.GetContainerRequest(id=cid))
        return found.container if found is not None else None

    def _sandbox_metadata(self, sandbox_id: str) -> Mapping[str, bytes]:
        """The pod sandbox's CRI metadata: from the sandbox Store, where containerd 2.x keeps every
        pod (whichever sandboxer runs it), else from the pause container's record (1.6, 1.7)."""
        from .api import sandbox_pb2

        if self._store_serves:
            found = self._call(f"pod sandbox {sandbox_id}", "store", sandbox_pb2.StoreGetRequest(sandbox_id=sandbox_id))
            if found is not None and STORE_METADATA in found.sandbox.extensions:
                log.debug("pod sandbox %s: found in containerd's sandbox store", sandbox_id)
                return {SANDBOX_METADATA: found.sandbox.extensions[STORE_METADATA].value}
        log.debug("pod sandbox %s: looked up as a container", sandbox_id)
        record = self._get(sandbox_id)
        return {k: v.value for k, v in record.extensions.items()} if record is not None else {}

    def find(self, key: str) -> PodContainer | Lookup:
        """The pod's app container behind a snapshot key of the CRI namespace, or why there is none."""
        cid = container_id(key, self.config.namespace)
        record = self._get(cid) if cid else None
        if record is None:
            return Lookup.NO_RECORD
        container = app_container(record.labels, record.spec.value, {k: v.value for k, v in record.extensions.items()},
                                  record.sandbox)
        if container is None:
            return Lookup.NOT_A_POD
        pod = pod_sandbox(self._sandbox_metadata(container.sandbox_id))
        if pod is None:  # a sandbox without CRI metadata: no namespace to hold it to
            raise InvalidArgument(f"container {container.name!r}: its pod sandbox {container.sandbox_id} has no "
                                  "CRI metadata naming its namespace")
        return PodContainer(pod.namespace, pod.name, container.name,
                            requested_lowers(container, pod.annotations, self.config.annotation))
