"""What an operator watches: the Prometheus endpoint after a workload, and the logs' formats."""

from __future__ import annotations

import platform
import re
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest

from addlower import __version__
from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.ops.client import SnapshotsClient
from tests.support.daemon import Daemon, allowing
from tests.support.logfmt import parse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # the exposition sorts labels
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def test_metrics_move_with_a_workload(tmp_path: Path):
    port = free_port()
    args = allowing(tmp_path / "config.toml", tmp_path / "cache")
    d = Daemon(root=tmp_path / "root", args=[*args, "--metrics-address", f"127.0.0.1:{port}"]).start()
    try:
        with d.channel() as ch:
            c = SnapshotsClient(ch)
            c.prepare("a")
            c.commit("base", "a")
            c.prepare("b", "base", labels={LOWERS: str(tmp_path / "cache")})
            c.view("v", "base")
            for _ in range(3):
                with pytest.raises(grpc.RpcError):
                    c.stat("missing")
            with pytest.raises(grpc.RpcError):
                c.prepare("bad", labels={LOWERS: "/x,upperdir=/etc"})
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        d.kill()
    assert metric(text, "addlower_rpc_duration_seconds_count", method="Prepare") == 3
    assert metric(text, "addlower_rpc_duration_seconds_count", method="Commit") == 1
    assert metric(text, "addlower_rpc_handled_total", method="Stat", code="NOT_FOUND") == 3
    assert metric(text, "addlower_rpc_handled_total", method="Prepare", code="INVALID_ARGUMENT") == 1
    assert metric(text, "addlower_rpc_handled_total", method="Prepare", code="OK") == 2
    errors = re.findall(r"^addlower_rpc_errors_total\{(.*)\} (\S+)$", text, re.M)
    assert errors and all(float(n) == 0 for _, n in errors)  # a missing snapshot or a refusal is an answer
    assert 'addlower_rpc_errors_total{code="UNAVAILABLE",method="Mounts"} 0.0' in text  # there before the first
    assert metric(text, "addlower_committed_bytes", unit="inodes") >= 1  # base's root dir, counted at its Commit
    assert metric(text, "addlower_build_info", python=platform.python_version(), version=__version__) == 1
    assert metric(text, "addlower_extra_lower_containers", lower=str(tmp_path / "cache")) == 1
    assert metric(text, "addlower_snapshots", kind="active") == 1
    assert metric(text, "addlower_snapshots", kind="committed") == 1
    assert metric(text, "addlower_snapshots", kind="view") == 1
    assert metric(text, "addlower_extra_lowers_resolved_total", source="label") == 1
    assert metric(text, "addlower_extra_lowers_refused_total", source="label") == 1
    assert 'addlower_extra_lowers_refused_total{source="annotation"} 0.0' in text  # there before the first
    assert metric(text, "addlower_metadata_bytes") > 0


def test_metrics_are_off_by_default(daemon: Daemon):
    assert "metrics=off" in daemon.log()


def test_bad_metrics_address_is_refused(tmp_path: Path):
    d = Daemon(root=tmp_path / "root", args=["--metrics-address", "nonsense"])
    with pytest.raises(RuntimeError, match="metrics_address: host:port"):
        d.start()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_log_line_is_one_record_with_fields(tmp_path: Path, fmt: str):
    d = Daemon(root=tmp_path / "root", args=["--log-format", fmt, "--log-level", "debug"]).start()
    try:
        with d.channel() as ch:
            SnapshotsClient(ch).prepare("k1")
            with pytest.raises(grpc.RpcError):
                SnapshotsClient(ch).prepare("k 2", labels={LOWERS: "relative"})
    finally:
        d.stop()
    entries = parse(d.log(), fmt)
    serving = next(e for e in entries if e["msg"] == "serving")
    assert serving["root"] == str(tmp_path / "root") and serving["metrics"] == "off"
    calls = {(e["method"], e["key"]): e for e in entries if e["msg"] == "rpc"}
    assert calls["Prepare", "k1"]["code"] == "OK" and float(calls["Prepare", "k1"]["duration_s"]) > 0
    assert calls["Prepare", "k 2"]["code"] == "INVALID_ARGUMENT"
    refused = next(e for e in entries if e["level"] == "warning")
    assert refused["msg"].startswith("refused extra lowers") and "'relative'" in refused["msg"]
    assert refused["key"] == "k 2" and refused["source"] == "label"


def test_every_caches_series_is_there_at_zero_from_the_start(tmp_path: Path):
    port = free_port()
    toml = 'mount_targets = "on"\n[lowers.named.m2]\ncache = true\ntarget = "/root/.m2"\npromote = "always"\n'
    (tmp_path / "c.toml").write_text(toml)
    args = ["--config", str(tmp_path / "c.toml"), "--metrics-address", f"127.0.0.1:{port}"]
    d = Daemon(root=tmp_path / "root", args=args).start()
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        d.kill()
    for result in ("promoted", "empty", "refused", "failed", "unseen", "denied"):
        assert f'addlower_cache_promotions_total{{cache="m2",result="{result}"}} 0.0' in text
    assert 'addlower_cache_squashes_total{cache="m2",result="failed"} 0.0' in text
