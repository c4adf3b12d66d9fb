#!/usr/bin/env python3
"""perfbench: our snapshotter against the Go original and containerd's built-in overlayfs, in one run.

Targets: `ours` (this checkout's daemon, `python -m addlower.cli --root-dir ...`, PYTHONPATH set to
this checkout), `go` (the original Go program, --go-bin) and `go'` (the same Go program again: the
go/go' ratios show the run's noise; they should be near 1.0). The end-to-end part adds `overlayfs`,
containerd's built-in snapshotter. Every target gets, in every round, a filesystem of its own made
for it: a sparse file under the run's dir in /tmp, `mkfs.ext4 -i 8192 -E lazy_itable_init=0,
lazy_journal_init=0` (no background inode-table init during the measurements), loop-mounted,
holding the snapshotter's root and, end to end, containerd's root and state too; unmounted and
deleted once the target's turn (per-op: the round) is over. (On a long-used disk, ext4's allocator
made containerd's import 1.4-3x slower.)
In each round every target takes its turn, the order rotating from round to round (per-op: from op
to op too), so drift (other load, page cache) spreads over all targets. Figures are the median over
the rounds, with [min-max]; ratios are computed per round (targets paired within a round), then
their median and [min-max] are shown.

Part 1, per-op (`--only per-op`): bench/goclient, a Go program using containerd's own Snapshots
proxy client (github.com/containerd/containerd/snapshots/proxy over a gRPC unix socket), is built
at run time into the run's dir from Debian's golang-go and golang-github-containerd-containerd-dev
(GOPATH mode, offline). Against each target's socket, directly, it runs each op at concurrency 1
(one goroutine) and 8 (8 goroutines, each on its own connection), N calls in all (each goroutine
ceil(N/c)), after untimed fixtures and a warm-up of a tenth of the calls (1 to 50 per goroutine).
In a round the three daemons run at once, each on its own fresh filesystem, and each op is run on
every target in turn (a goclient process per op and target), so one op's figures are taken
seconds apart. The ops, in this order:
  list-100, list-1000  List (the client's Walk) of the whole store, filled with committed snapshots
                       to exactly 100, then 1000 (these run first; the count is checked each call)
  stat                 Stat of a committed snapshot
  mounts               Mounts of an active snapshot with 3 committed parents
  prepare-remove       Prepare on a committed parent, then Remove (timed together)
  commit               Commit of an empty active snapshot (all Prepares done before the timed phase)
  chain                10 layers: Prepare on the previous layer, mount (containerd's mount package),
                       write 50 small files, unmount, Commit; the time of a whole chain
ops/s = calls / wall time of the timed phase; p50/p99 over every call's latency; server CPU per
call = the daemon's CPU time over the timed phase, divided by the calls: the sum of its threads'
run times (/proc/PID/task/TID/schedstat, ns), or, if one of them exited meanwhile, utime+stime
(/proc/PID/stat, 10 ms ticks; the JSON has both); then VmRSS and VmHWM (peak) of the daemon.

Part 2, end to end (`--only e2e`): a private containerd (addlower.dev.devcontainerd, the one on
PATH or $ADDLOWER_CONTAINERD_BIN_DIR) per target and round, with its CRI plugin on and CRI's
snapshotter set to the target; for ours/go/go' the daemon is its proxy plugin. Timed with the wall
clock, around the `ctr` processes:
  image import         `ctr images import --snapshotter S` of a locally built OCI image
                       (addlower.dev.ociimage: busybox plus 7 layers, 29k small files in all), unpacked
  ctr run              `ctr run --rm` of `/bin/true` in that image until ctr exits (after one
                       untimed run); median of the round's runs
  10 concurrent runs   10 such `ctr run --rm` at once, until the last exits
  ctr snapshots ls     `ctr snapshots --snapshotter S ls` of a namespace holding exactly 100, then
                       1000 snapshots (made untimed by bench/goclient through containerd: active, one
                       Prepare each, labelled containerd.io/gc.root); median of the round's runs
  CRI stats loop       real CRI, no kubelet: a pod (busybox pause) and 100 created, not started,
                       containers; containerd's CRI snapshot syncer then Walks the k8s.io snapshots
                       (through containerd: one Stat per snapshot for a proxy) and calls Usage of
                       each active one, every stats_collect_period, set to 1 s here. After 2 s to
                       settle, the CPU time (as for per-op) of the snapshotter process and of
                       containerd over a window of K periods (10; --quick 5); /K = CPU per sync,
                       x6 = CPU-s per minute at CRI's default period of 10 s (idle CPU in the
                       window included). For overlayfs the snapshotter is containerd itself:
                       compare the totals.
  RSS                  VmRSS and VmHWM of the snapshotter and of containerd at the end of the round.

Needs root, mount, mkfs.ext4 (e2fsprogs), containerd, ctr, runc, go and the Go original
(bash /work/shared/peers/seedsnap/build.sh). --quick: 2 rounds, a tenth of the calls, shorter
windows (about 4 min); the default: 5 rounds (about 14 min on 2 busy CPUs).

Usage: python3 bench/perfbench.py [--quick] [--only per-op|e2e] [--rounds N] [--json OUT] [--go-bin PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tomlkit  # noqa: E402

from addlower.core import ctrdconfig  # noqa: E402
from addlower.core.config import PLUGIN_NAME  # noqa: E402
from addlower.dev import ociimage  # noqa: E402
from addlower.dev.devcontainerd import (  # noqa: E402
    GO_ORIGINAL,
    GO_ORIGINAL_BUILD,
    CriSettings,
    PrivateContainerd,
    SnapshotterProcess,
    unmount_under,
)
from tests.support.cri.client import CriClient  # noqa: E402

HERE = Path(__file__).resolve().parent
GO_BIN = GO_ORIGINAL
GO_BUILD = f"bash {GO_ORIGINAL_BUILD}"
BUILTIN = ctrdconfig.BUILTIN_SNAPSHOTTER
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONCURRENCY = (1, 8)
WORKLOAD_REF = "localhost/perfbench/workload:latest"
# Files in each layer above busybox: 29k in all, most in the lower layers, as in a distro image.
WORKLOAD_LAYERS = (12000, 7000, 4000, 3000, 1500, 1000, 500)
LS_NAMESPACE = "perfbench-ls"
CRI_NAMESPACE = "k8s.io"
STATS_PERIOD = 1  # seconds: CRI's stats_collect_period during the runs
DEFAULT_STATS_PERIOD = 10  # CRI's default, which the per-minute figure is scaled to
FS_SIZE = {"per-op": 2 << 30, "e2e": 4 << 30}


@dataclass(frozen=True)
class Plan:
    rounds: int
    ops: tuple[tuple[str, int], ...]  # per-op: (goclient op, calls at each concurrency), in order
    start_runs: int  # timed `ctr run`s per round
    ls_runs: int  # timed `ctr snapshots ls` per size and round
    stats_containers: int
    stats_syncs: int  # the CPU window, in stats periods


FULL = Plan(
    rounds=5,
    ops=(
        ("list-100", 1000),
        ("list-1000", 200),
        ("stat", 3000),
        ("mounts", 3000),
        ("prepare-remove", 1000),
        ("commit", 1000),
        ("chain", 10),
    ),
    start_runs=3,
    ls_runs=5,
    stats_containers=100,
    stats_syncs=10,
)
QUICK = Plan(
    rounds=2,
    ops=(
        ("list-100", 100),
        ("list-1000", 20),
        ("stat", 300),
        ("mounts", 300),
        ("prepare-remove", 100),
        ("commit", 100),
        ("chain", 2),
    ),
    start_runs=2,
    ls_runs=3,
    stats_containers=100,
    stats_syncs=5,
)


@dataclass(frozen=True)
class Target:
    name: str
    command: tuple[str, ...] | None  # the snapshotter daemon; None: containerd's built-in overlayfs

    @property
    def snapshotter(self) -> str:
        return PLUGIN_NAME if self.command else BUILTIN


Figures = dict[str, dict[str, float]]  # one round: target -> metric -> value
Samples = dict[str, dict[str, list[float]]]  # metric -> target -> one value per round


def rotated(items: Sequence[Target], by: int) -> list[Target]:
    by %= len(items)
    return [*items[by:], *items[:by]]


# --- processes and filesystems ----------------------------------------------------------------


@dataclass(frozen=True)
class CpuSample:
    """A process's CPU time at one instant: utime+stime (/proc/PID/stat, clock ticks, exited threads
    included) and each live thread's run time (/proc/PID/task/TID/schedstat, ns)."""

    stat_s: float
    threads_ns: dict[str, int]

    @staticmethod
    def of(pid: int) -> CpuSample:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        threads = {}
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # the thread exited meanwhile
                threads[task.name] = int((task / "schedstat").read_text().split()[0])
        return CpuSample((int(fields[11]) + int(fields[12])) / CLK_TCK, threads)

    def until(self, later: CpuSample) -> float:
        """CPU seconds from this sample to `later`: from the threads' run times unless one of them
        exited (its time would be lost), else from utime+stime, 10 ms coarse."""
        if not self.threads_ns.keys() <= later.threads_ns.keys():
            return later.stat_s - self.stat_s
        return sum(ns - self.threads_ns.get(tid, 0) for tid, ns in later.threads_ns.items()) / 1e9


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


@contextmanager
def fresh_fs(mountpoint: Path, size: int, keep_logs: Path) -> Iterator[Path]:
    """A new ext4 on a sparse loop file beside `mountpoint`, mounted there; unmounted and deleted
    afterwards. If the block fails, the logs on it are copied to `keep_logs` first."""
    image = mountpoint.with_name(mountpoint.name + ".ext4")
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(size)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-i", "8192", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
            check=True,
        )
        mountpoint.mkdir()
        subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
        mounted = True
        yield mountpoint
    except BaseException:
        for log in mountpoint.rglob("*.log") if mounted else ():
            if log.is_file() and "pod-logs" not in log.parts:
                dest = keep_logs / mountpoint.name / log.relative_to(mountpoint)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(log, dest)
        raise
    finally:
        if mounted:
            unmount_under(mountpoint)
            if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mountpoint)], check=True)
        image.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            mountpoint.rmdir()


@contextmanager
def running(daemon: SnapshotterProcess) -> Iterator[SnapshotterProcess]:
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


class BenchContainerd(PrivateContainerd):
    """A PrivateContainerd whose CRI snapshot syncer runs every STATS_PERIOD seconds."""

    def config(self) -> str:
        doc = tomlkit.parse(super().config())
        version = self.config_version  # the setting moved to CRI's images plugin in 2.0
        table = ctrdconfig.cri_images_table(version) if version >= 3 else ("plugins", ctrdconfig.CRI_SERVICE)
        ctrdconfig.set_path(doc, table, "stats_collect_period", STATS_PERIOD)
        return tomlkit.dumps(doc)


# --- the Go client ----------------------------------------------------------------------------


def build_goclient(out: Path) -> Path:
    """go build bench/goclient in GOPATH mode against Debian's packaged Go sources, offline."""
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": "/usr/share/gocode",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOCACHE": os.environ.get("GOCACHE", "/tmp/perfbench-gocache"),
    }
    subprocess.run(["go", "build", "-o", str(out), "."], cwd=HERE / "goclient", env=env, check=True)
    return out


def goclient(binary: Path, *args: str) -> Any:
    """Run bench/goclient; what it prints, parsed (its shape depends on the mode)."""
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"goclient {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


# --- per-op -----------------------------------------------------------------------------------


def per_op_round(r: int, targets: Sequence[Target], plan: Plan, work: Path, client: Path) -> Figures:
    """Round r of part 1: every target's daemon up at once, each on a fresh filesystem of its own;
    then op by op (each at every concurrency) every target in turn, the order rotating with the op
    and the round, so the targets' figures for one op are taken seconds apart."""
    figures: Figures = {t.name: {} for t in targets}
    with ExitStack() as stack:
        daemons = {}
        for t in targets:
            assert t.command
            fs = stack.enter_context(fresh_fs(work / fs_name("per-op", r, t), FS_SIZE["per-op"], work / "failed-logs"))
            (fs / "mnt").mkdir()
            daemons[t.name] = stack.enter_context(running(SnapshotterProcess(fs / "root", command=t.command))), fs
        for i, (op, n) in enumerate(plan.ops):
            for t in rotated(targets, r + i):
                daemon, fs = daemons[t.name]
                assert daemon.proc is not None
                results = goclient(
                    client,
                    "-address",
                    str(daemon.socket),
                    "-pid",
                    str(daemon.proc.pid),
                    "-clk-tck",
                    str(CLK_TCK),
                    "-workdir",
                    str(fs / "mnt"),
                    "-prefix",
                    "pb",
                    "-ops",
                    f"{op}:{n}",
                    "-c",
                    ",".join(map(str, CONCURRENCY)),
                )
                for res in results:
                    key = f"{res['op']}/c{res['concurrency']}"
                    if res["server_cpu_source"] != "schedstat":
                        log(f"  note: {t.name} {key}: a server thread exited, CPU from /proc/PID/stat (10 ms ticks)")
                    figures[t.name] |= {
                        f"{key}/ops_per_s": res["ops_per_s"],
                        f"{key}/p50_us": res["p50_us"],
                        f"{key}/p99_us": res["p99_us"],
                        f"{key}/cpu_us_per_op": res["server_cpu_us_per_op"],
                    }
        for t in targets:
            daemon, _ = daemons[t.name]
            assert daemon.proc is not None
            memory = memory_kib(daemon.proc.pid)
            figures[t.name] |= {"rss_mib": memory["VmRSS"] / 1024, "hwm_mib": memory["VmHWM"] / 1024}
    return figures


# --- end to end -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    workload: ociimage.OciImage
    busybox: ociimage.OciImage
    pause: ociimage.OciImage
    summary: str  # what the workload image holds


def workload_layers(files_per_layer: Sequence[int], seed: int = 14) -> list[list[ociimage.Entry]]:
    """Layers of small files, deterministic: dirs of 25 files under 200-file packages, sizes
    log-normal around 1 KiB (mean about 2 KiB, at most 64 KiB), text-like (gzip to about 60%),
    one file in 40 a symlink, one in 20 executable; each layer also rewrites 1% of the one below."""
    rng = random.Random(seed)
    text = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz      \n") for _ in range(1 << 17))
    layers: list[list[ociimage.Entry]] = []
    below: list[str] = []
    for n, count in enumerate(files_per_layer):
        entries: list[ociimage.Entry] = []
        dirs: set[str] = set()
        paths: list[str] = []
        for i in range(count):
            d = f"usr/lib/perfbench{n}/pkg{i // 200:03d}/d{(i // 25) % 8}"
            for k in range(3, d.count("/") + 2):
                parent = "/".join(d.split("/")[:k])
                if parent not in dirs:
                    dirs.add(parent)
                    entries.append(ociimage.directory(parent))
            path = f"{d}/f{i}"
            if i % 40 == 39:
                entries.append(ociimage.symlink(path, f"f{i - 1}"))
                continue
            size = min(65536, int(rng.lognormvariate(7, 1.2)))
            start = rng.randrange(len(text) - size)
            entries.append(ociimage.file(path, text[start : start + size], mode=0o755 if i % 20 == 0 else 0o644))
            paths.append(path)
        for path in rng.sample(below, len(below) // 100):
            entries.append(ociimage.file(path, text[: rng.randrange(64, 4096)]))
        layers.append(entries)
        below = paths
    return layers


def build_images(out: Path) -> Images:
    layers = workload_layers(WORKLOAD_LAYERS)
    workload = ociimage.build_busybox_image(
        out / "workload.tar", ref=WORKLOAD_REF, cmd=("/bin/true",), extra_layers=layers
    )
    entries = [e for layer in layers for e in layer]
    count = {kind: sum(e.type == kind for e in entries) for kind in (tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE)}
    summary = (
        f"busybox + {len(layers)} layers: {count[tarfile.REGTYPE]} files, {count[tarfile.SYMTYPE]} symlinks, "
        f"{count[tarfile.DIRTYPE]} dirs, {sum(len(e.data) for e in entries) >> 20} MiB "
        f"({workload.path.stat().st_size >> 20} MiB as the tar of gzipped layers)"
    )
    return Images(
        workload,
        ociimage.build_busybox_image(out / "busybox.tar"),
        ociimage.build_pause_image(out / "pause.tar"),
        summary,
    )


def e2e_turn(target: Target, fs: Path, plan: Plan, images: Images, client: Path) -> dict[str, float]:
    """One target's turn in a round: a fresh containerd (and daemon) on `fs`, every workload."""
    sn = target.snapshotter
    with ExitStack() as stack:
        proxies = {}
        daemon = None
        if target.command:
            daemon = stack.enter_context(running(SnapshotterProcess(fs / "snap", command=target.command)))
            proxies = {PLUGIN_NAME: daemon.socket}
        ctrd = stack.enter_context(
            BenchContainerd(
                fs / "ctrd", proxy_plugins=proxies, cri=CriSettings(snapshotter=sn), differ=target.name == "ours"
            )
        )  # the Go original has none
        assert ctrd.proc is not None
        ctrd_pid = ctrd.proc.pid
        snap_pid = daemon.proc.pid if daemon and daemon.proc else ctrd_pid
        m: dict[str, float] = {}

        m["import_s"] = timed(lambda: ctrd.import_image(images.workload.path, snapshotter=sn))
        layers = set(ctrd.ctr("snapshots", "--snapshotter", sn, "ls").stdout.split())
        if not set(images.workload.chain_ids) <= layers:
            raise RuntimeError(f"the import left {sorted(layers)} in {sn}, not the image's layers")

        def run(name: str) -> None:
            ctrd.run(WORKLOAD_REF, name, "/bin/true", snapshotter=sn)

        run("warm-up")
        m["run_s"] = statistics.median(timed(functools.partial(run, f"run-{i}")) for i in range(plan.start_runs))
        with ThreadPoolExecutor(10) as pool:
            m["run10_s"] = timed(lambda: list(pool.map(run, (f"run10-{i}" for i in range(10)))))

        stored = 0
        for size in (100, 1000):
            goclient(
                client,
                "-populate",
                str(size - stored),
                "-address",
                str(ctrd.address),
                "-namespace",
                LS_NAMESPACE,
                "-snapshotter",
                sn,
                "-prefix",
                f"ls{stored}",
                "-c",
                "8",
            )
            stored = size

            def ls(size: int = size) -> None:
                lines = ctrd.ctr("snapshots", "--snapshotter", sn, "ls", namespace=LS_NAMESPACE).stdout.splitlines()
                if len(lines) != size + 1:  # and the header
                    raise RuntimeError(f"ctr snapshots ls listed {len(lines) - 1} snapshots, expected {size}")

            m[f"ls{size}_s"] = statistics.median(timed(ls) for _ in range(plan.ls_runs))

        m |= stats_loop(ctrd, images, plan, fs, snap_pid, ctrd_pid)
        ctrd_mem = memory_kib(ctrd_pid)
        m["ctrd_rss_mib"] = ctrd_mem["VmRSS"] / 1024
        if daemon:
            snap_mem = memory_kib(snap_pid)
            m["snap_rss_mib"], m["snap_hwm_mib"] = snap_mem["VmRSS"] / 1024, snap_mem["VmHWM"] / 1024
            m["total_rss_mib"] = m["ctrd_rss_mib"] + m["snap_rss_mib"]
        else:
            m["total_rss_mib"] = m["ctrd_rss_mib"]
        return m


def stats_loop(
    ctrd: PrivateContainerd, images: Images, plan: Plan, fs: Path, snap_pid: int, ctrd_pid: int
) -> dict[str, float]:
    """CPU of the snapshotter and of containerd while CRI's syncer runs over a pod's containers."""
    sn = ctrd.cri.snapshotter if ctrd.cri else BUILTIN
    for image in (images.pause, images.busybox):
        ctrd.import_image(image.path, namespace=CRI_NAMESPACE, snapshotter=sn)
    cri = CriClient(ctrd.address, log_root=fs / "pod-logs")
    try:
        pod = cri.run_pod("perfbench")
        for i in range(plan.stats_containers):
            cri.create_container(pod.id, pod.config, f"c{i}", images.busybox.ref, ["sleep", "3600"])
        time.sleep(2 * STATS_PERIOD)  # the first syncs also take the new snapshots' Usage
        snap0, ctrd0 = CpuSample.of(snap_pid), CpuSample.of(ctrd_pid)
        time.sleep(plan.stats_syncs * STATS_PERIOD)
        snap, total = snap0.until(CpuSample.of(snap_pid)), ctrd0.until(CpuSample.of(ctrd_pid))
    finally:
        cri.close()
    scale = 60 / DEFAULT_STATS_PERIOD / plan.stats_syncs  # per sync, then syncs per minute at 10 s
    if snap_pid != ctrd_pid:
        total += snap
        return {"stats_snap_cpu_s_min": snap * scale, "stats_total_cpu_s_min": total * scale}
    return {"stats_total_cpu_s_min": total * scale}


def e2e_round(r: int, targets: Sequence[Target], plan: Plan, work: Path, images: Images, client: Path) -> Figures:
    """Round r of part 2: one target after the other (order rotating with the round), each with a
    fresh filesystem, containerd and daemon of its own, torn down before the next starts."""
    figures: Figures = {}
    for t in rotated(targets, r):
        started = time.monotonic()
        with fresh_fs(work / fs_name("e2e", r, t), FS_SIZE["e2e"], work / "failed-logs") as fs:
            figures[t.name] = e2e_turn(t, fs, plan, images, client)
        log(f"  e2e round {r + 1}/{plan.rounds} {t.name}: {time.monotonic() - started:.0f} s")
    return figures


# --- the run ----------------------------------------------------------------------------------


def fs_name(part: str, r: int, target: Target) -> str:
    return f"{part}-r{r + 1}-{target.name.replace(chr(39), '2')}"


def run_rounds(part: str, rounds: int, one_round: Callable[[int], Figures]) -> Samples:
    samples: Samples = {}
    for r in range(rounds):
        started = time.monotonic()
        for target, figures in one_round(r).items():
            for metric, value in figures.items():
                samples.setdefault(metric, {}).setdefault(target, []).append(value)
        log(f"{part} round {r + 1}/{rounds}: {time.monotonic() - started:.0f} s")
    return samples


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float

    @staticmethod
    def of(values: Sequence[float]) -> Spread:
        return Spread(statistics.median(values), min(values), max(values))

    def show(self, fmt: Callable[[float], str]) -> str:
        return f"{fmt(self.median)} [{fmt(self.min)}-{fmt(self.max)}]"


def num(x: float) -> str:
    """Three significant digits or so."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def ratio(x: float) -> str:
    return f"{x:.2f}"


def ratios(samples: dict[str, list[float]], a: str, b: str) -> Spread | None:
    """The per-round ratios a/b (paired within rounds; rounds where b is 0, e.g. no CPU tick, left out)."""
    pairs = [x / y for x, y in zip(samples.get(a, ()), samples.get(b, ()), strict=False) if y]
    return Spread.of(pairs) if pairs else None


def summary(samples: Samples, pairs: Sequence[tuple[str, str]]) -> dict:
    return {
        metric: {
            "targets": {t: asdict(Spread.of(v)) for t, v in by.items()},
            "ratios": {f"{a}/{b}": asdict(s) for a, b in pairs if (s := ratios(by, a, b))},
        }
        for metric, by in samples.items()
    }


def render_per_op(samples: Samples, plan: Plan, targets: Sequence[str]) -> str:
    lines = [
        f"per-op: bench/goclient (containerd's Go proxy client) on each daemon's socket, {plan.rounds} rounds, "
        "fresh ext4 per target and round; median [min-max] over rounds",
        f"{'op':<15}{'c':>2}  {'target':<7}{'ops/s':>22}{'p50 us':>10}{'p99 us':>10}{'server CPU us/call':>26}",
    ]
    for op, _ in plan.ops:
        for c in CONCURRENCY:
            key = f"{op}/c{c}"
            for i, t in enumerate(targets):

                def med(f: str, key: str = key, t: str = t) -> float:
                    return statistics.median(samples[f"{key}/{f}"][t])

                lines.append(
                    f"{op if i == 0 else '':<15}{c if i == 0 else '':>2}  {t:<7}"
                    f"{Spread.of(samples[f'{key}/ops_per_s'][t]).show(num):>22}{num(med('p50_us')):>10}"
                    f"{num(med('p99_us')):>10}{Spread.of(samples[f'{key}/cpu_us_per_op'][t]).show(num):>26}"
                )
    for metric, what in (("rss_mib", "RSS after the ops, MiB"), ("hwm_mib", "peak RSS, MiB")):
        lines.append(f"{what:<24}" + "".join(f"  {t} {Spread.of(samples[metric][t]).show(num)}" for t in targets))
    lines += [
        "",
        "per-op ratios, median [min-max] of the per-round ratios (ops/s: < 1 means slower; "
        "CPU/call: > 1 means more CPU)",
        f"{'op':<15}{'c':>2}"
        + "".join(f"{h:>20}" for h in ("ops/s ours/go", "ops/s go/go'", "CPU ours/go", "CPU go/go'")),
    ]
    for op, _ in plan.ops:
        for c in CONCURRENCY:
            key = f"{op}/c{c}"
            cells = [
                ratios(samples[f"{key}/{f}"], a, b)
                for f in ("ops_per_s", "cpu_us_per_op")
                for a, b in (("ours", "go"), ("go", "go'"))
            ]
            lines.append(f"{op:<15}{c:>2}" + "".join(f"{s.show(ratio) if s else '-':>20}" for s in cells))
    for metric, what in (("rss_mib", "RSS ours/go"), ("hwm_mib", "peak RSS ours/go")):
        s = ratios(samples[metric], "ours", "go")
        lines.append(f"{what:<17}{s.show(ratio) if s else '-':>20}")
    return "\n".join(lines)


E2E_ROWS = (
    ("import_s", "image import, s"),
    ("run_s", "ctr run --rm, s"),
    ("run10_s", "10 concurrent ctr run, s"),
    ("ls100_s", "ctr snapshots ls 100, s"),
    ("ls1000_s", "ctr snapshots ls 1000, s"),
    ("stats_snap_cpu_s_min", "stats: snapshotter CPU-s/min"),
    ("stats_total_cpu_s_min", "stats: containerd+snapshotter CPU-s/min"),
    ("snap_rss_mib", "snapshotter RSS, MiB"),
    ("snap_hwm_mib", "snapshotter peak RSS, MiB"),
    ("ctrd_rss_mib", "containerd RSS, MiB"),
    ("total_rss_mib", "containerd+snapshotter RSS, MiB"),
)


def render_e2e(samples: Samples, plan: Plan, targets: Sequence[str], env: dict[str, str], image: str) -> str:
    lines = [
        f"end to end through containerd {env['containerd']} (CRI on), {plan.rounds} rounds, fresh ext4 per "
        "target and round; median [min-max]",
        f"image: {image}",
        f"ctr run: /bin/true, median of {plan.start_runs}; ls: median of {plan.ls_runs}; "
        "stats: real CRI snapshot syncer over "
        f"{plan.stats_containers} created containers, period {STATS_PERIOD} s, {plan.stats_syncs} periods, "
        f"scaled to the default {DEFAULT_STATS_PERIOD} s",
        f"{'metric':<40}" + "".join(f"{t:>22}" for t in targets),
    ]
    for metric, what in E2E_ROWS:
        if metric in samples:
            by = samples[metric]
            lines.append(
                f"{what:<40}" + "".join(f"{Spread.of(by[t]).show(num) if t in by else '-':>22}" for t in targets)
            )
    pairs = (("ours", "go"), ("ours", "overlayfs"), ("go", "go'"))
    lines += [
        "",
        "end-to-end ratios, median [min-max] of the per-round ratios (> 1 means ours takes longer / "
        "more CPU / more memory)",
        f"{'metric':<40}" + "".join(f"{a + '/' + b:>20}" for a, b in pairs),
    ]
    for metric, what in E2E_ROWS:
        if metric in samples:
            cells = [ratios(samples[metric], a, b) for a, b in pairs]
            lines.append(f"{what:<40}" + "".join(f"{s.show(ratio) if s else '-':>20}" for s in cells))
    return "\n".join(lines)


def environment() -> dict[str, str]:
    import addlower

    version = PrivateContainerd(Path("/nonexistent")).binaries.version
    return {
        "python": platform.python_version(),
        "containerd": ".".join(map(str, version)),
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "daemon code": str(Path(addlower.__file__).parent),
        "loadavg at start": loadavg(),
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A run's work dir under /tmp: removed when the run succeeds, kept (with the failed turn's
    logs in failed-logs/) when it fails."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield work
    except BaseException:
        log(f"failed; logs of the failed turn, if any, are in {work / 'failed-logs'}")
        raise
    shutil.rmtree(work)


def finish(env: dict, began: float, text: list[str], out: dict, json_path: Path | None) -> int:
    """Print the report (`text`, its first line the environment and the run's time) and write the
    JSON (`out`) if asked; the exit code."""
    env["loadavg at end"] = loadavg()
    out["elapsed_s"] = time.monotonic() - began
    text[0] = ", ".join(f"{k} {v}" for k, v in env.items()) + f", took {out['elapsed_s'] / 60:.1f} min"
    print("\n".join(text))
    if json_path:
        json_path.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def add_output_args(parser: argparse.ArgumentParser, build_note: str) -> None:
    """--json and --go-bin, as every bench against the Go original takes them."""
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write samples and summaries as JSON")
    parser.add_argument(
        "--go-bin", type=Path, default=GO_BIN, help=f"the original Go program (default {GO_BIN}; {build_note})"
    )


def build_go(go_bin: Path) -> None:
    """The Go original, with the peers' build script (Debian's Go packages, offline)."""
    script = GO_BUILD.split()[-1]
    log(f"building the Go original into {go_bin} ({GO_BUILD}) ...")
    subprocess.run(["bash", script, "", str(go_bin)], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, a tenth of the calls (about 4 min)")
    parser.add_argument("--only", choices=("per-op", "e2e"), help="run one part only")
    parser.add_argument("--rounds", type=int, help="rounds (default 5, --quick 2)")
    add_output_args(parser, f"build: {GO_BUILD}")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (mount, mkfs, containerd)")
    if not args.go_bin.exists():
        parser.error(f"{args.go_bin} is missing; build it with {GO_BUILD}")
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(**{**asdict(plan), "rounds": args.rounds})
    # The daemon (python -m addlower.cli) must be this checkout's, whatever else is installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    ours = Target("ours", (sys.executable, "-m", "addlower.cli"))
    go, go2 = Target("go", (str(args.go_bin.resolve()),)), Target("go'", (str(args.go_bin.resolve()),))
    env = environment()
    began = time.monotonic()
    out: dict = {"environment": env, "plan": asdict(plan)}
    text = [", ".join(f"{k} {v}" for k, v in env.items())]
    with scratch("perfbench-") as work:
        log(f"building bench/goclient into {work} ...")
        client = build_goclient(work / "goclient")
        if args.only in (None, "per-op"):
            targets: tuple[Target, ...] = (ours, go, go2)
            samples = run_rounds("per-op", plan.rounds, lambda r: per_op_round(r, targets, plan, work, client))
            out["per_op"] = {"samples": samples, "summary": summary(samples, (("ours", "go"), ("go", "go'")))}
            text += ["", render_per_op(samples, plan, [t.name for t in targets])]
        if args.only in (None, "e2e"):
            log("building the images ...")
            images = build_images(work / "images")
            targets = (ours, go, go2, Target("overlayfs", None))
            samples = run_rounds("e2e", plan.rounds, lambda r: e2e_round(r, targets, plan, work, images, client))
            out["e2e"] = {
                "image": images.summary,
                "samples": samples,
                "summary": summary(samples, (("ours", "go"), ("ours", "overlayfs"), ("go", "go'"))),
            }
            text += ["", render_e2e(samples, plan, [t.name for t in targets], env, images.summary)]
    return finish(env, began, text, out, args.json)


if __name__ == "__main__":
    sys.exit(main())
