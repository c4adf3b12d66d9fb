"""Managed caches through a real containerd, as a CI user runs jobs with `ctr run --rm`: a job that
exits 0 leaves its writes to the next job, one that exits 1 leaves nothing, deletions stay
deleted. The daemon learns the exits from containerd's events (/tasks/exit); containerd 1.6 has
no mount targets, so there a cache is refused as any target is."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from addlower.core.config import PLUGIN_NAME
from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.dev.devcontainerd import Binaries
from addlower.dev.ociimage import OciImage

from .conftest import Target, running_target

pytestmark = pytest.mark.e2e

NS = "ci"
SETTLE_SECONDS = 30  # a removed job's writes wait at most EXIT_WAIT (10 s) for its exit
LS_AND_WRITE = "ls /root/.m2/repository; echo mine > /root/.m2/repository/running.jar"


@pytest.fixture
def node(tmp_path_factory: pytest.TempPathFactory, busybox_image: OciImage, binaries: Binaries) -> Iterator[Target]:
    """Our daemon with a cache `m2` at /root/.m2 that promotes on success, seeded from a host dir,
    and a containerd with busybox imported."""
    work = tmp_path_factory.mktemp("caches")
    seed = work / "seed"
    (seed / "repository").mkdir(parents=True)
    (seed / "repository" / "seeded.jar").write_text("seeded\n")
    config = work / "config.toml"
    config.write_text(
        f'containerd_address = "{work / "containerd" / "containerd.sock"}"\n'
        f'[lowers.named.m2]\ncache = true\ntarget = "/root/.m2"\npromote = "on-success"\nseed = "{seed}"\n'
    )
    with running_target(work, binaries, builtin=False, daemon_args=["--config", str(config)]) as t:
        t.import_image(busybox_image, NS)
        yield t


def job(t: Target, image: OciImage, cid: str, script: str) -> subprocess.CompletedProcess[str]:
    """A CI job: `ctr run --rm` with the cache, whatever its exit status; returns once its snapshot
    is gone (containerd's garbage collector, waited for)."""
    done = t.containerd.run(
        image.ref,
        cid,
        "sh",
        "-c",
        script,
        namespace=NS,
        snapshotter=PLUGIN_NAME,
        options=["--snapshotter-label", f"{LOWERS}=m2"],
        check=False,
    )
    t.containerd.collect_garbage(NS)
    return done


def start_job(t: Target, image: OciImage, cid: str) -> None:
    """A job left running on the cache (`sleep 3600`, detached), for tests of what it keeps seeing."""
    t.containerd.run(
        image.ref,
        cid,
        "sleep",
        "3600",
        rm=False,
        namespace=NS,
        snapshotter=PLUGIN_NAME,
        options=["-d", "--snapshotter-label", f"{LOWERS}=m2"],
    )


def settled(t: Target, cid: str) -> str:
    """Wait for the daemon to say what became of job `cid`'s writes; that line of its log."""
    assert t.daemon is not None
    said = re.compile(rf'^.*msg="(promoted a job\'s writes|not promoting[^"]*)".*key={NS}/\d+/{cid}\b.*$', re.M)
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        found = said.search(t.daemon.log())
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"the daemon never said what became of {cid}'s writes:\n{t.daemon.log()[-3000:]}")


def test_a_successful_job_warms_the_cache_for_the_next_and_a_failed_one_does_not(
    node: Target, busybox_image: OciImage, binaries: Binaries
):
    if binaries.version < (1, 7):
        refused = job(node, busybox_image, "job1", "true")
        assert refused.returncode != 0 and "a target needs containerd >= 1.7" in refused.stderr
        return
    start_job(node, busybox_image, "running")  # a job that runs while the others come and go
    first = job(
        node,
        busybox_image,
        "job1",
        "cat /root/.m2/repository/seeded.jar; echo one > /root/.m2/repository/one.jar; "
        "rm /root/.m2/repository/seeded.jar",
    )
    assert (first.returncode, first.stdout) == (0, "seeded\n"), first.stderr
    assert "promoted a job's writes" in settled(node, "job1")
    failed = job(
        node, busybox_image, "job2", "ls /root/.m2/repository; echo two > /root/.m2/repository/two.jar; exit 1"
    )
    assert (failed.returncode, failed.stdout.split()) == (1, ["one.jar"])  # job1's writes, its deletion kept
    assert "it exited with status 1" in settled(node, "job2")
    third = job(node, busybox_image, "job3", "ls /root/.m2/repository")
    assert (third.returncode, third.stdout.split()) == (0, ["one.jar"])  # nothing of the failed job2
    # The running job never saw job1's promotion; an exec's exit (0) is not its container's, and
    # its container, killed (137), is no success either.
    seen = node.ctr("tasks", "exec", "--exec-id", "ls", "running", "sh", "-c", LS_AND_WRITE, namespace=NS)
    assert seen.stdout.split() == ["seeded.jar"]
    node.ctr("tasks", "kill", "-s", "SIGKILL", "running", namespace=NS)
    node.ctr("tasks", "delete", "-f", "running", namespace=NS)
    node.ctr("containers", "rm", "running", namespace=NS)
    node.containerd.collect_garbage(NS)
    assert "it exited with status 137" in settled(node, "running")
    last = job(node, busybox_image, "job4", "ls /root/.m2/repository")
    assert last.stdout.split() == ["one.jar"]
    assert node.daemon is not None
    gens = sorted(p.name for p in (node.daemon.root / "caches" / "m2").iterdir())
    assert gens == ["1", "2"], node.daemon.log()[-2000:]  # the seed, job1's; job3 and job4 wrote nothing
