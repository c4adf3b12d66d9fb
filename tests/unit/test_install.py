"""Pointing a node's containerd at the snapshotter: config edits, the installer's files, the manifests."""

from __future__ import annotations

import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from addlower.cli import admin
from addlower.core.config import DEFAULT_ROOT, SOCKET_NAME
from addlower.ops.admin import ContainerdFile, check_containerd
from addlower.ops.install import InstallError, configure

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


ROOT = "/var/lib/x"
V16, V17, V21 = (1, 6, 20), (1, 7, 24), (2, 1, 9)
UNPACK = "io.containerd.transfer.v1.local"


def test_v2_config_gets_the_plugin_and_cri_snapshotter_and_keeps_the_rest():
    doc = tomllib.loads(configure(V2, SOCK, ROOT, V16))
    assert doc["proxy_plugins"][NAME] == {"type": "snapshot", "address": SOCK, "exports": {"root": ROOT}}
    cri = doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["snapshotter"] == NAME and cri["default_runtime_name"] == "runc"
    assert cri["runtimes"]["runc"]["runtime_type"] == "io.containerd.runc.v2"
    assert doc["root"] == "/var/lib/containerd"
    assert UNPACK not in doc["plugins"]  # 1.x unpacks without the Transfer service


def test_v3_config_on_2_1_sets_the_images_plugin_and_unpacks_into_both_snapshotters():
    doc = tomllib.loads(configure("version = 3\n", SOCK, ROOT, V21))
    assert doc["plugins"]["io.containerd.cri.v1.images"]["snapshotter"] == NAME
    assert [e["snapshotter"] for e in doc["plugins"][UNPACK]["unpack_config"]] == ["overlayfs", NAME]
    assert all(e["platform"].startswith("linux/") for e in doc["plugins"][UNPACK]["unpack_config"])


def test_existing_unpack_entries_are_kept_and_ours_added_once():
    text = f"version = 3\n[[plugins.'{UNPACK}'.unpack_config]]\n  platform = 'linux/arm64'\n  snapshotter = 'erofs'\n"
    once = configure(text, SOCK, ROOT, V21)
    entries = tomllib.loads(once)["plugins"][UNPACK]["unpack_config"]
    assert [e["snapshotter"] for e in entries] == ["erofs", NAME]
    assert configure(once, SOCK, ROOT, V21) == once


def test_a_version_2_file_on_containerd_2_keeps_a_runtimes_table_for_the_migration():
    doc = tomllib.loads(configure("version = 2\n", SOCK, ROOT, V21))
    cri = doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["snapshotter"] == NAME and cri["runtimes"]["runc"]["runtime_type"] == "io.containerd.runc.v2"


@pytest.mark.parametrize("text", [
    # spellings containerd accepts; the edit must find the tables as written and keep the comments
    "version = 2\n[plugins.'io.containerd.grpc.v1.cri'.containerd]\n  snapshotter = 'overlayfs'  # was\n",
    'version = 2\nplugins."io.containerd.grpc.v1.cri".containerd.snapshotter = "overlayfs"\n',
    'version = 2\n[ plugins . "io.containerd.grpc.v1.cri" . containerd ]\nsnapshotter = "overlayfs"\n',
    'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd] # CRI\nsnapshotter = "overlayfs"\n',
    "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\nsnapshotter = \"overlayfs\"\n",
])
def test_every_spelling_is_edited_in_place(text):
    out = configure(text, SOCK, ROOT, V17)
    doc = tomllib.loads(out)
    cri = doc["plugins"]["io.containerd.cri.v1.images"] if doc["version"] == 3 else \
        doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["snapshotter"] == NAME
    assert out.startswith(text.split("\n")[0]) and "overlayfs" not in out
    assert ("# was" in out) == ("# was" in text) and ("# CRI" in out) == ("# CRI" in text)


def test_configuring_twice_changes_nothing():
    once = configure(V2, SOCK, ROOT, V21)
    assert configure(once, SOCK, ROOT, V21) == once


@pytest.mark.parametrize("text, says", [
    ("version = 2\n[broken\n", "does not parse"),
    ("version = 1\n", "version 1"),
    (f'version = 2\n[proxy_plugins.{NAME}]\n  address = "/elsewhere"\n', "already points at '/elsewhere'"),
])
def test_unsafe_edits_are_refused(text, says):
    with pytest.raises(InstallError, match=says):
        configure(text, SOCK, ROOT, V16)


def test_doctor_wants_unpack_config_on_2_1_and_names_the_table(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text(configure("version = 3\n", SOCK, ROOT, V17))  # written for 1.7: no unpack entries
    checks = {c.name: c for c in check_containerd(ContainerdFile.read(path), Path(SOCK), Path(ROOT), V21,
                                                  pods=False)[1]}
    assert checks["unpack into it"].status == "FAIL" and "no unpack platforms defined" in checks["unpack into it"].detail
    assert f'snapshotter = "{NAME}"' in checks["unpack into it"].hint
    path.write_text(configure("version = 3\n", SOCK, ROOT, V21))
    checks = {c.name: c for c in check_containerd(ContainerdFile.read(path), Path(SOCK), Path(ROOT), V21,
                                                  pods=False)[1]}
    assert {n: c.status for n, c in checks.items()} == {
        "containerd config": "PASS", "image filesystem": "PASS", "CRI snapshotter": "PASS", "unpack into it": "PASS"}


def test_doctor_fails_a_plugin_without_exports_root(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text(f'version = 2\n[proxy_plugins.{NAME}]\n  type = "snapshot"\n  address = "{SOCK}"\n')
    checks = {c.name: c for c in check_containerd(ContainerdFile.read(path), Path(SOCK), Path(ROOT), V16,
                                                  pods=False)[1]}
    assert checks["image filesystem"].status == "FAIL" and "ImageFsInfo" in checks["image filesystem"].detail


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
            "--config", str(config), "--no-start", "--containerd-version", "1.7.24"]
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
                                   "--config", str(config), "--no-start", "--containerd-version", "1.7.24"])
    assert r.exit_code != 0 and "kubernetes.enabled: expected a bool" in r.output
    assert not (tmp_path / "host").exists()


@pytest.mark.parametrize("snippet, containerd", [("config-v2.toml", V16), ("config-v2.toml", V17),
                                                 ("config-v3.toml", V21)])
def test_containerd_snippets_say_all_the_installer_would(snippet, containerd):
    text = (REPO / "deploy/containerd" / snippet).read_text()
    socket = str(DEFAULT_ROOT / SOCKET_NAME)
    assert configure(text, socket, str(DEFAULT_ROOT), containerd) == text


def test_kubernetes_manifests_are_valid_against_the_schema():
    docs = list(yaml.safe_load_all((REPO / "deploy/kubernetes/addlower.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["Namespace", "ConfigMap", "DaemonSet"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    config = docs[1]["data"]["config.toml"]
    from addlower.core.config import parse_config

    assert parse_config(tomllib.loads(config)).kubernetes.enabled


def test_a_manifest_error_is_caught():
    ds = list(yaml.safe_load_all((REPO / "deploy/kubernetes/addlower.yaml").read_text()))[2]
    ds["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, "1.30.0", strict=True)
