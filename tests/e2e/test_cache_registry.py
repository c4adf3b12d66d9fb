"""Caches across nodes through a registry: two nodes (each a containerd and our daemon, own roots)
and the `docker-registry` on loopback. Node A's jobs warm its cache and it pushes the chain as an
image; node B pulls it and its jobs see the same tree, copy-on-write; A pushes again and only the
new layer travels, both ways; credential files never reach the registry; a failed pull leaves B
with what it had, and a running job keeps its view across a pull."""

from __future__ import annotations

import hashlib
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import tomlkit

from addlower.dev.devcontainerd import Binaries
from addlower.dev.ociimage import OciImage
from tests.support.registry import Registry

from .conftest import Target, eventually, running_target
from .test_caches import NS, job, settled, start_job

# Caches need mount targets: containerd 1.6 refuses them (test_caches checks that).
pytestmark = [pytest.mark.e2e, pytest.mark.containerd_from((1, 7))]

SECRET = "s3cr3t-token-7f1d"
# What a job sees of the cache: every entry with its type, mode, owner, size and link, and every
# file's checksum.
TREE = (
    "cd /root/.m2 && find . | sort | while read -r p; do stat -c '%n %F %a %u:%g %s' \"$p\"; "
    '[ -L "$p" ] && readlink "$p"; [ -f "$p" ] && [ ! -L "$p" ] && md5sum < "$p"; done; true'
)


def hosts_dir(where: Path, registry: Registry) -> Path:
    """containerd's registry host configuration for the plain-HTTP registry, pushes allowed."""
    host = where / registry.host
    host.mkdir(parents=True)
    url = f"http://{registry.host}"
    doc = {"server": url, "host": {url: {"capabilities": ["pull", "resolve", "push"]}}}
    (host / "hosts.toml").write_text(tomlkit.dumps(doc))
    return where


def configure(work: Path, binaries: Binaries, hosts: Path, cache: dict[str, object]) -> Path:
    """The config file of the node at `work` (written again by a later call: then SIGHUP)."""
    config = work / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "containerd_address": str(work / "containerd" / "containerd.sock"),
        "registry_config_path": str(hosts),
        "ctr_path": binaries.command("ctr"),
        "lowers": {"named": {"m2": {"cache": True, "target": "/root/.m2", "promote": "on-success", **cache}}},
    }
    config.write_text(tomlkit.dumps(doc))
    return config


def node(
    stack: ExitStack, work: Path, binaries: Binaries, hosts: Path, image: OciImage, cache: dict[str, object]
) -> Target:
    """A node whose cache m2 at /root/.m2 promotes on success, with `cache`'s other keys."""
    config = configure(work, binaries, hosts, cache)
    target = stack.enter_context(running_target(work, binaries, builtin=False, daemon_args=["--config", str(config)]))
    target.import_image(image, NS)
    return target


def cache_command(t: Target, *args: str) -> subprocess.CompletedProcess[str]:
    assert t.daemon is not None
    return subprocess.run(
        ["addlower", "cache", *args, "--root-dir", str(t.daemon.root)], capture_output=True, text=True, timeout=600
    )


def tree(t: Target, image: OciImage, cid: str) -> str:
    done = job(t, image, cid, TREE)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def fleet(
    tmp_path_factory: pytest.TempPathFactory, busybox_image: OciImage, binaries: Binaries
) -> Iterator[tuple[Registry, Target, Target, str]]:
    work = tmp_path_factory.mktemp("fleet")
    seed = work / "seed"
    (seed / "repository" / "org").mkdir(parents=True)
    (seed / "repository" / "org" / "seeded.jar").write_text("seeded\n")
    (seed / "repository" / "org" / "stale.jar").write_text("stale\n")
    (seed / ".docker").mkdir()
    (seed / ".docker" / "config.json").write_text(f'{{"auths": {{"x": "{SECRET}"}}}}\n')
    (seed / "settings-security.xml").write_text(f"<master>{SECRET}</master>\n")
    with ExitStack() as stack:
        registry = stack.enter_context(Registry(work / "registry", access_log=True))
        hosts = hosts_dir(work / "certs.d", registry)
        ref = f"{registry.host}/ci/m2:main"
        a = node(stack, work / "a", binaries, hosts, busybox_image, {"seed": str(seed)})
        b = node(stack, work / "b", binaries, hosts, busybox_image, {"image": ref})
        yield registry, a, b, ref


def test_a_cache_pushed_by_one_node_is_the_next_nodes_base(fleet, busybox_image: OciImage):
    registry, a, b, ref = fleet
    warm = job(
        a,
        busybox_image,
        "a1",
        "cd /root/.m2 && rm repository/org/stale.jar && echo one > repository/org/one.jar && "
        "ln -s org/one.jar repository/latest && mkdir -p repository/x && chmod 0700 repository/x && "
        f"echo {SECRET} > .git-credentials",
    )
    assert warm.returncode == 0, warm.stderr
    assert "promoted a job's writes" in settled(a, "a1")
    pushed = cache_command(a, "push", "m2", ref)
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed 2 layers" in pushed.stdout and "2 written now" in pushed.stdout
    blobs = registry.blobs()
    assert not any(SECRET.encode() in data for data in blobs.values())  # credential files stay home

    # B has the image in its config: a pull makes it the chain for the jobs created afterwards.
    pulled = cache_command(b, "pull", "m2")
    assert pulled.returncode == 0, pulled.stderr
    seen_a, seen_b = tree(a, busybox_image, "a2"), tree(b, busybox_image, "b1")
    assert "stale.jar" not in seen_b and "one.jar" in seen_b and "latest symbolic link" in seen_b
    strip = {"./.docker", "./.docker/config.json", "./settings-security.xml", "./.git-credentials"}
    assert without(seen_b, strip) == without(seen_a, strip)  # byte for byte, but for the credentials
    assert ".git-credentials" in seen_a and ".git-credentials" not in seen_b

    # Copy-on-write: a failed job on B changes nothing, a running one keeps its view.
    failed = job(b, busybox_image, "b2", "rm -r /root/.m2/repository; exit 1")
    assert failed.returncode == 1
    assert "it exited with status 1" in settled(b, "b2")
    start_job(b, busybox_image, "b-running")

    # A warms again and pushes: one new layer goes up, and B's pull fetches it alone.
    again = job(a, busybox_image, "a3", "echo two > /root/.m2/repository/org/two.jar")
    assert again.returncode == 0 and "promoted a job's writes" in settled(a, "a3")
    before = len(registry.requests())
    pushed = cache_command(a, "push", "m2", ref)
    assert pushed.returncode == 0 and "pushed 3 layers" in pushed.stdout and "1 written now" in pushed.stdout
    uploaded = {
        urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)["digest"][0]
        for method, path in registry.requests()[before:]
        if method == "PUT" and "/blobs/uploads/" in path
    }
    new = set(registry.blobs()) - set(blobs)
    assert len(new) == 3 and len(uploaded) == 2 and uploaded < new  # the new layer and config; and a manifest
    before = len(registry.requests())
    assert cache_command(b, "pull", "m2").returncode == 0
    fetched = {path.rsplit("/", 1)[1] for method, path in registry.requests()[before:] if method == "GET"}
    assert not fetched & set(blobs), "B fetched layers it had"
    assert "two.jar" in tree(b, busybox_image, "b3")
    running = b.ctr("tasks", "exec", "--exec-id", "ls", "b-running", "ls", "/root/.m2/repository/org", namespace=NS)
    assert running.stdout.split() == ["one.jar", "seeded.jar"]

    # A pull that fails leaves B serving what it had.
    missing = cache_command(b, "pull", "m2", f"{registry.host}/ci/m2:gone")
    assert missing.returncode != 0 and "ctr images pull" in missing.stderr
    assert "two.jar" in tree(b, busybox_image, "b4")
    b.ctr("tasks", "kill", "-s", "SIGKILL", "b-running", namespace=NS)


def without(listing: str, paths: set[str]) -> str:
    """A TREE listing without the entries (and their checksum lines) under `paths`."""
    kept, skipping = [], False
    for line in listing.splitlines():
        if line.startswith("./") or line == ".":
            skipping = line.split()[0] in paths
        if not skipping:
            kept.append(line)
    return hashlib.sha256("\n".join(kept).encode()).hexdigest() + "\n" + "\n".join(kept)


def test_a_replaced_base_is_kept_while_a_job_uses_it_then_collected(fleet, busybox_image: OciImage):
    """A new image whose layers differ: containerd's collector tries to remove the old layer's
    snapshot at once; the store refuses while a running job has it, and lets it go later."""
    registry, a, b, ref = fleet
    assert job(a, busybox_image, "a1", "echo one > /root/.m2/one.jar").returncode == 0
    assert "promoted a job's writes" in settled(a, "a1")
    assert cache_command(a, "push", "m2", ref).returncode == 0
    assert cache_command(b, "pull", "m2").returncode == 0
    start_job(b, busybox_image, "b-running")
    assert b.daemon is not None
    layer_dirs = {p.name: p.resolve() for p in (b.daemon.root / "caches" / "m2").iterdir()}
    one = next(path for path in layer_dirs.values() if (path / "one.jar").exists())

    # A replaces its top generation: the tag's new image shares the seed's layer only.
    assert "chain [1, 2] -> [1]" in cache_command(a, "rollback", "m2").stdout
    assert job(a, busybox_image, "a2", "echo two > /root/.m2/two.jar").returncode == 0
    assert "promoted a job's writes" in settled(a, "a2")
    assert cache_command(a, "push", "m2", ref).returncode == 0
    assert cache_command(b, "pull", "m2").returncode == 0
    b.containerd.collect_garbage(NS)
    b.containerd.collect_garbage("addlower-caches")
    refused = 'failed to remove snapshot" error="cannot remove snapshot \'addlower-caches/'
    assert refused in b.containerd.log_tail(1000) and one.is_dir()  # refused to containerd's collector
    running = b.ctr("tasks", "exec", "--exec-id", "ls", "b-running", "ls", "/root/.m2", namespace=NS)
    assert running.stdout.split() == ["one.jar", "repository"]
    assert "two.jar" in job(b, busybox_image, "b1", "ls /root/.m2").stdout

    b.ctr("tasks", "kill", "-s", "SIGKILL", "b-running", namespace=NS)
    b.ctr("tasks", "delete", "-f", "b-running", namespace=NS)
    b.ctr("containers", "rm", "b-running", namespace=NS)
    b.containerd.collect_garbage(NS)  # the job's snapshot goes; Cleanup then lets the old layer go
    job(b, busybox_image, "b2", "true")  # a later removal has containerd's collector try again
    b.containerd.collect_garbage("addlower-caches")
    assert not one.exists()


def test_a_node_refreshes_its_cache_from_the_image(
    tmp_path_factory: pytest.TempPathFactory, busybox_image: OciImage, binaries: Binaries
):
    """`refresh`: a node pulls the cache's image again on its own; what it promoted meanwhile on
    the same base stays, a new image replaces it."""
    work = tmp_path_factory.mktemp("refresh")
    with ExitStack() as stack:
        registry = stack.enter_context(Registry(work / "registry"))
        hosts = hosts_dir(work / "certs.d", registry)
        ref = f"{registry.host}/ci/m2:main"
        a = node(stack, work / "a", binaries, hosts, busybox_image, {})
        b = node(stack, work / "b", binaries, hosts, busybox_image, {"image": ref, "refresh": "1s"})
        assert job(a, busybox_image, "a1", "echo one > /root/.m2/one.jar").returncode == 0
        assert "promoted a job's writes" in settled(a, "a1")
        assert cache_command(a, "push", "m2", ref).returncode == 0
        assert eventually(lambda: "one.jar" in job(b, busybox_image, "b-wait", "ls /root/.m2").stdout, 30)
        assert job(b, busybox_image, "b1", "echo local > /root/.m2/local.jar").returncode == 0
        assert "promoted a job's writes" in settled(b, "b1")
        time.sleep(2.5)  # refreshes of an unchanged image
        assert job(b, busybox_image, "b2", "ls /root/.m2").stdout.split() == ["local.jar", "one.jar"]
        assert job(a, busybox_image, "a2", "echo two > /root/.m2/two.jar").returncode == 0
        assert "promoted a job's writes" in settled(a, "a2")
        assert cache_command(a, "push", "m2", ref).returncode == 0
        assert eventually(lambda: "two.jar" in job(b, busybox_image, "b-wait", "ls /root/.m2").stdout, 30)
        assert job(b, busybox_image, "b3", "ls /root/.m2").stdout.split() == ["one.jar", "two.jar"]


def test_a_reload_that_names_an_image_pulls_it_at_once(
    tmp_path_factory: pytest.TempPathFactory, busybox_image: OciImage, binaries: Binaries
):
    """`systemctl reload` with a cache's first `image`, then with another one (no `refresh`
    either time): each is pulled when the reload is handled, not at the next start."""
    work = tmp_path_factory.mktemp("reload")
    with ExitStack() as stack:
        registry = stack.enter_context(Registry(work / "registry"))
        hosts = hosts_dir(work / "certs.d", registry)
        main, next_ = f"{registry.host}/ci/m2:main", f"{registry.host}/ci/m2:next"
        a = node(stack, work / "a", binaries, hosts, busybox_image, {})
        b = node(stack, work / "b", binaries, hosts, busybox_image, {})
        assert b.daemon is not None
        assert job(a, busybox_image, "a1", "echo one > /root/.m2/one.jar").returncode == 0
        assert "promoted a job's writes" in settled(a, "a1")
        assert cache_command(a, "push", "m2", main).returncode == 0
        assert job(a, busybox_image, "a2", "echo two > /root/.m2/two.jar").returncode == 0
        assert "promoted a job's writes" in settled(a, "a2")
        assert cache_command(a, "push", "m2", next_).returncode == 0
        assert job(b, busybox_image, "b1", "ls /root/.m2").stdout.split() == []

        configure(work / "b", binaries, hosts, {"image": main})
        b.daemon.hup("reloaded the config")
        assert eventually(lambda: "one.jar" in job(b, busybox_image, "b-wait", "ls /root/.m2").stdout, 30)
        assert job(b, busybox_image, "b2", "ls /root/.m2").stdout.split() == ["one.jar"]

        configure(work / "b", binaries, hosts, {"image": next_})
        b.daemon.hup("reloaded the config")
        assert eventually(lambda: "two.jar" in job(b, busybox_image, "b-wait", "ls /root/.m2").stdout, 30)
        assert job(b, busybox_image, "b3", "ls /root/.m2").stdout.split() == ["one.jar", "two.jar"]


def test_an_image_volumes_blobs_are_not_fetched_again(fleet, busybox_image: OciImage):
    """What README says of ImageVolume: kubelet has CRI pull the image into namespace k8s.io (as
    `ctr -n k8s.io images pull` does here); the cache's own pull then fetches none of its layers."""
    registry, a, b, ref = fleet
    assert job(a, busybox_image, "a1", "echo one > /root/.m2/one.jar").returncode == 0
    assert "promoted a job's writes" in settled(a, "a1")
    assert cache_command(a, "push", "m2", ref).returncode == 0
    layers = set(registry.blobs())
    b.containerd.ctr("images", "pull", "--hosts-dir", str(hosts_of(b)), ref, namespace="k8s.io")
    before = len(registry.requests())
    assert cache_command(b, "pull", "m2").returncode == 0
    fetched = {path.rsplit("/", 1)[1] for method, path in registry.requests()[before:] if method == "GET"}
    assert not fetched & layers
    assert "one.jar" in job(b, busybox_image, "b1", "ls /root/.m2").stdout


def hosts_of(t: Target) -> Path:
    assert t.daemon is not None
    config = tomlkit.parse((t.daemon.root.parent / "config.toml").read_text())
    return Path(str(config["registry_config_path"]))
