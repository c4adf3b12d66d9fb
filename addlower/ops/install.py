"""`addlower install`: point a node's containerd at the snapshotter (what the DaemonSet's init
container runs), without breaking the node's config.

The pure part edits the config text with tomlkit, which keeps every comment, spelling and table
order the node's admin wrote: it adds the proxy plugin (with `exports.root`, where CRI reports
the image filesystem), sets CRI's snapshotter in the table the config version uses, and on
containerd 2.1+ lists the snapshotter in the Transfer service's `unpack_config` (addlower.core.ctrdconfig
holds those facts). It refuses, changing nothing, when the result would not parse or not say what
it must. Must not know the daemon.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError

from addlower.core import ctrdconfig
from addlower.core.config import PLUGIN_NAME
from addlower.core.ctrdconfig import get_path, set_path

Version = tuple[int, int, int]


class InstallError(Exception):
    """The config cannot be changed safely; nothing was written."""


def plugin_table(socket: str, root: str) -> str:
    """The config table that declares the snapshotter to containerd, as TOML text."""
    return tomlkit.dumps({"proxy_plugins": {PLUGIN_NAME: ctrdconfig.proxy_plugin(socket, root)}})


def new_config(containerd: Version) -> str:
    """The start of a config for a node that has none: the version its containerd reads natively
    (containerd 2.3 drops CRI's snapshotter when it migrates a version 2 file without runtimes)."""
    return f"version = {ctrdconfig.config_version(containerd)}\n"


def configure(text: str, socket: str, root: str, containerd: Version, cri: bool = True) -> str:
    """The config `text` with our proxy plugin (and CRI's snapshotter, and Transfer's unpack entries
    on 2.1+) set for a containerd of version `containerd`; unchanged if already so."""
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise InstallError(f"the current config does not parse: {exc}") from None
    version = int(doc.get("version", 1))
    if version < 2:
        raise InstallError("config version 1 is not supported: migrate it with `containerd config migrate`")
    plugin = get_path(doc, ("proxy_plugins", PLUGIN_NAME))
    if plugin is not None and plugin.get("address") != socket:
        raise InstallError(f"proxy_plugins.{PLUGIN_NAME} already points at {plugin.get('address')!r}, not {socket!r}")
    if plugin is None:
        set_path(doc, ("proxy_plugins",), PLUGIN_NAME, ctrdconfig.proxy_plugin(socket, root))
    else:
        plugin["type"] = "snapshot"
        set_path(plugin, ("exports",), "root", root)
    if cri:
        images = ctrdconfig.cri_images_table(version)
        if get_path(doc, (*images, "snapshotter")) != PLUGIN_NAME:
            set_path(doc, images, "snapshotter", PLUGIN_NAME)
        runtimes = ctrdconfig.cri_runtimes_table(version)
        if version == 2 and containerd[0] >= 2 and get_path(doc, runtimes) is None:
            set_path(doc, (*runtimes, "runc"), "runtime_type", "io.containerd.runc.v2")
    if ctrdconfig.uses_transfer_unpack(containerd):
        entries = get_path(doc, (*ctrdconfig.TRANSFER, "unpack_config"))
        if entries is None:
            entries = tomlkit.aot()
            set_path(doc, ctrdconfig.TRANSFER, "unpack_config", entries)
        present = {(e.get("platform"), e.get("snapshotter")) for e in entries}
        wanted = ctrdconfig.unpack_config() if not present else ctrdconfig.unpack_config((PLUGIN_NAME,))
        for entry in wanted:
            if (entry["platform"], entry["snapshotter"]) not in present:
                entries.append(entry)
    out = tomlkit.dumps(doc)
    _check(out, socket, root, version, containerd, cri)
    return out


def _check(text: str, socket: str, root: str, version: int, containerd: Version, cri: bool) -> None:
    """Read the result back as containerd would (tomllib) and refuse it unless it says all of it."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InstallError(f"the edited config would not parse ({exc}); nothing written") from None
    plugin = get_path(doc, ("proxy_plugins", PLUGIN_NAME)) or {}
    unpack = get_path(doc, (*ctrdconfig.TRANSFER, "unpack_config")) or []
    if (plugin.get("address"), get_path(plugin, ("exports", "root"))) != (socket, root) \
            or (cri and get_path(doc, (*ctrdconfig.cri_images_table(version), "snapshotter")) != PLUGIN_NAME) \
            or (ctrdconfig.uses_transfer_unpack(containerd)
                and not any(e.get("snapshotter") == PLUGIN_NAME for e in unpack)):
        raise InstallError("the edited config would not say what it must; nothing written")


def containerd_version(host_root: Path) -> Version:
    """The node's containerd version, from its binary under `host_root`."""
    for d in ("usr/local/bin", "usr/bin"):
        binary = host_root / d / "containerd"
        if binary.exists():
            try:
                out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout
                return ctrdconfig.parse_version(out)
            except (OSError, subprocess.CalledProcessError, ValueError) as exc:
                raise InstallError(f"cannot tell the version of {binary} ({exc}): "
                                   "give it with --containerd-version") from None
    raise InstallError(f"no containerd under {host_root}/usr/bin or /usr/local/bin: give its version with "
                       "--containerd-version")


UNIT_NAME = "overlay-custom-add-lower-snapshotter.service"
HOST_PREFIX = "/opt/addlower"  # on the host: wheels/ and venv/
DAEMON_CONFIG = "/etc/overlay-custom-add-lower-snapshotter/config.toml"
NSENTER = ["nsenter", "--target", "1", "--mount", "--uts", "--ipc", "--net", "--pid", "--"]


def unit_file(template: str) -> str:
    """The systemd unit, running the daemon from the host venv the installer made."""
    return template.replace("ExecStart=/usr/local/bin/", f"ExecStart={HOST_PREFIX}/venv/bin/")


def _listing(directory: Path) -> set[tuple[str, int]]:
    return {(p.name, p.stat().st_size) for p in directory.iterdir()} if directory.is_dir() else set()


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True


def install(host_root: Path, socket: str, root: str, unit_template: str, wheels: Path | None, start: bool,
            containerd: Version, config_text: str | None = None) -> list[str]:
    """Put the daemon on the host (a venv from `wheels`, the systemd unit), point containerd at it.

    `host_root` is where the host's / is mounted (the DaemonSet mounts it at /host); `root` is the
    daemon's root (containerd's `exports.root`), `containerd` the node's version. With `start`,
    commands run in the host's namespaces (nsenter into pid 1): build the venv, enable and start
    the unit (restarted when its files changed), then restart containerd if its config changed, in
    that order, so containerd finds the socket. `config_text` becomes the daemon's config file.
    """
    done = []
    daemon_changed = False
    if config_text is not None:
        if _write_if_changed(host_root / DAEMON_CONFIG.lstrip("/"), config_text):
            daemon_changed = True
            done.append(f"wrote {DAEMON_CONFIG}")
    target = host_root / HOST_PREFIX.lstrip("/") / "wheels"
    if wheels is not None and _listing(wheels) != _listing(target):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(wheels, target)
        daemon_changed = True
        done.append(f"copied {len(list(target.iterdir()))} wheels to {HOST_PREFIX}/wheels")
    if _write_if_changed(host_root / "etc/systemd/system" / UNIT_NAME, unit_file(unit_template)):
        daemon_changed = True
        done.append(f"wrote /etc/systemd/system/{UNIT_NAME}")
    config = host_root / "etc/containerd/config.toml"
    text = config.read_text() if config.exists() else new_config(containerd)
    new = configure(text, socket, root, containerd)
    changed = new != text
    if changed:
        if config.exists():
            shutil.copy2(config, config.with_name(config.name + ".bak-addlower"))
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(new)
        done.append("configured /etc/containerd/config.toml (backup: config.toml.bak-addlower)")
    if start:
        steps = [
            ["python3", "-m", "venv", f"{HOST_PREFIX}/venv"],
            [f"{HOST_PREFIX}/venv/bin/pip", "install", "-q", "--no-index", "--find-links", f"{HOST_PREFIX}/wheels",
             "--upgrade", "addlower"],
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", UNIT_NAME],
            ["systemctl", "restart" if daemon_changed else "start", UNIT_NAME],
            *([["systemctl", "restart", "containerd"]] if changed else []),
        ]
        for step in steps:
            subprocess.run([*NSENTER, *step], check=True)
            done.append("ran " + " ".join(step))
    return done
