"""containerd's own configuration file, as far as this snapshotter is concerned: which table says
what for each config version, and the entries that declare the snapshotter, as TOML data.

containerd 1.6 and 1.7 read config version 2; 2.x reads version 3 (2.3 writes 4 and migrates 3).
CRI's tables moved in 2.0: the snapshotter setting to 'io.containerd.cri.v1.images', runtimes to
'io.containerd.cri.v1.runtime'. From 2.1 on, pulls and imports go through the Transfer service,
which unpacks only into the snapshotters its `unpack_config` lists. CRI reports
a proxy snapshotter's image filesystem (kubelet's ImageFsInfo and image GC) at the plugin's
`exports.root`. Pure: used by the installer, doctor and the private containerd of tests; must
not run anything or touch files.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from addlower.core.config import DIFFER_NAME, PLUGIN_NAME

BUILTIN_SNAPSHOTTER = "overlayfs"
CRI_SERVICE = "io.containerd.grpc.v1.cri"
TRANSFER = ("plugins", "io.containerd.transfer.v1.local")
# The diff service tries its differs in this key's order, the next one when a differ answers
# UNIMPLEMENTED; containerd's own default is ["walking"]. The same table in config versions 2 and 3.
DIFF_SERVICE = ("plugins", "io.containerd.service.v1.diff-service")
WALKING = "walking"
MIN_DIFF_PROXY = (1, 7)  # containerd 1.6 loads no proxy plugin of type diff
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def parse_version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) from `containerd --version` output ("containerd <repo> 1.7.24~ds1 ...")."""
    found = re.search(r"\sv?(\d+)\.(\d+)\.(\d+)", text)
    if found is None:
        raise ValueError(f"no containerd version in {text!r}")
    major, minor, patch = (int(n) for n in found.groups())
    return major, minor, patch


def config_version(version: tuple[int, ...]) -> int:
    """The config version a containerd of `version` reads natively."""
    return 3 if version[0] >= 2 else 2


def cri_images_table(config: int) -> tuple[str, ...]:
    """The table whose `snapshotter` key is CRI's snapshotter."""
    return ("plugins", "io.containerd.cri.v1.images") if config >= 3 else ("plugins", CRI_SERVICE, "containerd")


def cri_registry_table(config: int) -> tuple[str, ...]:
    """The table whose `config_path` names CRI's per-registry hosts.toml dir."""
    return (*(("plugins", "io.containerd.cri.v1.images") if config >= 3 else ("plugins", CRI_SERVICE)), "registry")


def cri_runtimes_table(config: int) -> tuple[str, ...]:
    """The table of CRI's runtime handlers."""
    runtime = ("plugins", "io.containerd.cri.v1.runtime") if config >= 3 else ("plugins", CRI_SERVICE)
    return (*runtime, "containerd", "runtimes")


@dataclass(frozen=True)
class CriUse:
    """How a containerd config's CRI uses one snapshotter."""

    enabled: bool  # CRI is not in disabled_plugins
    default: str  # the snapshotter CRI unpacks into and runs pods on
    handlers: tuple[str, ...]  # runtime handlers (RuntimeClasses) whose pods run on the snapshotter


def cri_use(document: Mapping[str, Any], snapshotter: str) -> CriUse:
    """How CRI uses `snapshotter`, as the parsed config `document` says."""
    version = int(document.get("version", 1))
    default = get_path(document, (*cri_images_table(version), "snapshotter")) or BUILTIN_SNAPSHOTTER
    runtimes = get_path(document, cri_runtimes_table(version)) or {}
    handlers = tuple(
        sorted(h for h, t in runtimes.items() if hasattr(t, "get") and t.get("snapshotter") == snapshotter)
    )
    return CriUse(CRI_SERVICE not in (document.get("disabled_plugins") or []), str(default), handlers)


def uses_transfer_unpack(version: tuple[int, ...]) -> bool:
    """Whether `ctr images pull/import` and CRI pulls unpack through the Transfer service."""
    return version[:2] >= (2, 1)


def host_platform() -> str:
    """This machine's platform as containerd names it (linux/amd64)."""
    machine = platform.machine()
    return f"linux/{_GOARCH.get(machine, machine)}"


def proxy_plugin(address: str, root: str) -> dict[str, Any]:
    """The [proxy_plugins.<name>] table declaring the snapshotter at `address`, its data at `root`."""
    return {"type": "snapshot", "address": address, "exports": {"root": root}}


def diff_proxy(version: tuple[int, ...]) -> bool:
    """Whether a containerd of `version` can ask our differ (a proxy plugin of type diff)."""
    return version[:2] >= MIN_DIFF_PROXY


def differ_plugin(address: str) -> dict[str, Any]:
    """The [proxy_plugins.<DIFFER_NAME>] table: the daemon's socket, serving containerd's Diff API."""
    return {"type": "diff", "address": address}


def differ_order(current: list[str] | None) -> list[str]:
    """The diff service's `default` with our differ first (it passes on what is not ours)."""
    rest = [name for name in (current or [WALKING]) if name != DIFFER_NAME]
    return [DIFFER_NAME, *rest]


def unpack_config(snapshotters: tuple[str, ...] = (BUILTIN_SNAPSHOTTER, PLUGIN_NAME)) -> list[dict[str, str]]:
    """Transfer's unpack_config entries: this platform into each snapshotter (keep overlayfs too:
    listing any entry replaces containerd's default of overlayfs alone)."""
    return [{"platform": host_platform(), "snapshotter": name} for name in snapshotters]


def set_path(doc: Any, path: tuple[str, ...], key: str, value: Any) -> None:
    """doc[path...][key] = value, making the tables on the way (works on dicts and tomlkit docs)."""
    for part in path:
        if part not in doc:
            doc[part] = {}
        doc = doc[part]
    doc[key] = value


def get_path(doc: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not hasattr(doc, "get"):
            return None
        doc = doc.get(part)
        if doc is None:
            return None
    return doc
