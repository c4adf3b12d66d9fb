"""SIGHUP: a running daemon re-reads its config file and swaps the policy; a bad file changes
nothing, and the daemon never dies of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.ops.client import SnapshotsClient
from tests.support.daemon import Daemon, config_args


def roots(*dirs: Path) -> str:
    return "[lowers]\nallowed_roots = [" + ", ".join(f'"{d}"' for d in dirs) + "]\n"


def test_sighup_swaps_the_policy_and_a_bad_file_keeps_the_running_one(tmp_path: Path):
    team_a, team_b = tmp_path / "team-a", tmp_path / "team-b"
    team_a.mkdir()
    team_b.mkdir()
    config = tmp_path / "config.toml"
    d = Daemon(root=tmp_path / "root", args=config_args(config, roots(team_a))).start()
    try:
        with d.channel() as ch:
            c = SnapshotsClient(ch)
            c.prepare("a1", labels={LOWERS: str(team_a)})
            with pytest.raises(grpc.RpcError) as refused:
                c.prepare("b1", labels={LOWERS: str(team_b)})
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            config.write_text(roots(team_b))
            d.hup("reloaded the config")
            c.prepare("b2", labels={LOWERS: str(team_b)})
            with pytest.raises(grpc.RpcError) as refused:
                c.prepare("a2", labels={LOWERS: str(team_a)})
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as refused:
                c.mounts("a1")  # a container's next Mounts is held to the new policy too
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            config.write_text(roots(team_a) + '[lowers.named]\nbad = "/etc"\n')
            d.hup("reload refused")
            c.prepare("b3", labels={LOWERS: str(team_b)})  # the policy before the bad file
            config.write_text("[lowers\n")
            d.hup("reload refused")
            config.unlink()
            d.hup("reload refused")
            c.prepare("b4", labels={LOWERS: str(team_b)})

            config.write_text(
                f'root_dir = "{tmp_path / "elsewhere"}"\nasync_remove = false\nlog_level = "debug"\n' + roots(team_b)
            )
            d.hup("reloaded the config")
            c.stat("b4")
    finally:
        d.stop()
    log = d.log()
    assert "named lower 'bad' '/etc': overlaps the system dir" in log  # the refusal names the bad part
    assert (
        'msg="changed keys take effect only after a restart" keys=async_remove\n' in log
    )  # root_dir: the flag decides
    assert "method=Stat key=b4" in log  # the new log level applies at once
    assert not (tmp_path / "elsewhere").exists()


def reload_command(config: Path, d: Daemon) -> subprocess.CompletedProcess:
    """What the unit's ExecReload runs: the daemon command with --reload, told $MAINPID."""
    assert d.proc is not None
    return subprocess.run(
        [sys.executable, "-m", "addlower.cli", "--config", str(config), "--reload"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MAINPID": str(d.proc.pid)},
    )


def named(root: Path, cache: Path) -> str:
    """A config that names `cache` maven (and the daemon's root: an emptied file forgets it)."""
    return f'root_dir = "{root}"\n[lowers]\nallowed_roots = ["{cache.parent}"]\n[lowers.named]\nmaven = "{cache}"\n'


def test_a_reload_never_applies_an_empty_or_cut_short_file_and_says_so(tmp_path: Path):
    cache = tmp_path / "cache" / "m2"
    cache.mkdir(parents=True)
    config, root = tmp_path / "config.toml", tmp_path / "root"
    full = named(root, cache)
    d = Daemon(root=root, args=config_args(config, full)).start()
    try:
        with d.channel() as ch:
            c = SnapshotsClient(ch)
            for n, bad in enumerate(["", "\n  \n", "# the node's snapshotter\n"]):
                config.write_text(bad)
                r = reload_command(config, d)
                assert r.returncode == 1, r
                assert "reload refused, the running config stays" in r.stderr
                assert "no settings at all (an empty file, or one cut short?)" in r.stderr
                c.prepare(f"still-{n}", labels={LOWERS: "maven"})  # the named lower is still there

            # An editor writing the file in place: the first half alone is a valid config without the
            # named lower. A reload meanwhile waits for the file to be at rest and applies all of it.
            cut = full.index("[lowers.named]")
            with open(config, "w") as f:
                f.write(full[:cut])
                f.flush()
                d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
                time.sleep(0.1)
                f.write(full[cut:])
            hup_seen = time.monotonic() + 10
            while d.log().count("reloaded the config") < 1:
                assert time.monotonic() < hup_seen, d.log()[-2000:]
                time.sleep(0.05)
            c.prepare("after-the-editor", labels={LOWERS: "maven"})

            config.write_text(full + '[lowers.named.bad]\npath = "/etc"\n')
            r = reload_command(config, d)
            assert r.returncode == 1 and "overlaps the system dir /etc" in r.stderr
            config.write_text(full.replace("[lowers.named]\n", "max_host_mounts = 7\n[lowers.named]\n"))
            r = reload_command(config, d)
            assert r.returncode == 0, r
            assert "reloaded the config: " in r.stdout and "max_host_mounts=7" in r.stdout
        assert d.stop() == 0
        config.write_text(full)
        r = reload_command(config, d)  # nobody serves: say so, and fail
        assert r.returncode == 1 and "no daemon answers on" in r.stderr
    finally:
        d.stop()
    assert "Traceback" not in d.log()


def test_a_storm_of_rewrites_of_the_same_policy_refuses_no_container(tmp_path: Path):
    """A config rewritten in place over and over (a config management loop, a ConfigMap synced by
    hand) while reloads come in: every reload applies the whole file or nothing."""
    cache = tmp_path / "cache" / "m2"
    cache.mkdir(parents=True)
    config, root = tmp_path / "config.toml", tmp_path / "root"
    full = named(root, cache)
    cut = full.index("[lowers.named]")
    d = Daemon(root=root, args=config_args(config, full)).start()
    stop = threading.Event()

    def rewrite() -> None:
        while not stop.is_set():
            with open(config, "w") as f:  # truncated: empty for a moment, then half, then whole
                time.sleep(0.002)
                f.write(full[:cut])
                f.flush()
                time.sleep(0.005)
                f.write(full[cut:])
            time.sleep(0.01)

    def hups() -> None:
        while not stop.is_set():
            d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            time.sleep(0.013)

    threads = [threading.Thread(target=rewrite), threading.Thread(target=hups)]
    prepared = refused = 0
    try:
        try:
            for t in threads:
                t.start()
            with d.channel() as ch:
                c = SnapshotsClient(ch)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    try:
                        c.prepare(f"job-{prepared + refused}", labels={LOWERS: "maven"})
                        prepared += 1
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                        refused += 1
        finally:
            stop.set()
            for t in threads:
                t.join()
        r = reload_command(config, d)  # at rest again: applied
        assert r.returncode == 0, r
    finally:
        stop.set()
        d.stop()
    print(
        f"storm: {prepared} prepared, {refused} refused, {d.log().count('reload refused')} reloads refused, "
        f"{d.log().count('reloaded the config')} applied"
    )
    assert refused == 0 and prepared > 100
    assert "Traceback" not in d.log()
