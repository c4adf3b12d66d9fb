"""The daemon's TOML configuration file and how command-line flags override it.

Reads and checks the file into plain values; a bad file is an error that names the key. Must not
start anything or know about snapshots beyond the option names.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import InvalidArgument
from .kubernetes import KubernetesConfig
from .lowers import LowerPolicy, check_path, is_within

DEFAULT_CONFIG = Path("/etc/overlay-custom-add-lower-snapshotter/config.toml")
DEFAULT_ROOT = Path("/var/lib/containerd/cn.rectcircle.containerd.overlay-custom-add-lower-snapshotter")
PLUGIN_NAME = "overlay-custom-add-lower-snapshotter"  # as containerd configs and docs name it
SOCKET_NAME = "grpc.socks"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class ConfigError(Exception):
    """The configuration file cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Config:
    root_dir: Path = DEFAULT_ROOT
    address: Path | None = None
    async_remove: bool = True
    upperdir_label: bool = False
    log_level: str = "info"
    log_format: str = "text"
    metrics_address: str | None = None  # host:port serving Prometheus metrics; off when None
    mount_options: tuple[str, ...] = ()
    allowed_roots: tuple[str, ...] = ("/",)
    named_lowers: Mapping[str, str] = field(default_factory=dict)
    kubernetes: KubernetesConfig = KubernetesConfig()

    @property
    def socket_path(self) -> Path:
        return self.address or self.root_dir / SOCKET_NAME


# key -> (expected type, converter); everything else in the file is an error.
_TOP = {
    "root_dir": (str, Path),
    "address": (str, Path),
    "async_remove": (bool, bool),
    "upperdir_label": (bool, bool),
    "log_level": (str, str),
    "log_format": (str, str),
    "metrics_address": (str, str),
    "mount_options": (list, tuple),
}


def _typed(key: str, value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected a {kind.__name__}, got {value!r}")
    return value


def check_metrics_address(address: str | None) -> None:
    if address is not None and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[\w.-]*):\d{1,5}", address):
        raise ConfigError(f"metrics_address: host:port, not {address!r}")


def parse_config(data: Mapping[str, Any]) -> Config:
    """Check a parsed TOML document and turn it into a Config."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("lowers", "kubernetes"):
            continue
        if key not in _TOP:
            raise ConfigError(f"{key}: unknown key")
        kind, convert = _TOP[key]
        values[key] = convert(_typed(key, value, kind))
    if values.get("log_level", "info") not in LOG_LEVELS:
        raise ConfigError(f"log_level: one of {', '.join(LOG_LEVELS)}, not {values['log_level']!r}")
    if values.get("log_format", "text") not in LOG_FORMATS:
        raise ConfigError(f"log_format: one of {', '.join(LOG_FORMATS)}, not {values['log_format']!r}")
    check_metrics_address(values.get("metrics_address"))
    for i, opt in enumerate(values.get("mount_options", ())):
        _typed(f"mount_options[{i}]", opt, str)
    lowers = _typed("lowers", data.get("lowers", {}), dict)
    for key in lowers:
        if key not in ("allowed_roots", "named"):
            raise ConfigError(f"lowers.{key}: unknown key")
    roots = _typed("lowers.allowed_roots", lowers.get("allowed_roots", ["/"]), list)
    for i, root in enumerate(roots):
        _typed(f"lowers.allowed_roots[{i}]", root, str)
    named = _typed("lowers.named", lowers.get("named", {}), dict)
    for name, path in named.items():
        _typed(f"lowers.named.{name}", path, str)
    config = Config(**values, allowed_roots=tuple(roots), named_lowers=dict(named),
                    kubernetes=_kubernetes(_typed("kubernetes", data.get("kubernetes", {}), dict), tuple(roots)))
    try:  # the same checks the snapshotter applies
        LowerPolicy(str(config.root_dir), config.allowed_roots, config.named_lowers)
    except InvalidArgument as exc:
        raise ConfigError(f"lowers: {exc}") from None
    return config


# [kubernetes] key -> expected type
_KUBERNETES = {"enabled": bool, "containerd_address": str, "namespace": str, "annotation": str,
               "allowed_roots": list, "timeout": (int, float)}


def _kubernetes(section: Mapping[str, Any], label_roots: tuple[str, ...]) -> KubernetesConfig:
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key not in _KUBERNETES:
            raise ConfigError(f"kubernetes.{key}: unknown key")
        kind = _KUBERNETES[key]
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise ConfigError(f"kubernetes.{key}: expected a {getattr(kind, '__name__', 'number')}, got {value!r}")
        values[key] = value
    roots = tuple(values.pop("allowed_roots", ()))
    for i, root in enumerate(roots):
        key = f"kubernetes.allowed_roots[{i}]"
        try:
            check_path(_typed(key, root, str), key)
        except InvalidArgument as exc:
            raise ConfigError(str(exc)) from None
        # A pod's lowers are recorded as the snapshot's label, which the label policy then checks.
        if not any(is_within(root, r) for r in label_roots):
            raise ConfigError(f"{key}: {root!r} is outside lowers.allowed_roots {list(label_roots)}")
    if values.get("timeout", 1) <= 0:
        raise ConfigError("kubernetes.timeout: must be positive")
    return KubernetesConfig(**values, allowed_roots=roots)


def load_config(path: Path | None) -> Config:
    """The file at `path`, or the default file if it exists, or the defaults."""
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return Config()
        path = DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
