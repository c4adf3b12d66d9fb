"""Extra lower dirs through the daemon's socket, with real overlay mounts: every mount case,
copy-on-write over host dirs, Update, refused labels that leave nothing behind, the config file."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.ops.client import SnapshotsClient
from tests.integration.layers import expect_code, mount_snapshot
from tests.integration.test_observability import free_port, metric
from tests.support.daemon import Daemon

Code = grpc.StatusCode


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host cache dir with one file, as a CI node would have."""
    d = tmp_path / "host" / "m2"
    d.mkdir(parents=True)
    (d / "settings.xml").write_text("host\n")
    return d


def base_layer(client: SnapshotsClient, tmp_path: Path) -> str:
    client.prepare("base-active")
    with mount_snapshot(client.mounts("base-active"), tmp_path / "mnt-base") as m:
        (m / "image-file").write_text("image\n")
    client.commit("base", "base-active")
    return "base"


@pytest.mark.parametrize(
    "case", ["active-no-parent", "active-on-image", "view-no-parent", "view-of-one-layer", "view-of-two-layers"]
)
def test_host_files_show_in_every_mount_case(client: SnapshotsClient, tmp_path: Path, host: Path, case: str):
    labels = {LOWERS: str(host)}
    if case == "active-no-parent":
        mounts = client.prepare("c", labels=labels)
    elif case == "active-on-image":
        mounts = client.prepare("c", base_layer(client, tmp_path), labels=labels)
    elif case == "view-no-parent":
        mounts = client.view("c", labels=labels)
    elif case == "view-of-one-layer":
        mounts = client.view("c", base_layer(client, tmp_path), labels=labels)
    else:
        client.prepare("l2-active", base_layer(client, tmp_path))
        client.commit("l2", "l2-active")
        mounts = client.view("c", "l2", labels=labels)
    assert [m.type for m in mounts] == ["overlay"]
    assert client.mounts("c") == mounts
    with mount_snapshot(mounts, tmp_path / "mnt") as m:
        assert (m / "settings.xml").read_text() == "host\n"
        if case != "active-no-parent" and case != "view-no-parent":
            assert (m / "image-file").read_text() == "image\n"


def test_writes_stay_in_the_container_and_host_changes_show_through(
    client: SnapshotsClient, tmp_path: Path, host: Path
):
    client.prepare("c", labels={LOWERS: str(host)})
    with mount_snapshot(client.mounts("c"), tmp_path / "mnt") as m:
        (m / "settings.xml").write_text("container\n")
        (m / "new").write_text("mine\n")
        (host / "later").write_text("from host\n")
        assert (m / "settings.xml").read_text() == "container\n"
        assert (m / "later").read_text() == "from host\n"
    assert (host / "settings.xml").read_text() == "host\n"
    assert not (host / "new").exists()


def test_leftmost_entry_is_on_top(client: SnapshotsClient, tmp_path: Path):
    top, below = tmp_path / "top", tmp_path / "below"
    for d, text in ((top, "top\n"), (below, "below\n")):
        d.mkdir()
        (d / "f").write_text(text)
    client.prepare("c", labels={LOWERS: f"{top}::{below}"})
    with mount_snapshot(client.mounts("c"), tmp_path / "mnt") as m:
        assert (m / "f").read_text() == "top\n"


def test_update_changes_what_the_next_mounts_returns(client: SnapshotsClient, tmp_path: Path, host: Path):
    client.prepare("c")
    assert client.mounts("c")[0].type == "bind"
    client.update("c", {LOWERS: str(host)}, ["labels." + LOWERS])
    with mount_snapshot(client.mounts("c"), tmp_path / "mnt") as m:
        assert (m / "settings.xml").exists()
    client.update("c", {}, ["labels." + LOWERS])
    assert client.mounts("c")[0].type == "bind"


def assert_nothing_created(daemon: Daemon, client: SnapshotsClient) -> None:
    assert client.list() == []
    assert os.listdir(daemon.root / "snapshots") == []


@pytest.mark.parametrize(
    "value, says",
    [
        ("{tmp}/x,upperdir=/etc", "character ','"),
        ("{tmp}/a/../b", "must not contain '..'"),
        ("cache", "'cache' is not a named lower"),
        ("{root}/snapshots", "outside the allowed roots"),
    ],
)
def test_bad_label_is_refused_and_leaves_nothing_behind(
    daemon: Daemon, client: SnapshotsClient, tmp_path: Path, value: str, says: str
):
    value = value.format(tmp=tmp_path, root=daemon.root)
    for call in (client.prepare, client.view):
        err = expect_code(Code.INVALID_ARGUMENT, call, "c", labels={LOWERS: value})
        assert LOWERS in err.details() and says in err.details()
    assert_nothing_created(daemon, client)
    assert not (tmp_path / "x,upperdir=").exists() and not (tmp_path / "x").exists()
    client.prepare("ok")
    err = expect_code(Code.INVALID_ARGUMENT, client.update, "ok", {LOWERS: value}, ["labels." + LOWERS])
    assert says in err.details()
    assert LOWERS not in client.stat("ok").labels


@contextmanager
def configured(tmp_path: Path, toml: str) -> Iterator[tuple[Daemon, SnapshotsClient]]:
    """A daemon started with `--config` holding `toml`, and a client for it."""
    config = tmp_path / "config.toml"
    config.write_text(toml)
    d = Daemon(root=tmp_path / "root", args=["--config", str(config)]).start()
    try:
        with d.channel() as ch:
            yield d, SnapshotsClient(ch)
    finally:
        d.kill()


def test_symlinks_are_refused_wherever_they_point(tmp_path: Path):
    allowed = tmp_path / "allowed"
    (allowed / "fine").mkdir(parents=True)
    (allowed / "escape").symlink_to("/etc")
    (allowed / "inner").symlink_to(allowed / "fine")
    with configured(tmp_path, f'[lowers]\nallowed_roots = ["{allowed}"]\n') as (d, c):
        for link in ("escape", "inner"):
            err = expect_code(Code.INVALID_ARGUMENT, c.prepare, "c", labels={LOWERS: f"{allowed}/{link}/sub"})
            assert f"{allowed}/{link} is a symlink or not a directory" in err.details()
        err = expect_code(Code.INVALID_ARGUMENT, c.prepare, "c", labels={LOWERS: "/etc"})
        assert "outside the allowed roots" in err.details()
        c.prepare("c", labels={LOWERS: f"{allowed}/fine"})
        assert os.listdir(d.root / "snapshots") == ["1"]


def test_named_lower_from_the_config_file(tmp_path: Path, host: Path):
    toml = f'[lowers]\nallowed_roots = ["/nowhere"]\n[lowers.named]\nmaven = "{host}"\n'
    with configured(tmp_path, toml) as (d, c):
        c.prepare("c", labels={LOWERS: "maven"})
        with mount_snapshot(c.mounts("c"), tmp_path / "mnt") as m:
            assert (m / "settings.xml").read_text() == "host\n"
        assert f'named_lowers="maven={host}"' in d.log()


def run_daemon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "addlower.cli", *args], capture_output=True, text=True, timeout=20)


def test_missing_explicit_config_file_is_a_startup_error(tmp_path: Path):
    r = run_daemon("--root-dir", str(tmp_path / "root"), "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 78 and "nope.toml: No such file or directory" in r.stderr  # EX_CONFIG


def test_bad_config_key_is_a_startup_error_naming_it(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text('[lowers]\nallowed_roots = "/srv"\n')
    r = run_daemon("--root-dir", str(tmp_path / "root"), "--config", str(config))
    assert r.returncode == 78 and "lowers.allowed_roots: expected a list" in r.stderr


def test_flags_override_the_config_file(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text(f'root_dir = "{tmp_path / "from-file"}"\nasync_remove = true\n')
    d = Daemon(root=tmp_path / "from-flag", args=["--config", str(config), "--async-remove=false"]).start()
    try:
        assert "async_remove=False" in d.log() and f"root={tmp_path / 'from-flag'}" in d.log()
        assert not (tmp_path / "from-file").exists()
    finally:
        d.kill()


def test_kubernetes_lookup_waits_no_longer_than_the_timeout(tmp_path: Path):
    """containerd hangs (its socket accepts, nothing answers): Mounts fails UNAVAILABLE, in time."""
    hung = socket.socket(socket.AF_UNIX)
    hung.bind(str(tmp_path / "hung.sock"))
    hung.listen(16)
    toml = f'[kubernetes]\nenabled = true\ncontainerd_address = "{tmp_path / "hung.sock"}"\ntimeout = 1.0\n'
    try:
        with configured(tmp_path, toml) as (d, c):
            c.prepare("k8s.io/7/abc")
            c.prepare("default/7/abc")
            assert c.mounts("default/7/abc")[0].type == "bind"  # other namespaces never ask containerd
            started = time.monotonic()
            err = expect_code(Code.UNAVAILABLE, c.mounts, "k8s.io/7/abc")
            assert time.monotonic() - started < 5
            assert "looking up container abc in containerd" in err.details()
            assert c.stat("k8s.io/7/abc").name == "k8s.io/7/abc"  # the daemon still serves
    finally:
        hung.close()


def test_writes_at_a_target_count_in_usage_and_go_with_the_snapshot(tmp_path: Path, host: Path):
    toml = f'mount_targets = "on"\n[lowers]\nallowed_roots = ["{host.parent}"]\n'
    with configured(tmp_path, toml) as (d, c):
        root, m2 = c.prepare("c", labels={LOWERS: f"{host}@/root/.m2"})
        assert m2.target == "/root/.m2" and root.type == "overlay"
        upper = Path(next(o for o in m2.options if o.startswith("upperdir=")).removeprefix("upperdir="))
        assert upper.is_relative_to(d.root / "snapshots") and (d.root / "snapshots").stat().st_mode & 0o077 == 0
        before = c.usage("c").size
        (upper / "written").write_bytes(b"x" * (1 << 20))
        assert c.usage("c").size >= before + (1 << 20)
        c.remove("c")
        c.cleanup()
        assert os.listdir(d.root / "snapshots") == [] and (host / "settings.xml").exists()


# --- missing dirs: a named lower's is refused unless its table says create = true; a label path's
# is made under its allowed root, with a warning and a metric either way it is made -------------


@dataclass
class Node:
    daemon: Daemon
    client: SnapshotsClient
    caches: Path  # the named lowers' dirs, none there yet
    allowed: Path  # the allowed root for label paths
    port: int

    def metric(self, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10).read().decode()
        return metric(text, name, **labels)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    caches, allowed, port = tmp_path / "caches", tmp_path / "allowed", free_port()
    caches.mkdir()
    allowed.mkdir()
    toml = (
        f'metrics_address = "127.0.0.1:{port}"\n[lowers]\nallowed_roots = ["{allowed}"]\n[lowers.named]\n'
        f'maven = "{caches / "m2"}"\nnpm = {{ path = "{caches / "npm"}", create = true }}\n'
    )
    with configured(tmp_path, toml) as (d, c):
        yield Node(d, c, caches, allowed, port)


def test_a_missing_named_lower_is_refused_naming_it_its_dir_and_create(node: Node):
    err = expect_code(Code.INVALID_ARGUMENT, node.client.prepare, "c", labels={LOWERS: "maven"})
    m2 = node.caches / "m2"
    assert f"named lower 'maven' ({m2}): {m2} does not exist" in err.details()
    assert "create = true" in err.details() and LOWERS in err.details()
    assert not m2.exists() and node.client.list() == []
    assert node.metric("addlower_extra_lowers_refused_total", source="label") == 1
    assert node.metric("addlower_extra_lowers_created_total", entry="named") == 0
    assert "refused extra lowers" in node.daemon.log() and str(m2) in node.daemon.log()

    node.client.prepare("later")  # the same refusal when the label comes by Update and the next Mounts
    node.client.update("later", {LOWERS: "maven"}, ["labels." + LOWERS])
    assert "create = true" in expect_code(Code.INVALID_ARGUMENT, node.client.mounts, "later").details()
    m2.mkdir()
    (m2 / "settings.xml").write_text("host\n")
    with mount_snapshot(node.client.mounts("later"), node.caches.parent / "mnt") as m:  # there now: used
        assert (m / "settings.xml").read_text() == "host\n"


def test_a_named_lower_with_create_true_is_made_with_a_warning_and_counted(node: Node):
    node.client.prepare("c", labels={LOWERS: "npm"})
    npm = node.caches / "npm"
    assert npm.is_dir() and stat.S_IMODE(npm.stat().st_mode) == 0o755 and os.listdir(npm) == []
    warning = (
        f"level=warning logger=addlower.engine.pinning msg=\"label {LOWERS}: entry named lower 'npm' ({npm}) "
        "did not exist: made it, empty, for snapshot c\" key=c entry=\"named lower 'npm' (" + str(npm) + ')"'
    )
    assert warning in node.daemon.log()
    assert node.metric("addlower_extra_lowers_created_total", entry="named") == 1
    node.client.mounts("c")  # there now: nothing more to say
    assert node.daemon.log().count("did not exist") == 1
    assert node.metric("addlower_extra_lowers_created_total", entry="named") == 1


def test_a_missing_label_dir_under_an_allowed_root_is_made_0755_with_a_warning_and_counted(node: Node):
    wanted = node.allowed / "not" / "yet"
    node.client.prepare("c", labels={LOWERS: str(wanted)})
    assert wanted.is_dir() and stat.S_IMODE(wanted.stat().st_mode) == 0o755
    assert stat.S_IMODE(wanted.parent.stat().st_mode) == 0o755
    assert f"'{wanted}' did not exist: made it, empty, for snapshot c" in node.daemon.log()
    assert node.metric("addlower_extra_lowers_created_total", entry="path") == 1
    assert node.metric("addlower_extra_lowers_created_total", entry="named") == 0
