"""Filesystem facts and helpers the snapshotter needs: d_type support, overlay option probing,
disk usage, tree removal.

Everything here touches the host (files, /proc, /sys); nothing here knows about snapshots,
metadata or gRPC.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import platform
import re
import stat
import struct
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from addlower.core.model import Usage

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

    Python's scandir hides d_type, so this reads directories through libc's readdir: `directory`
    itself when it has entries (a full disk must not stop a restart), else a probe made in it.
    """
    with os.scandir(directory) as entries:
        has_entries = next(entries, None) is not None
    if has_entries:
        return _dtype_known(directory)
    with tempfile.TemporaryDirectory(dir=directory, prefix="d_type-check-") as tmp:
        Path(tmp, "probe").touch()
        return _dtype_known(Path(tmp))


def _dtype_known(directory: Path) -> bool:
    """Whether readdir gives the first entry of `directory` (other than . and ..) a d_type."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    handle = libc.opendir(os.fsencode(directory))
    if not handle:
        raise OSError(ctypes.get_errno(), f"opendir {directory}")
    try:
        while True:
            entry = libc.readdir(handle)
            if not entry:
                return False
            if entry.contents.d_name not in (b".", b".."):
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


def disk_usage(root: Path) -> Usage:
    """Blocks and inodes under `root` (itself included), each (dev, inode) counted once."""
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
                if stat.S_ISDIR(st.st_mode):
                    pending.append(entry.path)
    return Usage(size=size, inodes=len(seen))


# What a filesystem says when it is full: no blocks, no inodes, or the user's quota.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Space:
    """Free room on a filesystem, as an unprivileged writer sees it, and where it is mounted."""

    mount_point: str
    free_bytes: int
    free_inodes: int


def space(path: Path) -> Space:
    """The free room on `path`'s filesystem, and its mount point (the topmost dir on the same
    device: bind mounts of the same filesystem end it too, so it is where `path` is mounted)."""
    st = os.statvfs(path)
    point = os.path.abspath(path)
    dev = os.stat(point).st_dev
    while point != "/" and os.stat(os.path.dirname(point)).st_dev == dev:
        point = os.path.dirname(point)
    return Space(point, st.f_bavail * st.f_frsize, st.f_favail)


class Reserve:
    """Room kept back on the root's filesystem, as a file of `size` bytes: when the filesystem is
    full, deleting it lets the database write the deletion of rows (SQLite appends to its WAL even
    to delete), so containers can still be removed and space freed through containerd."""

    def __init__(self, path: Path, size: int):
        self.path = path
        self.size = size
        self.kept = False

    def keep(self) -> bool:
        """Make the file if it is missing; False when the filesystem has no room for it."""
        try:
            if os.stat(self.path).st_blocks * 512 >= self.size:
                self.kept = True
                return True
        except FileNotFoundError:
            pass
        part = self.path.with_name(f"{self.path.name}.new")
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
            os.rename(part, self.path)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            if exc.errno in NO_SPACE:
                return False
            raise
        self.kept = True
        return True

    def release(self) -> bool:
        """Give the room back to the filesystem; False when there was none kept."""
        self.kept = False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True


def mount_points() -> list[str]:
    """Every mount point this process sees, from /proc/self/mountinfo (which escapes space, tab,
    newline and backslash in octal)."""
    with open("/proc/self/mountinfo") as f:
        return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]) for line in f]


def mounts_inside(top: str, names: Iterable[str]) -> dict[str, list[str]]:
    """The mount points inside each of the dirs `top`/<name>, from one read of the mount table:
    linear in the table and the names, however many there are."""
    wanted = set(names)
    prefix = top.rstrip("/") + "/"
    inside: dict[str, list[str]] = {}
    for point in mount_points():
        if point.startswith(prefix):
            name = point[len(prefix) :].partition("/")[0]
            if name in wanted:
                inside.setdefault(name, []).append(point)
    return inside


_MS_RDONLY = 0x1
_MNT_DETACH = 0x2


def mount_overlay(target: str, options: Sequence[str]) -> None:
    """Mount a read-only overlay with `options` (lowerdir= included) at `target`."""
    data = ",".join(options).encode()
    if _libc.mount(b"overlay", target.encode(), b"overlay", _MS_RDONLY, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount overlay: {os.strerror(err)}", target)


def unmount(target: str) -> None:
    """Detach whatever is mounted at `target`; nothing mounted there is fine."""
    _libc.umount2(target.encode(), _MNT_DETACH)


def upper_in_use(upper: str) -> bool:
    """Whether an overlay mounted anywhere in this mount namespace writes to `upper` (its super
    options in the mount table name it)."""
    wanted = f"upperdir={upper}"
    with open("/proc/self/mountinfo") as table:
        for line in table:
            if " - overlay " in line and any(opt == wanted for opt in line.rsplit(" ", 1)[-1].strip().split(",")):
                return True
    return False


def remove_tree(path: Path) -> None:
    """Remove a directory tree; a tree that is already gone is fine (Cleanup retries the rest).

    Never crosses into a mount (a host dir, for all it knows): each dir's mount is checked as it
    is opened, so one mounted after any look at the mount table stops the removal too (EBUSY),
    with what lies on the tree's own mount partly removed."""
    try:
        top = os.open(path, _O_TREE)
    except FileNotFoundError:
        return
    try:
        parent = os.open(path.parent, _O_TREE)
        try:
            own = mount_id(parent)
        finally:
            os.close(parent)
        _remove_contents(top, own, str(path))
    finally:
        os.close(top)
    with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another remover
        os.rmdir(path)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_STATX_MNT_ID = 0x1000
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_SIZE = 256  # struct statx
_STATX_MASK_AT, _STATX_MNT_ID_AT = 0, 144  # offsets of stx_mask and stx_mnt_id


def mount_id(fd: int) -> tuple[int, int]:
    """Which mount the file open at `fd` is on: (1, mount id) from statx (Linux 5.8+), else
    (0, st_dev), which tells apart mounts of other filesystems only."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _libc.statx(fd, b"", _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW, _STATX_MNT_ID, buf) == 0:
        (mask,) = struct.unpack_from("<I", buf, _STATX_MASK_AT)
        if mask & _STATX_MNT_ID:
            return 1, struct.unpack_from("<Q", buf, _STATX_MNT_ID_AT)[0]
    return 0, os.fstat(fd).st_dev


# A directory of a tree being removed: never through a symlink a container may have put there.
_O_TREE = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _remove_contents(top: int, mount: tuple[int, int], shown: str) -> None:
    """Empty the directory open at `top`, depth first with an explicit stack and every step
    relative to its parent's fd: a container can make its upper dir as deep as it likes
    (shutil.rmtree recurses on Python 3.11), and can swap dirs for symlinks meanwhile. Every dir
    must be on `mount`."""
    stack: list[tuple[int, list[str] | None, str]] = [(top, None, "")]  # (fd, subdirs left, name)
    try:
        _remove_stack(stack, mount, shown)
    finally:
        for fd, _, _ in stack[1:]:  # the fds below the top that an error left open
            os.close(fd)


def _remove_stack(stack: list[tuple[int, list[str] | None, str]], mount: tuple[int, int], shown: str) -> None:
    while stack:
        fd, pending, name = stack[-1]
        if pending is None:
            if mount_id(fd) != mount:
                path = "/".join(n for _, _, n in stack if n)
                raise OSError(errno.EBUSY, f"{path or 'it'} is a mount point: not removing it", shown)
            pending = []
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.name)
                    else:
                        with contextlib.suppress(FileNotFoundError):  # another remover got there first
                            os.unlink(entry.name, dir_fd=fd)
            stack[-1] = (fd, pending, name)
        if pending:
            sub = pending.pop()
            with contextlib.suppress(FileNotFoundError):
                stack.append((os.open(sub, _O_TREE, dir_fd=fd), None, sub))
            continue
        stack.pop()
        if stack:  # below the top: close it and remove it from its parent
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(name, dir_fd=stack[-1][0])
