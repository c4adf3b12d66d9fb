"""Pinned lowers: the very host dirs the policy checked, bind-mounted under the snapshotter's root,
so that the paths containerd hands the kernel cannot be changed by anyone who can write under an
allowed root (a CI job filling a cache can swap a dir for a symlink at any instant).

Opening walks from "/" one component at a time, each opened with O_NOFOLLOW relative to its
parent's fd: a symlink anywhere in the path is refused, and whatever is renamed afterwards, the
fd stays on the dir that was checked. Missing dirs are made with mkdirat under the parent's fd,
only at or below the entry's create root (none for a named lower without create = true), and
only once every entry has been walked: a refused label leaves nothing made. A dir made is a
warning and a metric, since the container gets it empty. A pin is a read-only bind mount of the
fd (through /proc/self/fd/N) at <root>/lowers/<snapshot id>/<n>; the root is 0700, so nobody
else can touch the path. Pins go
away by unmount and rmdir only: nothing here deletes a file, and a tree walk that strays into a
pin meets a read-only mount.

Must not know about the store, labels, policy or gRPC: callers hand it checked Lower entries.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from addlower.core.errors import InvalidArgument, ResourceExhausted
from addlower.core.logformat import fields
from addlower.core.lowers import ROOT_TARGET, Lower
from addlower.engine import metrics

log = logging.getLogger(__name__)

PINS_DIR = "lowers"  # under the snapshotter's root
DIR_MODE = 0o755  # of dirs created for missing lowers, as the original
PIN_DIR_MODE = 0o700
# An O_PATH fd of a directory, never through a symlink.
_O_WALK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A pin may carry stacked mounts after a crash between two mounts; unmount at most this many.
MAX_STACKED_MOUNTS = 16

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _mount(source: str | None, target: str, flags: int) -> None:
    if _libc.mount(source.encode() if source else None, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _unmount(target: str) -> bool:
    """Detach the top mount at `target`; False when nothing is mounted there."""
    if _libc.umount2(target.encode(), MNT_DETACH | UMOUNT_NOFOLLOW) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, os.strerror(err), target)


def _refusal(what: str, lower: Lower, exc: OSError) -> InvalidArgument:
    return InvalidArgument(f"{what} {lower.shown}: {exc.strerror.lower() if exc.strerror else exc}")


def _open_one(lower: Lower, what: str, create: bool) -> int | None:
    """An O_PATH fd of `lower.path`, walked without following symlinks. Missing dirs at or below
    its create root are made when `create`; without it, the walk stops there and says None."""
    fd = os.open("/", _O_WALK)
    current = ""
    try:
        for name in lower.path.strip("/").split("/"):
            current += "/" + name
            try:
                child = os.open(name, _O_WALK, dir_fd=fd)
            except FileNotFoundError:
                if not lower.may_create(current):
                    raise InvalidArgument(f"{what} {lower.shown}: {lower.missing_text(current)}") from None
                if not create:
                    os.close(fd)
                    return None
                with contextlib.suppress(FileExistsError):  # made meanwhile: open checks what it is
                    os.mkdir(name, DIR_MODE, dir_fd=fd)  # 0755 under the daemon's umask (022)
                child = os.open(name, _O_WALK, dir_fd=fd)
            os.close(fd)
            fd = child
        return fd
    except NotADirectoryError:  # O_NOFOLLOW|O_DIRECTORY on a symlink says ENOTDIR too
        os.close(fd)
        raise InvalidArgument(
            f"{what} {lower.shown}: {current} is a symlink or not a directory; name the directory itself"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise _refusal(what, lower, exc) from None
    except BaseException:
        os.close(fd)
        raise


def probe(lower: Lower, what: str) -> bool:
    """Whether `lower` is there as the daemon opens it (for doctor): True; False if it is missing
    and the daemon would make it; InvalidArgument naming `what` for what the daemon refuses."""
    fd = _open_one(lower, what, create=False)
    if fd is None:
        return False
    os.close(fd)
    return True


@dataclass
class Opened:
    """The fds of a request's entries, in order; closed when done with."""

    lowers: tuple[Lower, ...]
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    @property
    def host_mounts(self) -> int:
        """The host mounts these lowers take once pinned and mounted: a pin each, and a mount per
        container path (target) they go to."""
        if not self.fds:
            return 0
        return len(self.fds) + len({lower.target for lower in self.lowers if lower.target != ROOT_TARGET})

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pins:
    """The pins under <root>/lowers, one dir per snapshot that has extra lowers."""

    def __init__(self, root: str):
        self.dir = f"{root}/{PINS_DIR}"
        os.makedirs(self.dir, mode=PIN_DIR_MODE, exist_ok=True)
        self._lock = threading.Lock()
        # Snapshots that may have pins: most have none, and their Mounts calls skip the disk.
        self._pinned: set[str] = set(os.listdir(self.dir))
        # The node-wide budget: host mounts each pinned snapshot's lowers take, and their sum.
        self._mounts: dict[str, int] = {}
        self.host_mounts = 0

    def count(self, targets: Callable[[int], int]) -> None:
        """Account for the pins found on disk at start-up: each snapshot's pins, plus its
        `targets(id)` target mounts."""
        with self._lock:
            for entry in os.listdir(self.dir):
                if entry.isdigit():
                    pins = sum(1 for pin in os.listdir(f"{self.dir}/{entry}") if pin.isdigit())
                    self._account(entry, pins + targets(int(entry)) if pins else 0)

    def _account(self, sid: str, mounts: int) -> None:
        self.host_mounts += mounts - self._mounts.pop(sid, 0)
        if mounts:
            self._mounts[sid] = mounts

    def path(self, sid: int, n: int) -> str:
        return f"{self.dir}/{sid}/{n}"

    @staticmethod
    def open(lowers: Sequence[Lower], what: str, key: str) -> Opened:
        """Open each entry of snapshot `key`, making missing dirs: the part that may take long (a
        slow filesystem under an allowed root), so callers do it outside their locks. Every entry
        is walked before any dir is made, so a refusal leaves nothing made; an entry is walked
        again only if it had dirs to make. Only a race with a writer between the two walks can
        leave an empty dir, inside the allowed root (removing it again could remove a dir the
        writer swapped in)."""
        found: list[int | None] = []  # per entry, its fd, or None while dirs of it are missing
        try:
            for lower in lowers:  # first, without making anything
                found.append(_open_one(lower, what, create=False))
            for i, lower in enumerate(lowers):  # then, only where needed, making what is missing
                if found[i] is None:
                    found[i] = _open_one(lower, what, create=True)
                    assert found[i] is not None  # a walk that may make dirs reaches the end or raises
                    metrics.LOWERS_CREATED.inc("path" if lower.name is None else "named")
                    log.warning(
                        "%s %s did not exist: made it, empty, for snapshot %s",
                        what,
                        lower.shown,
                        key,
                        extra=fields(key=key, entry=lower.shown),
                    )
            fds = [fd for fd in found if fd is not None]
            Pins._refuse_repeats(lowers, fds, what)
        except BaseException:
            for fd in found:
                if fd is not None:
                    os.close(fd)
            raise
        return Opened(tuple(lowers), fds)

    def attach(self, sid: int, opened: Opened, what: str, budget: int) -> tuple[str, ...]:
        """Pin the opened dirs for snapshot `sid` (quick: mounts of fds); the pins' paths in order.
        With none, drops the pins `sid` had, if any. Refused when the node's host mounts for
        lowers would exceed `budget`."""
        if not opened.fds and str(sid) not in self._pinned:
            return ()
        need = opened.host_mounts
        with self._lock:
            had = self._mounts.get(str(sid), 0)
            others = self.host_mounts - had
            if need > had and others + need > budget:
                raise ResourceExhausted(
                    f"lowers.max_host_mounts: this snapshot's extra lowers need {need} host mounts (a pin per "
                    f"entry, a mount per target) and {others} of the node's budget of {budget} are in use; "
                    "remove containers that use extra lowers, or raise the budget in the snapshotter's config"
                )
            try:
                paths = self._sync(sid, opened.fds)
            except OSError as exc:  # e.g. its writer removed the dir while it was pinned
                self._release(sid)
                raise InvalidArgument(f"{what}: a dir changed while it was pinned ({exc.strerror})") from None
            self._account(str(sid), need)
            return paths

    @staticmethod
    def _refuse_repeats(lowers: Sequence[Lower], fds: Sequence[int], what: str) -> None:
        """The same dir twice under one target: overlayfs would refuse the mount (ELOOP)."""
        seen: dict[tuple[str, int, int], str] = {}
        for lower, fd in zip(lowers, fds, strict=True):
            st = os.fstat(fd)
            key = (lower.target, st.st_dev, st.st_ino)
            if key in seen:
                raise InvalidArgument(f"{what} {lower.shown}: the same dir as {seen[key]}, twice at {lower.target}")
            seen[key] = lower.shown

    def _sync(self, sid: int, fds: Sequence[int]) -> tuple[str, ...]:
        base = f"{self.dir}/{sid}"
        if not fds:
            self._release(sid)
            return ()
        os.makedirs(base, mode=PIN_DIR_MODE, exist_ok=True)
        self._pinned.add(str(sid))
        paths = []
        for n, fd in enumerate(fds):
            pin = self.path(sid, n)
            wanted = os.fstat(fd)
            try:
                current = os.stat(pin)
            except FileNotFoundError:
                os.mkdir(pin, PIN_DIR_MODE)
                current = None
            if (
                current is None
                or (current.st_dev, current.st_ino) != (wanted.st_dev, wanted.st_ino)
                or not os.statvfs(pin).f_flag & os.ST_RDONLY
            ):  # a kill between bind and remount
                self._unmount_all(pin)
                _mount(f"/proc/self/fd/{fd}", pin, MS_BIND)
                _mount(None, pin, MS_REMOUNT | MS_BIND | MS_RDONLY)
            paths.append(pin)
        for entry in os.listdir(base):  # pins of entries the snapshot no longer has
            if not entry.isdigit() or int(entry) >= len(fds):
                self._remove_pin(f"{base}/{entry}")
        return tuple(paths)

    def release(self, sid: int) -> None:
        """Unmount and remove snapshot `sid`'s pins, if it has any."""
        if str(sid) not in self._pinned:
            return
        with self._lock:
            self._release(sid)

    def release_all_but(self, live: set[int]) -> list[str]:
        """Release the pins of every snapshot not in `live`; returns the ids released."""
        released = []
        with self._lock:
            for entry in os.listdir(self.dir):
                if not (entry.isdigit() and int(entry) in live):
                    self._release(entry)
                    released.append(entry)
        return released

    def _release(self, sid: int | str) -> None:
        base = f"{self.dir}/{sid}"
        try:
            entries = os.listdir(base)
        except FileNotFoundError:
            self._pinned.discard(str(sid))
            self._account(str(sid), 0)
            return
        for entry in entries:
            self._remove_pin(f"{base}/{entry}")
        self._account(str(sid), 0)
        try:
            os.rmdir(base)
            self._pinned.discard(str(sid))
        except OSError as exc:
            log.warning("could not remove %s: %s", base, exc)

    def _remove_pin(self, pin: str) -> None:
        try:
            self._unmount_all(pin)
            os.rmdir(pin)  # an empty mountpoint dir; anything else stays
        except OSError as exc:
            log.warning("could not remove the pin %s: %s", pin, exc)

    @staticmethod
    def _unmount_all(pin: str) -> None:
        for _ in range(MAX_STACKED_MOUNTS):
            if not _unmount(pin):
                return
