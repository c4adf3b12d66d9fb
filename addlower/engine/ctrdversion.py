"""Which containerd the snapshotter serves, for the one decision that depends on it: mounts with a
`target` (a lower at a container path). containerd 1.7+ mounts each mount after the first at
rootfs/<target>; 1.6 ignores the field and would mount them all over the rootfs, so a target is
refused unless containerd is known to be 1.7+: asked of containerd's Version API at
`kubernetes.containerd_address` (remembered for a minute), or stated by the `mount_targets`
setting. I/O at the edge; must not know the store, labels or mounts.
"""

from __future__ import annotations

import time
from typing import Any

from addlower.core.ctrdconfig import parse_version
from addlower.core.errors import InvalidArgument

MIN_TARGET_VERSION = (1, 7)
REMEMBER_SECONDS = 60.0  # containerd may be upgraded under a running snapshotter


class TargetSupport:
    """Whether mount targets may be handed out; `setting` is "auto" (ask containerd), "on" or "off"."""

    def __init__(self, setting: str, address: str, timeout: float):
        self.setting = setting
        self.address = address
        self.timeout = timeout
        self._known: tuple[float, tuple[int, int, int] | None, str] | None = None  # (when, version, why not)

    def check(self, what: str) -> None:
        """Refuse (InvalidArgument naming `what`) unless containerd honours mount targets."""
        if self.setting == "on":
            return
        if self.setting == "off":
            raise InvalidArgument(f"{what}: a target needs containerd >= 1.7, and mount_targets is off here")
        version, why = self._version()
        if version is None:
            raise InvalidArgument(
                f"{what}: a target needs containerd >= 1.7, and its version is unknown "
                f'({why}); set mount_targets = "on" if it is'
            )
        if version[:2] < MIN_TARGET_VERSION:
            raise InvalidArgument(
                f"{what}: a target needs containerd >= 1.7; this is {'.'.join(map(str, version))},"
                " which would mount it over the whole rootfs"
            )

    def version(self) -> tuple[int, int, int] | None:
        """The containerd version, as asked (None when it did not answer)."""
        return self._version()[0]

    def _version(self) -> tuple[tuple[int, int, int] | None, str]:
        now = time.monotonic()
        if self._known is None or now - self._known[0] > REMEMBER_SECONDS:
            version, why = ask_version(self.address, self.timeout)
            self._known = (now, version, why)
        return self._known[1], self._known[2]


def ask_version(address: str, timeout: float) -> tuple[tuple[int, int, int] | None, str]:
    """The version of the containerd answering at `address`, or None and why not."""
    import grpc  # only daemons that see targets need a gRPC client
    from google.protobuf import empty_pb2

    from addlower.api import version_pb2_grpc

    try:
        with grpc.insecure_channel(f"unix://{address}") as channel:
            stub: Any = version_pb2_grpc.VersionStub(channel)
            reply = stub.Version(empty_pb2.Empty(), timeout=timeout)
        return parse_version(f" {reply.version}"), ""
    except grpc.RpcError as exc:
        return None, f"containerd at {address}: {exc.code().name}"
    except ValueError as exc:
        return None, str(exc)
