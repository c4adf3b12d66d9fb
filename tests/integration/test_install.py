"""What `addlower install` puts on a node, checked with the node's own tools: the unit as systemd
reads it (verify, security, enable), the daemon within the privileges the unit leaves it, and the
wheelhouse on each Python a node may have."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from addlower.cli import admin
from addlower.core.config import Config
from addlower.core.labels import EXTRA_LOWERS_LABEL
from addlower.ops.client import SnapshotsClient
from addlower.ops.install import SOCKET_UNIT, UNIT_NAME, render_unit, this_installation, venv_commands, wheel_pythons
from tests.integration.layers import mount_snapshot
from tests.support.daemon import Daemon, allowing

REPO = Path(__file__).resolve().parents[2]
DAEMON = "/usr/local/bin/overlay-custom-add-lower-snapshotter"
# Settings that would give the daemon a mount namespace of its own, where containerd would not see
# its pinned lowers.
OWN_MOUNT_NAMESPACE = [
    "PrivateMounts=",
    "PrivateTmp=",
    "PrivateDevices=",
    "ProtectSystem=",
    "ProtectHome=",
    "ProtectKernelTunables=",
    "ProtectKernelModules=",
    "ProtectKernelLogs=",
    "ProtectControlGroups=",
    "ProtectProc=",
    "ProcSubset=",
    "PrivateNetwork=",
]


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A scratch node with systemd's own units, containerd's config, the daemon in /usr/local/bin
    (ExecStart's and ExecReload's), and the unit installed by `addlower install`."""
    host = tmp_path / "node"
    shutil.copytree("/usr/lib/systemd/system", host / "usr/lib/systemd/system", symlinks=True)
    (host / "etc/containerd").mkdir(parents=True)
    (host / "etc/containerd/config.toml").write_text("version = 2\n")
    (host / DAEMON.lstrip("/")).parent.mkdir(parents=True)
    shutil.copy2(this_installation(), host / DAEMON.lstrip("/"))
    r = CliRunner().invoke(
        admin, ["install", "--host-root", str(host), "--exec-start", DAEMON, "--containerd-version", "1.7.24"]
    )
    assert r.exit_code == 0, r.output
    return host


def analyze(node: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args, f"--root={node}", UNIT_NAME], capture_output=True, text=True)


def test_systemd_accepts_the_installed_unit(node: Path):
    verify = analyze(node, "verify")
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")


def test_the_installed_unit_is_hardened_without_a_mount_namespace(node: Path):
    text = analyze(node, "security", "--offline=true")
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", text.stdout)
    assert exposure, text.stdout
    score = float(exposure.group(1))
    assert score <= 4.5, text.stdout  # 9.6 UNSAFE before
    report = json.loads(analyze(node, "security", "--offline=true", "--json=short").stdout)
    checks = {c["name"]: c["set"] for c in report}
    assert {name: checks[name] for name in OWN_MOUNT_NAMESPACE} == {name: False for name in OWN_MOUNT_NAMESPACE}
    assert checks["NoNewPrivileges="] and checks["MemoryDenyWriteExecute="] and checks["RestrictNamespaces=~mnt"]
    assert checks["CapabilityBoundingSet=~CAP_SYS_MODULE"] and checks["RestrictAddressFamilies=~AF_NETLINK"]


def test_enabling_it_never_ties_containerd_to_it(node: Path):
    subprocess.run(["systemctl", f"--root={node}", "enable", UNIT_NAME], check=True, capture_output=True)
    system = node / "etc/systemd/system"
    assert (system / "multi-user.target.wants" / UNIT_NAME).is_symlink()
    assert (system / "sockets.target.wants" / SOCKET_UNIT).is_symlink()  # Also=: the socket comes along
    assert sorted(p.name for p in system.iterdir()) == [  # no containerd.*
        "multi-user.target.wants",
        UNIT_NAME,
        SOCKET_UNIT,
        "sockets.target.wants",
    ]
    unit = (system / UNIT_NAME).read_text()
    assert "\nBefore=containerd.service\n" in unit and "\nWantedBy=multi-user.target\n" in unit
    assert f"\nRequires={SOCKET_UNIT}\n" in unit and "\nRestartPreventExitStatus=78\n" in unit  # EX_CONFIG
    socket_unit = (system / SOCKET_UNIT).read_text()
    assert f"\nListenStream={Config().socket_path}\n" in socket_unit  # the socket containerd's config names
    r = CliRunner().invoke(admin, ["uninstall", "--host-root", str(node), "--containerd-version", "1.7.24"])
    assert r.exit_code == 0, r.output
    assert not (system / UNIT_NAME).exists() and not (system / "multi-user.target.wants" / UNIT_NAME).is_symlink()
    assert not (system / SOCKET_UNIT).exists() and not (system / "sockets.target.wants" / SOCKET_UNIT).is_symlink()


# linux/capability.h, for the capabilities the unit keeps
CAPABILITIES = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_SYS_ADMIN": 21}


def directive(unit: str, name: str) -> str:
    match = re.search(rf"^{name}=(.*)$", unit, re.M)
    assert match, f"no {name}= in the unit"
    return match.group(1)


def sandboxed() -> list[str]:
    """Our daemon's command line with what the unit's directives that a process can take for
    itself do: its capability bounding set, NoNewPrivileges, UMask, and MemoryDenyWriteExecute
    through the kernel's own PR_SET_MDWE (systemd's seccomp filter refuses the same mappings)."""
    unit = render_unit(DAEMON)
    assert directive(unit, "NoNewPrivileges") == "yes" and directive(unit, "MemoryDenyWriteExecute") == "yes"
    caps = ",".join("+" + c.removeprefix("CAP_").lower() for c in directive(unit, "CapabilityBoundingSet").split())
    umask = int(directive(unit, "UMask"), 8)
    mdwe = (
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.prctl(65, 1, 0, 0, 0):\n"  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        "    raise OSError(ctypes.get_errno(), 'PR_SET_MDWE')\n"
        f"os.umask({umask})\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'addlower.cli', *sys.argv[1:]])\n"
    )
    return ["setpriv", "--no-new-privs", f"--bounding-set=-all,{caps}", "--", sys.executable, "-c", mdwe]


def test_the_daemon_works_within_the_units_privileges(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    where = tmp_path_factory.mktemp("sandboxed")
    daemon = Daemon(root=where / "root", args=allowing(where / "config.toml", tmp_path), command=sandboxed()).start()
    try:
        assert daemon.proc is not None
        lines = Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines()
        status = {key: value for key, value in (line.split(":\t", 1) for line in lines)}
        granted = sum(1 << CAPABILITIES[c] for c in directive(render_unit(DAEMON), "CapabilityBoundingSet").split())
        assert (status["NoNewPrivs"], int(status["CapEff"], 16)) == ("1", granted)
        host = tmp_path / "cache"  # a lower only its owner may enter
        host.mkdir(mode=0o700)
        (host / "settings.xml").write_text("host\n")
        os.chown(host, 1000, 1000)
        with daemon.channel() as channel:
            client = SnapshotsClient(channel)
            client.prepare("base-active")
            with mount_snapshot(client.mounts("base-active"), tmp_path / "mnt-base") as m:
                # an image's tree: a user's private home with a sticky dir holding another user's file
                (m / "home/shared").mkdir(parents=True)
                (m / "home/shared/theirs").write_text("x")
                (m / "bin").mkdir()
                (m / "bin/su").write_text("setuid")
                os.chmod(m / "bin/su", 0o4755)
                os.chown(m / "home/shared/theirs", 1001, 1001)
                os.chmod(m / "home/shared", 0o1777)
                os.chown(m / "home/shared", 1000, 1000)
                os.chmod(m / "home", 0o700)
                os.chown(m / "home", 1000, 1000)
            client.commit("base", "base-active")
            mounts = client.prepare("c1", "base", labels={EXTRA_LOWERS_LABEL: str(host)})  # pinned: a bind mount
            with mount_snapshot(mounts, tmp_path / "mnt") as m:
                assert (m / "settings.xml").read_text() == "host\n" and (m / "bin/su").stat().st_mode & 0o4000
                (m / "written").write_text("in the container\n")
            assert client.usage("c1").size > 0
            client.remove("c1")
            client.remove("base")
            client.cleanup()
        assert list((where / "root/snapshots").iterdir()) == []  # the trees went, other users' files included
        assert daemon.proc.poll() is None and "Traceback" not in daemon.log() and "level=ERROR" not in daemon.log()
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the installer image carries: deploy/wheelhouse.sh's wheels (from the package index)."""
    dest = tmp_path_factory.mktemp("wheels")
    subprocess.run([str(REPO / "deploy/wheelhouse.sh"), str(dest)], check=True, capture_output=True)
    return dest


@pytest.mark.parametrize("python", ["3.11", "3.12", "3.13"])
def test_the_wheelhouse_serves_each_python_a_node_may_have(wheelhouse: Path, tmp_path: Path, python: str):
    """pip resolves addlower and every dependency from the wheels alone for that CPython, as the
    node's pip will (binary wheels only: a node has no compiler)."""
    report = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--dry-run",
            "--ignore-installed",
            "--no-index",
            "--only-binary=:all:",
            "--find-links",
            str(wheelhouse),
            "--python-version",
            python,
            "--target",
            str(tmp_path / "t"),
            "--report",
            str(report),
            "addlower",
        ],
        check=True,
        capture_output=True,
    )
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert {"addlower", "grpcio", "protobuf", "google-re2", "click", "tomlkit"} <= names
    pythons = wheel_pythons([p.name for p in wheelhouse.iterdir()])
    assert pythons is not None and python in pythons


def test_the_venv_the_installer_builds_runs_the_daemon(wheelhouse: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    names = [p.name for p in wheelhouse.iterdir()]
    for command in venv_commands(sys.executable, str(venv), str(wheelhouse), wheel_pythons(names)):
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": ""})
    out = subprocess.run(
        [str(venv / "bin/overlay-custom-add-lower-snapshotter"), "--version"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    ).stdout
    assert "overlay-custom-add-lower-snapshotter" in out
    unit = venv / f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages/addlower/ops" / UNIT_NAME
    assert "@EXEC_START@" in unit.read_text()  # the template came with the wheel


def test_the_wheel_says_its_license_and_pythons(wheelhouse: Path):
    wheel = next(wheelhouse.glob("addlower-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        licence = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/licenses/LICENSE"))).decode()
    assert "License-Expression: Apache-2.0" in metadata and "Apache License" in licence
    assert {f"Programming Language :: Python :: 3.{v}" for v in (11, 12, 13)} <= set(
        line.removeprefix("Classifier: ") for line in metadata.splitlines()
    )
