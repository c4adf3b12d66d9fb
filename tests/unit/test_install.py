"""Pointing a node's containerd at the snapshotter: config edits, the installer's files, the manifests."""

from __future__ import annotations

import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from addlower.cli import admin
from addlower.install import InstallError, configure

REPO = Path(__file__).resolve().parents[2]
SOCK = "/var/lib/x/grpc.socks"
NAME = "overlay-custom-add-lower-snapshotter"

V2 = '''version = 2
root = "/var/lib/containerd"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
'''


def test_v2_config_gets_the_plugin_and_cri_snapshotter_and_keeps_the_rest():
    doc = tomllib.loads(configure(V2, SOCK))
    assert doc["proxy_plugins"][NAME] == {"type": "snapshot", "address": SOCK}
    cri = doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["snapshotter"] == NAME and cri["default_runtime_name"] == "runc"
    assert cri["runtimes"]["runc"]["runtime_type"] == "io.containerd.runc.v2"
    assert doc["root"] == "/var/lib/containerd"


def test_v3_config_sets_the_images_plugin():
    doc = tomllib.loads(configure("version = 3\n", SOCK))
    assert doc["plugins"]["io.containerd.cri.v1.images"]["snapshotter"] == NAME


def test_configuring_twice_changes_nothing():
    once = configure(V2, SOCK)
    assert configure(once, SOCK) == once


@pytest.mark.parametrize("text, says", [
    ("version = 2\n[broken\n", "does not parse"),
    ("version = 1\n", "version 1"),
    (f'version = 2\n[proxy_plugins.{NAME}]\n  address = "/elsewhere"\n', "already points at '/elsewhere'"),
])
def test_unsafe_edits_are_refused(text, says):
    with pytest.raises(InstallError, match=says):
        configure(text, SOCK)


def test_install_into_a_host_root(tmp_path: Path):
    host = tmp_path / "host"
    (host / "etc/containerd").mkdir(parents=True)
    (host / "etc/containerd/config.toml").write_text(V2)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "addlower-0.1.0-py3-none-any.whl").write_bytes(b"wheel")
    config = tmp_path / "config.toml"
    config.write_text('[kubernetes]\nenabled = true\n')
    unit = REPO / "deploy/systemd/overlay-custom-add-lower-snapshotter.service"
    args = ["install", "--host-root", str(host), "--unit", str(unit), "--wheels", str(wheels),
            "--config", str(config), "--no-start"]
    first = CliRunner().invoke(admin, args)
    assert first.exit_code == 0, first.output
    installed = (host / "etc/systemd/system" / unit.name).read_text()
    assert "ExecStart=/opt/addlower/venv/bin/overlay-custom-add-lower-snapshotter" in installed
    assert "Before=containerd.service" in installed and "Type=notify" in installed
    assert (host / "opt/addlower/wheels/addlower-0.1.0-py3-none-any.whl").exists()
    assert (host / "etc/overlay-custom-add-lower-snapshotter/config.toml").read_text() == config.read_text()
    assert (host / "etc/containerd/config.toml.bak-addlower").read_text() == V2
    assert NAME in tomllib.loads((host / "etc/containerd/config.toml").read_text())["proxy_plugins"]
    second = CliRunner().invoke(admin, args)
    assert second.exit_code == 0 and second.output == ""  # nothing left to change


def test_install_refuses_a_bad_daemon_config(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text('[kubernetes]\nenabled = "yes"\n')
    unit = REPO / "deploy/systemd/overlay-custom-add-lower-snapshotter.service"
    r = CliRunner().invoke(admin, ["install", "--host-root", str(tmp_path / "host"), "--unit", str(unit),
                                   "--config", str(config), "--no-start"])
    assert r.exit_code != 0 and "kubernetes.enabled: expected a bool" in r.output
    assert not (tmp_path / "host").exists()


@pytest.mark.parametrize("snippet", ["config-v2.toml", "config-v3.toml"])
def test_containerd_snippets_parse_and_name_the_plugin(snippet):
    doc = tomllib.loads((REPO / "deploy/containerd" / snippet).read_text())
    assert doc["proxy_plugins"][NAME]["type"] == "snapshot"


def test_kubernetes_manifests_are_valid_against_the_schema():
    docs = list(yaml.safe_load_all((REPO / "deploy/kubernetes/addlower.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["Namespace", "ConfigMap", "DaemonSet"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    config = docs[1]["data"]["config.toml"]
    from addlower.config import parse_config

    assert parse_config(tomllib.loads(config)).kubernetes.enabled


def test_a_manifest_error_is_caught():
    ds = list(yaml.safe_load_all((REPO / "deploy/kubernetes/addlower.yaml").read_text()))[2]
    ds["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, "1.30.0", strict=True)
