"""lowers.max_host_mounts: the node-wide budget of host mounts that extra lowers take (a pin per
host dir in use, shared by every snapshot using it, and a mount per container path). Past it a
Prepare, View or Mounts is refused with RESOURCE_EXHAUSTED naming the budget and the count,
leaving nothing made; removing gives it back, and a restart counts what is pinned."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import grpc
import pytest

from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.ops.client import SnapshotsClient
from tests.integration.test_observability import free_port, metric
from tests.support.daemon import Daemon


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_the_budget_counts_shared_pins_once_refuses_by_name_gives_back_on_remove_and_survives_a_restart(
    tmp_path: Path,
):
    cache = tmp_path / "cache"
    for name in "abcd":
        (cache / name).mkdir(parents=True)
    a, b, c, d_ = (str(cache / n) for n in "abcd")
    port = free_port()
    config = tmp_path / "config.toml"
    root = tmp_path / "root"
    pins = root / "lowers" / "pins"

    def write(budget: int) -> None:
        config.write_text(
            f'mount_targets = "on"\nmetrics_address = "127.0.0.1:{port}"\n'
            f'[lowers]\nallowed_roots = ["{cache}"]\nmax_host_mounts = {budget}\n'
        )

    def used() -> float:
        return metric(scrape(port), "addlower_host_mounts")

    def refusal(call, *args, **kwargs) -> str:
        with pytest.raises(grpc.RpcError) as refused:
            call(*args, **kwargs)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return refused.value.details() or ""

    write(4)
    d = Daemon(root=root, args=["--config", str(config)]).start()
    try:
        with d.channel() as ch:
            cl = SnapshotsClient(ch)
            cl.prepare("two-at-root", labels={LOWERS: f"{a}:{b}"})  # 2 pins
            cl.prepare("two-at-a-target", labels={LOWERS: f"{a}@/x:{b}@/x"})  # the same 2 pins + 1 mount at /x
            assert used() == 3 and len(os.listdir(pins)) == 2
            assert metric(scrape(port), "addlower_host_mounts_budget") == 4

            said = refusal(cl.prepare, "one-at-a-target", labels={LOWERS: f"{c}@/y"})  # 1 pin + 1 mount: 5 > 4
            assert (
                "lowers.max_host_mounts: this snapshot's extra lowers need 2 more host mounts (a pin per host dir "
                "not pinned yet, a mount per target) and 3 of the node's budget of 4 are in use"
            ) in said
            refusal(cl.view, "a-view", labels={LOWERS: f"{c}@/y"})
            with pytest.raises(grpc.RpcError) as missing:
                cl.stat("one-at-a-target")
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # nothing half made
            assert sorted(os.listdir(root / "lowers")) == ["1", "2", "pins"] and len(os.listdir(pins)) == 2

            cl.prepare("one-at-root", labels={LOWERS: c})  # exactly at the budget: 4
            assert len(cl.mounts("two-at-a-target")) == 2  # a snapshot's own mounts never count twice
            cl.update("one-at-root", {LOWERS: f"{c}@/y"}, ["labels." + LOWERS])
            refusal(cl.mounts, "one-at-root")  # now a mount at /y too: 5

            cl.remove("two-at-root")  # its pins stay: the other snapshot uses them
            assert used() == 4 and len(os.listdir(pins)) == 3
            cl.remove("two-at-a-target")  # the last user of a and b: their pins and its mount go
            assert used() == 1 and len(os.listdir(pins)) == 1
            assert len(cl.mounts("one-at-root")) == 2
            assert used() == 2
        d.stop()
        d = Daemon(root=root, args=["--config", str(config)]).start()  # counts what is pinned
        assert used() == 2
        with d.channel() as ch:
            cl = SnapshotsClient(ch)
            cl.prepare("late", labels={LOWERS: f"{a}:{b}:{c}"})  # c is pinned already: 2 + 2 = 4
            assert used() == 4 and len(os.listdir(pins)) == 3
            assert "4 of the node's budget of 4 are in use" in refusal(cl.prepare, "later", labels={LOWERS: d_})
            write(5)  # the budget is reloaded with the policy
            d.hup("reloaded the config")
            cl.prepare("later", labels={LOWERS: d_})
            assert metric(scrape(port), "addlower_host_mounts_budget") == 5 and used() == 5
    finally:
        assert d.stop() == 0
    assert "Traceback" not in d.log()
