"""`addlower install`: point a node's containerd at the snapshotter (what the DaemonSet's init
container runs), without breaking the node's config.

The pure part edits the config text: it adds the proxy plugin and sets CRI's snapshotter in the
table containerd's config version uses, leaving everything else as written, and refuses (changing
nothing) when the result would not parse or not say what it must. Must not know the daemon.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

from .config import PLUGIN_NAME as PROXY_PLUGIN


class InstallError(Exception):
    """The config cannot be changed safely; nothing was written."""


def plugin_table(socket: str) -> str:
    """The config table that declares the snapshotter to containerd."""
    return f'[proxy_plugins.{PROXY_PLUGIN}]\n  type = "snapshot"\n  address = "{socket}"\n'


def _cri_table(version: int) -> tuple[tuple[str, ...], str]:
    """Where CRI's snapshotter setting lives: the key path and the table header as written."""
    if version >= 3:
        return ("plugins", "io.containerd.cri.v1.images"), "[plugins.'io.containerd.cri.v1.images']"
    return ("plugins", "io.containerd.grpc.v1.cri", "containerd"), '[plugins."io.containerd.grpc.v1.cri".containerd]'


def _lookup(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def configure(text: str, socket: str, cri: bool = True) -> str:
    """The config `text` with our proxy plugin (and CRI's snapshotter) set; unchanged if already so."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InstallError(f"the current config does not parse: {exc}") from None
    version = int(doc.get("version", 1))
    if version < 2:
        raise InstallError("config version 1 is not supported: migrate it with `containerd config migrate`")
    out = text if text.endswith("\n") or not text else text + "\n"
    plugin = _lookup(doc, ("proxy_plugins", PROXY_PLUGIN))
    if plugin is None:
        out += "\n" + plugin_table(socket)
    elif plugin.get("address") != socket:
        raise InstallError(f"proxy_plugins.{PROXY_PLUGIN} already points at {plugin.get('address')!r}, not {socket!r}")
    if cri:
        path, header = _cri_table(version)
        table = _lookup(doc, path)
        setting = f'  snapshotter = "{PROXY_PLUGIN}"'
        if table is None:
            out += f"\n{header}\n{setting}\n"
        elif table.get("snapshotter") != PROXY_PLUGIN:
            pattern = re.compile(r"^[ \t]*" + re.escape(header) + r"[ \t]*$", re.M)
            found = pattern.search(out)
            if found is None:
                raise InstallError(f"cannot find the table {header} as a header to set its snapshotter")
            body_end = re.compile(r"^[ \t]*\[", re.M).search(out, found.end())
            body = out[found.end(): body_end.start() if body_end else len(out)]
            body = re.sub(r"^[ \t]*snapshotter[ \t]*=.*\n?", "", body, flags=re.M)
            out = out[: found.end()] + "\n" + setting + body + (out[body_end.start():] if body_end else "")
    check = tomllib.loads(out)
    if _lookup(check, ("proxy_plugins", PROXY_PLUGIN, "address")) != socket or (
            cri and _lookup(check, (*_cri_table(version)[0], "snapshotter")) != PROXY_PLUGIN):
        raise InstallError("the edited config would not say what it must; nothing written")
    return out


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


def install(host_root: Path, socket: str, unit_template: str, wheels: Path | None, start: bool,
            config_text: str | None = None) -> list[str]:
    """Put the daemon on the host (a venv from `wheels`, the systemd unit), point containerd at it.

    `host_root` is where the host's / is mounted (the DaemonSet mounts it at /host). With `start`,
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
    text = config.read_text() if config.exists() else "version = 2\n"
    new = configure(text, socket)
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
