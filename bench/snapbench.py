#!/usr/bin/env python3
"""snapbench: latency and throughput of Snapshots API calls on four targets, in one run.

Targets, each started on a fresh temp root under /tmp:
  (a) ours        our daemon's socket, called directly;
  (b) go          the original Go program's socket, called directly;
  (c) ctrd/ovl    containerd's built-in `overlayfs` snapshotter through containerd's socket;
  (d) ctrd/ours   our daemon (a second instance) as containerd's proxy plugin, through containerd.
(c) and (d) send the gRPC metadata `containerd-namespace` and `containerd-lease`: the lease keeps
containerd's garbage collector from deleting the benchmark's snapshots. The Leases stubs are
generated at run time from bench/leases.proto with grpc_tools.protoc into a temp dir.

One synchronous gRPC client class (one channel per target) runs the same workload on every
target, one call at a time. Op by op: set up every target, warm up every target, then run the N
timed iterations (time.perf_counter around the calls named below) in 8 rounds interleaved over
the targets, the order rotating each round, so drift does not favour one target. Keys are unique
per run. The workload:
  list-100, list-1000  List of the whole store when it holds exactly 100, then 1000 committed
                       snapshots (run first on empty stores; the count is checked every time).
                       These snapshots stay for the later ops.
  stat                 Stat of a committed snapshot.
  mounts               Mounts of an active snapshot with 3 committed parents.
  prepare+remove       Prepare an active snapshot on a committed parent, then Remove it (timed together).
  commit               Commit of an empty active snapshot (its Prepare is not timed).
  chain-10x50          One chain of 10 layers: per layer Prepare on the previous layer, `mount` the
                       returned mounts, write 50 small files, `umount`, Commit (time per chain).
Reports ops/s (N / total timed seconds), p50 and p99 latency, the throughput ratios (a)/(b) and
(d)/(c), and VmRSS/VmHWM of the daemons after the run. Needs root (mount, containerd).

Usage: python3 bench/snapbench.py [--quick] [--json OUT] [--go-bin PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import grpc
from grpc_tools import protoc

from addlower.ops.client import SnapshotsClient
from addlower.core.config import PLUGIN_NAME
from addlower.dev.devcontainerd import PrivateContainerd, SnapshotterProcess
from addlower.dev.mounting import mounted

HERE = Path(__file__).resolve().parent
GO_BIN = Path("/tmp/peers-bin/overlay-custom-add-lower-snapshotter")
GO_BUILD = "bash /work/shared/peers/seedsnap/build.sh"
NAMESPACE = "snapbench"
FILES_PER_LAYER = 50
LAYERS_PER_CHAIN = 10
MOUNTS_PARENTS = 3
LIST_SIZES = (100, 1000)
ROUNDS = 8


# --- workload sizes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Timed iterations per op; the warm-up is a tenth of it (at least 1, at most 50)."""

    stat: int
    mounts: int
    prepare_remove: int
    list_small: int
    list_large: int
    commit: int
    chain: int

    @staticmethod
    def warmup(n: int) -> int:
        return min(50, max(1, n // 10))


FULL = Sizes(stat=2000, mounts=2000, prepare_remove=500, list_small=200, list_large=40, commit=500, chain=10)
QUICK = Sizes(stat=100, mounts=100, prepare_remove=30, list_small=10, list_large=3, commit=30, chain=1)


# --- client -----------------------------------------------------------------------------------


def committed(client: SnapshotsClient, name: str, parent: str = "") -> str:
    """Prepare `name`-active on `parent` and commit it as `name`; returns `name`."""
    client.prepare(f"{name}-active", parent)
    client.commit(name, f"{name}-active")
    return name


# --- targets ----------------------------------------------------------------------------------


@dataclass
class Target:
    label: str  # a, b, c, d
    name: str
    client: SnapshotsClient
    pid: int  # the process whose memory is reported
    process: str  # what that process is


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def leases_stubs(out: Path) -> tuple[ModuleType, ModuleType]:
    """Generate and import the Python stubs of bench/leases.proto."""
    args = ["protoc", f"-I{HERE}", f"--python_out={out}", f"--grpc_python_out={out}", str(HERE / "leases.proto")]
    if protoc.main(args) != 0:
        raise RuntimeError("grpc_tools.protoc failed on bench/leases.proto")
    sys.path.insert(0, str(out))
    return importlib.import_module("leases_pb2"), importlib.import_module("leases_pb2_grpc")


def through_containerd(channel: grpc.Channel, snapshotter: str, namespace: str,
                       leases: tuple[ModuleType, ModuleType]) -> SnapshotsClient:
    """A client for `snapshotter` in containerd `namespace`, holding a fresh lease there."""
    leases_pb2, leases_pb2_grpc = leases
    ns = (("containerd-namespace", namespace),)
    lease = leases_pb2_grpc.LeasesStub(channel).Create(leases_pb2.CreateRequest(id=f"{namespace}-lease"), metadata=ns)
    return SnapshotsClient(channel, snapshotter, (*ns, ("containerd-lease", lease.lease.id)))


@contextmanager
def targets(work: Path, go_bin: Path, run_id: str) -> Iterator[list[Target]]:
    """Start the three snapshotter processes and containerd; yield the four targets; stop all."""
    with ExitStack() as stack:
        ours = stack.enter_context(_running(SnapshotterProcess(work / "ours")))
        go = stack.enter_context(_running(SnapshotterProcess(work / "go", command=[str(go_bin)])))
        proxied = stack.enter_context(_running(SnapshotterProcess(work / "proxied")))
        ctrd = stack.enter_context(PrivateContainerd(work / "ctrd", proxy_plugins={PLUGIN_NAME: proxied.socket}))
        channels = [stack.enter_context(grpc.insecure_channel(f"unix://{path}"))
                    for path in (ours.socket, go.socket, ctrd.address)]
        leases = leases_stubs(Path(stack.enter_context(tempfile.TemporaryDirectory(dir=work))))
        assert ctrd.proc is not None
        yield [
            Target("a", "ours", SnapshotsClient(channels[0], PLUGIN_NAME), ours.proc.pid, "our daemon"),
            Target("b", "go", SnapshotsClient(channels[1], PLUGIN_NAME), go.proc.pid, "Go original"),
            Target("c", "ctrd/ovl", through_containerd(channels[2], "overlayfs", f"{NAMESPACE}-{run_id}-c", leases),
                   ctrd.proc.pid, "containerd (serves c and d)"),
            Target("d", "ctrd/ours", through_containerd(channels[2], PLUGIN_NAME, f"{NAMESPACE}-{run_id}-d", leases),
                   proxied.proc.pid, "our daemon as proxy plugin"),
        ]


@contextmanager
def _running(daemon: SnapshotterProcess) -> Iterator[SnapshotterProcess]:
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


# --- ops --------------------------------------------------------------------------------------


Step = Callable[[str], float]  # one iteration; gets a unique tag, returns the seconds it timed


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


@dataclass
class Workload:
    """The ops for one target's client. Each op method creates its fixtures and returns its Step.

    `prefix` makes keys unique per run and per target.
    """

    client: SnapshotsClient
    prefix: str
    mountpoint: Path
    stored: int = 0  # committed snapshots created by the list ops

    def key(self, *parts: str) -> str:
        return "-".join((self.prefix, *parts))

    def list_all(self, size: int) -> Step:
        while self.stored < size:
            committed(self.client, self.key("list", str(self.stored)))
            self.stored += 1

        def step(_: str) -> float:
            start = time.perf_counter()
            count = sum(self.client.list_batches())
            elapsed = time.perf_counter() - start
            if count != size:
                raise RuntimeError(f"List returned {count} snapshots, expected {size}")
            return elapsed

        return step

    def stat(self) -> Step:
        name = committed(self.client, self.key("stat"))
        return lambda _: timed(lambda: self.client.stat(name))

    def mounts(self) -> Step:
        parent = ""
        for i in range(MOUNTS_PARENTS):
            parent = committed(self.client, self.key("mounts", f"p{i}"), parent)
        active = self.key("mounts", "active")
        self.client.prepare(active, parent)
        return lambda _: timed(lambda: self.client.mounts(active))

    def prepare_remove(self) -> Step:
        parent = committed(self.client, self.key("prm", "parent"))

        def step(tag: str) -> float:
            key = self.key("prm", tag)
            return timed(lambda: (self.client.prepare(key, parent), self.client.remove(key)))

        return step

    def commit(self) -> Step:
        def step(tag: str) -> float:
            key = self.key("commit", tag)
            self.client.prepare(f"{key}-active")
            return timed(lambda: self.client.commit(key, f"{key}-active"))

        return step

    def chain(self) -> Step:
        return lambda tag: timed(lambda: self._one_chain(tag))

    def _one_chain(self, tag: str) -> None:
        parent = ""
        for layer in range(LAYERS_PER_CHAIN):
            name = self.key("chain", tag, str(layer))
            mounts = self.client.prepare(f"{name}-active", parent)
            with mounted(mounts, self.mountpoint):
                for i in range(FILES_PER_LAYER):
                    (self.mountpoint / f"l{layer}-f{i}").write_bytes(b"snapbench %d %d\n" % (layer, i))
            self.client.commit(name, f"{name}-active")
            parent = name


@dataclass(frozen=True)
class Op:
    name: str
    iterations: Callable[[Sizes], int]
    setup: Callable[[Workload], Step]

    def run(self, loads: dict[str, Workload], sizes: Sizes) -> dict[str, list[float]]:
        """Set up and warm up every target, then time the iterations in ROUNDS interleaved rounds.

        Each round runs a slice of the iterations on every target, the target order rotating by
        one per round, so drift (page cache, journal, containerd's GC) spreads over all targets.
        """
        n = self.iterations(sizes)
        steps = {label: self.setup(load) for label, load in loads.items()}
        for step in steps.values():
            for i in range(Sizes.warmup(n)):
                step(f"w{i}")
        samples: dict[str, list[float]] = {label: [] for label in steps}
        labels = list(steps)
        for r in range(ROUNDS):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                samples[label] += [steps[label](str(i)) for i in range(r * n // ROUNDS, (r + 1) * n // ROUNDS)]
        return samples


OPS = (
    Op("list-100", lambda s: s.list_small, lambda w: w.list_all(LIST_SIZES[0])),
    Op("list-1000", lambda s: s.list_large, lambda w: w.list_all(LIST_SIZES[1])),
    Op("stat", lambda s: s.stat, Workload.stat),
    Op("mounts", lambda s: s.mounts, Workload.mounts),
    Op("prepare+remove", lambda s: s.prepare_remove, Workload.prepare_remove),
    Op("commit", lambda s: s.commit, Workload.commit),
    Op(f"chain-{LAYERS_PER_CHAIN}x{FILES_PER_LAYER}", lambda s: s.chain, Workload.chain),
)


# --- results ----------------------------------------------------------------------------------


@dataclass
class Result:
    op: str
    target: str
    n: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float

    @staticmethod
    def of(op: str, target: str, samples: list[float]) -> Result:
        ordered = sorted(samples)

        def pct(p: float) -> float:  # nearest-rank percentile, in ms
            return ordered[max(0, math.ceil(len(ordered) * p / 100) - 1)] * 1000

        return Result(op, target, len(samples), len(samples) / sum(samples), pct(50), pct(99))


@dataclass
class Report:
    sizes: Sizes
    results: list[Result] = field(default_factory=list)
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)  # op -> {"a/b": x, "d/c": y}
    memory_kib: dict[str, dict[str, int]] = field(default_factory=dict)  # "a: process" -> VmRSS, VmHWM
    environment: dict[str, str] = field(default_factory=dict)

    def add_ratios(self) -> None:
        by = {(r.op, r.target): r.ops_per_s for r in self.results}
        for op in dict.fromkeys(r.op for r in self.results):
            self.ratios[op] = {"a/b": by[op, "a"] / by[op, "b"], "d/c": by[op, "d"] / by[op, "c"]}

    def render(self, names: dict[str, str]) -> str:
        lines = [", ".join(f"{k} {v}" for k, v in self.environment.items()), ""]
        lines += [f"{'op':<16}{'target':<14}{'n':>6}{'ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}"]
        for r in self.results:
            lines.append(f"{r.op:<16}{r.target + ' ' + names[r.target]:<14}{r.n:>6}{r.ops_per_s:>10.1f}"
                         f"{r.p50_ms:>9.3f}{r.p99_ms:>9.3f}")
        lines += ["", f"{'throughput ratio':<16}{'(a)/(b)':>9}{'(d)/(c)':>9}"]
        lines += [f"{op:<16}{x['a/b']:>9.2f}{x['d/c']:>9.2f}" for op, x in self.ratios.items()]
        lines += ["", "memory after the run, KiB: VmRSS (VmHWM = peak)"]
        lines += [f"  {p:<36}{m['VmRSS']:>8} ({m['VmHWM']})" for p, m in self.memory_kib.items()]
        return "\n".join(lines)


def environment() -> dict[str, str]:
    # "containerd github.com/containerd/containerd 1.6.20~ds1 <revision>"
    ctrd = subprocess.run(["containerd", "--version"], check=True, capture_output=True, text=True).stdout.split()[2]
    return {"python": platform.python_version(), "grpcio": grpc.__version__, "containerd": ctrd,
            "kernel": platform.release(), "cpus": str(os.cpu_count())}


def bench(sizes: Sizes, go_bin: Path) -> tuple[Report, dict[str, str]]:
    run_id = uuid.uuid4().hex[:8]
    report = Report(sizes, environment=environment())
    work = Path(tempfile.mkdtemp(prefix="snapbench-", dir="/tmp"))
    try:
        with targets(work, go_bin, run_id) as tgts:
            loads: dict[str, Workload] = {}
            for t in tgts:
                (work / f"mnt-{t.label}").mkdir()
                loads[t.label] = Workload(t.client, f"sb{run_id}{t.label}", work / f"mnt-{t.label}")
            for op in OPS:
                print(f"  {op.name} ...", file=sys.stderr, flush=True)
                samples = op.run(loads, sizes)
                report.results += [Result.of(op.name, label, samples[label]) for label in loads]
            report.memory_kib = {f"{t.label}: {t.process}": memory_kib(t.pid) for t in tgts}
            names = {t.label: t.name for t in tgts}
    finally:
        shutil.rmtree(work)
    report.add_ratios()
    return report, names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N, a smoke check (< 1 min)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--go-bin", type=Path, default=GO_BIN,
                        help=f"the original Go program (default {GO_BIN}; build: {GO_BUILD})")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (mount, containerd)")
    if not args.go_bin.exists():
        parser.error(f"{args.go_bin} is missing; build it with {GO_BUILD}")
    report, names = bench(QUICK if args.quick else FULL, args.go_bin)
    print(report.render(names))
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "targets": names}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
