#!/usr/bin/env python3
"""scalebench: our snapshotter at scale against the Go original, in one run: many containers
sharing the same extra lowers, and start-up and memory on large stores.

Targets, as in perfbench (whose helpers this imports): `ours` (this checkout's daemon, `python -m
addlower.cli --root-dir ...`, PYTHONPATH set to this checkout) and `go` (the Go original, --go-bin,
built with /work/shared/peers/seedsnap/build.sh if missing). Both run as root with their defaults
(async remove); ours gets a config file only in part 1, whose lowers.allowed_roots is the dir
holding the host dirs. Every target gets, in every round, a fresh ext4 of its own
(perfbench.fresh_fs: a sparse loop file, inode tables written at mkfs), unmounted and deleted after
its turn; the targets take turns, the order rotating from round to round (and, in part 2, from
size to size). Figures are the median over the rounds with [min-max]; ratios ours/go are taken per
round (the targets paired within it): their median, then each round's.

The client: bench/goclient (a Go program on containerd's own Snapshots proxy client, built at run
time as perfbench builds it) for everything timed per call, so the figures are the server's and
not a Python client's; its phase mode makes N calls in a row on one connection, times each, and
reads the server's CPU time around them (perfbench's schedstat method). Set-up calls (a committed
parent) go through addlower's Python client, untimed.

Part 1, shared lowers (`--only pins`): 8 host dirs on the target's fresh filesystem, 3 small files
each; one committed parent; then C Prepares (default 1000; --quick 300) on that parent, each with
the extra-lowers label (containerd.io/snapshot/overlay-custom-add-lower.paths, the Go original's,
which ours takes too) naming the same 8 dirs, colon-separated; then Mounts of each, then Remove of
each, one call after the other. goclient checks that every overlay mount returned names 9
lowerdirs (the 8 dirs, or ours' pins of them, and the parent). The Prepares run as two goclient
calls, the first 10% then the rest, so that the mounts under the daemon's root (lines of
/proc/self/mountinfo whose mount point is the root dir or under it) are counted after 10% and after
all of them: a count that does not grow from one to the other is a constant, not per container.
Reported: those counts and the count after the Removes; Prepare p50 over the first 10% and over
the last 10% of the Prepares, and last/first; p50 and p99 of Prepare, Mounts and Remove over all
calls; ops/s of each (calls / wall time of the phase); the server's CPU per call; RSS after.

Part 2, start-up and memory (`--only startup`): stores of N committed snapshots (parentless, keys
s<k>-fill-<i>), N = 1k, 10k, 50k (--quick: 1k, 10k), and an empty store. Filling through the daemon
takes about 1 ms a snapshot (50k: about 55 s per target, with the archiving), too slow for every
round: so each target
fills one store through its own daemon once, before the rounds (goclient's fill mode, 8
connections), on a filesystem of its own, stopping the daemon (SIGTERM) at 1k, 10k and 50k to
archive its root dir (tar, in the run's dir); each round's turn extracts the target's own archive
for N onto its fresh filesystem and syncs it (its pages stay in the page cache: start-up is
measured warm), then starts the daemon. Timed from just before the exec (Popen) with
time.perf_counter: `accept`, until a connect() to the socket succeeds (polled every ms), and
`Stat`, until the daemon answers a Stat of one of the N snapshots (of a missing key on the empty
store, NOT_FOUND being the answer) on a new gRPC channel of addlower's Python client, retried
while UNAVAILABLE (one failing call before the rounds sets up gRPC's core, so that its one-off cost
is not in the first turn). That client's own cost is in `Stat`: its floor, a new channel and one
Stat on the running daemon, is reported beside it (median of 5). Then VmRSS right after the answer, 3 full
Lists (goclient walks, each checking the count; not on the empty store, where the Go original
answers "bucket does not exist"), VmRSS and VmHWM after them, List time (median of the 3).
Also per round: start-up at N / start-up on the empty store, per target.

The issue's targets, printed next to the figures with met/missed (on the medians): mounts under
the root after the Prepares = the distinct dirs + a constant (met when the count after all the
Prepares is the count after 10% of them, and at most twice the dirs);
Prepare p50 over the last 10% within 1.5x the first 10%; ops/s of Prepare, Mounts and Remove with
8 lowers >= 0.8x Go's; start-up (Stat answered) at 50k within 1.5x start-up on an empty store;
RSS after the Lists at 50k <= Go's.

Needs root, mount, mkfs.ext4, tar, go and the Go original. Default: 9 rounds, 1000 containers,
stores up to 50k (about 4 min on 2 busy CPUs: 1.5 min of filling, 15 s a round); --quick: 2
rounds, 300 containers, stores up to 10k (under 1 min).

Usage: python3 bench/scalebench.py [--quick] [--only pins|startup] [--rounds N] [--containers C]
                                   [--json OUT] [--go-bin PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perfbench  # puts this checkout first on sys.path
from perfbench import CLK_TCK, Figures, Samples, Spread, Target, fresh_fs, log, memory_kib, num, ratio, rotated

import addlower
from addlower.api import snapshots_pb2
from addlower.core.labels import EXTRA_LOWERS_LABEL
from addlower.dev.devcontainerd import SnapshotterProcess
from addlower.ops.client import SnapshotsClient

DIRS = 8  # shared host dirs, each an extra lower of every container
FILES_PER_DIR = 3
SIZES = {"empty": 0, "1k": 1_000, "10k": 10_000, "50k": 50_000}
LISTS = 3  # full Lists (Walks) before the second RSS reading
FLOOR_STATS = 5  # new channel + Stat on the running daemon, for the Python client's floor
FILL_CONCURRENCY = 8
START_TIMEOUT = 120.0
POLL = 0.001  # seconds between connect() attempts while a daemon starts
PINS_FS = 1 << 30
PAIR = ("ours", "go")
# The thresholds.
PREPARE_GROWTH_MAX = 1.5
THROUGHPUT_MIN = 0.8
STARTUP_GROWTH_MAX = 1.5
RSS_RATIO_MAX = 1.0


@dataclass(frozen=True)
class Plan:
    rounds: int
    containers: int  # part 1: Prepares, then Mounts, then Removes
    sizes: tuple[str, ...]  # part 2: keys of SIZES, "empty" first


FULL = Plan(rounds=9, containers=1000, sizes=("empty", "1k", "10k", "50k"))
QUICK = Plan(rounds=2, containers=300, sizes=("empty", "1k", "10k"))


def store_fs_size(n: int) -> int:
    """Room for n snapshots (3 dirs each, 4 KiB blocks; -i 8192: an inode per 8 KiB), sparse."""
    return (512 << 20) + n * (32 << 10)


def mounts_under(root: Path) -> int:
    """Lines of /proc/self/mountinfo whose mount point is `root` or under it."""
    prefix = f"{root}/"
    count = 0
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split(" ", 5)[4]
            count += point == str(root) or point.startswith(prefix)
    return count


def goclient(client: Path, daemon: SnapshotterProcess, *args: str) -> dict:
    """One goclient run against the daemon's socket, reading its CPU time; its JSON output."""
    assert daemon.proc is not None
    out = perfbench.goclient(
        client, "-address", str(daemon.socket), "-pid", str(daemon.proc.pid), "-clk-tck", str(CLK_TCK), *args
    )
    assert isinstance(out, dict)
    return out


def p50(values: Sequence[float]) -> float:
    return statistics.median(values)


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * 99 // 100) - 1)]  # nearest rank, as goclient's


# --- part 1: shared lowers ----------------------------------------------------------------------


def make_host_dirs(host: Path) -> list[str]:
    dirs = []
    for i in range(DIRS):
        d = host / f"lower{i}"
        d.mkdir(parents=True)
        for f in range(FILES_PER_DIR):
            (d / f"file{f}").write_text(f"scalebench lower {i} file {f}\n")
        dirs.append(str(d))
    return dirs


def pins_turn(target: Target, fs: Path, plan: Plan, client: Path) -> dict[str, float]:
    """One target's turn in part 1: a daemon on `fs`, C Prepares naming the same 8 dirs, C Mounts,
    C Removes, one call after the other."""
    assert target.command is not None
    host = fs / "host"
    dirs = make_host_dirs(host)
    args: tuple[str, ...] = ()
    if target.name == "ours":
        config = fs / "snapshotter.toml"
        config.write_text(f'[lowers]\nallowed_roots = ["{host}"]\n')
        args = ("--config", str(config))
    daemon = SnapshotterProcess(fs / "root", args=args, command=target.command)
    c = plan.containers
    first = max(1, c // 10)
    label = f"{EXTRA_LOWERS_LABEL}={':'.join(dirs)}"
    lowers = str(DIRS + 1)  # and the parent's
    m: dict[str, float] = {}
    with perfbench.running(daemon):
        with grpc.insecure_channel(f"unix://{daemon.socket}") as channel:
            setup = SnapshotsClient(channel)
            setup.prepare("parent-active")
            setup.commit("parent", "parent-active")
        prepare = ("-c", "1", "-prefix", "c", "-phase", "prepare", "-parent", "parent", "-label", label)
        head = goclient(client, daemon, *prepare, "-expect-lowers", lowers, "-first", "0", "-n", str(first))
        m["mounts_after_10pct"] = mounts_under(daemon.root)
        rest = goclient(client, daemon, *prepare, "-expect-lowers", lowers, "-first", str(first), "-n", str(c - first))
        m["mounts_after_prepares"] = mounts_under(daemon.root)
        phases = {
            "prepare": {
                "latencies_us": head["latencies_us"] + rest["latencies_us"],
                "seconds": head["seconds"] + rest["seconds"],
                "server_cpu_s": head["server_cpu_s"] + rest["server_cpu_s"],
                "server_cpu_source": max(head["server_cpu_source"], rest["server_cpu_source"]),
            }
        }
        common = ("-c", "1", "-prefix", "c", "-n", str(c))
        phases["mounts"] = goclient(client, daemon, *common, "-phase", "mounts", "-expect-lowers", lowers)
        phases["remove"] = goclient(client, daemon, *common, "-phase", "remove")
        m["mounts_after_removes"] = mounts_under(daemon.root)
        assert daemon.proc is not None
        m["rss_mib"] = memory_kib(daemon.proc.pid)["VmRSS"] / 1024
    for phase, res in phases.items():
        lat = res["latencies_us"]
        if len(lat) != c:
            raise RuntimeError(f"{target.name}: {phase}: {len(lat)} calls timed, expected {c}")
        if res["server_cpu_source"] != "schedstat":
            log(f"  note: {target.name} {phase}: a server thread exited, CPU from /proc/PID/stat (10 ms ticks)")
        m[f"{phase}_p50_us"] = p50(lat)
        m[f"{phase}_p99_us"] = p99(lat)
        m[f"{phase}_ops_per_s"] = c / res["seconds"]
        m[f"{phase}_cpu_us"] = res["server_cpu_s"] / c * 1e6
    lat = phases["prepare"]["latencies_us"]
    m["prepare_first_p50_us"] = p50(lat[:first])
    m["prepare_last_p50_us"] = p50(lat[-first:])
    m["prepare_growth"] = m["prepare_last_p50_us"] / m["prepare_first_p50_us"]
    return m


def pins_round(r: int, targets: Sequence[Target], plan: Plan, work: Path, client: Path) -> Figures:
    figures: Figures = {}
    for t in rotated(targets, r):
        with fresh_fs(work / f"pins-r{r + 1}-{t.name}", PINS_FS, work / "failed-logs") as fs:
            figures[t.name] = m = pins_turn(t, fs, plan, client)
        log(
            f"  pins round {r + 1}/{plan.rounds} {t.name}: mounts {m['mounts_after_10pct']:.0f} -> "
            f"{m['mounts_after_prepares']:.0f}, Prepare p50 {m['prepare_first_p50_us']:.0f} -> "
            f"{m['prepare_last_p50_us']:.0f} us, ops/s Prepare {m['prepare_ops_per_s']:.0f} "
            f"Mounts {m['mounts_ops_per_s']:.0f} Remove {m['remove_ops_per_s']:.0f}"
        )
    return figures


# --- part 2: start-up and memory ----------------------------------------------------------------


def stat_key(n: int) -> str:
    return "s0-fill-0" if n else "scalebench-missing"


def archive(root: Path, dest: Path) -> None:
    """The daemon's root dir (stopped) as a tar, without its socket."""
    subprocess.run(
        ["tar", "-C", str(root.parent), f"--exclude={root.name}/grpc.socks", "-cf", str(dest), root.name], check=True
    )


def fill_stores(target: Target, plan: Plan, work: Path, client: Path, stores: Path) -> dict[str, float]:
    """Fill one store through the target's daemon to each size of the plan in turn, archiving its
    root at each (daemon stopped); the seconds each fill took."""
    assert target.command is not None
    sizes = [s for s in plan.sizes if SIZES[s]]
    took: dict[str, float] = {}
    if not sizes:
        return took
    with fresh_fs(work / f"fill-{target.name}", store_fs_size(SIZES[sizes[-1]]), work / "failed-logs") as fs:
        daemon = SnapshotterProcess(fs / "root", command=target.command)
        stored = 0
        for size in sizes:
            n = SIZES[size]
            with perfbench.running(daemon):
                res = goclient(client, daemon, "-fill", str(n - stored), "-prefix", f"s{stored}", "-c", "8")
            took[size] = res["seconds"]
            log(f"  {target.name}: filled {n - stored} committed snapshots (to {n}) in {res['seconds']:.1f} s")
            stored = n
            archive(daemon.root, stores / f"{target.name}-{size}.tar")
    return took


def stat(channel: grpc.Channel, key: str, timeout: float) -> None:
    """One Stat through addlower's Python client's stub, with a deadline."""
    client = SnapshotsClient(channel)
    client.stub.Stat(snapshots_pb2.StatSnapshotRequest(snapshotter=client.snapshotter, key=key), timeout=timeout)


@contextmanager
def timed_start(daemon: SnapshotterProcess, key: str, found: bool) -> Iterator[dict[str, float]]:
    """Start the daemon, timing from just before the exec until its socket accepts a connection
    and until it answers a Stat of `key` (found, or NOT_FOUND when not `found`); stopped after."""
    times: dict[str, float] = {}
    with open(daemon.log_path, "ab") as out:
        start = time.perf_counter()
        daemon.proc = subprocess.Popen(
            [*daemon.command, "--root-dir", str(daemon.root), *daemon.args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = start + START_TIMEOUT

        def alive() -> None:
            assert daemon.proc is not None
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"{daemon.command[-1]} exited {daemon.proc.returncode}:\n{daemon.log()[-3000:]}")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{daemon.command[-1]} did not answer in {START_TIMEOUT} s:\n{daemon.log()[-3000:]}")

        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(daemon.socket))
                    break
                except OSError:
                    pass
            alive()
            time.sleep(POLL)
        times["accept_ms"] = (time.perf_counter() - start) * 1e3
        while True:
            with grpc.insecure_channel(f"unix://{daemon.socket}") as channel:
                try:
                    stat(channel, key, max(0.1, deadline - time.perf_counter()))
                    if not found:
                        raise RuntimeError(f"Stat of {key} answered, expected NOT_FOUND")
                    break
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.NOT_FOUND and not found:
                        break
                    if e.code() != grpc.StatusCode.UNAVAILABLE:
                        raise RuntimeError(f"Stat of {key}: {e.code().name}: {e.details()}") from None
            alive()
            time.sleep(POLL)
        times["stat_ms"] = (time.perf_counter() - start) * 1e3
        yield times
    finally:
        daemon.stop()


def warm_grpc() -> None:
    """One failing call, so that the Python client's one-off set-up (gRPC core, its threads) is not
    in the first timed start-up."""
    with grpc.insecure_channel("unix:///nonexistent/scalebench.sock") as channel:
        try:
            stat(channel, "warm-up", 1.0)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise


def client_floor(daemon: SnapshotterProcess, key: str) -> float:
    """ms of a new channel and one Stat on the running daemon, as timed_start makes them."""

    def once() -> float:
        begin = time.perf_counter()
        with grpc.insecure_channel(f"unix://{daemon.socket}") as channel:
            try:
                stat(channel, key, START_TIMEOUT)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        return (time.perf_counter() - begin) * 1e3

    return statistics.median(once() for _ in range(FLOOR_STATS))


def startup_turn(target: Target, size: str, fs: Path, stores: Path, client: Path) -> dict[str, float]:
    assert target.command is not None
    n = SIZES[size]
    if n:
        subprocess.run(["tar", "-C", str(fs), "-xpf", str(stores / f"{target.name}-{size}.tar")], check=True)
    subprocess.run(["sync", "-f", str(fs)], check=True)
    daemon = SnapshotterProcess(fs / "root", command=target.command)
    with timed_start(daemon, stat_key(n), found=bool(n)) as m:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        m["rss_start_mib"] = memory_kib(pid)["VmRSS"] / 1024
        m["floor_ms"] = client_floor(daemon, stat_key(n))
        if n:
            walks = goclient(client, daemon, "-c", "1", "-phase", "walk", "-n", str(LISTS), "-expect-count", str(n))
            m["list_ms"] = statistics.median(walks["latencies_us"]) / 1e3
            memory = memory_kib(pid)
            m["rss_lists_mib"], m["hwm_mib"] = memory["VmRSS"] / 1024, memory["VmHWM"] / 1024
        else:
            m["hwm_mib"] = memory_kib(pid)["VmHWM"] / 1024
    return m


def startup_round(r: int, targets: Sequence[Target], plan: Plan, work: Path, stores: Path, client: Path) -> Figures:
    figures: Figures = {t.name: {} for t in targets}
    for i, size in enumerate(plan.sizes):
        for t in rotated(targets, r + i):
            fs_size = store_fs_size(SIZES[size])
            with fresh_fs(work / f"startup-r{r + 1}-{size}-{t.name}", fs_size, work / "failed-logs") as fs:
                m = startup_turn(t, size, fs, stores, client)
            figures[t.name] |= {f"{size}/{k}": v for k, v in m.items()}
            log(
                f"  startup round {r + 1}/{plan.rounds} {size} {t.name}: accept {m['accept_ms']:.0f} ms, "
                f"Stat {m['stat_ms']:.0f} ms, RSS {m['rss_start_mib']:.1f}"
                + (f" -> {m['rss_lists_mib']:.1f} MiB after {LISTS} Lists" if "rss_lists_mib" in m else " MiB")
            )
    for t in targets:  # start-up at each size over start-up on the empty store, this round
        f = figures[t.name]
        for size in plan.sizes[1:]:
            for what in ("accept", "stat"):
                if "empty/stat_ms" in f:
                    f[f"{size}/{what}_growth"] = f[f"{size}/{what}_ms"] / f[f"empty/{what}_ms"]
    return figures


# --- report -------------------------------------------------------------------------------------


def cell(by: dict[str, list[float]], t: str, fmt: Callable[[float], str] = num) -> str:
    return Spread.of(by[t]).show(fmt) if by.get(t) else "-"


def count(x: float) -> str:
    return f"{x:.0f}"


def per_round(by: dict[str, list[float]], a: str = "ours", b: str = "go") -> tuple[list[float], float | None]:
    """The per-round ratios a/b (rounds where b is 0 left out) and their median."""
    values = [x / y for x, y in zip(by.get(a, ()), by.get(b, ()), strict=False) if y]
    return values, statistics.median(values) if values else None


def ratio_line(what: str, by: dict[str, list[float]], width: int) -> str:
    values, median = per_round(by)
    if median is None:
        return f"{what:<{width}}-"
    return f"{what:<{width}}median {ratio(median):<8}per round: {' '.join(ratio(v) for v in values)}"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def median_of(samples: Samples, metric: str, t: str) -> float | None:
    values = samples.get(metric, {}).get(t)
    return statistics.median(values) if values else None


PINS_ROWS = (
    ("mounts_after_10pct", "mounts under root, after 10% of Prepares", ""),
    ("mounts_after_prepares", "mounts under root, after all Prepares", f"= {DIRS} distinct dirs + a constant"),
    ("mounts_after_removes", "mounts under root, after the Removes", ""),
    ("prepare_first_p50_us", "Prepare p50, first 10%, us", ""),
    ("prepare_last_p50_us", "Prepare p50, last 10%, us", ""),
    ("prepare_growth", "Prepare p50 last 10% / first 10%", f"<= {PREPARE_GROWTH_MAX}"),
    ("prepare_p50_us", "Prepare p50, all, us", ""),
    ("prepare_p99_us", "Prepare p99, all, us", ""),
    ("prepare_ops_per_s", "Prepare ops/s", f">= {THROUGHPUT_MIN}x go"),
    ("prepare_cpu_us", "Prepare server CPU/call, us", ""),
    ("mounts_p50_us", "Mounts p50, us", ""),
    ("mounts_p99_us", "Mounts p99, us", ""),
    ("mounts_ops_per_s", "Mounts ops/s", f">= {THROUGHPUT_MIN}x go"),
    ("mounts_cpu_us", "Mounts server CPU/call, us", ""),
    ("remove_p50_us", "Remove p50, us", ""),
    ("remove_p99_us", "Remove p99, us", ""),
    ("remove_ops_per_s", "Remove ops/s", f">= {THROUGHPUT_MIN}x go"),
    ("remove_cpu_us", "Remove server CPU/call, us", ""),
    ("rss_mib", "RSS after the Removes, MiB", ""),
)


def render_pins(samples: Samples, plan: Plan, names: Sequence[str]) -> str:
    c = plan.containers
    lines = [
        f"shared lowers: {c} containers x {DIRS} shared lowers ({DIRS} host dirs on the fresh fs, "
        f"{FILES_PER_DIR} files each; every Prepare on one committed parent, with the label naming all {DIRS}); "
        f"bench/goclient, one connection, calls in a row; {plan.rounds} rounds, fresh ext4 per target and round; "
        "median [min-max] over rounds",
        f"{'metric':<44}" + "".join(f"{n:>24}" for n in names) + "   target",
    ]
    for metric, what, target in PINS_ROWS:
        by = samples.get(metric, {})
        fmt = count if metric.startswith("mounts_after") else num
        lines.append(
            f"{what:<44}" + "".join(f"{cell(by, n, fmt):>24}" for n in names) + (f"   {target}" if target else "")
        )
    lines += [
        "",
        "ratios ours/go: the median of the per-round ratios, then each round's (ops/s: < 1 means ours is slower)",
    ]
    for metric, what, _ in PINS_ROWS:
        if metric.endswith(("_ops_per_s", "_p50_us", "_cpu_us")) or metric == "rss_mib":
            lines.append(ratio_line(what, samples.get(metric, {}), 44))
    lines += ["", "the issue's targets (on the medians):"]
    head, full = (median_of(samples, f"mounts_after_{w}", "ours") for w in ("10pct", "prepares"))
    if head is not None and full is not None:
        ok = full == head and full <= 2 * DIRS
        lines.append(
            f"  mounts under ours' root after {c} Prepares: {full:.0f} (after {max(1, c // 10)}: {head:.0f}); "
            f"target {DIRS} distinct dirs + a constant (per container would be {c * DIRS}): {verdict(ok)}"
        )
    growth = median_of(samples, "prepare_growth", "ours")
    if growth is not None:
        lines.append(
            f"  ours' Prepare p50, last 10% / first 10%: {ratio(growth)}; target <= {PREPARE_GROWTH_MAX}: "
            f"{verdict(growth <= PREPARE_GROWTH_MAX)}"
        )
    for phase in ("prepare", "mounts", "remove"):
        _, med = per_round(samples.get(f"{phase}_ops_per_s", {}))
        if med is not None:
            lines.append(
                f"  {phase.capitalize()} ops/s with {DIRS} lowers, ours/go: {ratio(med)}; target >= {THROUGHPUT_MIN}: "
                f"{verdict(med >= THROUGHPUT_MIN)}"
            )
    return "\n".join(lines)


STARTUP_ROWS = (
    ("accept_ms", "socket accepts, ms after exec"),
    ("stat_ms", "Stat answered, ms after exec"),
    ("floor_ms", "  (client floor: new channel + Stat, ms)"),
    ("rss_start_mib", "RSS after start, MiB"),
    ("list_ms", f"List (Walk) of the store, ms (median of {LISTS})"),
    ("rss_lists_mib", f"RSS after {LISTS} Lists, MiB"),
    ("hwm_mib", "peak RSS (VmHWM), MiB"),
    ("accept_growth", "accept at N / accept on empty store"),
    ("stat_growth", "Stat at N / Stat on empty store"),
)


def render_startup(samples: Samples, plan: Plan, names: Sequence[str], fills: dict[str, dict[str, float]]) -> str:
    lines = [
        f"start-up and memory: stores of N committed snapshots (filled once per target through its daemon, "
        f"goclient -fill -c {FILL_CONCURRENCY}, archived with tar and extracted onto each round's fresh ext4, "
        f"synced; start-up warm); {plan.rounds} rounds; median [min-max] over rounds",
        "fill through the daemon, s: "
        + "; ".join(f"{t} " + ", ".join(f"to {s} {v:.1f}" for s, v in f.items()) for t, f in fills.items()),
        f"{'N':<6}{'metric':<46}" + "".join(f"{n:>24}" for n in names),
    ]
    for size in plan.sizes:
        first = True
        for metric, what in STARTUP_ROWS:
            by = samples.get(f"{size}/{metric}")
            if by:
                lines.append(f"{size if first else '':<6}{what:<46}" + "".join(f"{cell(by, n):>24}" for n in names))
                first = False
    lines += [
        "",
        "ratios ours/go: the median of the per-round ratios, then each round's (> 1 means ours takes longer / "
        "more memory)",
    ]
    for size in plan.sizes:
        for metric, what in STARTUP_ROWS:
            if metric in ("floor_ms", "accept_growth", "stat_growth") or f"{size}/{metric}" not in samples:
                continue
            lines.append(ratio_line(f"{size:<6}{what}", samples[f"{size}/{metric}"], 52))
    lines += ["", "the issue's targets (on the medians):"]
    top = plan.sizes[-1]
    for t in names:
        growth = median_of(samples, f"{top}/stat_growth", t)
        if growth is not None:
            ok = growth <= STARTUP_GROWTH_MAX
            mark = f": {verdict(ok)}" if t == "ours" else " (for comparison)"
            lines.append(
                f"  {t} start-up (Stat answered) at {top} / on the empty store: {ratio(growth)}; "
                f"target <= {STARTUP_GROWTH_MAX}{mark}"
            )
    _, med = per_round(samples.get(f"{top}/rss_lists_mib", {}))
    if med is not None:
        lines.append(
            f"  RSS after {LISTS} Lists at {top}, ours/go: {ratio(med)}; target <= {RSS_RATIO_MAX}: "
            f"{verdict(med <= RSS_RATIO_MAX)}"
        )
    if top != "50k":
        lines.append(f"  (the targets name 50k; this run's largest store is {top})")
    return "\n".join(lines)


# --- the run ------------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "daemon code": str(Path(addlower.__file__).parent),
        "loadavg at start": perfbench.loadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, 300 containers, stores up to 10k (under 1 min)")
    parser.add_argument("--only", choices=("pins", "startup"), help="run one part only")
    parser.add_argument("--rounds", type=int, help="rounds (default 9, --quick 2)")
    parser.add_argument("--containers", type=int, help="part 1's containers (default 1000, --quick 300)")
    perfbench.add_output_args(parser, f"built with {perfbench.GO_BUILD} if missing")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (mount, mkfs)")
    plan = QUICK if args.quick else FULL
    given = {k: v for k in ("rounds", "containers") if (v := getattr(args, k)) is not None}
    plan = Plan(**{**asdict(plan), **given})
    if plan.rounds < 1 or plan.containers < 10:
        parser.error("need rounds >= 1, containers >= 10")
    if not args.go_bin.exists():
        perfbench.build_go(args.go_bin)
    # SIGTERM unwinds like Ctrl-C: daemons stopped, pins and filesystems unmounted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # The daemon (python -m addlower.cli) must be this checkout's, whatever else is installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(perfbench.REPO), os.environ.get("PYTHONPATH"))))
    targets = (Target("ours", (sys.executable, "-m", "addlower.cli")), Target("go", (str(args.go_bin.resolve()),)))
    names = [t.name for t in targets]
    env = environment()
    began = time.monotonic()
    out: dict = {"environment": env, "plan": asdict(plan), "targets": {t.name: list(t.command or ()) for t in targets}}
    text = [""]
    with perfbench.scratch("scalebench-") as work:
        log(f"building bench/goclient into {work} ...")
        client = perfbench.build_goclient(work / "goclient")
        if args.only in (None, "pins"):
            samples = perfbench.run_rounds("pins", plan.rounds, lambda r: pins_round(r, targets, plan, work, client))
            out["pins"] = {"samples": samples, "summary": perfbench.summary(samples, [PAIR])}
            text += ["", render_pins(samples, plan, names)]
        if args.only in (None, "startup"):
            stores = work / "stores"
            stores.mkdir()
            try:
                fills = {}
                for t in targets:
                    started = time.monotonic()
                    fills[t.name] = fill_stores(t, plan, work, client, stores)
                    log(f"startup: stores of {t.name} filled and archived in {time.monotonic() - started:.0f} s")
                warm_grpc()
                samples = perfbench.run_rounds(
                    "startup", plan.rounds, lambda r: startup_round(r, targets, plan, work, stores, client)
                )
            finally:
                shutil.rmtree(stores, ignore_errors=True)
            out["startup"] = {
                "fill_s": fills,
                "samples": samples,
                "summary": perfbench.summary(samples, [PAIR]),
            }
            text += ["", render_startup(samples, plan, names, fills)]
    return perfbench.finish(env, began, text, out, args.json)


if __name__ == "__main__":
    sys.exit(main())
