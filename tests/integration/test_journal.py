"""The daemon under systemd: log lines carry their syslog priority when stderr is the journal
(so `journalctl -p warning` shows refusals and errors), and a config file it cannot use ends it
with EX_CONFIG (78), which the unit does not restart on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc

from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.ops.client import SnapshotsClient


def daemon(tmp_path: Path, *args: str, journal: bool) -> tuple[subprocess.Popen[bytes], Path]:
    """Our daemon with stderr on a file, which JOURNAL_STREAM names (as systemd does) if `journal`."""
    log = tmp_path / "stderr"
    with open(log, "wb") as f:
        st = os.fstat(f.fileno())
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "addlower.cli", "--root-dir", str(tmp_path / "root"), *args],
            stdout=f,
            stderr=f,
            env=env,
        )
    return proc, log


def test_log_lines_carry_their_priority_for_the_journal(tmp_path: Path):
    proc, log = daemon(tmp_path, journal=True)
    try:
        socket = tmp_path / "root" / "grpc.socks"
        deadline = time.monotonic() + 30
        while "msg=serving" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        with grpc.insecure_channel(f"unix://{socket}") as ch:
            try:
                SnapshotsClient(ch).prepare("c", labels={LOWERS: "/etc"})  # refused: a warning
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        proc.terminate()
        proc.wait()
    lines = log.read_text().splitlines()
    assert all(line[:3] in ("<6>", "<4>", "<3>", "<7>") for line in lines), lines
    assert any(line.startswith("<6>") and "msg=serving" in line for line in lines)
    assert any(line.startswith("<4>") and "refused extra lowers" in line for line in lines)


def test_without_the_journal_lines_are_plain(tmp_path: Path):
    proc, log = daemon(tmp_path, "--config", str(tmp_path / "missing.toml"), journal=False)
    assert proc.wait(timeout=30) == 78  # EX_CONFIG: systemd's RestartPreventExitStatus=78
    [line] = log.read_text().splitlines()
    assert line.startswith("time=") and "level=error" in line and "bad configuration" in line


def test_a_config_error_ends_the_daemon_with_ex_config(tmp_path: Path):
    (tmp_path / "c.toml").write_text("[lowers]\nallowed_roots = ['/etc']\n")
    proc, log = daemon(tmp_path, "--config", str(tmp_path / "c.toml"), journal=True)
    assert proc.wait(timeout=30) == 78
    assert log.read_text().startswith("<3>") and "overlaps the system dir /etc" in log.read_text()
