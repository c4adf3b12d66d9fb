#!/usr/bin/env python3
"""cachebench: managed caches against what a CI user would otherwise do, in one run.

Part 1, promotion (`--only promote`): a job's container writes N new small files into a cache
that already holds B files, and ends. `ours`: our daemon (promote = "always"), the time of the
Remove call that makes the job's upper the cache's next generation (the walk that checks it and
the rename, in the store's transaction); one job of one file is promoted first, untimed, so
that the seed's copy (once in a cache's life) and its filesystem journal's aftermath are not in
the figure. `tarball`: what actions/cache and GitLab's cache do to
save a cache after a job, `tar -c` of the whole cache dir (the B files and the N new ones) to a
file, then `sync`. N = 1k and 100k, B = 1k and 100k (--quick: N = 1k and 20k, B = 1k and 20k).
Promotion should not grow with B; the tarball grows with B + N.

Part 2, container start (`--only start`): the snapshotter's part of starting a container that
gets the cache at /root/.m2, Prepare + Mounts through the daemon's socket and the target's
overlay mounted by hand (and unmounted, and the snapshot removed, untimed): `gen-G`, a cache
whose chain has G generations (1, 8 and 16; each a job's 500 files, max_generations 64 so nothing
is squashed), against `plain`, a named lower that is a host dir holding the same files (a pin).

Every target gets, in every round, a fresh ext4 of its own (perfbench.fresh_fs); the order
rotates from round to round. Figures are medians over the rounds with [min-max]; ratios are
taken per round, then their median. Needs root, mount, mkfs.ext4 and tar.

Usage: python3 bench/cachebench.py [--quick] [--rounds R] [--only promote|start] [--json OUT]
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perfbench  # noqa: E402

from addlower.api import mount_pb2  # noqa: E402
from addlower.core.labels import EXTRA_LOWERS_LABEL  # noqa: E402
from addlower.dev.devcontainerd import SnapshotterProcess  # noqa: E402
from addlower.ops.client import SnapshotsClient  # noqa: E402

FS_SIZE = 8 << 30
TARGET = "/root/.m2"
GEN_FILES = 500  # files per generation in part 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def write_files(top: Path, n: int, tag: str) -> None:
    """`n` small files under `top`, 1000 per dir."""
    for i in range(n):
        sub = top / f"{tag}{i // 1000}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i % 1000}").write_text(tag)


def mount(m: mount_pb2.Mount, at: Path) -> None:
    opts = ",".join(m.options)
    if _libc.mount(b"overlay", str(at).encode(), b"overlay", 0, opts.encode()) != 0:
        raise OSError(ctypes.get_errno(), "mount overlay", str(at))


def unmount(at: Path) -> None:
    _libc.umount2(str(at).encode(), 0)


def daemon_on(fs: Path, toml: str) -> SnapshotterProcess:
    config = fs / "config.toml"
    config.write_text(toml)
    return SnapshotterProcess(fs / "root", args=("--config", str(config)))


def cache_toml(seed: Path | None, generations: int = 64) -> str:
    seeded = f'seed = "{seed}"\n' if seed else ""
    return (
        f'mount_targets = "on"\n[lowers.named.m2]\ncache = true\ntarget = "{TARGET}"\npromote = "always"\n'
        f"max_generations = {generations}\n{seeded}"
    )


def target_mount(mounts: Sequence[mount_pb2.Mount]) -> mount_pb2.Mount:
    return next(m for m in mounts if m.target == TARGET)


# --- part 1: promotion ----------------------------------------------------------------------------


def promote_turn(target: str, fs: Path, new: int, base: int) -> float:
    """Seconds to save a job's `new` files into a cache of `base` files, the `target`'s way."""
    seed = fs / "seed"
    write_files(seed, base, "b")
    if target == "tarball":
        cache = fs / "cache"
        subprocess.run(["cp", "-a", f"{seed}/.", str(cache)], check=True)
        write_files(cache / "new", new, "n")
        subprocess.run(["sync"], check=True)
        started = time.perf_counter()
        subprocess.run(["tar", "-cf", str(fs / "cache.tar"), "-C", str(cache), "."], check=True)
        subprocess.run(["sync"], check=True)
        return time.perf_counter() - started
    daemon = daemon_on(fs, cache_toml(seed))
    with perfbench.running(daemon), grpc.insecure_channel(f"unix://{daemon.socket}") as channel:
        c = SnapshotsClient(channel)
        seconds = 0.0
        for job in ("first", "job"):  # the first, untimed, follows the seed's copy (its journal's aftermath)
            m = target_mount(c.prepare(job, labels={EXTRA_LOWERS_LABEL: "m2"}))
            upper = Path(next(o for o in m.options if o.startswith("upperdir=")).removeprefix("upperdir="))
            write_files(upper / job, new if job == "job" else 1, "n")  # as the job's writes land: in its upper
            subprocess.run(["sync"], check=True)
            started = time.perf_counter()
            c.remove(job)
            seconds = time.perf_counter() - started
        assert (daemon.root / "caches" / "m2" / "3").is_dir(), "no generation was made"
        return seconds


# --- part 2: container start ------------------------------------------------------------------------


def start_turn(target: str, fs: Path, starts: int) -> list[float]:
    """Seconds of each of `starts` container starts (Prepare, Mounts, the target's mount)."""
    if target == "plain":
        host = fs / "host" / "m2"
        write_files(host, GEN_FILES * 16, "g")
        toml = f'mount_targets = "on"\n[lowers.named.m2]\npath = "{host}"\ntarget = "{TARGET}"\n'
    else:
        toml = cache_toml(None)
    daemon = daemon_on(fs, toml)
    times = []
    with perfbench.running(daemon), grpc.insecure_channel(f"unix://{daemon.socket}") as channel:
        c = SnapshotsClient(channel)
        for g in range(int(target.removeprefix("gen-")) if target != "plain" else 0):
            m = target_mount(c.prepare(f"fill{g}", labels={EXTRA_LOWERS_LABEL: "m2"}))
            upper = Path(next(o for o in m.options if o.startswith("upperdir=")).removeprefix("upperdir="))
            write_files(upper, GEN_FILES * 16 // int(target.removeprefix("gen-")), f"g{g}-")
            c.remove(f"fill{g}")
        at = fs / "mnt"
        at.mkdir()
        for i in range(starts):
            started = time.perf_counter()
            c.prepare(f"c{i}", labels={EXTRA_LOWERS_LABEL: "m2"})
            m = target_mount(c.mounts(f"c{i}"))
            mount(m, at)
            times.append(time.perf_counter() - started)
            unmount(at)
            c.remove(f"c{i}")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, smaller trees (about 2 min)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5, --quick 2)")
    parser.add_argument("--only", choices=("promote", "start"), help="run one part only")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write samples and summaries as JSON")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    sizes = (1000, 20_000) if args.quick else (1000, 100_000)
    starts = 20 if args.quick else 50
    began, env = time.monotonic(), perfbench.environment()
    text, out = [""], {"rounds": rounds}
    with perfbench.scratch("cachebench-") as work:
        if args.only in (None, "promote"):
            samples: dict[str, dict[str, list[float]]] = {}
            for r in range(rounds):
                for new in sizes:
                    for base in sizes:
                        for target in perfbench.rotated(
                            [perfbench.Target("ours", None), perfbench.Target("tarball", None)], r
                        ):
                            name = f"promote-{target.name}-r{r}-n{new}-b{base}"
                            with perfbench.fresh_fs(work / name, FS_SIZE, work / "failed-logs") as fs:
                                seconds = promote_turn(target.name, fs, new, base)
                            samples.setdefault(f"new {new}, cache {base}", {}).setdefault(target.name, []).append(
                                seconds
                            )
                perfbench.log(f"promote round {r + 1}/{rounds} done")
            text.append(
                "promotion: a job's N new files saved into a cache of B files; seconds, "
                f"median [min-max] over {rounds} rounds"
            )
            text.append(
                f"{'':<26}{'ours (Remove that promotes)':>32}{'tarball (tar -c + sync)':>30}{'ours/tarball':>16}"
            )
            for metric, by in samples.items():
                paired = perfbench.ratios(by, "ours", "tarball")
                text.append(
                    f"{metric:<26}{perfbench.Spread.of(by['ours']).show(perfbench.num):>32}"
                    f"{perfbench.Spread.of(by['tarball']).show(perfbench.num):>30}"
                    f"  {paired.show(perfbench.ratio) if paired else '-':>14}"
                )
            for new in sizes:
                small, large = samples[f"new {new}, cache {sizes[0]}"], samples[f"new {new}, cache {sizes[1]}"]
                growth = perfbench.Spread.of([a / b for a, b in zip(large["ours"], small["ours"], strict=True)])
                text.append(
                    f"ours, {new} new files: cache of {sizes[1]} / cache of {sizes[0]} = {growth.show(perfbench.ratio)}"
                    " (target: does not grow with the cache)"
                )
            out["promote"] = perfbench.summary(samples, [("ours", "tarball")])
        if args.only in (None, "start"):
            targets = ["plain", "gen-1", "gen-8", "gen-16"]
            start_samples: dict[str, list[float]] = {}
            for r in range(rounds):
                for name in targets[r % len(targets) :] + targets[: r % len(targets)]:
                    with perfbench.fresh_fs(work / f"start-{name}-r{r}", FS_SIZE, work / "failed-logs") as fs:
                        times = start_turn(name, fs, starts)
                    start_samples.setdefault(name, []).append(sorted(times)[len(times) // 2] * 1e3)
                perfbench.log(f"start round {r + 1}/{rounds} done")
            text.append("")
            text.append(
                f"container start at {TARGET} (Prepare + Mounts + the target's mount), p50 ms over {starts} starts per"
                f" round; median [min-max] over {rounds} rounds; {GEN_FILES * 16} files in all"
            )
            for name in targets:
                vs = perfbench.ratios({name: start_samples[name], "plain": start_samples["plain"]}, name, "plain")
                text.append(
                    f"{name:<10}{perfbench.Spread.of(start_samples[name]).show(perfbench.num):>24} ms"
                    f"   /plain {vs.show(perfbench.ratio) if vs else '-'}"
                )
            out["start"] = {"samples_ms": start_samples}
        return perfbench.finish(env, began, text, out, args.json)


if __name__ == "__main__":
    sys.exit(main())
