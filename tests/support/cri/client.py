"""CriClient: drive a containerd's CRI plugin (Kubernetes runtime.v1) the way kubelet does, minus
networking: pods use the host network (no CNI needed), containers log under a directory of ours.

Failed calls raise grpc.RpcError carrying containerd's message (`.code()`, `.details()`).
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tests.support.cri import api_pb2 as pb
from tests.support.cri import api_pb2_grpc

# Generous: the first call on a container may unpack its image.
RPC_TIMEOUT = 120.0


@dataclass(frozen=True)
class Pod:
    """A running pod sandbox: its id and the config it was created with (CreateContainer needs both)."""

    id: str
    config: pb.PodSandboxConfig


@dataclass
class CriClient:
    """A client for the CRI served on containerd's socket `address`; pod logs go under `log_root`."""

    address: Path
    log_root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cri-logs-")))

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(f"unix://{self.address}")
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def version(self) -> pb.VersionResponse:
        return self.runtime.Version(pb.VersionRequest(version="v1"), timeout=RPC_TIMEOUT)

    def image_status(self, image: str) -> pb.Image | None:
        """What CRI knows of `image` (a reference or id), or None if it does not know it."""
        resp = self.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=image)), timeout=RPC_TIMEOUT)
        return resp.image if resp.HasField("image") else None

    def pull_image(self, image: str) -> str:
        """PullImage, as kubelet pulls an image before it creates a container; the image ref."""
        req = pb.PullImageRequest(image=pb.ImageSpec(image=image))
        return self.images.PullImage(req, timeout=RPC_TIMEOUT).image_ref

    def image_fs_mountpoints(self) -> list[str]:
        """Where CRI says images are stored (kubelet's ImageFsInfo, which image GC acts on)."""
        resp = self.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=RPC_TIMEOUT)
        return [fs.fs_id.mountpoint for fs in resp.image_filesystems]

    def run_pod(
        self,
        name: str,
        namespace: str = "default",
        uid: str | None = None,
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        runtime_handler: str = "",
    ) -> Pod:
        """RunPodSandbox with the host network, on `runtime_handler` (a RuntimeClass's handler; ""
        for the default); the pod's log directory is created under `log_root`."""
        uid = uid or str(uuid.uuid4())
        log_dir = self.log_root / f"{namespace}_{name}_{uid}"
        log_dir.mkdir(parents=True, exist_ok=True)
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace),
            log_directory=str(log_dir),
            labels=dict(labels or {}),
            annotations=dict(annotations or {}),
            linux=pb.LinuxPodSandboxConfig(
                security_context=pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(network=pb.NODE))
            ),
        )
        resp = self.runtime.RunPodSandbox(
            pb.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler), timeout=RPC_TIMEOUT
        )
        return Pod(resp.pod_sandbox_id, config)

    def pod_state(self, pod_id: str) -> str:
        """`SANDBOX_READY` or `SANDBOX_NOTREADY`."""
        resp = self.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT)
        return pb.PodSandboxState.Name(resp.status.state)

    def stop_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT)

    def remove_pod(self, pod_id: str) -> None:
        """RemovePodSandbox: removes its containers too; containerd's GC removes snapshots later."""
        self.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT)

    @contextmanager
    def pod(
        self,
        name: str,
        namespace: str = "default",
        uid: str | None = None,
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        runtime_handler: str = "",
    ) -> Iterator[Pod]:
        """run_pod, then always stop_pod and remove_pod."""
        pod = self.run_pod(name, namespace, uid, annotations, labels, runtime_handler)
        try:
            yield pod
        finally:
            self.stop_pod(pod.id)
            self.remove_pod(pod.id)

    def create_container(
        self,
        pod_id: str,
        pod_config: pb.PodSandboxConfig,
        name: str,
        image: str,
        command: Sequence[str],
        annotations: Mapping[str, str] | None = None,
    ) -> str:
        """CreateContainer in the pod; it logs to <pod log dir>/<name>/0.log. Returns its id."""
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name),
            image=pb.ImageSpec(image=image),
            command=list(command),
            annotations=dict(annotations or {}),
            log_path=f"{name}/0.log",
        )
        req = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config)
        return self.runtime.CreateContainer(req, timeout=RPC_TIMEOUT).container_id

    def start(self, container_id: str) -> None:
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=container_id), timeout=RPC_TIMEOUT)

    def stop(self, container_id: str, timeout: int = 0) -> None:
        """StopContainer: SIGTERM, then SIGKILL after `timeout` seconds (0: at once)."""
        req = pb.StopContainerRequest(container_id=container_id, timeout=timeout)
        self.runtime.StopContainer(req, timeout=RPC_TIMEOUT + timeout)

    def remove(self, container_id: str) -> None:
        self.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=container_id), timeout=RPC_TIMEOUT)

    def container_status(self, container_id: str) -> pb.ContainerStatus:
        req = pb.ContainerStatusRequest(container_id=container_id)
        return self.runtime.ContainerStatus(req, timeout=RPC_TIMEOUT).status

    def container_state(self, container_id: str) -> str:
        """`CONTAINER_CREATED`, `CONTAINER_RUNNING`, `CONTAINER_EXITED` or `CONTAINER_UNKNOWN`."""
        return pb.ContainerState.Name(self.container_status(container_id).state)

    def exec_sync(self, container_id: str, cmd: Sequence[str], timeout: int = 30) -> tuple[int, str, str]:
        """ExecSync: run `cmd` in the container; (exit code, stdout, stderr) as text."""
        req = pb.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout)
        resp = self.runtime.ExecSync(req, timeout=timeout + RPC_TIMEOUT)
        return resp.exit_code, resp.stdout.decode(errors="replace"), resp.stderr.decode(errors="replace")
