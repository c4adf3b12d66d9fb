#!/usr/bin/env python3
"""differbench: the time of a container's commit diff on our snapshotter (our differ) against
containerd's built-in overlayfs (containerd's walking differ), in one containerd.

What is timed: `ctr snapshots diff <container>` with its output to /dev/null, wall clock around the
ctr process: containerd's Compare of the container's active snapshot against its parent, the layer
written into containerd's content store (under ctr's lease) and ctr reading it back. The container
(`ctr run` of busybox sh, not removed: its snapshot stays) changed 10 files: 9 new small files in a
dir of the image and one file of the image appended to. Targets:
  ours        our snapshotter, through containerd 1.7+'s diff service, which asks our differ first
              (the diff proxy plugin on the daemon's socket, as addlower.dev.devcontainerd
              configures it): it walks the snapshot's upper dir only and looks its paths up in the
              parent's layers (addlower.engine.differ), then uploads the layer (addlower.engine.content)
  ours+lower  the same, the container carrying an extra lower at / (a host dir of 5k files, 10 of them
              in the dir the container writes to): its files must not be in the layer, nor cost time
  overlayfs   containerd's built-in overlayfs, whose diff containerd's walking differ makes: it mounts
              the parent and the container and walks both, the whole image
The image is perfbench's (bench/perfbench.py's workload_layers: busybox plus 7 layers of small
files, ~30k files in all), built with addlower.dev.ociimage and imported into both snapshotters.
Each round has a fresh ext4 of its own (perfbench's fresh_fs: a sparse loop file, mkfs'd with the
inode tables written), holding our daemon's root, containerd's root and state and the host dir; on
it our daemon and one containerd (its proxy plugins: our snapshotter and our differ), the image
imported into both snapshotters, the three containers run; then one untimed diff per target (whose
layer is checked: exactly the 10 files, their parent dirs and /run, which runc makes; none of the
host dir's files: the run fails loudly otherwise) and DIFFS timed diffs per target, the targets'
order rotating from diff to diff and from round to round; a round's figure is the median of its
DIFFS. Our daemon's log must then say "wrote a layer from the snapshot's own dir" once per diff of
ours and ours+lower, none for overlayfs (else our differ fell through to the walking one: failure).
Figures: median over the rounds [min-max]; ratios per round (paired within it), then their median
[min-max] (perfbench's Spread and ratios).

--scale: the same at images of ~3k, ~30k and ~100k files (perfbench's layers scaled), then a table
of how each target's time grows with the image (ours should stay flat, the walking differ grow).

Needs root, mount, mkfs.ext4, runc, /bin/busybox and containerd 1.7+ (scripts/containerd-versions.sh
unpacks 1.7 (trixie) and 2.1 (sid) under /var/cache/addlower-ci/containerd; 1.6 has no diff proxy).
Default: containerd 2.1, 5 rounds at ~30k files (about 2 min on 2 CPUs); --quick: 2 rounds (under
1 min); --scale: 5 rounds at each of 3k, 30k, 100k (about 8 min; with --quick 2 rounds, about 3.5 min).

Usage: python3 bench/differbench.py [--quick] [--scale] [--rounds N] [--containerd 1.7|2.1] [--json OUT]
"""

from __future__ import annotations

import argparse
import functools
import gzip
import io
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import perfbench
from perfbench import (
    Figures,
    Samples,
    Spread,
    Target,
    fresh_fs,
    log,
    num,
    ratio,
    ratios,
    rotated,
    running,
)

from addlower.core import ctrdconfig
from addlower.core.config import PLUGIN_NAME
from addlower.core.labels import EXTRA_LOWERS_LABEL
from addlower.dev import ociimage
from addlower.dev.devcontainerd import VERSIONS_CACHE, Binaries, PrivateContainerd, SnapshotterProcess

CONTAINERD_LINES = {"1.7": "trixie", "2.1": "sid"}
NAMESPACE = "differbench"
DIFFS = 5  # timed diffs per target and round
FLOOR = "ctr version"  # a pseudo-target: ctr's own start-up and one call, the floor of any ctr command
OURS_LOG = "wrote a layer from the snapshot's own dir"
# perfbench's layers (~29k files above busybox), scaled: name -> factor.
SIZES = {"3k": 0.1, "30k": 1.0, "100k": 3.45}
DEFAULT_SIZE = "30k"
# The container's changes: 9 new files in a dir of the image's lowest workload layer, one of its files
# appended to (workload_layers puts file 0 of layer 0 there, a regular file).
CHANGED_DIR = "usr/lib/perfbench0/pkg000/d0"
NEW_FILES = tuple(f"{CHANGED_DIR}/new{i}" for i in range(1, 10))
MODIFIED = f"{CHANGED_DIR}/f0"
SCRIPT = (
    f"set -e; for i in 1 2 3 4 5 6 7 8 9; do echo new file $i > /{CHANGED_DIR}/new$i; done; echo changed >> /{MODIFIED}"
)
RUNC_MADE = ("run",)  # the busybox image has no /run; runc makes it for its tmpfs
# The host dir at / of ours+lower: HOST_SPREAD files in hostcache/dNN/, HOST_BESIDE beside the changes.
HOST_SPREAD, HOST_BESIDE = 4990, 10
HOST_MARKS = ("hostcache", "/host-f")


def expected_layer() -> set[str]:
    """What the layer must list: the changed files, their parent dirs (the walking differ writes a
    changed entry's parents) and what runc made."""
    names = {*NEW_FILES, MODIFIED, *RUNC_MADE}
    parts = CHANGED_DIR.split("/")
    names |= {"/".join(parts[:k]) for k in range(1, len(parts) + 1)}
    return names


@dataclass(frozen=True)
class Bench:
    targets: tuple[Target, ...]
    binaries: Binaries
    rounds: int
    work: Path


@dataclass(frozen=True)
class Workload:
    label: str  # "30k"
    image: ociimage.OciImage
    files: int  # regular files and symlinks in the image, busybox included
    summary: str


def build_workload(label: str, out: Path) -> Workload:
    """perfbench's workload image with every layer's file count scaled by SIZES[label]."""
    counts = tuple(max(1, round(n * SIZES[label])) for n in perfbench.WORKLOAD_LAYERS)
    layers = perfbench.workload_layers(counts)
    image = ociimage.build_busybox_image(
        out / f"workload-{label}.tar",
        ref=f"localhost/differbench/{label}:latest",
        cmd=("/bin/true",),
        extra_layers=layers,
    )
    entries = [e for layer in layers for e in layer]
    kinds = {
        kind: len({e.path for e in entries if e.type == kind})
        for kind in (tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE)
    }
    files = kinds[tarfile.REGTYPE] + kinds[tarfile.SYMTYPE] + 1 + len(ociimage.APPLETS) + 2  # busybox's
    summary = (
        f"busybox + {len(layers)} layers {counts}: {files} files and symlinks (distinct paths), "
        f"{kinds[tarfile.DIRTYPE]} dirs, {sum(len(e.data) for e in entries) >> 20} MiB "
        f"({image.path.stat().st_size >> 20} MiB as the tar of gzipped layers)"
    )
    return Workload(label, image, files, summary)


def make_host_dir(root: Path) -> None:
    """The extra lower of ours+lower: HOST_SPREAD small files under hostcache/, HOST_BESIDE in the
    dir the container writes to (so the container sees them beside its own)."""
    for i in range(HOST_SPREAD):
        d = root / "hostcache" / f"d{i // 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(b"host file %d\n" % i * 20)
    beside = root / CHANGED_DIR
    beside.mkdir(parents=True)
    for i in range(HOST_BESIDE):
        (beside / f"host-f{i}").write_text(f"host file beside {i}\n")


def container_id(target: Target) -> str:
    return target.name.replace("+", "-")


def has_lower(target: Target) -> bool:
    return target.name.endswith("+lower")


def diff_cmd(ctrd: PrivateContainerd, target: Target) -> list[str]:
    return [
        ctrd.binaries.command("ctr"),
        "--address",
        str(ctrd.address),
        "-n",
        NAMESPACE,
        "snapshots",
        "--snapshotter",
        target.snapshotter,
        "diff",
        container_id(target),
    ]


def check_layer(target: Target, ctrd: PrivateContainerd) -> int:
    """An untimed diff of the target's container: its layer must list exactly expected_layer(), and
    nothing of the host dir; returns the layer's size in bytes (gzipped)."""
    done = subprocess.run(
        diff_cmd(ctrd, target), env=ctrd.binaries.env(), capture_output=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{target.name}: ctr snapshots diff failed:\n{done.stderr.decode(errors='replace')}")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(done.stdout))) as layer:
        names = [m.name.rstrip("/") for m in layer.getmembers()]
    leaked = [n for n in names if any(mark in f"/{n}" for mark in HOST_MARKS)]
    if leaked:
        raise RuntimeError(f"{target.name}: the layer holds the host dir's files: {leaked[:10]}")
    want = expected_layer()
    if set(names) != want or len(names) != len(want):
        raise RuntimeError(
            f"{target.name}: the layer lists {sorted(names)}, expected {sorted(want)} "
            f"(missing {sorted(want - set(names))}, extra {sorted(set(names) - want)})"
        )
    return len(done.stdout)


def timed_diff(target: Target, ctrd: PrivateContainerd) -> float:
    cmd, env = diff_cmd(ctrd, target), ctrd.binaries.env()
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600, check=False)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{target.name}: ctr snapshots diff failed:\n{done.stderr.decode(errors='replace')}")
    return took


def fs_size(workload: Workload) -> int:
    """The round's filesystem: the image twice unpacked, its blobs, the host dir; sparse."""
    return (3 << 30) + workload.files * (40 << 10)


def diff_round(r: int, bench: Bench, workload: Workload) -> Figures:
    """Round r at one image size: a fresh ext4, our daemon and a containerd on it, the image in both
    snapshotters, a container per target, one checked and DIFFS timed diffs per target."""
    figures: Figures = {t.name: {} for t in bench.targets}
    with ExitStack() as stack:
        fs = stack.enter_context(
            fresh_fs(bench.work / f"{workload.label}-r{r + 1}", fs_size(workload), bench.work / "failed-logs")
        )
        host = fs / "host"
        make_host_dir(host)
        config = fs / "snapshotter.toml"
        config.write_text(
            f'containerd_address = "{fs / "ctrd" / "containerd.sock"}"\n[lowers]\nallowed_roots = ["{host}"]\n'
        )
        command = next(t.command for t in bench.targets if t.command)
        assert command
        daemon = stack.enter_context(
            running(SnapshotterProcess(fs / "snap", args=("--config", str(config)), command=command))
        )
        ctrd = stack.enter_context(
            PrivateContainerd(fs / "ctrd", proxy_plugins={PLUGIN_NAME: daemon.socket}, binaries=bench.binaries)
        )
        for sn in {t.snapshotter for t in bench.targets}:
            took = perfbench.timed(functools.partial(ctrd.import_image, workload.image.path, NAMESPACE, sn))
            for t in bench.targets:
                if t.snapshotter == sn and not has_lower(t):
                    figures[t.name]["import_s"] = took
        for t in bench.targets:
            options = ["--snapshotter-label", f"{EXTRA_LOWERS_LABEL}={host}"] if has_lower(t) else []
            ctrd.run(
                workload.image.ref,
                container_id(t),
                "sh",
                "-c",
                SCRIPT,
                snapshotter=t.snapshotter,
                rm=False,
                options=options,
                namespace=NAMESPACE,
            )
        for t in rotated(bench.targets, r):
            figures[t.name]["layer_bytes"] = check_layer(t, ctrd)
        times: dict[str, list[float]] = {t.name: [] for t in bench.targets}
        floor: list[float] = []
        for i in range(DIFFS):
            for t in rotated(bench.targets, r + i):
                times[t.name].append(timed_diff(t, ctrd))
            floor.append(perfbench.timed(lambda: ctrd.ctr("version", namespace=NAMESPACE)))
        ours = sum(1 for t in bench.targets if t.command)
        written = daemon.log().count(OURS_LOG)
        if written != ours * (1 + DIFFS):
            raise RuntimeError(
                f"our daemon logged {OURS_LOG!r} {written} times, expected {ours * (1 + DIFFS)} "
                "(one per diff of ours and ours+lower): our differ failed or fell through to the "
                f"walking one; see {daemon.log_path} and {ctrd.log_path}"
            )
        for t in bench.targets:
            figures[t.name]["diff_s"] = statistics.median(times[t.name])
            log(f"    {t.name}: diffs {' '.join(f'{x:.3f}' for x in times[t.name])} s")
        figures[FLOOR] = {"floor_s": statistics.median(floor)}
    return figures


def run_size(bench: Bench, workload: Workload) -> Samples:
    return perfbench.run_rounds(f"{workload.label} files", bench.rounds, lambda r: diff_round(r, bench, workload))


# --- report -----------------------------------------------------------------------------------

PAIRS = (("ours", "overlayfs"), ("ours+lower", "overlayfs"), ("ours+lower", "ours"), ("overlayfs", "ours"))
SCALE_PAIRS = (("ours", "overlayfs"), ("overlayfs", "ours"))
ROWS = (
    ("diff_s", "ctr snapshots diff, s"),
    ("import_s", "image import (set-up, untimed), s"),
    ("layer_bytes", "layer, bytes (gzipped)"),
)


def fine(x: float) -> str:
    """A ratio: 2 decimals, 2 significant digits below 0.1 (ours/overlayfs goes below 0.01), 3 or so
    from 10 up."""
    return num(x) if x >= 10 else ratio(x) if x >= 0.1 else f"{x:.2g}"


def cell(by: dict[str, list[float]], t: str) -> str:
    return Spread.of(by[t]).show(num) if by.get(t) else "-"


def render(samples: Samples, workload: Workload, bench: Bench, env: dict[str, str]) -> str:
    names = [t.name for t in bench.targets]
    lines = [
        (
            f"commit diff through containerd {env['containerd']}, {bench.rounds} rounds of {DIFFS} diffs per target "
            "(a round's figure: their median), one fresh ext4 and containerd per round; median [min-max] over rounds"
        ),
        f"image: {workload.summary}",
        (
            f"container: {len(NEW_FILES)} new files and 1 appended in /{CHANGED_DIR}; ours+lower: an extra lower "
            f"at / of {HOST_SPREAD + HOST_BESIDE} files; every layer checked: {len(expected_layer())} entries, "
            "exactly the changes"
        ),
        f"{'metric':<34}" + "".join(f"{t:>24}" for t in names),
    ]
    for metric, what in ROWS:
        if metric in samples:
            lines.append(f"{what:<34}" + "".join(f"{cell(samples[metric], t):>24}" for t in names))
    lines.append(f"{'floor: ctr version, s':<34}{cell(samples['floor_s'], FLOOR):>24}   (ctr's start-up and one call)")
    lines += [
        "",
        "ratios, median [min-max] of the per-round ratios (< 1 means the first takes less time)",
        f"{'metric':<34}" + "".join(f"{a + '/' + b:>24}" for a, b in PAIRS),
    ]
    by = samples["diff_s"]
    cells = [ratios(by, a, b) for a, b in PAIRS]
    lines.append(f"{'ctr snapshots diff':<34}" + "".join(f"{s.show(fine) if s else '-':>24}" for s in cells))
    return "\n".join(lines)


def render_scale(results: dict[str, tuple[Workload, Samples]], bench: Bench) -> str:
    names = [t.name for t in bench.targets]
    labels = list(results)
    lines = [
        f"scaling: ctr snapshots diff, s, median [min-max] over {bench.rounds} rounds, by image size",
        f"{'image':<8}{'files':>8}"
        + "".join(f"{t:>22}" for t in names)
        + "".join(f"{a + '/' + b:>24}" for a, b in SCALE_PAIRS),
    ]
    for label in labels:
        workload, samples = results[label]
        by = samples["diff_s"]
        cells = [ratios(by, a, b) for a, b in SCALE_PAIRS]
        lines.append(
            f"{label:<8}{workload.files:>8}"
            + "".join(f"{cell(by, t):>22}" for t in names)
            + "".join(f"{s.show(fine) if s else '-':>24}" for s in cells)
        )
    first, last = results[labels[0]], results[labels[-1]]
    grow = last[0].files / first[0].files
    lines += [
        "",
        (
            f"growth from {labels[0]} to {labels[-1]} ({grow:.0f}x the files): median time at {labels[-1]} / "
            f"at {labels[0]}; and seconds per 10k more files (a least-squares line through the medians)"
        ),
    ]
    for t in names:
        xs = [results[label][0].files for label in labels]
        ys = [statistics.median(results[label][1]["diff_s"][t]) for label in labels]
        slope = statistics.linear_regression(xs, ys).slope if len(xs) > 1 else 0.0
        lines.append(f"  {t:<12}{ys[-1] / ys[0]:>8.2f}x   {slope * 1e4:+.4f} s per 10k files")
    return "\n".join(lines)


def environment(binaries: Binaries) -> dict[str, str]:
    import addlower

    return {
        "python": platform.python_version(),
        "containerd": ".".join(map(str, binaries.version)),
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "daemon code": str(Path(addlower.__file__).parent),
        "loadavg at start": perfbench.loadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds (under 1 min)")
    parser.add_argument(
        "--scale", action="store_true", help=f"run at images of {', '.join(SIZES)} files and show the growth"
    )
    parser.add_argument("--rounds", type=int, help="rounds (default 5, --quick 2)")
    parser.add_argument(
        "--containerd",
        choices=tuple(CONTAINERD_LINES),
        default="2.1",
        help="containerd line (default 2.1), from scripts/containerd-versions.sh's cache",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write samples and summaries as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (mount, mkfs, containerd)")
    bin_dir = VERSIONS_CACHE / CONTAINERD_LINES[args.containerd] / "usr" / "bin"
    if not (bin_dir / "containerd").exists():
        suite = CONTAINERD_LINES[args.containerd]
        parser.error(f"no containerd in {bin_dir}: run scripts/containerd-versions.sh {suite}")
    binaries = Binaries(bin_dir)
    if ".".join(map(str, binaries.version[:2])) != args.containerd or not ctrdconfig.diff_proxy(binaries.version):
        parser.error(f"{bin_dir} holds containerd {binaries.version}, not {args.containerd}")
    rounds = args.rounds or (2 if args.quick else 5)
    # The daemon (python -m addlower.cli) must be this checkout's, whatever else is installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    ours = (sys.executable, "-m", "addlower.cli")
    targets = (Target("ours", ours), Target("ours+lower", ours), Target("overlayfs", None))
    env = environment(binaries)
    began = time.monotonic()
    sizes = list(SIZES) if args.scale else [DEFAULT_SIZE]
    out: dict = {"environment": env, "rounds": rounds, "diffs_per_round": DIFFS, "script": SCRIPT, "sizes": {}}
    results: dict[str, tuple[Workload, Samples]] = {}
    text = [""]
    with perfbench.scratch("differbench-") as work:
        bench = Bench(targets, binaries, rounds, work)
        for label in sizes:
            log(f"building the {label} image ...")
            workload = build_workload(label, work / "images")
            log(f"  {workload.summary}")
            samples = run_size(bench, workload)
            workload.image.path.unlink()
            results[label] = (workload, samples)
            out["sizes"][label] = {
                "image": workload.summary,
                "files": workload.files,
                "samples": samples,
                "summary": perfbench.summary(samples, PAIRS),
            }
            text += ["", render(samples, workload, bench, env)]
        if len(results) > 1:
            text += ["", render_scale(results, bench)]
    return perfbench.finish(env, began, text, out, args.json)


if __name__ == "__main__":
    sys.exit(main())
