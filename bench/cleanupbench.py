"""cleanupbench: the Snapshots API's Cleanup on a node with a large mount table, ours against the Go original.

Targets, as in perfbench (whose helpers this imports): `ours` (this checkout's daemon, `python -m
addlower.cli`, async remove, its default), `go` (the Go original, --go-bin, built with
/work/shared/peers/seedsnap/build.sh if missing) and `go'` (the same again: the go/go' ratios show
the run's noise). The Go original answers Cleanup with UNIMPLEMENTED (its service wrapper does not
forward it), so with its default async remove it never deletes a removed snapshot's directory:
it runs here with --async-remove=false, deleting each directory in its Remove, and what compares
with ours is the time until the directories are gone, Removes + Cleanup. `--ours-sync` adds
`ours-sync`, our daemon with --async-remove=false, the like-for-like match of go's Removes.
`--baseline REF` adds `base`, our daemon as committed at REF (`git archive REF addlower` into the
run's dir, run with `python -P` and PYTHONPATH there): before and after a change in one run.

Each round first puts M extra mounts (--mounts, default 4000) in this mount namespace, which the
daemons share: a private tmpfs under the run's dir in /tmp with M bind mounts of a small dir on it
(mount(2) through ctypes), detached at the end of the round with one `umount -l` of the tmpfs, also
on an error, Ctrl-C or SIGTERM. Then every target takes its turn, the order rotating from round to
round: a fresh loop-mounted ext4 (perfbench.fresh_fs), a daemon on it, through addlower's Python
client N Prepares (--dirs, default 100; keys k-0..., no parent), N Removes, then one Cleanup, each
phase timed with the wall clock around the client calls; `<root>/snapshots/` must hold N dirs
before the Cleanup (unless the target removes synchronously) and none after it, or the run fails.
Figures are the median over the rounds with [min-max]; ratios are computed per round, then their
median and [min-max] are shown.

Needs root, mount, mkfs.ext4 and, unless --no-go, the Go original (its build takes about 40 s the
first time). --quick: 2 rounds, M = 1000 (about 10 s); the default: 5 rounds, M = 4000 (about 20 s;
a Cleanup that reads the mount table once per directory adds 1.2 s per turn at 4000 mounts).

Usage: python3 bench/cleanupbench.py [--quick] [--rounds R] [--mounts M] [--dirs N] [--baseline REF]
                                     [--no-go] [--ours-sync] [--json OUT] [--go-bin PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perfbench  # puts this checkout first on sys.path
from perfbench import Spread, Target, fresh_fs, log, num, ratio

import addlower
from addlower.dev.devcontainerd import SnapshotterProcess
from addlower.ops.client import SnapshotsClient

FS_SIZE = 256 << 20
MS_BIND = 0x1000
SYNC_REMOVE = "--async-remove=false"


@dataclass(frozen=True)
class Plan:
    rounds: int
    mounts: int  # extra mounts on the node during the targets' turns
    dirs: int  # snapshots prepared, removed, then cleaned up, per target and round


FULL = Plan(rounds=5, mounts=4000, dirs=100)
QUICK = Plan(rounds=2, mounts=1000, dirs=100)


def mount_table_lines() -> int:
    with open("/proc/self/mountinfo", "rb") as f:
        return sum(1 for _ in f)


@contextmanager
def extra_mounts(scratch: Path, count: int) -> Iterator[int]:
    """`count` bind mounts of a small dir, on a private tmpfs mounted at `scratch` (so nothing
    propagates anywhere); yields the mount table's length meanwhile. One lazy unmount of the tmpfs
    detaches them all, whatever happened."""
    libc = ctypes.CDLL(None, use_errno=True)
    scratch.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "cleanupbench", str(scratch)], check=True)
        subprocess.run(["mount", "--make-private", str(scratch)], check=True)
        src = scratch / "src"
        src.mkdir()
        (src / "file").write_text("cleanupbench\n")
        for i in range(count):
            dst = scratch / f"m{i}"
            dst.mkdir()
            if libc.mount(bytes(src), bytes(dst), None, MS_BIND, None) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"bind mount {i + 1} of {count}: {os.strerror(err)}", str(dst))
        yield mount_table_lines()
    finally:
        subprocess.run(["umount", "-l", str(scratch)], check=False, capture_output=True)
        left = [
            line
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == str(scratch) or line.split()[4].startswith(f"{scratch}/")
        ]
        if left:
            log(f"warning: {len(left)} mounts still under {scratch} after umount -l; unmounting them one by one")
            perfbench.unmount_under(scratch)
            subprocess.run(["umount", "-l", str(scratch)], check=False, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


def export_baseline(ref: str, dest: Path) -> tuple[tuple[str, ...], str]:
    """addlower/ as committed at `ref`, unpacked into `dest`; the command that runs that daemon and
    the commit it is. `python -P`: not the current dir's addlower/ first on sys.path."""
    repo = str(perfbench.REPO)
    commit = subprocess.run(
        ["git", "-C", repo, "rev-parse", "--verify", f"{ref}^{{commit}}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", repo, "archive", "--format=tar", commit, "addlower"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    command = ("env", f"PYTHONPATH={dest}", sys.executable, "-P")
    where = subprocess.run(
        [*command, "-c", "import addlower; print(addlower.__file__)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not where.startswith(f"{dest}/"):
        raise RuntimeError(f"the baseline daemon would import {where}, not the export in {dest}")
    return (*command, "-m", "addlower.cli"), commit


def entries(d: Path) -> list[str]:
    return sorted(os.listdir(d)) if d.exists() else []


def turn(target: Target, fs: Path, plan: Plan) -> tuple[dict[str, float], str | None]:
    """One target's turn: a daemon on `fs`, N Prepares, N Removes, one Cleanup; the figures and a
    note (the Cleanup's status, if not OK)."""
    assert target.command is not None
    daemon = SnapshotterProcess(fs / "root", command=target.command)
    snapshots_dir = daemon.root / "snapshots"
    sync_remove = SYNC_REMOVE in target.command
    note = None
    m: dict[str, float] = {}
    with perfbench.running(daemon), grpc.insecure_channel(f"unix://{daemon.socket}") as channel:
        client = SnapshotsClient(channel)
        keys = [f"k-{i}" for i in range(plan.dirs)]
        m["prepare_s"] = perfbench.timed(lambda: [client.prepare(k) for k in keys])
        if len(made := entries(snapshots_dir)) != plan.dirs:
            raise RuntimeError(f"{target.name}: {len(made)} dirs in {snapshots_dir} after {plan.dirs} Prepares")

        def remove_all() -> None:
            for k in keys:
                client.remove(k)

        m["remove_s"] = perfbench.timed(remove_all)
        left = entries(snapshots_dir)
        if len(left) != (0 if sync_remove else plan.dirs):
            raise RuntimeError(
                f"{target.name}: {len(left)} dirs in {snapshots_dir} after the Removes, expected "
                f"{0 if sync_remove else plan.dirs} ({'sync' if sync_remove else 'async'} remove)"
            )
        start = time.perf_counter()
        try:
            client.cleanup()
            m["cleanup_s"] = time.perf_counter() - start
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED or not sync_remove:
                raise RuntimeError(
                    f"{target.name}: Cleanup failed: {e.code().name}: {e.details()}\n"
                    f"daemon log:\n{daemon.log()[-3000:]}"
                ) from None
            note = f"Cleanup answered UNIMPLEMENTED in {(time.perf_counter() - start) * 1e3:.1f} ms"
        m["gone_s"] = m["remove_s"] + m.get("cleanup_s", 0.0)
        if left := entries(snapshots_dir):
            raise RuntimeError(
                f"{target.name}: Cleanup left {len(left)} of {plan.dirs} dirs in {snapshots_dir}, "
                f"such as {left[:3]}\ndaemon log:\n{daemon.log()[-3000:]}"
            )
        if len(client.list()) != 0:
            raise RuntimeError(f"{target.name}: snapshots left in the store after the Removes")
    return m, note


def one_round(
    r: int, targets: Sequence[Target], plan: Plan, work: Path, notes: dict[str, set[str]], table: list[int]
) -> perfbench.Figures:
    figures: perfbench.Figures = {}
    with extra_mounts(work / f"mounts-r{r + 1}", plan.mounts) as lines:
        table.append(lines)
        for t in perfbench.rotated(targets, r):
            with fresh_fs(work / perfbench.fs_name("cleanup", r, t), FS_SIZE, work / "failed-logs") as fs:
                figures[t.name], note = turn(t, fs, plan)
            if note:
                notes.setdefault(t.name, set()).add(note.split(" in ")[0])
            extra = f" ({note})" if note else ""
            log(
                f"  round {r + 1}/{plan.rounds} {t.name}: Cleanup "
                f"{num(figures[t.name]['cleanup_s']) + ' s' if 'cleanup_s' in figures[t.name] else '-'}, "
                f"Removes+Cleanup {num(figures[t.name]['gone_s'])} s{extra}"
            )
    return figures


PAIRS = (("ours", "base"), ("ours", "go"), ("base", "go"), ("ours-sync", "go"), ("go", "go'"))
ROWS = (
    ("prepare_s", "N Prepares, s"),
    ("remove_s", "N Removes, s"),
    ("cleanup_s", "Cleanup, s"),
    ("gone_s", "Removes + Cleanup, s"),
)


def render(
    samples: perfbench.Samples, plan: Plan, targets: Sequence[Target], table: Sequence[int], notes: dict[str, set[str]]
) -> str:
    names = [t.name for t in targets]
    lines = [
        (
            f"Cleanup with {plan.mounts} extra mounts on the node (mount table {min(table)}-{max(table)} lines), "
            f"{plan.dirs} snapshots prepared then removed, {plan.rounds} rounds, fresh ext4 per target and round; "
            "median [min-max] over rounds"
        ),
        "; ".join(f"{t.name}: {'sync' if SYNC_REMOVE in (t.command or ()) else 'async'} remove" for t in targets),
        f"{'metric':<24}" + "".join(f"{n:>24}" for n in names),
    ]
    for metric, what in ROWS:
        by = samples.get(metric, {})
        lines.append(f"{what:<24}" + "".join(f"{Spread.of(by[n]).show(num) if n in by else '-':>24}" for n in names))
    for name, defects in sorted(notes.items()):
        lines.append(f"  {name}: {', '.join(sorted(defects))} (a known defect of the Go original)")
    pairs = [(a, b) for a, b in PAIRS if a in names and b in names]
    if pairs:
        lines += [
            "",
            "ratios, median [min-max] of the per-round ratios (> 1: the first takes longer)",
            f"{'metric':<24}" + "".join(f"{a + '/' + b:>20}" for a, b in pairs),
        ]
        for metric, what in ROWS:
            cells = [perfbench.ratios(samples.get(metric, {}), a, b) for a, b in pairs]
            lines.append(f"{what:<24}" + "".join(f"{s.show(ratio) if s else '-':>20}" for s in cells))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1000 extra mounts (about 10 s)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5, --quick 2)")
    parser.add_argument("--mounts", type=int, help="extra mounts on the node (default 4000, --quick 1000)")
    parser.add_argument("--dirs", type=int, help="snapshots to remove and clean up per turn (default 100)")
    parser.add_argument(
        "--baseline", metavar="REF", help="also our daemon as committed at REF (e.g. HEAD), as target `base`"
    )
    parser.add_argument(
        "--no-go", "--ours-only", dest="no_go", action="store_true", help="ours only, without the Go original"
    )
    parser.add_argument(
        "--ours-sync", action="store_true", help="also ours with --async-remove=false (the Removes delete, like go's)"
    )
    perfbench.add_output_args(parser, f"built with {perfbench.GO_BUILD} if missing")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (mount, mkfs)")
    plan = QUICK if args.quick else FULL
    given = {k: v for k in ("rounds", "mounts", "dirs") if (v := getattr(args, k)) is not None}
    plan = Plan(**{**asdict(plan), **given})
    if plan.rounds < 1 or plan.mounts < 0 or plan.dirs < 1:
        parser.error("need rounds >= 1, mounts >= 0, dirs >= 1")
    # SIGTERM unwinds like Ctrl-C: daemons stopped, filesystems and the extra mounts unmounted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # The daemon (python -m addlower.cli) must be this checkout's, whatever else is installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(perfbench.REPO), os.environ.get("PYTHONPATH"))))
    targets = [Target("ours", (sys.executable, "-m", "addlower.cli"))]
    env = {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "daemon code": str(Path(addlower.__file__).parent),
    }
    if args.ours_sync:
        targets.append(Target("ours-sync", (sys.executable, "-m", "addlower.cli", SYNC_REMOVE)))
    if not args.no_go:
        if not args.go_bin.exists():
            perfbench.build_go(args.go_bin)
        go = (str(args.go_bin.resolve()), SYNC_REMOVE)
        targets += [Target("go", go), Target("go'", go)]
    began = time.monotonic()
    notes: dict[str, set[str]] = {}
    table: list[int] = []
    with perfbench.scratch("cleanupbench-") as work:
        if args.baseline:
            command, commit = export_baseline(args.baseline, work / "baseline")
            targets.insert(1, Target("base", command))
            env["base"] = f"{args.baseline} = {commit[:12]}"
        env["loadavg at start"] = perfbench.loadavg()
        samples = perfbench.run_rounds(
            "cleanup", plan.rounds, lambda r: one_round(r, targets, plan, work, notes, table)
        )
    env["loadavg at end"] = perfbench.loadavg()
    elapsed = time.monotonic() - began
    head = ", ".join(f"{k} {v}" for k, v in env.items()) + f", took {elapsed:.0f} s"
    print(head + "\n\n" + render(samples, plan, targets, table, notes))
    if args.json:
        out = {
            "environment": env,
            "plan": asdict(plan),
            "mount_table_lines": table,
            "targets": {t.name: list(t.command or ()) for t in targets},
            "notes": {k: sorted(v) for k, v in notes.items()},
            "cleanup": {"samples": samples, "summary": perfbench.summary(samples, PAIRS)},
            "elapsed_s": elapsed,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
