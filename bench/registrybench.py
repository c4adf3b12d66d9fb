#!/usr/bin/env python3
"""registrybench: a cache moved between nodes through a registry, ours against the tarball
workflow CI users run today, in one run.

A tree of F files of 10 KiB of random bytes (1 GiB / 100k files; --quick 100 MiB / 10k) is the
cache. Two nodes on one machine, each a containerd (the newest line at hand) and our daemon on a
fresh ext4 of its own, and `docker-registry` on loopback (its storage on a fresh ext4 too):

- `push`: node A's cache seeded with the tree; `addlower cache push` (the layer written into
  containerd's content store, then containerd pushes it). Against `tar -c` of the tree to a file,
  then its upload as one blob (monolithic PUT), as actions/cache or GitLab's cache save do.
- `pull`: `addlower cache pull` on node B (containerd fetches and unpacks into our snapshotter),
  until a container created afterwards would see the tree. Against the blob's download, then
  `tar -x` into an empty dir.
- `push again`, `pull again`: a job adds 1k files (promote = "always") and the cache is pushed
  and pulled again (one new layer each way), against the tarball workflow's whole tree again.

Uncompressed both ways (our layers are plain tar). Figures are medians over the rounds with
[min-max]; the order of ours and the tarball alternates from round to round; ratios per round,
then their median. Needs root, mount, mkfs.ext4, tar and docker-registry.

Usage: python3 bench/registrybench.py [--quick] [--rounds R] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import tomlkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import perfbench  # noqa: E402
from cachebench import target_mount  # noqa: E402

from addlower.core.config import PLUGIN_NAME  # noqa: E402
from addlower.core.labels import EXTRA_LOWERS_LABEL  # noqa: E402
from addlower.dev.devcontainerd import Binaries, PrivateContainerd, SnapshotterProcess, unpacked_lines  # noqa: E402
from addlower.ops.client import SnapshotsClient  # noqa: E402
from tests.support.registry import Registry  # noqa: E402

FS_SIZE = 12 << 30
FILE_BYTES = 10 << 10
REPO = "ci/m2"
STEPS = ("push", "pull", "push again", "pull again")


def make_tree(top: Path, files: int, tag: str = "f") -> None:
    for i in range(files):
        sub = top / f"{tag}{i // 1000}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i}.bin").write_bytes(os.urandom(FILE_BYTES))


def binaries() -> Binaries:
    lines = unpacked_lines()
    newest = max(lines, key=lambda d: Binaries(d).version) if lines else None
    return Binaries(newest) if newest else Binaries()


@contextmanager
def node(work: Path, bins: Binaries, hosts: Path, cache: dict[str, object]) -> Iterator[tuple[Path, PrivateContainerd]]:
    """A daemon (cache m2 at /root/.m2, promote always, plus `cache`) and its containerd."""
    root = work / "snapshotter"
    config = work / "config.toml"
    doc = {
        "containerd_address": str(work / "containerd" / "containerd.sock"),
        "registry_config_path": str(hosts),
        "ctr_path": bins.command("ctr"),
        "lowers": {"named": {"m2": {"cache": True, "target": "/root/.m2", "promote": "always", **cache}}},
    }
    work.mkdir(parents=True, exist_ok=True)
    config.write_text(tomlkit.dumps(doc))
    daemon = SnapshotterProcess(root, args=["--config", str(config)]).start()
    try:
        with PrivateContainerd(work / "containerd", {PLUGIN_NAME: daemon.socket}, binaries=bins) as containerd:
            yield root, containerd
    finally:
        daemon.stop()


def cache(root: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run(["addlower", "cache", *args, "--root-dir", str(root)], check=True, capture_output=True)
    return time.perf_counter() - started


def job_writes(root: Path, files: int) -> None:
    """A job's container on the cache (its snapshot through the socket) writes `files` files into
    its upper and is removed: promoted (promote = "always")."""
    with grpc.insecure_channel(f"unix://{root / 'grpc.socks'}") as channel:
        client = SnapshotsClient(channel)
        mount = target_mount(client.prepare("default/1/job", "", {EXTRA_LOWERS_LABEL: "m2"}))
        upper = Path(next(o for o in mount.options if o.startswith("upperdir=")).removeprefix("upperdir="))
        make_tree(upper, files, "j")
        client.remove("default/1/job")


def http_blob(host: str, method: str, path: str, body: Path | None = None, out: Path | None = None) -> str:
    conn = http.client.HTTPConnection(host, timeout=600)
    headers = {"Content-Length": str(body.stat().st_size)} if body else {}
    with open(body, "rb") if body else contextlib.nullcontext() as data:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        if out is not None:
            with open(out, "wb") as sink:
                while chunk := resp.read(1 << 20):
                    sink.write(chunk)
        else:
            resp.read()
    if resp.status >= 300:
        raise RuntimeError(f"{method} {path}: HTTP {resp.status}")
    return resp.headers.get("Location", "")


def tar_push(tree: Path, scratch: Path, host: str) -> tuple[float, str]:
    started = time.perf_counter()
    archive = scratch / "cache.tar"
    subprocess.run(["tar", "-C", str(tree), "-cf", str(archive), "."], check=True)
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    blob = f"sha256:{digest.hexdigest()}"
    location = urllib.parse.urlsplit(http_blob(host, "POST", f"/v2/{REPO}-tar/blobs/uploads/"))
    query = "&".join(q for q in (location.query, urllib.parse.urlencode({"digest": blob})) if q)
    http_blob(host, "PUT", f"{location.path}?{query}", body=archive)
    archive.unlink()
    return time.perf_counter() - started, blob


def tar_pull(blob: str, scratch: Path, host: str) -> float:
    started = time.perf_counter()
    archive, into = scratch / "fetched.tar", scratch / "restored"
    http_blob(host, "GET", f"/v2/{REPO}-tar/blobs/{blob}", out=archive)
    into.mkdir()
    subprocess.run(["tar", "-C", str(into), "-xf", str(archive)], check=True)
    elapsed = time.perf_counter() - started
    archive.unlink()
    subprocess.run(["rm", "-rf", str(into)], check=True)
    return elapsed


class Round:
    """One round's two workflows on fresh nodes, a fresh registry and a fresh filesystem."""

    def __init__(self, stack: ExitStack, fs: Path, tree: Path, bins: Binaries):
        self.stack, self.fs, self.tree, self.bins = stack, fs, tree, bins
        self.registry = stack.enter_context(Registry(fs / "registry"))
        self.hosts = fs / "certs.d"
        (self.hosts / self.registry.host).mkdir(parents=True)
        url = f"http://{self.registry.host}"
        (self.hosts / self.registry.host / "hosts.toml").write_text(
            tomlkit.dumps({"server": url, "host": {url: {"capabilities": ["pull", "resolve", "push"]}}})
        )
        self.ref = f"{self.registry.host}/{REPO}:main"
        self.scratch = fs / "scratch"
        self.scratch.mkdir()
        self.a_root = self.b_root = fs
        self.blob = ""
        self.figures: dict[str, float] = {}

    def ours(self, step: str) -> None:
        if step == "push":
            self.a_root = self.stack.enter_context(
                node(self.fs / "a", self.bins, self.hosts, {"seed": str(self.tree)})
            )[0]
            job_writes(self.a_root, 0)  # the first use copies the seed in (untimed)
            os.sync()  # and its writeback is not the push's
        elif step == "pull":
            self.b_root = self.stack.enter_context(node(self.fs / "b", self.bins, self.hosts, {}))[0]
        elif step == "push again":
            job_writes(self.a_root, 1000)
        root = self.a_root if step.startswith("push") else self.b_root
        self.figures[f"ours {step}"] = cache(root, step.split()[0], "m2", self.ref)
        log = (root.parent / "snapshotter.log").read_text()
        said = re.findall(r'msg="(?:pushed a cache|pulled a cache\'s image)".*', log)[-1]
        for phase, seconds in re.findall(r"\b(write_s|push_s|pull_s|measure_s)=([0-9.]+)", said):
            self.figures[f"phase {step} {phase}"] = float(seconds)

    def tarball(self, step: str) -> None:
        if step == "push again":
            make_tree(self.tree / "again", 1000, "j")
        if step.startswith("push"):
            self.figures[f"tar {step}"], self.blob = tar_push(self.tree, self.scratch, self.registry.host)
        else:
            self.figures[f"tar {step}"] = tar_pull(self.blob, self.scratch, self.registry.host)


def one_round(work: Path, tree: Path, bins: Binaries, ours_first: bool) -> dict[str, float]:
    work.mkdir()
    with ExitStack() as stack:
        fs = stack.enter_context(perfbench.fresh_fs(work / "fs", FS_SIZE, work))
        r = Round(stack, fs, tree, bins)
        for step in STEPS:
            for runner in (r.ours, r.tarball) if ours_first else (r.tarball, r.ours):
                runner(step)
    subprocess.run(["rm", "-rf", str(tree / "again")], check=True)
    return r.figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 MiB / 10k files, 2 rounds")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the samples as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root")
    files = 10_000 if args.quick else 100_000
    rounds = args.rounds or (2 if args.quick else 3)
    bins = binaries()
    work = Path(f"/var/tmp/registrybench-{os.getpid()}")
    work.mkdir(parents=True)
    tree = work / "tree"
    perfbench.log(f"making the cache tree: {files} files of {FILE_BYTES} bytes ...")
    make_tree(tree, files)
    samples: list[dict[str, float]] = []
    try:
        for n in range(rounds):
            figures = one_round(work / f"round{n}", tree, bins, ours_first=n % 2 == 0)
            perfbench.log(f"round {n + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in figures.items()))
            samples.append(figures)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"registrybench: {files} files, {files * FILE_BYTES >> 20} MiB, containerd {bins.label}, {rounds} rounds")
    print(f"{'step':<12} {'ours s':>24} {'tarball s':>24} {'ours/tarball':>24}")
    for step in STEPS:
        series = {k: [s[f"{k} {step}"] for s in samples] for k in ("ours", "tar")}
        spread = perfbench.ratios(series, "ours", "tar")
        shown = spread.show(perfbench.ratio) if spread else "-"
        print(
            f"{step:<12} {perfbench.Spread.of(series['ours']).show(perfbench.num):>24}"
            f" {perfbench.Spread.of(series['tar']).show(perfbench.num):>24} {shown:>24}"
        )
    phases = sorted({k for sample in samples for k in sample if k.startswith("phase ")})
    for key in phases:  # where ours spends it (the daemon's log)
        print(
            f"  {key.removeprefix('phase '):<28} {perfbench.Spread.of([s[key] for s in samples]).show(perfbench.num)}"
        )
    if args.json:
        args.json.write_text(json.dumps(samples, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
