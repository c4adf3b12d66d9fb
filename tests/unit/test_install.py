"""Pointing a node's containerd at the snapshotter: config edits, install and uninstall on a scratch node, the
manifests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner, Result

from addlower.cli import admin
from addlower.core.config import DEFAULT_ROOT, DIFFER_NAME, SOCKET_NAME, Config
from addlower.ops.doctor import ContainerdFile, check_containerd
from addlower.ops.install import DAEMON_CONFIG, InstallError, configure, new_config, this_installation, wheel_pythons

REPO = Path(__file__).resolve().parents[2]
SOCK = "/var/lib/x/grpc.socks"
NAME = "overlay-custom-add-lower-snapshotter"

V2 = """version = 2
root = "/var/lib/containerd"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"""


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


@pytest.mark.parametrize(
    "text",
    [
        # spellings containerd accepts; the edit must find the tables as written and keep the comments
        "version = 2\n[plugins.'io.containerd.grpc.v1.cri'.containerd]\n  snapshotter = 'overlayfs'  # was\n",
        'version = 2\nplugins."io.containerd.grpc.v1.cri".containerd.snapshotter = "overlayfs"\n',
        'version = 2\n[ plugins . "io.containerd.grpc.v1.cri" . containerd ]\nsnapshotter = "overlayfs"\n',
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd] # CRI\nsnapshotter = "overlayfs"\n',
        'version = 3\n[plugins."io.containerd.cri.v1.images"]\nsnapshotter = "overlayfs"\n',
    ],
)
def test_every_spelling_is_edited_in_place(text):
    out = configure(text, SOCK, ROOT, V17)
    doc = tomllib.loads(out)
    cri = (
        doc["plugins"]["io.containerd.cri.v1.images"]
        if doc["version"] == 3
        else doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    )
    assert cri["snapshotter"] == NAME
    assert out.startswith(text.split("\n")[0]) and "overlayfs" not in out
    assert ("# was" in out) == ("# was" in text) and ("# CRI" in out) == ("# CRI" in text)


def test_configuring_twice_changes_nothing():
    once = configure(V2, SOCK, ROOT, V21)
    assert configure(once, SOCK, ROOT, V21) == once


@pytest.mark.parametrize(
    "text, says",
    [
        ("version = 2\n[broken\n", "does not parse"),
        ("version = 1\n", "version 1"),
        (f'version = 2\n[proxy_plugins.{NAME}]\n  address = "/elsewhere"\n', "already points at '/elsewhere'"),
    ],
)
def test_unsafe_edits_are_refused(text, says):
    with pytest.raises(InstallError, match=says):
        configure(text, SOCK, ROOT, V16)


def test_doctor_wants_unpack_config_on_2_1_and_names_the_table(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text(configure("version = 3\n", SOCK, ROOT, V17))  # written for 1.7: no unpack entries
    checks = {
        c.name: c for c in check_containerd(ContainerdFile.read(path), Path(SOCK), Path(ROOT), V21, pods=False)[1]
    }
    assert (
        checks["unpack into it"].status == "FAIL" and "no unpack platforms defined" in checks["unpack into it"].detail
    )
    assert f'snapshotter = "{NAME}"' in checks["unpack into it"].hint
    path.write_text(configure("version = 3\n", SOCK, ROOT, V21))
    checks = {
        c.name: c for c in check_containerd(ContainerdFile.read(path), Path(SOCK), Path(ROOT), V21, pods=False)[1]
    }
    assert {n: c.status for n, c in checks.items()} == {
        "containerd config": "PASS",
        "image filesystem": "PASS",
        "CRI snapshotter": "PASS",
        "unpack into it": "PASS",
    }


def test_doctor_fails_a_plugin_without_exports_root(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text(f'version = 2\n[proxy_plugins.{NAME}]\n  type = "snapshot"\n  address = "{SOCK}"\n')
    checks = {
        c.name: c for c in check_containerd(ContainerdFile.read(path), Path(SOCK), Path(ROOT), V16, pods=False)[1]
    }
    assert checks["image filesystem"].status == "FAIL" and "ImageFsInfo" in checks["image filesystem"].detail


DAEMON = "/usr/local/bin/overlay-custom-add-lower-snapshotter"
UNIT = f"etc/systemd/system/{NAME}.service"
SOCKET_UNIT = f"etc/systemd/system/{NAME}.socket"
CONFIG = "etc/containerd/config.toml"
BACKUP = "etc/containerd/config.toml.bak-addlower"


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A scratch node's /: containerd's config (0600, as one holding registry credentials would
    be) and the daemon installed in /usr/local/bin."""
    host = tmp_path / "node"
    (host / "etc/containerd").mkdir(parents=True)
    (host / CONFIG).write_text(V2)
    (host / CONFIG).chmod(0o600)
    (host / "usr/local/bin").mkdir(parents=True)
    (host / DAEMON.lstrip("/")).write_text("#!/bin/sh\n")
    (host / DAEMON.lstrip("/")).chmod(0o755)
    return host


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under `root`: mode and text (symlinks by target)."""
    return {
        str(p.relative_to(root)): (p.lstat().st_mode, os.readlink(p) if p.is_symlink() else p.read_text())
        for p in sorted(root.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(admin, [str(a) for a in args])


def install(node: Path, *args: str | Path) -> Result:
    return run("install", "--host-root", node, "--containerd-version", "1.7.24", "--exec-start", DAEMON, *args)


def uninstall(node: Path, *args: str | Path) -> Result:
    return run("uninstall", "--host-root", node, "--containerd-version", "1.7.24", *args)


def test_install_writes_the_unit_the_config_and_the_backup_it_names(node: Path, tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text("[kubernetes]\nenabled = true\n")
    first = install(node, "--config", config)
    assert first.exit_code == 0, first.output
    assert first.output.splitlines()[:5] == [
        f"created {DAEMON_CONFIG}",
        f"created /{UNIT}",
        f"created /{SOCKET_UNIT}",
        f"backed up /{CONFIG} to /{BACKUP}",
        f"wrote /{CONFIG} (the original is in /{BACKUP})",
    ]
    assert "next: systemctl daemon-reload && systemctl enable" in first.output  # nothing started unasked
    assert "next: systemctl restart containerd" in first.output
    assert f"\nExecStart={DAEMON}\n" in (node / UNIT).read_text()
    assert f"\nListenStream={Config().socket_path}\n" in (node / SOCKET_UNIT).read_text()
    assert (node / BACKUP).read_text() == V2 and (node / BACKUP).stat().st_mode & 0o777 == 0o600
    assert (node / CONFIG).stat().st_mode & 0o777 == 0o600
    assert NAME in tomllib.loads((node / CONFIG).read_text())["proxy_plugins"]
    assert (node / DAEMON_CONFIG.lstrip("/")).read_text() == config.read_text()
    assert set(tree(node)) == {UNIT, SOCKET_UNIT, CONFIG, BACKUP, DAEMON.lstrip("/"), DAEMON_CONFIG.lstrip("/")}
    second = install(node, "--config", config)
    assert second.exit_code == 0 and second.output == "nothing to change\n"


def test_a_second_install_keeps_the_first_backup(node: Path):
    assert install(node).exit_code == 0
    (node / CONFIG).write_text(V2.replace("overlayfs", "native"))  # the admin changes the config
    again = install(node)
    assert again.exit_code == 0 and "backed up" not in again.output
    assert (node / BACKUP).read_text() == V2


def test_dry_run_prints_every_change_and_makes_none(node: Path, tmp_path: Path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in (
        "addlower-0.1.0-py3-none-any.whl",
        "grpcio-1.85.3-cp311-cp311-manylinux2014_x86_64.whl",
        "grpcio-1.85.3-cp313-cp313-manylinux2014_x86_64.whl",
    ):
        (wheels / name).write_bytes(b"wheel")
    before = tree(node)
    r = run(
        "install",
        "--host-root",
        node,
        "--containerd-version",
        "2.1.9",
        "--wheels",
        wheels,
        "--nsenter",
        "--start",
        "--restart-containerd",
        "--dry-run",
    )
    assert r.exit_code == 0, r.output
    assert tree(node) == before
    lines = r.output.splitlines()
    assert lines[0] == "dry run: nothing is changed"
    said = [line for line in lines if line.startswith("would ")]
    nsenter = "nsenter --target 1 --mount --uts --ipc --net --pid -- "
    assert said[0] == f"would copy 3 wheels from {wheels} to /opt/addlower/wheels"
    assert said[1].startswith(f"would run {nsenter}python3 -c ") and "3.11 3.13" in said[1]
    assert said[2:] == [
        f"would run {nsenter}python3 -m venv /opt/addlower/venv",
        f"would run {nsenter}/opt/addlower/venv/bin/pip install --quiet --disable-pip-version-check --no-index "
        "--only-binary=:all: --find-links /opt/addlower/wheels --force-reinstall addlower",
        f"would create /{UNIT}",
        f"would create /{SOCKET_UNIT}",
        f"would back up /{CONFIG} to /{BACKUP}",
        f"would write /{CONFIG} (the original is in /{BACKUP})",
        f"would run {nsenter}systemctl daemon-reload",
        f"would run {nsenter}systemctl enable {NAME}.socket {NAME}.service",
        f"would run {nsenter}systemctl stop {NAME}.service",  # the socket unit takes its path over
        f"would run {nsenter}systemctl restart {NAME}.socket",
        f"would run {nsenter}systemctl restart {NAME}.service",  # before containerd, which dials it
        f"would run {nsenter}systemctl restart containerd",
    ]
    assert "    +ExecStart=/opt/addlower/venv/bin/overlay-custom-add-lower-snapshotter" in lines
    assert '    -  snapshotter = "overlayfs"' in lines
    assert f'    +snapshotter = "{NAME}"' in lines  # 2.1 on a version 2 file: the unpack entries too
    assert "not run" not in r.output and "next:" not in r.output


@pytest.mark.parametrize(
    "args, says",
    [
        (["--start"], "add --nsenter"),
        (["--restart-containerd"], "add --nsenter"),
        (["--wheels", "{wheels}"], "add --nsenter"),
        (["--exec-start", "/usr/bin/missing"], "/usr/bin/missing is not an executable file on the node"),
        (["--exec-start", "relative/path"], "must be absolute"),
    ],
)
def test_refusals_change_nothing(node: Path, tmp_path: Path, args: list[str], says: str):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "addlower-0.1.0-py3-none-any.whl").write_bytes(b"wheel")
    before = tree(node)
    r = run(
        "install",
        "--host-root",
        node,
        "--containerd-version",
        "1.7.24",
        "--exec-start",
        DAEMON,
        *[a.format(wheels=wheels) for a in args],
    )
    assert r.exit_code == 1 and says in r.output
    assert tree(node) == before


def test_another_host_root_needs_the_daemons_path_on_that_node(node: Path):
    r = run("install", "--host-root", node, "--containerd-version", "1.7.24")
    assert r.exit_code == 1 and "give --exec-start" in r.output


def test_the_default_daemon_is_this_installations_entry_point():
    found = this_installation()
    assert Path(found).is_absolute() and Path(found).name == NAME
    out = subprocess.run([found, "--version"], capture_output=True, text=True, check=True).stdout
    assert NAME in out


def test_uninstall_restores_the_backup_and_removes_the_unit(node: Path):
    assert install(node).exit_code == 0
    wants = node / "etc/systemd/system/multi-user.target.wants" / f"{NAME}.service"
    wants.parent.mkdir(parents=True)
    wants.symlink_to(f"/{UNIT}")  # as `systemctl enable` leaves it
    r = uninstall(node)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[:5] == [
        f"wrote /{CONFIG} (restored from /{BACKUP})",
        f"removed /{BACKUP}",
        f"removed /{wants.relative_to(node)}",
        f"removed /{UNIT}",
        f"removed /{SOCKET_UNIT}",
    ]
    assert "next: systemctl restart containerd" in r.output
    assert f"next: systemctl stop {NAME}.service {NAME}.socket" in r.output
    assert (node / CONFIG).read_text() == V2 and (node / CONFIG).stat().st_mode & 0o777 == 0o600
    assert set(tree(node)) == {CONFIG, DAEMON.lstrip("/")}
    assert uninstall(node).output == "nothing to change\n"


def test_uninstall_refuses_to_undo_later_edits_unless_forced(node: Path):
    assert install(node).exit_code == 0
    edited = (node / CONFIG).read_text() + "# the admin's\n"
    (node / CONFIG).write_text(edited)
    r = uninstall(node)
    assert r.exit_code == 1 and "--force" in r.output and (node / CONFIG).read_text() == edited
    dry = uninstall(node, "--force", "--dry-run")
    assert "    -# the admin's" in dry.output.splitlines() and (node / CONFIG).read_text() == edited
    assert uninstall(node, "--force").exit_code == 0 and (node / CONFIG).read_text() == V2


def test_uninstall_without_a_backup(node: Path):
    (node / CONFIG).unlink()
    assert install(node).exit_code == 0 and not (node / BACKUP).exists()  # nothing to back up
    r = uninstall(node)
    assert r.exit_code == 0 and f"removed /{CONFIG} (addlower install created it)" in r.output
    assert not (node / CONFIG).exists()
    (node / CONFIG).write_text(configure(V2, SOCK, ROOT, V17))  # declared by hand, or by someone else
    r = uninstall(node)
    assert r.exit_code == 1 and f"no backup /{BACKUP}" in r.output and f"[proxy_plugins.{NAME}]" in r.output


def test_uninstall_with_stop_runs_only_through_nsenter_on_another_root(node: Path):
    assert install(node).exit_code == 0
    r = uninstall(node, "--stop")
    assert r.exit_code == 1 and "add --nsenter" in r.output and (node / UNIT).exists()
    dry = uninstall(node, "--stop", "--restart-containerd", "--nsenter", "--dry-run")
    said = [
        line.replace("nsenter --target 1 --mount --uts --ipc --net --pid -- ", "")
        for line in dry.output.splitlines()
        if line.startswith("would ")
    ]
    assert said == [
        f"would write /{CONFIG} (restored from /{BACKUP})",
        f"would remove /{BACKUP}",
        "would run systemctl restart containerd",  # first: containerd lets go of us
        f"would run systemctl disable --now {NAME}.service {NAME}.socket",
        f"would remove /{UNIT}",
        f"would remove /{SOCKET_UNIT}",
        "would run systemctl daemon-reload",
    ]


def test_install_refuses_a_bad_daemon_config(node: Path, tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text('[kubernetes]\nenabled = "yes"\n')
    before = tree(node)
    r = install(node, "--config", config)
    assert r.exit_code != 0 and "kubernetes.enabled: expected a bool" in r.output
    assert tree(node) == before


@pytest.mark.parametrize(
    "names, pythons",
    [
        (
            [
                "addlower-0.1.0-py3-none-any.whl",
                "click-8.5.1-py3-none-any.whl",
                "protobuf-6.33.6-cp39-abi3-manylinux2014_x86_64.whl",
            ],
            None,
        ),  # any python will do
        (
            [
                "grpcio-1.85.3-cp311-cp311-manylinux2014_x86_64.whl",
                "grpcio-1.85.3-cp312-cp312-manylinux2014_x86_64.whl",
                "google_re2-1.1.20251105-1-cp312-cp312-manylinux_2_28_x86_64.whl",
                "google_re2-1.1.20251105-1-cp311-cp311-manylinux_2_28_x86_64.whl",
                "google_re2-1.1.20251105-1-cp313-cp313-manylinux_2_28_x86_64.whl",
            ],
            ["3.11", "3.12"],
        ),  # grpcio lacks 3.13
    ],
)
def test_the_pythons_a_wheelhouse_serves(names, pythons):
    assert wheel_pythons(names) == pythons


@pytest.mark.parametrize(
    "snippet, containerd", [("config-v2.toml", V16), ("config-v2.toml", V17), ("config-v3.toml", V21)]
)
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


def test_the_daemonset_runs_on_labelled_nodes_and_rolls_when_its_config_changes():
    _, configmap, ds = yaml.safe_load_all((REPO / "deploy/kubernetes/addlower.yaml").read_text())
    pod = ds["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"addlower.io/enabled": "true"}
    digest = hashlib.sha256(configmap["data"]["config.toml"].encode()).hexdigest()
    assert pod["metadata"]["annotations"]["addlower.io/config-sha256"] == digest, (
        f"config.toml changed: set addlower.io/config-sha256 to {digest}"
    )
    args = pod["spec"]["initContainers"][0]["args"]
    assert args[:4] == ["install", "--host-root", "/host", "--nsenter"] and pod["spec"]["hostPID"] is True
    assert {"--start", "--restart-containerd"} <= set(args)


def test_setup_refuses_a_python_the_readme_commands_would_not_run(tmp_path: Path):
    other = tmp_path / "python3"
    other.write_text("#!/bin/sh\necho /opt/other/bin/python3\n")  # answers as another interpreter would
    other.chmod(0o755)
    for python, says in ((other, "/opt/other/bin/python3, but python3 on PATH is"), (tmp_path / "none", "cannot run")):
        r = subprocess.run(
            ["bash", str(REPO / "scripts/setup.sh")],
            env={**os.environ, "PYTHON": str(python)},
            capture_output=True,
            text=True,
        )
        assert r.returncode == 1 and says in r.stderr and "installing" not in r.stdout


@pytest.mark.parametrize("containerd", [V17, V21])
def test_the_differ_goes_first_on_17_and_later_unless_declined(containerd):
    socket, root = "/s/grpc.socks", "/s"
    text = configure(new_config(containerd), socket, root, containerd)
    doc = tomllib.loads(text)
    assert doc["proxy_plugins"][DIFFER_NAME] == {"type": "diff", "address": socket}
    assert doc["plugins"]["io.containerd.service.v1.diff-service"]["default"] == [DIFFER_NAME, "walking"]
    assert configure(text, socket, root, containerd) == text  # a second run changes nothing
    declined = tomllib.loads(configure(new_config(containerd), socket, root, containerd, differ=False))
    assert DIFFER_NAME not in declined["proxy_plugins"] and "io.containerd.service.v1.diff-service" not in declined.get(
        "plugins", {}
    )
    kept = 'version = 2\n[plugins."io.containerd.service.v1.diff-service"]\ndefault = ["walking", "mine"]\n'
    if containerd[0] < 2:  # an admin's own order is kept, after ours
        assert tomllib.loads(configure(kept, socket, root, containerd))["plugins"][
            "io.containerd.service.v1.diff-service"
        ]["default"] == [DIFFER_NAME, "walking", "mine"]


def test_containerd_16_gets_no_differ():
    assert "diff" not in configure(new_config(V16), "/s/grpc.socks", "/s", V16)


def test_doctor_names_systemctl_where_the_unit_is_installed(tmp_path: Path):
    from addlower.ops.doctor import restart_hint

    unit = tmp_path / f"{NAME}.service"
    assert (
        restart_hint("x --root-dir /r", start=True, unit=unit)
        == "start the daemon: x --root-dir /r (its log is on its stderr)"
    )
    unit.write_text("[Service]\n")
    assert restart_hint(start=True, unit=unit) == (
        f"systemctl start {NAME}.service, and see why it stopped: journalctl -u {NAME}.service -n 50"
    )
    assert restart_hint(unit=unit).startswith(f"systemctl restart {NAME}.service")


def test_uninstall_refuses_while_containers_and_images_use_the_snapshotter(node: Path):
    from addlower.core.model import Kind, Usage
    from addlower.engine import wire
    from addlower.engine.store import MetaStore

    assert install(node).exit_code == 0
    root = node / str(Config().root_dir).lstrip("/")
    root.mkdir(parents=True)
    store = MetaStore(root / "metadata.db", wire.encode_field)
    with store.transaction() as tx:
        tx.create(Kind.ACTIVE, "default/1/layer", "", {})
    with store.transaction() as tx:
        tx.commit_active("default/1/layer", "default/2/sha256:abc", Usage(0, 1), {})
    with store.transaction() as tx:
        tx.create(Kind.ACTIVE, "default/3/app", "default/2/sha256:abc", {})
    store.close()
    refused = uninstall(node)
    assert refused.exit_code == 1 and (node / UNIT).exists()
    assert "1 containers (active snapshots), 1 image layers still live on the snapshotter" in refused.output
    assert "crictl rmp -a" in refused.output and "--force" in refused.output
    dry = uninstall(node, "--force", "--stop", "--nsenter", "--dry-run")
    assert f"would unmount every mount under {Config().root_dir}/lowers" in dry.output  # no pin stays mounted
    forced = uninstall(node, "--force")
    assert forced.exit_code == 0 and not (node / UNIT).exists()
    assert "left behind: 1 containers (active snapshots), 1 image layers" in forced.output


def test_a_runtime_handler_routes_only_its_pods_and_leaves_crIs_default_alone(node: Path):
    r = install(node, "--runtime-handler", "addlower", "--dry-run")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert '    +[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.addlower]' in lines
    assert '    +runtime_type = "io.containerd.runc.v2"' in lines and f'    +snapshotter = "{NAME}"' in lines
    assert '    -  snapshotter = "overlayfs"' not in lines  # CRI's default stays: other pods do not move
    assert install(node, "--runtime-handler", "addlower").exit_code == 0
    written = tomllib.loads((node / CONFIG).read_text())
    cri = written["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["snapshotter"] == "overlayfs" and cri["runtimes"]["addlower"]["snapshotter"] == NAME
    r = uninstall(node)
    assert r.exit_code == 0 and (node / CONFIG).read_text() == V2, r.output  # recognised as install's: restored


def test_the_cri_default_is_switched_unless_asked_not_to(node: Path):
    both = install(node, "--runtime-handler", "addlower", "--cri-default", "--dry-run").output.splitlines()
    assert (
        '    -  snapshotter = "overlayfs"' in both
        and '    +[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.addlower]' in both
    )
    neither = install(node, "--no-cri-default", "--dry-run").output.splitlines()
    assert '    -  snapshotter = "overlayfs"' not in neither
    assert not any(line.startswith("    +") and "runtimes." in line for line in neither)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--runtime-handler", "Bad_Name"), "runtime handler 'Bad_Name': a DNS label"),
        (("--runtime-handler", "addlower", "--containerd-version", "1.6.20"), "needs containerd >= 1.7"),
    ],
)
def test_a_runtime_handler_is_refused_where_it_cannot_work(node: Path, args: tuple[str, ...], says: str):
    r = run("install", "--host-root", node, "--exec-start", DAEMON, "--containerd-version", "1.7.24", *args)
    assert r.exit_code == 1 and says in r.output and not (node / UNIT).exists()
