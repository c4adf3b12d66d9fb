"""Filesystem facts and helpers the snapshotter needs: d_type support, overlay option probing,
disk usage, tree removal.

Everything here touches the host (files, /proc, /sys); nothing here knows about snapshots,
metadata or gRPC.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import platform
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

DT_UNKNOWN = 0


class _Dirent(ctypes.Structure):
    # glibc's struct dirent on 64-bit Linux.
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


def supports_dtype(directory: Path) -> bool:
    """Whether the filesystem under `directory` fills in d_type, which overlayfs requires.

    Python's scandir hides d_type, so this reads the directory through libc's readdir.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    with tempfile.TemporaryDirectory(dir=directory, prefix="d_type-check-") as tmp:
        Path(tmp, "probe").touch()
        handle = libc.opendir(tmp.encode())
        if not handle:
            raise OSError(ctypes.get_errno(), f"opendir {tmp}")
        try:
            while True:
                entry = libc.readdir(handle)
                if not entry:
                    return False
                if entry.contents.d_name == b"probe":
                    return entry.contents.d_type != DT_UNKNOWN
        finally:
            libc.closedir(handle)


def _kernel_at_least(major: int, minor: int) -> bool:
    parts = platform.release().split(".")
    try:
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (IndexError, ValueError):
        return False


def running_in_user_namespace() -> bool:
    """True unless this process sees the full identity uid map of the initial namespace."""
    try:
        lines = Path("/proc/self/uid_map").read_text().split("\n")
    except OSError:
        return False
    fields = lines[0].split()
    return fields != ["0", "0", "4294967295"]


def overlay_options(configured: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Leading overlay options in containerd's order: configured ones, userxattr, index=off."""
    opts = list(configured)
    if "userxattr" not in opts and running_in_user_namespace() and _kernel_at_least(5, 11):
        opts.append("userxattr")
    if os.path.exists("/sys/module/overlay/parameters/index"):
        opts.append("index=off")
    return tuple(opts)


@dataclass(frozen=True)
class Usage:
    size: int = 0
    inodes: int = 0


def disk_usage(root: Path, max_inodes: int | None = None) -> Usage | None:
    """Blocks and inodes under `root` (itself included), each (dev, inode) counted once; None as
    soon as more than `max_inodes` are seen (a caller that must stay quick gives up)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    pending = [os.fspath(root)]
    first = os.lstat(pending[0])
    seen.add((first.st_dev, first.st_ino))
    size += first.st_blocks * 512
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                ident = (st.st_dev, st.st_ino)
                if ident not in seen:
                    seen.add(ident)
                    size += st.st_blocks * 512
                    if max_inodes is not None and len(seen) > max_inodes:
                        return None
                if stat.S_ISDIR(st.st_mode):
                    pending.append(entry.path)
    return Usage(size=size, inodes=len(seen))


def mount_points() -> list[str]:
    """Every mount point this process sees, from /proc/self/mountinfo (which escapes space, tab,
    newline and backslash in octal)."""
    with open("/proc/self/mountinfo") as f:
        return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]) for line in f]


def remove_tree(path: Path) -> None:
    """Remove a directory tree; a tree that is already gone is fine (Cleanup retries the rest).

    Refuses (EBUSY) a tree with anything mounted in it: a walk through a mount would delete what
    the mount shows, a host dir for all it knows."""
    inside = [m for m in mount_points() if m == str(path) or m.startswith(f"{path}/")]
    if inside:
        raise OSError(errno.EBUSY, f"{len(inside)} mount(s) inside, such as {inside[0]}: not removing it", str(path))
    try:
        top = os.open(path, _O_TREE)
    except FileNotFoundError:
        return
    try:
        _remove_contents(top)
    finally:
        os.close(top)
    os.rmdir(path)


# A directory of a tree being removed: never through a symlink a container may have put there.
_O_TREE = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _remove_contents(top: int) -> None:
    """Empty the directory open at `top`, depth first with an explicit stack and every step
    relative to its parent's fd: a container can make its upper dir as deep as it likes
    (shutil.rmtree recurses on Python 3.11), and can swap dirs for symlinks meanwhile."""
    stack: list[tuple[int, list[str] | None, str]] = [(top, None, "")]  # (fd, subdirs left, name)
    while stack:
        fd, pending, name = stack[-1]
        if pending is None:
            pending = []
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.name)
                    else:
                        os.unlink(entry.name, dir_fd=fd)
            stack[-1] = (fd, pending, name)
        if pending:
            sub = pending.pop()
            stack.append((os.open(sub, _O_TREE, dir_fd=fd), None, sub))
            continue
        stack.pop()
        if stack:  # below the top: close it and remove it from its parent
            os.close(fd)
            os.rmdir(name, dir_fd=stack[-1][0])
