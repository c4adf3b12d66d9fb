"""SIGHUP: a running daemon re-reads its config file and swaps the policy; a bad file changes
nothing, and the daemon never dies of it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest

from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.ops.client import SnapshotsClient
from tests.support.daemon import Daemon, config_args


def hup(d: Daemon, until: str) -> None:
    """Send SIGHUP and wait for the log line that says it was handled."""
    seen = d.log().count(until)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while d.log().count(until) == seen:
        assert time.monotonic() < deadline, d.log()[-2000:]
        assert d.proc.poll() is None, d.log()[-2000:]
        time.sleep(0.05)


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
            hup(d, "reloaded the config")
            c.prepare("b2", labels={LOWERS: str(team_b)})
            with pytest.raises(grpc.RpcError) as refused:
                c.prepare("a2", labels={LOWERS: str(team_a)})
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as refused:
                c.mounts("a1")  # a container's next Mounts is held to the new policy too
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            config.write_text(roots(team_a) + "[lowers.named]\nbad = \"/etc\"\n")
            hup(d, "reload refused")
            c.prepare("b3", labels={LOWERS: str(team_b)})  # the policy before the bad file
            config.write_text("[lowers\n")
            hup(d, "reload refused")
            config.unlink()
            hup(d, "reload refused")
            c.prepare("b4", labels={LOWERS: str(team_b)})

            config.write_text(f'root_dir = "{tmp_path / "elsewhere"}"\nasync_remove = false\nlog_level = "debug"\n' + roots(team_b))
            hup(d, "reloaded the config")
            c.stat("b4")
    finally:
        d.stop()
    log = d.log()
    assert "named lower 'bad' '/etc': overlaps the system dir" in log  # the refusal names the bad part
    assert 'msg="changed keys take effect only after a restart" keys=async_remove\n' in log  # root_dir: the flag decides
    assert "method=Stat key=b4" in log  # the new log level applies at once
    assert not (tmp_path / "elsewhere").exists()
