"""lowers.max_host_mounts: the node-wide budget of host mounts that extra lowers take (a pin per
entry, a mount per container path). Past it a Prepare, View or Mounts is refused with
RESOURCE_EXHAUSTED naming the budget and the count, leaving nothing made; removing gives it back,
and a restart counts what is pinned."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import grpc
import pytest

from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.ops.client import SnapshotsClient
from tests.integration.test_observability import free_port, metric
from tests.integration.test_reload import hup
from tests.support.daemon import Daemon


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_the_budget_refuses_by_name_gives_back_on_remove_and_survives_a_restart(tmp_path: Path):
    cache = tmp_path / "cache"
    for name in ("a", "b", "c"):
        (cache / name).mkdir(parents=True)
    a, b, c = (str(cache / n) for n in "abc")
    port = free_port()
    config = tmp_path / "config.toml"

    def write(budget: int) -> None:
        config.write_text(
            f'mount_targets = "on"\nmetrics_address = "127.0.0.1:{port}"\n'
            f'[lowers]\nallowed_roots = ["{cache}"]\nmax_host_mounts = {budget}\n'
        )

    write(6)
    root = tmp_path / "root"
    d = Daemon(root=root, args=["--config", str(config)]).start()
    try:
        with d.channel() as ch:
            cl = SnapshotsClient(ch)
            cl.prepare("two-at-root", labels={LOWERS: f"{a}:{b}"})  # 2 pins
            cl.prepare("two-at-a-target", labels={LOWERS: f"{a}@/x:{b}@/x"})  # 2 pins + 1 mount at /x
            assert metric(scrape(port), "addlower_host_mounts") == 5
            assert metric(scrape(port), "addlower_host_mounts_budget") == 6

            with pytest.raises(grpc.RpcError) as refused:
                cl.prepare("one-at-a-target", labels={LOWERS: f"{c}@/y"})  # 1 pin + 1 mount: 7 > 6
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (
                "lowers.max_host_mounts: this snapshot's extra lowers need 2 host mounts (a pin per entry, a "
                "mount per target) and 5 of the node's budget of 6 are in use"
            ) in refused.value.details()
            with pytest.raises(grpc.RpcError) as refused:
                cl.view("a-view", labels={LOWERS: f"{c}@/y"})
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.RpcError) as refused:
                cl.stat("one-at-a-target")
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND  # nothing half made
            assert len(os.listdir(root / "lowers")) == 2  # the two snapshots' pins only

            cl.prepare("one-at-root", labels={LOWERS: c})  # exactly at the budget: 6
            assert len(cl.mounts("two-at-a-target")) == 2  # a snapshot's own mounts never count twice
            cl.update("one-at-root", {LOWERS: f"{c}@/y"}, ["labels." + LOWERS])
            with pytest.raises(grpc.RpcError) as refused:
                cl.mounts("one-at-root")  # now 2 mounts where it had 1
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            cl.remove("two-at-root")  # gives back 2
            assert metric(scrape(port), "addlower_host_mounts") == 4  # the refused Mounts released its pin
            assert len(cl.mounts("one-at-root")) == 2
            assert metric(scrape(port), "addlower_host_mounts") == 5
        d.stop()
        d = Daemon(root=root, args=["--config", str(config)]).start()  # counts what is pinned
        assert metric(scrape(port), "addlower_host_mounts") == 5
        with d.channel() as ch:
            cl = SnapshotsClient(ch)
            with pytest.raises(grpc.RpcError) as refused:
                cl.prepare("late", labels={LOWERS: f"{a}:{b}"})
            assert "5 of the node's budget of 6 are in use" in refused.value.details()
            write(7)  # the budget is reloaded with the policy
            hup(d, "reloaded the config")
            cl.prepare("late", labels={LOWERS: f"{a}:{b}"})  # 5 + 2 = 7
            assert metric(scrape(port), "addlower_host_mounts_budget") == 7
    finally:
        assert d.stop() == 0
    assert "Traceback" not in d.log()
