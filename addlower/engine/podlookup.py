"""Asking containerd about a Kubernetes container's pod, at the Mounts call CRI makes when it starts
the container: the container record through the Containers API, the pod sandbox's CRI metadata
through the sandbox Store (2.x) or the pause container's record (1.x). Bounded by a timeout;
keeps nothing between calls but its connection. The rules are addlower.core.pods'.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from addlower.core.errors import InvalidArgument, Unavailable
from addlower.core.pods import (
    SANDBOX_METADATA,
    STORE_METADATA,
    KubernetesConfig,
    Lookup,
    PodContainer,
    app_container,
    container_id,
    pod_sandbox,
    requested_lowers,
    requested_scopes,
)

log = logging.getLogger(__name__)


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

        from addlower.api import containers_pb2_grpc, sandbox_pb2_grpc

        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.config.containerd_address}")
            self._containers = containers_pb2_grpc.ContainersStub(self._channel)
            self._store = sandbox_pb2_grpc.StoreStub(self._channel)
        stub = self._store if method == "store" else self._containers
        try:
            return stub.Get(
                request, timeout=self.config.timeout, metadata=[("containerd-namespace", self.config.namespace)]
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and method == "store":
                self._store_serves = False
                return None
            raise Unavailable(
                f"looking up {what} in containerd at {self.config.containerd_address}: "
                f"{exc.code().name}: {exc.details()}"
            ) from None

    def _get(self, cid: str) -> Any:
        from addlower.api import containers_pb2

        found = self._call(f"container {cid}", "containers", containers_pb2.GetContainerRequest(id=cid))
        return found.container if found is not None else None

    def _sandbox_metadata(self, sandbox_id: str) -> Mapping[str, bytes]:
        """The pod sandbox's CRI metadata: from the sandbox Store, where containerd 2.x keeps every
        pod (whichever sandboxer runs it), else from the pause container's record (1.6, 1.7)."""
        from addlower.api import sandbox_pb2

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
        container = app_container(
            record.labels, record.spec.value, {k: v.value for k, v in record.extensions.items()}, record.sandbox
        )
        if container is None:
            return Lookup.NOT_A_POD
        pod = pod_sandbox(self._sandbox_metadata(container.sandbox_id))
        if pod is None:  # a sandbox without CRI metadata: no namespace to hold it to
            raise InvalidArgument(
                f"container {container.name!r}: its pod sandbox {container.sandbox_id} has no "
                "CRI metadata naming its namespace"
            )
        return PodContainer(
            pod.namespace,
            pod.name,
            container.name,
            requested_lowers(container, pod.annotations, self.config.annotation),
            requested_scopes(container, pod.annotations),
        )
