"""Apply the mounts a snapshotter returns, the way containerd's mount package would: for tests
and the benchmark, which mount snapshots without containerd. The daemon never mounts anything."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence


def mount_all(mounts: Sequence, target: Path) -> None:
    for m in mounts:
        opts = list(m.options)
        if m.type == "bind":
            flags = ["--rbind"] if "rbind" in opts else ["--bind"]
            subprocess.run(["mount", *flags, m.source, str(target)], check=True)
            if "ro" in opts:
                subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], check=True)
        else:
            opts, cwd = _compact_lowerdirs(opts)
            subprocess.run(["mount", "-t", m.type, m.source, "-o", ",".join(opts), str(target)],
                           check=True, capture_output=True, text=True, cwd=cwd)


def _compact_lowerdirs(opts: list[str]) -> tuple[list[str], str | None]:
    """Like containerd's mount package: when the options would not fit a page, mount from the
    lowerdirs' common parent with relative paths."""
    if len(",".join(opts)) < 4096 - 512:
        return opts, None
    i = next(n for n, o in enumerate(opts) if o.startswith("lowerdir="))
    dirs = opts[i].removeprefix("lowerdir=").split(":")
    common = os.path.commonpath(dirs)
    if len(dirs) > 1 and common in dirs:  # keep at least the last path component relative
        common = os.path.dirname(common)
    rel = [os.path.relpath(d, common) for d in dirs]
    return opts[:i] + ["lowerdir=" + ":".join(rel)] + opts[i + 1:], common


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
