"""The daemon's TOML configuration file and how command-line flags override it.

Reads and checks the file into plain values; a bad file is an error that names the key. Must not
start anything or know about snapshots beyond the option names.
"""

from __future__ import annotations

import functools
import os
import re
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from addlower.core.caches import CachePolicy, policy_of
from addlower.core.errors import InvalidArgument
from addlower.core.lowers import DEFAULT_ALLOWED_ROOTS, NAMESPACE, ROOT_TARGET, LowerPolicy, NamedLower
from addlower.core.pods import KubernetesConfig

DEFAULT_CONFIG = Path("/etc/overlay-custom-add-lower-snapshotter/config.toml")
DEFAULT_ROOT = Path("/var/lib/containerd/cn.rectcircle.containerd.overlay-custom-add-lower-snapshotter")
PLUGIN_NAME = "overlay-custom-add-lower-snapshotter"  # as containerd configs and docs name it
DIFFER_NAME = "overlay-custom-add-lower-differ"  # the same daemon as containerd's diff proxy plugin
SOCKET_NAME = "grpc.socks"
# The daemon's own gRPC service beside containerd's Snapshots on its socket (0660, root's): its
# Reload re-reads the file the daemon was started with and takes nothing from the caller.
ADMIN_SERVICE = "addlower.v1.Admin"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
TARGET_SETTINGS = ("auto", "on", "off")  # mount_targets; see addlower.engine.ctrdversion
# lowers.max_host_mounts: pins and target mounts on the node at once. A mount namespace holds at
# most fs.mount-max mounts (100,000 by default) and containerd, runc and every other mount of the
# node share the host's: this leaves them nine tenths.
DEFAULT_MAX_HOST_MOUNTS = 10_000
DEFAULT_REGISTRY_CONFIG_PATH = Path("/etc/containerd/certs.d")


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
    mount_targets: str = "auto"  # lowers at container paths: "auto" asks containerd's version, "on", "off"
    parallel_unpack: bool = False  # parentless actives as overlays (containerd 2.2+ with "rebase")
    allowed_roots: tuple[str, ...] = DEFAULT_ALLOWED_ROOTS
    named_lowers: Mapping[str, NamedLower] = field(default_factory=dict)
    max_host_mounts: int = DEFAULT_MAX_HOST_MOUNTS
    kubernetes: KubernetesConfig = KubernetesConfig()
    # containerd's registry host configuration (hosts.toml per registry: mirrors, TLS, plain HTTP,
    # auth headers), what caches' pushes and pulls go by, as CRI's registry.config_path
    registry_config_path: Path = DEFAULT_REGISTRY_CONFIG_PATH
    ctr_path: str = "ctr"  # containerd's client, which pushes and pulls caches' images

    @functools.cached_property
    def caches(self) -> dict[str, CachePolicy]:
        """The managed caches among the named lowers, by name."""
        return {name: named.cache for name, named in self.named_lowers.items() if named.cache is not None}

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
    "mount_targets": (str, str),
    "parallel_unpack": (bool, bool),
    "registry_config_path": (str, Path),
    "ctr_path": (str, str),
}


def _typed(key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    """`value` if it is a `kind` (a bool is no number here, though Python says it is an int)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        name = "number" if float in kinds else kinds[0].__name__
        raise ConfigError(f"{key}: expected a {name}, got {value!r}")
    return value


def check_metrics_address(address: str | None) -> None:
    if address is not None and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[\w.-]*):\d{1,5}", address):
        raise ConfigError(f"metrics_address: host:port, not {address!r}")


def parse_config(data: Mapping[str, Any]) -> Config:
    """Check a parsed TOML document and turn it into a Config."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("lowers", "kubernetes", "containerd_address"):
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
    if values.get("mount_targets", "auto") not in TARGET_SETTINGS:
        raise ConfigError(f"mount_targets: one of {', '.join(TARGET_SETTINGS)}, not {values['mount_targets']!r}")
    for i, opt in enumerate(values.get("mount_options", ())):
        _typed(f"mount_options[{i}]", opt, str)
    lowers = _typed("lowers", data.get("lowers", {}), dict)
    for key in lowers:
        if key not in ("allowed_roots", "named", "max_host_mounts"):
            raise ConfigError(f"lowers.{key}: unknown key")
    budget = _typed("lowers.max_host_mounts", lowers.get("max_host_mounts", DEFAULT_MAX_HOST_MOUNTS), int)
    if budget < 1:
        raise ConfigError(f"lowers.max_host_mounts: must be positive, not {budget}")
    roots = _strings("lowers.allowed_roots", lowers.get("allowed_roots", list(DEFAULT_ALLOWED_ROOTS)))
    named = {
        name: _named_lower(f"lowers.named.{name}", value)
        for name, value in _typed("lowers.named", lowers.get("named", {}), dict).items()
    }
    kubernetes = dict(_typed("kubernetes", data.get("kubernetes", {}), dict))
    if "containerd_address" in data:  # what the differ, mount targets and pod lookups all ask
        address = _typed("containerd_address", data["containerd_address"], str)
        if kubernetes.setdefault("containerd_address", address) != address:
            raise ConfigError("containerd_address and kubernetes.containerd_address differ: give one")
    config = Config(
        **values, allowed_roots=roots, named_lowers=named, max_host_mounts=budget, kubernetes=_kubernetes(kubernetes)
    )
    root = str(config.root_dir)
    try:  # the same checks the snapshotter applies
        LowerPolicy(root, config.allowed_roots, config.named_lowers)
    except InvalidArgument as exc:
        raise ConfigError(f"lowers: {exc}") from None
    k8s = config.kubernetes
    for where, ns_roots in (
        ("kubernetes", k8s.allowed_roots),
        *((f"kubernetes.namespaces.{ns}", r) for ns, r in k8s.namespaces.items()),
    ):
        try:
            LowerPolicy(root, ns_roots)
        except InvalidArgument as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return config


def _strings(key: str, value: Any) -> tuple[str, ...]:
    return tuple(_typed(f"{key}[{i}]", item, str) for i, item in enumerate(_typed(key, value, list)))


_CACHE_KEYS = (
    "promote",
    "promote_namespaces",
    "max_generations",
    "max_bytes",
    "seed",
    "scopes",
    "scope_ttl",
    "max_scopes",
    "image",
    "refresh",
    "push",
    "exclude",
)


def _named_lower(key: str, value: Any) -> NamedLower:
    """A named lower: a path, or a table {path = "...", namespaces = [...], target = "...",
    create = true}; or a managed cache, {cache = true, target = "...", promote = ..., ...}."""
    if isinstance(value, str):
        return NamedLower(value)
    table = _typed(key, value, dict)
    cache = _typed(f"{key}.cache", table.get("cache", False), bool)
    for k in table:
        if k not in ("path", "namespaces", "target", "create", "cache", *(_CACHE_KEYS if cache else ())):
            hint = " (a key of caches: cache = true)" if k in _CACHE_KEYS else ""
            raise ConfigError(f"{key}.{k}: unknown key{hint}")
    namespaces = _strings(f"{key}.namespaces", table["namespaces"]) if "namespaces" in table else None
    for ns in namespaces or ():
        _check_namespace(f"{key}.namespaces", ns)
    target = _typed(f"{key}.target", table.get("target", ROOT_TARGET), str)
    if cache:
        return NamedLower("", namespaces, target, cache=_cache(key, table))
    if "path" not in table:
        raise ConfigError(f"{key}: a table needs a path (or cache = true)")
    create = _typed(f"{key}.create", table.get("create", False), bool)
    return NamedLower(_typed(f"{key}.path", table["path"], str), namespaces, target, create)


def _cache(key: str, table: Mapping[str, Any]) -> CachePolicy:
    for k in ("path", "create"):
        if k in table:
            raise ConfigError(f"{key}.{k}: a cache's contents live under the snapshotter's root (seed copies a dir in)")
    promoters = _strings(f"{key}.promote_namespaces", table.get("promote_namespaces", []))
    for ns in promoters:
        _check_namespace(f"{key}.promote_namespaces", ns)
    for ns in _typed(f"{key}.scopes", table.get("scopes", {}), dict):
        _check_namespace(f"{key}.scopes", ns)
    try:
        return policy_of(key, table, promoters)
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from None


def _check_namespace(key: str, namespace: str) -> None:
    if not NAMESPACE.fullmatch(namespace):
        raise ConfigError(f"{key}: {namespace!r} is not a Kubernetes namespace name")


# [kubernetes] key -> expected type
_KUBERNETES: dict[str, type | tuple[type, ...]] = {
    "enabled": bool,
    "containerd_address": str,
    "namespace": str,
    "annotation": str,
    "allowed_roots": list,
    "namespaces": dict,
    "timeout": (int, float),
}


def _kubernetes(section: Mapping[str, Any]) -> KubernetesConfig:
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key not in _KUBERNETES:
            raise ConfigError(f"kubernetes.{key}: unknown key")
        values[key] = _typed(f"kubernetes.{key}", value, _KUBERNETES[key])
    roots = _strings("kubernetes.allowed_roots", values.pop("allowed_roots", []))
    namespaces = {}
    for ns, table in values.pop("namespaces", {}).items():
        key = f"kubernetes.namespaces.{ns}"
        _check_namespace("kubernetes.namespaces", ns)
        for k in _typed(key, table, dict):
            if k != "allowed_roots":
                raise ConfigError(f"{key}.{k}: unknown key")
        namespaces[ns] = _strings(f"{key}.allowed_roots", table.get("allowed_roots", []))
    if values.get("timeout", 1) <= 0:
        raise ConfigError("kubernetes.timeout: must be positive")
    return KubernetesConfig(**values, allowed_roots=roots, namespaces=namespaces)


# A reload reads only a file at rest: one changed within QUIET_SECONDS may still be being written
# (an editor, `cat > file`); past SETTLE_SECONDS of changes the reload is refused.
QUIET_SECONDS = 0.25
SETTLE_SECONDS = 3.0


def read_toml(path: Path, settled: bool = False) -> dict[str, Any]:
    """A TOML file as data; ConfigError naming the file when it cannot be read or parsed.
    `settled`: only once it has stopped changing (a reload must never apply a file caught halfway)."""
    try:
        text = _read_settled(path) if settled else path.read_bytes()
        return tomllib.loads(text.decode())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _read_settled(path: Path) -> bytes:
    """The file's bytes once it was last changed at least QUIET_SECONDS ago and did not change
    while it was read (same inode, size, mtime and ctime: a ConfigMap's swap of symlinks too)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        before = os.stat(path)
        age = time.time() - before.st_mtime
        if not 0 <= age < QUIET_SECONDS:  # a future mtime is no writer at work either
            data = path.read_bytes()
            if _identity(os.stat(path)) == _identity(before):
                return data
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"{path}: still being written (it changed within {QUIET_SECONDS} s, again and "
                f"again, for {SETTLE_SECONDS} s)"
            )
        time.sleep(min(max(QUIET_SECONDS - age, 0.02), QUIET_SECONDS))


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def load_config(path: Path | None, reload: bool = False) -> Config:
    """The file at `path`, or the default file if it exists, or the defaults. `reload`: for a
    running daemon, which keeps its config unless the file is there, at rest, complete and valid:
    a missing file or one without a single setting (empty, or cut short before the first) is
    refused, never taken for the defaults."""
    if path is None:
        if not DEFAULT_CONFIG.exists() and not reload:
            return Config()
        path = DEFAULT_CONFIG
    data = read_toml(path, settled=reload)
    if reload and not data:
        raise ConfigError(
            f"{path}: no settings at all (an empty file, or one cut short?); a reload never goes "
            "back to the defaults: restart the daemon for that"
        )
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# What a reload (SIGHUP) applies: the policy's keys and the log level. The rest is how the daemon
# was set up (its root, socket, pools, containerd client) and changes only with a restart.
_RELOADED = ("allowed_roots", "named_lowers", "max_host_mounts", "log_level")  # [lowers] keys, log_level
_RELOADED_KUBERNETES = ("allowed_roots", "namespaces")


def reloaded(running: Config, new: Config) -> tuple[Config, list[str]]:
    """The config a reload leaves running: `new`'s policy keys and log level, the rest as it is;
    and the keys `new` changes that only a restart applies, as the file spells them."""
    k8s_running, k8s_new = running.kubernetes, new.kubernetes
    kubernetes = replace(k8s_running, **{f: getattr(k8s_new, f) for f in _RELOADED_KUBERNETES})
    applied = replace(running, kubernetes=kubernetes, **{f: getattr(new, f) for f in _RELOADED})
    later = [
        f
        for f in fields(Config)
        if f.name not in (*_RELOADED, "kubernetes") and getattr(applied, f.name) != getattr(new, f.name)
    ]
    later_kubernetes = [f for f in fields(KubernetesConfig) if getattr(kubernetes, f.name) != getattr(k8s_new, f.name)]
    return applied, [f.name for f in later] + [f"kubernetes.{f.name}" for f in later_kubernetes]
