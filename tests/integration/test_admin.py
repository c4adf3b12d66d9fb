"""The admin commands as an operator uses them, against a real daemon and, with the daemon
stopped, against its store read-only.

Each test builds the same snapshots: a committed chain base <- middle <- top with files written
into their fs dirs, an active container snapshot on top with the extra-lowers label (and a name
too long for the tables), and a view of top.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from addlower.cli import admin as GROUP
from addlower.core.config import PLUGIN_NAME
from addlower.core.labels import EXTRA_LOWERS_LABEL
from addlower.core.model import Info, Kind
from addlower.ops import render
from addlower.ops.client import SnapshotsClient
from tests.support.daemon import Daemon

CONTAINER = "default/42/container-" + "0123456789abcdef" * 4  # longer than any column
CHAIN = {"base": ("", 64 * 1024), "middle": ("base", 256 * 1024), "top": ("middle", 8 * 1024)}
KINDS = {
    "base": ("committed", "-"),
    "middle": ("committed", "base"),
    "top": ("committed", "middle"),
    CONTAINER: ("active", "top"),
    "top-view": ("view", "top"),
}


@dataclass
class Setup:
    daemon: Daemon
    client: SnapshotsClient
    lowers: str  # the container's extra-lowers label

    def run(self, *args: str, code: int = 0, columns: str | None = "80") -> Result:
        """The command as on a terminal `columns` wide (None: stdout is a pipe, COLUMNS unset)."""
        env = {"COLUMNS": columns}  # CliRunner's stdout is never a terminal: COLUMNS decides
        result = CliRunner(env=env).invoke(GROUP, [*args, "--root-dir", str(self.daemon.root)])
        assert result.exit_code == code, f"exit {result.exit_code}:\n{result.output}\n{result.exception!r}"
        return result

    def json(self, *args: str) -> Any:
        """The command's --json output, parsed."""
        return json.loads(self.run(*args, "--json").stdout)

    def sizes(self) -> dict[str, int]:
        """What the daemon's Usage says, for every snapshot."""
        return {name: self.client.usage(name).size for name in KINDS}


def _upper(mounts: Sequence) -> Path:
    """The fs dir of the active snapshot these mounts belong to."""
    m = mounts[0]
    if m.type == "bind":
        return Path(m.source)
    return Path(next(o for o in m.options if o.startswith("upperdir=")).removeprefix("upperdir="))


@pytest.fixture
def setup(daemon: Daemon, client: SnapshotsClient, tmp_path: Path) -> Setup:
    for name, (parent, size) in CHAIN.items():
        key = f"{name}-prepare"
        (_upper(client.prepare(key, parent)) / f"{name}.bin").write_bytes(os.urandom(size))
        client.commit(name, key)
    lowers = f"{tmp_path}/lower-a:{tmp_path}/lower-b"
    (_upper(client.prepare(CONTAINER, "top", {EXTRA_LOWERS_LABEL: lowers})) / "log").write_bytes(b"x" * 20000)
    client.view("top-view", "top")
    return Setup(daemon, client, lowers)


def _table(stdout: str, width: int | None = 80) -> tuple[list[str], dict[str, list[str]]]:
    """A table's header cells and its rows by their first cell (cells are 2+ spaces apart); each
    line at most `width` long (None: any)."""
    lines = stdout.splitlines()
    assert width is None or all(len(line) <= width for line in lines), "\n".join(
        line for line in lines if len(line) > width
    )
    rows = [re.split(r" {2,}", line.strip()) for line in lines]
    return rows[0], {row[0]: row for row in rows[1:]}


def _row_of_container(rows: dict[str, list[str]]) -> list[str]:
    """The long name is cut in the middle: its start and end stay."""
    (name,) = [n for n in rows if n.startswith("defau")]
    assert "…" in name and name.endswith("cdef") and len(name) < len(CONTAINER)
    return rows[name]


def _match(pattern: str, text: str) -> re.Match[str]:
    """re.match, which must match."""
    match = re.match(pattern, text)
    assert match, f"{text!r} does not match {pattern!r}"
    return match


def _kib(size: int) -> str:
    return f"{size / 1024:.1f} KiB"


# --- ls ------------------------------------------------------------------------------------------


def test_ls_shows_every_snapshot_with_kind_parent_size_extra_lowers_and_age(setup: Setup):
    header, rows = _table(setup.run("ls").stdout)
    assert header == ["NAME", "KIND", "PARENT", "SIZE", "EXTRA LOWERS", "AGE"]
    assert len(rows) == len(KINDS)
    sizes = setup.sizes()
    for name, (kind, parent) in KINDS.items():
        row = _row_of_container(rows) if name == CONTAINER else rows[name]
        assert row[1:3] == [kind, parent], row
        assert row[3] == (_kib(sizes[name]) if sizes[name] else "0 B"), row
        assert re.fullmatch(r"\d+[smhd]", row[5]), row
    lowers_cell = _row_of_container(rows)[4]
    assert lowers_cell.startswith(setup.lowers[:8]) and lowers_cell.endswith("lower-b")
    assert [rows[n][4] for n in CHAIN] == ["-"] * 3
    assert sizes["middle"] >= 256 * 1024 and sizes[CONTAINER] >= 20000  # the files written count


def test_ls_fits_the_terminal_columns_says(setup: Setup):
    names = {}
    for columns in (60, 80, 120):
        _, rows = _table(setup.run("ls", columns=str(columns)).stdout, columns)
        assert len(rows) == len(KINDS)
        names[columns] = _row_of_container(rows)[0]
    assert len(names[60]) < len(names[80]) < len(names[120]) < len(CONTAINER)  # as much as fits


@pytest.mark.parametrize("how", ["--wide", "a pipe"])
def test_ls_cuts_nothing_with_wide_or_into_a_pipe(setup: Setup, how: str):
    result = setup.run("ls", "--wide") if how == "--wide" else setup.run("ls", columns=None)
    _, rows = _table(result.stdout, None)
    assert rows[CONTAINER][1:3] == ["active", "top"] and rows[CONTAINER][4] == setup.lowers
    _, rows = _table(setup.run("du", "--wide").stdout, None)
    assert CONTAINER in rows
    assert f"├── {CONTAINER} (active)" in setup.run("tree", "--wide").stdout


def test_ls_filter_is_containerd_syntax_and_repeats_as_or(setup: Setup):
    _, rows = _table(setup.run("ls", "--filter", "kind==active").stdout)
    assert [r[1] for r in rows.values()] == ["active"]
    _, rows = _table(setup.run("ls", "--filter", "kind==view", "--filter", "name==base").stdout)
    assert set(rows) == {"top-view", "base"}
    labelled = setup.json("ls", "--filter", f'labels."{EXTRA_LOWERS_LABEL}"')
    assert [s["name"] for s in labelled] == [CONTAINER]
    bad = setup.run("ls", "--filter", "name~=(", code=1)
    assert "Error:" in bad.stderr and "name~=(" in bad.stderr


def test_ls_json_is_a_list_of_complete_objects(setup: Setup):
    listed = {s["name"]: s for s in setup.json("ls")}
    assert set(listed) == set(KINDS)
    sizes = setup.sizes()
    for name, (kind, parent) in KINDS.items():
        assert (listed[name]["kind"], listed[name]["parent"] or "-") == (kind, parent)
        assert listed[name]["size"] == sizes[name]
    container = listed[CONTAINER]
    assert container["extra_lowers"] == setup.lowers
    assert container["labels"] == {EXTRA_LOWERS_LABEL: setup.lowers}
    assert container["inodes"] == setup.client.usage(CONTAINER).inodes


# --- info ----------------------------------------------------------------------------------------


def test_info_shows_fields_usage_and_labels(setup: Setup):
    lines = setup.run("info", CONTAINER).stdout.splitlines()
    matches = [_match(r"(\w+):\s*(.*)", line) for line in lines if not line.startswith(" ")]
    fields = {m[1]: m[2] for m in matches}
    usage = setup.client.usage(CONTAINER)
    assert fields["name"] == CONTAINER
    assert (fields["kind"], fields["parent"]) == ("active", "top")
    assert fields["size"] == _kib(usage.size) and fields["inodes"] == str(usage.inodes)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 \(\d+[smhd] ago\)", fields["created"])
    assert f"  {EXTRA_LOWERS_LABEL}={setup.lowers}" in lines

    shown = setup.json("info", "middle")
    stat = setup.client.stat("middle")
    assert (shown["name"], shown["kind"], shown["parent"], shown["labels"]) == ("middle", "committed", "base", {})
    assert shown["size"] == setup.client.usage("middle").size
    assert shown["created_at"].startswith(stat.created_at.ToDatetime().strftime("%Y-%m-%dT%H:%M:%S"))


def test_info_of_an_unknown_key_fails_naming_it(setup: Setup):
    result = setup.run("info", "nope", code=1)
    assert "nope" in result.stderr and "not exist" in result.stderr


def test_info_takes_the_name_containerds_clients_use_as_ctr_does(setup: Setup):
    """containerd hands us `<namespace>/<n>/<name>`; `ctr snapshots info` takes <name>."""
    name = CONTAINER.split("/", 2)[2]
    assert setup.json("info", name)["name"] == CONTAINER
    assert setup.json("info", name, "--namespace", "default")["name"] == CONTAINER
    assert "does not exist in namespace 'k8s.io'" in setup.run("info", name, "-n", "k8s.io", code=1).stderr

    setup.client.prepare(f"k8s.io/7/{name}", "top")
    ambiguous = setup.run("info", name, code=1).stderr
    assert "several namespaces (default, k8s.io)" in ambiguous and "--namespace" in ambiguous
    assert setup.json("info", name, "-n", "k8s.io")["name"] == f"k8s.io/7/{name}"
    setup.client.prepare(f"k8s.io/8/{name}", "top")  # the same name twice in one namespace: whole keys only
    twice = setup.run("info", name, "-n", "k8s.io", code=1).stderr
    assert f"k8s.io/7/{name}, k8s.io/8/{name}; give the whole key" in twice
    assert setup.json("info", f"k8s.io/8/{name}")["name"] == f"k8s.io/8/{name}"


# --- tree ----------------------------------------------------------------------------------------


def test_tree_draws_the_parent_chains(setup: Setup):
    lines = setup.run("tree").stdout.splitlines()
    assert lines[:3] == ["base", "└── middle", "    └── top"]
    assert lines[3].startswith("        ├── default/42/container-") and lines[3].endswith("cdef (active)")
    assert "…" in lines[3] and len(lines[3]) == 80
    assert lines[4:] == ["        └── top-view (view)"]

    (root,) = setup.json("tree")
    top = root["children"][0]["children"][0]
    assert (root["name"], top["name"]) == ("base", "top")
    assert [(c["name"], c["kind"], c["children"]) for c in top["children"]] == [
        (CONTAINER, "active", []),
        ("top-view", "view", []),
    ]


def test_tree_roots_are_snapshots_without_parent(setup: Setup):
    setup.client.prepare("another-root")
    lines = setup.run("tree").stdout.splitlines()
    assert [line for line in lines if not line.startswith((" ", "└", "├"))] == ["another-root (active)", "base"]


def test_a_deep_chain_still_fits_80_columns():
    infos = [
        Info(f"layer-{i:03d}-" + "f" * 64, f"layer-{i - 1:03d}-" + "f" * 64 if i else "", Kind.COMMITTED, 0, 0)
        for i in range(40)
    ]
    (root,) = render.build_forest(infos)
    lines = render.draw_tree(root, 80)
    assert len(lines) == 40 and all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert re.fullmatch(r"… +└── layer-039-f+…f+", lines[-1]), lines[-1]  # indentation cut on the left


# --- du ------------------------------------------------------------------------------------------


def test_du_total_is_the_sum_of_the_snapshots(setup: Setup):
    shown = setup.json("du")
    sizes = setup.sizes()
    assert {s["name"]: s["size"] for s in shown["snapshots"]} == sizes
    assert shown["total"]["size"] == sum(sizes.values())
    assert shown["total"]["inodes"] == sum(s["inodes"] for s in shown["snapshots"])

    header, rows = _table(setup.run("du").stdout)
    assert header == ["NAME", "KIND", "SIZE", "INODES"]
    assert next(iter(rows)) == "middle"  # largest first
    assert rows["total"] == ["total", _kib(sum(sizes.values())), str(shown["total"]["inodes"])]


# --- cleanup -------------------------------------------------------------------------------------


def test_cleanup_removes_the_directory_of_a_removed_snapshot(setup: Setup):
    snapshots = setup.daemon.root / "snapshots"
    before = set(os.listdir(snapshots))
    setup.client.remove("top-view")
    assert set(os.listdir(snapshots)) == before  # async remove: the directory stays for Cleanup
    result = setup.run("cleanup")
    (gone,) = before - set(os.listdir(snapshots))
    assert result.stdout.startswith(f"removed 1 directory from {snapshots}")
    assert gone in result.stdout or f"rm-{gone}" in result.stdout
    assert setup.json("cleanup") == {"removed": 0, "directories": []}


def test_cleanup_needs_the_daemon(setup: Setup):
    setup.daemon.stop()
    assert "cleanup needs the daemon" in setup.run("cleanup", code=1).stderr


# --- doctor --------------------------------------------------------------------------------------


def _containerd_config(tmp_path: Path, socket: Path | None) -> Path:
    """A containerd config (version 2) whose proxy plugin `addlower` is at `socket` (None: none)."""
    path = tmp_path / "containerd.toml"
    plugin = (
        (
            f'[proxy_plugins.addlower]\n  type = "snapshot"\n  address = "{socket}"\n'
            f'[proxy_plugins.addlower.exports]\n  root = "{socket.parent}"\n'
            '[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "addlower"\n'
        )
        if socket
        else ""
    )
    path.write_text(f"version = 2\n\n{plugin}")
    return path


def _doctor(setup: Setup, containerd_config: Path, code: int, *args: str) -> dict[str, str]:
    """Each check's lines (status, name, detail, hint), by the check's name. No containerd answers
    here (tests/e2e/test_doctor.py has real ones)."""
    stdout = setup.run(
        "doctor",
        "--containerd-config",
        str(containerd_config),
        "--containerd-address",
        str(containerd_config.parent / "no-containerd.sock"),
        *args,
        code=code,
    ).stdout
    blocks = re.split(r"\n(?=\S)", stdout.strip())
    return {_match(r"(?:PASS|FAIL|WARN|INFO)  (.+?): ", block)[1]: block for block in blocks}


def test_doctor_fails_with_a_hint_when_containerd_lacks_the_proxy_plugin(setup: Setup, tmp_path: Path):
    checks = _doctor(setup, _containerd_config(tmp_path, None), code=1)
    line = checks["containerd config"]
    assert line.startswith("FAIL")
    assert "fix:" in line and f"[proxy_plugins.{PLUGIN_NAME}]" in line
    assert f'address = "{setup.daemon.socket}"' in line
    assert checks["socket"].startswith("PASS")

    elsewhere = _containerd_config(tmp_path, tmp_path / "other.sock")
    assert _doctor(setup, elsewhere, code=1)["containerd config"].startswith("FAIL")


def test_doctor_fails_cri_elsewhere_only_when_pod_lookups_are_on(setup: Setup, tmp_path: Path):
    def cri(*args: str) -> str:
        return " ".join(_doctor(setup, containerd, 1, *args)["CRI snapshotter"].split())  # unwrapped

    containerd = tmp_path / "containerd.toml"
    plugin = f'version = 2\n[proxy_plugins.addlower]\n  type = "snapshot"\n  address = "{setup.daemon.socket}"\n'
    containerd.write_text(plugin)
    assert cri().startswith(
        "INFO CRI snapshotter: CRI unpacks and runs pods on 'overlayfs', and no runtime handler names addlower"
    )
    pods = tmp_path / "pods.toml"
    pods.write_text("[kubernetes]\nenabled = true\n")
    with_pods = cri("--config", str(pods))
    assert with_pods.startswith("FAIL") and "kubernetes.enabled is on, yet no pod runs here" in with_pods
    assert 'set snapshotter = "addlower" in [plugins."io.containerd.grpc.v1.cri".containerd]' in with_pods
    containerd.write_text(
        plugin + '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.rc]\n  snapshotter = "addlower"\n'
    )
    assert cri("--config", str(pods)).startswith(
        "PASS CRI snapshotter: CRI runs pods on 'overlayfs', those of runtime handler rc"
    )


def test_doctor_fails_with_a_hint_when_the_socket_is_down(setup: Setup, tmp_path: Path):
    setup.daemon.stop()
    checks = _doctor(setup, _containerd_config(tmp_path, setup.daemon.socket), code=1)
    assert checks["socket"].startswith("FAIL") and "start the daemon" in checks["socket"]
    assert [name for name, line in checks.items() if line.startswith("FAIL")] == ["socket", "containerd"]
    assert checks["containerd"].startswith("FAIL  containerd: no answer to containerd's Version API")
    assert checks["plugin loaded"].startswith("INFO  plugin loaded: not checked")


def test_doctor_fails_on_a_bad_config_file_and_checks_the_rest(setup: Setup, tmp_path: Path):
    bad = tmp_path / "config.toml"
    bad.write_text('log_level = "loud"\n')
    checks = _doctor(setup, _containerd_config(tmp_path, setup.daemon.socket), 1, "--config", str(bad))
    assert checks["config file"].startswith(f"FAIL  config file: {bad}") and "log_level" in checks["config file"]
    assert checks["socket"].startswith("PASS")  # the root and socket still come from --root-dir


# --- the same file and root as the daemon ----------------------------------------------------------


def test_config_file_gives_root_and_socket(setup: Setup, tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text(f'root_dir = "{setup.daemon.root}"\n')
    result = CliRunner().invoke(GROUP, ["ls", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert "read-only" not in result.stderr
    assert {s["name"] for s in json.loads(result.stdout)} == set(KINDS)


# --- the daemon down: the store, read-only ---------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_ls_info_tree_du_read_the_store_when_the_daemon_is_down(setup: Setup, sig: int):
    with_daemon = {
        cmd: setup.json(*cmd)
        for cmd in [("ls",), ("ls", "--filter", "kind==active"), ("info", CONTAINER), ("tree",), ("du",)]
    }
    setup.daemon.stop(sig)
    db = setup.daemon.root / "metadata.db"
    digest = _digest(db)
    for cmd, expected in with_daemon.items():
        result = setup.run(*cmd, "--json")
        assert f"daemon not reachable; reading {db} read-only" in result.stderr
        assert json.loads(result.stdout) == expected, cmd  # active sizes: walked on disk, the same
    _, rows = _table(setup.run("ls").stdout)
    assert _row_of_container(rows)[1:3] == ["active", "top"]
    assert setup.run("tree").stdout.splitlines()[:3] == ["base", "└── middle", "    └── top"]
    assert _digest(db) == digest


def test_reading_the_store_beside_a_live_daemon_does_not_block_it(setup: Setup, tmp_path: Path):
    result = CliRunner().invoke(
        GROUP, ["ls", "--json", "--root-dir", str(setup.daemon.root), "--address", str(tmp_path / "nobody.sock")]
    )
    assert result.exit_code == 0 and "read-only" in result.stderr
    assert {s["name"] for s in json.loads(result.stdout)} == set(KINDS)
    setup.client.prepare("after")  # the daemon still writes
    assert "after" in {s["name"] for s in setup.json("ls")}


def test_a_broken_config_file_does_not_stop_ls_when_the_root_is_given(setup: Setup, tmp_path: Path):
    """An operator looking at the node while the config is being edited: --root-dir says where."""
    broken = tmp_path / "broken.toml"
    broken.write_text("[lowers\n")
    listed = setup.run("ls", "--wide", "--config", str(broken))  # run() adds --root-dir
    assert CONTAINER in listed.stdout and "warning: bad configuration" in listed.stderr
    refused = CliRunner().invoke(GROUP, ["ls", "--config", str(broken)])
    assert refused.exit_code == 1 and "bad configuration" in refused.output
