"""Apply the mounts a snapshotter returns, the way containerd's mount package would: for tests
and the benchmark, which mount snapshots without containerd. The daemon never uses it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from addlower.core.lowers import compact_lowerdirs


def mount_all(mounts: Sequence, target: Path) -> None:
    for m in mounts:
        opts = list(m.options)
        if m.type == "bind":
            flags = ["--rbind"] if "rbind" in opts else ["--bind"]
            subprocess.run(["mount", *flags, m.source, str(target)], check=True)
            if "ro" in opts:
                subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], check=True)
        else:
            opts, cwd = compact_lowerdirs(opts)
            subprocess.run(
                ["mount", "-t", m.type, m.source, "-o", ",".join(opts), str(target)],
                check=True,
                capture_output=True,
                text=True,
                cwd=cwd,
            )


def unmount(target: Path) -> None:
    subprocess.run(["umount", "-R", str(target)], check=True)


@contextmanager
def mounted(mounts: Sequence, target: Path) -> Iterator[Path]:
    """Mount `mounts` on `target` (created if needed) for the duration of the block."""
    target.mkdir(parents=True, exist_ok=True)
    mount_all(mounts, target)
    try:
        yield target
    finally:
        unmount(target)
