"""Pinned lowers: the very host dirs the policy checked, bind-mounted under the snapshotter's root,
so that the paths containerd hands the kernel cannot be changed by anyone who can write under an
allowed root (a CI job filling a cache can swap a dir for a symlink at any instant).

Opening resolves the path in one openat2(RESOLVE_NO_SYMLINKS) call: the kernel refuses a symlink
in any component, and whatever is renamed afterwards, the fd stays on the dir that was resolved.
When that fails (a missing dir, a symlink, an old kernel), the path is walked from "/" one
component at a time, each opened with O_NOFOLLOW relative to its parent's fd, which gives the
precise refusal and makes missing dirs: with mkdirat under the parent's fd, only at or below the
entry's create root (none for a named lower without create = true), and only once every entry
has been walked, so a refused label leaves nothing made. A dir made is a warning and a metric,
since the container gets it empty.

A pin is a read-only bind mount of the fd (through /proc/self/fd/N) at
<root>/lowers/pins/<dev>-<ino>: one per host dir in use, shared by every snapshot that uses that
very dir, so the node's mount table grows with the distinct dirs, not with containers times
lowers. The name is the dir's identity, and the pin holds that inode, so its number cannot be
reused while pinned: a dir swapped after a pin was made has another name and gets its own pin
for new containers (a snapshot keeps the pins it was given while its entries and the policy stay),
and a pin whose mount shows the inode its name says still holds the checked
dir. Which pins a snapshot uses is recorded as symlinks <root>/lowers/<snapshot id>/<n> naming
them (read back at start-up; the kernel never follows them): a pin is made before a record names
it, and goes after the last record naming it went, so a kill at any point leaves at worst a pin
no record names, which start-up removes. The root is 0700, so nobody else can touch these paths.
Pins go away by unmount and rmdir only: nothing here deletes a file, and a tree walk that strays
into a pin meets a read-only mount.

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

PINS_DIR = "lowers"  # under the snapshotter's root: each snapshot's records, and SHARED_DIR
SHARED_DIR = "pins"  # under PINS_DIR: the pins themselves
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


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


SYS_OPENAT2 = 437  # the same number on every architecture
AT_FDCWD = -100
RESOLVE_NO_SYMLINKS = 0x04
_libc.syscall.restype = ctypes.c_long
_openat2_works = [True]  # False once the kernel said ENOSYS (before 5.6)


_HOW = _OpenHow(_O_WALK, 0, RESOLVE_NO_SYMLINKS)  # read only, shared by every thread
_HOW_REF, _HOW_SIZE = ctypes.byref(_HOW), ctypes.sizeof(_HOW)


def _resolve(path: str) -> int | None:
    """An O_PATH fd of `path` in one syscall that refuses a symlink in any component; None when
    that fails for any reason (the walk then says why, or makes what is missing)."""
    if not _openat2_works[0]:
        return None
    fd = _libc.syscall(SYS_OPENAT2, AT_FDCWD, path.encode(), _HOW_REF, _HOW_SIZE)
    if fd >= 0:
        return int(fd)
    if ctypes.get_errno() == errno.ENOSYS:
        _openat2_works[0] = False
    return None


def _open_one(lower: Lower, what: str, create: bool) -> int | None:
    """An O_PATH fd of `lower.path`, resolved without following symlinks. Missing dirs at or below
    its create root are made when `create`; without it, the walk stops there and says None."""
    found = _resolve(lower.path)
    if found is not None:
        return found
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
    """The fds of a request's entries, in order, and what each is (its fstat); closed when done with."""

    lowers: tuple[Lower, ...]
    fds: list[int] = field(default_factory=list)
    identities: list[os.stat_result] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    @property
    def host(self) -> tuple[Lower, ...]:
        """The entries that are host dirs (each has an fd), not managed caches."""
        return tuple(lower for lower in self.lowers if not lower.cache)

    @property
    def targets(self) -> int:
        """The host mounts these lowers take at container paths once mounted: one per target."""
        if not self.fds:
            return 0
        return len({lower.target for lower in self.host if lower.target != ROOT_TARGET})

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pins:
    """The pins under <root>/lowers/pins, shared by the snapshots whose records name them."""

    def __init__(self, root: str):
        self.dir = f"{root}/{PINS_DIR}"
        self.shared = f"{self.dir}/{SHARED_DIR}"
        os.makedirs(self.shared, mode=PIN_DIR_MODE, exist_ok=True)
        self._lock = threading.Lock()
        self._held: dict[int, tuple[str, ...]] = {}  # snapshot id -> the pins its records name, in order
        self._users: dict[str, set[int]] = {}  # pin -> the snapshots whose records name it
        self._targets: dict[int, int] = {}  # snapshot id -> its target mounts
        self._recorded: set[int] = set()  # snapshots with a records dir (with or without pins)
        self._checked: set[str] = set()  # pins in use that this process mounted or saw mounted
        self._made_for: dict[int, tuple[Lower, ...]] = {}  # snapshot id -> the entries its pins were opened for

    @property
    def host_mounts(self) -> int:
        """The node's host mounts for extra lowers: a pin per host dir in use, a mount per target."""
        return len(self._users) + sum(self._targets.values())

    def path(self, pin: str) -> str:
        return f"{self.shared}/{pin}"

    def users(self, pin: str) -> int:
        """How many snapshots use `pin` (a name under <root>/lowers/pins)."""
        return len(self._users.get(pin, ()))

    def recover(self, live: Callable[[int], bool], targets: Callable[[int], int]) -> list[str]:
        """At start-up: read the records of the `live` snapshots back, with their `targets(id)`
        target mounts, then release_all_but(live)."""
        with self._lock:
            for entry in os.listdir(self.dir):
                if entry.isdigit() and live(int(entry)):
                    sid = int(entry)
                    self._recorded.add(sid)
                    held = self._read_records(sid)
                    if held:
                        self._hold(sid, held)
                        self._targets[sid] = targets(sid)
        return self.release_all_but(live)

    def release_all_but(self, live: Callable[[int], bool]) -> list[str]:
        """Drop the records of every snapshot not `live` (gone, or committed) and remove the pins
        no record names; returns the ids whose records were dropped. Reads only the records: a
        dir per snapshot with extra lowers."""
        released = []
        with self._lock:
            for entry in os.listdir(self.dir):
                if entry != SHARED_DIR and not (entry.isdigit() and live(int(entry))):
                    self._drop_records(entry)
                    if entry.isdigit():
                        self._hold(int(entry), ())
                        self._targets.pop(int(entry), None)
                    released.append(entry)
            for pin in os.listdir(self.shared):
                if pin not in self._users:
                    log.info("removing the pin %s, which no snapshot uses", pin)
                    self._remove_pin(self.path(pin))
        return released

    def _read_records(self, sid: int) -> tuple[str, ...]:
        """The pins snapshot `sid`'s records name, in order; stops at the first gap. A record
        half made by a kill (<n>.new) goes."""
        base, held = f"{self.dir}/{sid}", list[str]()
        for entry in os.listdir(base):
            if not entry.isdigit():
                self._remove_record(f"{base}/{entry}")
        while True:
            try:
                held.append(os.readlink(f"{base}/{len(held)}"))
            except OSError:  # missing, or a pin of the older layout (a dir): made again at Mounts
                return tuple(held)

    @staticmethod
    def open(lowers: Sequence[Lower], what: str, key: str) -> Opened:
        """Open each entry of snapshot `key`, making missing dirs: the part that may take long (a
        slow filesystem under an allowed root), so callers do it outside their locks. Every entry
        is resolved before any dir is made, so a refusal leaves nothing made; an entry is walked
        again only if it had dirs to make. Only a race with a writer between the two walks can
        leave an empty dir, inside the allowed root (removing it again could remove a dir the
        writer swapped in)."""
        found: list[int | None] = []  # per host entry, its fd, or None while dirs of it are missing
        host = [lower for lower in lowers if not lower.cache]  # a cache has no host dir
        try:
            for lower in host:  # first, without making anything
                found.append(_open_one(lower, what, create=False))
            for i, lower in enumerate(host):  # then, only where needed, making what is missing
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
            identities = [os.fstat(fd) for fd in fds]
            Pins._refuse_repeats(host, identities, what)
        except BaseException:
            for fd in found:
                if fd is not None:
                    os.close(fd)
            raise
        return Opened(tuple(lowers), fds, identities)

    def attach(self, sid: int, opened: Opened, what: str, budget: int) -> tuple[str, ...]:
        """Pin the opened dirs for snapshot `sid`, sharing the pins other snapshots hold, and
        record which it uses; the pins' paths in order. Pins it no longer uses go when nobody
        else uses them. Refused when the node's host mounts for lowers would exceed `budget`."""
        if not opened.fds and sid not in self._recorded:
            return ()
        identities = opened.identities
        wanted = tuple(f"{st.st_dev}-{st.st_ino}" for st in identities)
        targets = opened.targets
        with self._lock:
            had = self._held.get(sid, ())
            if had == wanted and self._targets.get(sid) == targets and self._checked.issuperset(wanted):
                # The dirs its records name, in pins this process mounted: nothing to make or record.
                self._made_for[sid] = opened.lowers
                return tuple(self.path(pin) for pin in wanted)
            new = {pin for pin in wanted if pin not in self._users}
            freed = {pin for pin in had if pin not in wanted and self._users[pin] == {sid}}
            now = self.host_mounts
            after = now + len(new) - len(freed) + targets - self._targets.get(sid, 0)
            if after > now and after > budget:
                raise ResourceExhausted(
                    f"lowers.max_host_mounts: this snapshot's extra lowers need {len(new) + targets} more host "
                    f"mounts (a pin per host dir not pinned yet, a mount per target) and {now} of the node's "
                    f"budget of {budget} are in use; remove containers that use extra lowers, or raise the "
                    "budget in the snapshotter's config"
                )
            try:
                for pin, fd, st in zip(wanted, opened.fds, identities, strict=True):
                    self._make_pin(pin, fd, st)
                self._record(sid, had, wanted)
            except OSError as exc:  # e.g. its writer removed the dir while it was pinned
                for pin in new:  # made for this call only
                    self._remove_pin(self.path(pin))
                self._release(sid)
                raise InvalidArgument(f"{what}: a dir changed while it was pinned ({exc.strerror})") from None
            self._hold(sid, wanted)
            self._targets[sid] = targets
            if not wanted:
                self._release(sid)
            else:
                self._made_for[sid] = opened.lowers
            return tuple(self.path(pin) for pin in wanted)

    def reusable(self, sid: int, lowers: tuple[Lower, ...]) -> tuple[str, ...] | None:
        """The paths of snapshot `sid`'s pins when this process made or checked them for exactly
        `lowers` (so they hold the dirs those entries named then); else None."""
        with self._lock:
            held = self._held.get(sid)
            if held is None or self._made_for.get(sid) != lowers or not self._checked.issuperset(held):
                return None
            return tuple(self.path(pin) for pin in held)

    @staticmethod
    def _refuse_repeats(lowers: Sequence[Lower], identities: Sequence[os.stat_result], what: str) -> None:
        """The same dir twice under one target: overlayfs would refuse the mount (ELOOP)."""
        seen: dict[tuple[str, int, int], str] = {}
        for lower, st in zip(lowers, identities, strict=True):
            key = (lower.target, st.st_dev, st.st_ino)
            if key in seen:
                raise InvalidArgument(f"{what} {lower.shown}: the same dir as {seen[key]}, twice at {lower.target}")
            seen[key] = lower.shown

    def _make_pin(self, pin: str, fd: int, wanted: os.stat_result) -> None:
        """Mount the pin unless it holds that dir read-only already (a kill may have left it
        missing, empty, or between the bind and the read-only remount)."""
        path = self.path(pin)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            os.mkdir(path, PIN_DIR_MODE)
            current = None
        if current is None or (current.st_dev, current.st_ino) != (wanted.st_dev, wanted.st_ino):
            self._unmount_all(path)
            _mount(f"/proc/self/fd/{fd}", path, MS_BIND)
        elif os.statvfs(path).f_flag & os.ST_RDONLY:
            self._checked.add(pin)
            return
        # Read-only in place: a pin others use never shows its empty mountpoint meanwhile.
        _mount(None, path, MS_REMOUNT | MS_BIND | MS_RDONLY)
        self._checked.add(pin)

    def _record(self, sid: int, had: tuple[str, ...], wanted: tuple[str, ...]) -> None:
        """Make snapshot `sid`'s records name `wanted` (each replaced in one rename)."""
        base = f"{self.dir}/{sid}"
        if sid not in self._recorded:
            os.makedirs(base, mode=PIN_DIR_MODE, exist_ok=True)
            self._recorded.add(sid)
        for n, pin in enumerate(wanted):
            if n < len(had) and had[n] == pin:
                continue
            record = f"{base}/{n}"
            if os.path.isdir(record) and not os.path.islink(record):  # the older layout's pin
                self._remove_pin(record)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{record}.new")
            os.symlink(pin, f"{record}.new")
            os.rename(f"{record}.new", record)
        for entry in os.listdir(base):  # records of entries the snapshot no longer has
            if not entry.isdigit() or int(entry) >= len(wanted):
                self._remove_record(f"{base}/{entry}")

    def _hold(self, sid: int, wanted: tuple[str, ...]) -> None:
        """Count `sid` as a user of exactly `wanted`; pins nobody uses any more go."""
        for pin in self._held.get(sid, ()):
            users = self._users[pin]
            users.discard(sid)
            if not users and pin not in wanted:
                del self._users[pin]
                self._checked.discard(pin)
                self._remove_pin(self.path(pin))
        for pin in wanted:
            self._users.setdefault(pin, set()).add(sid)
        if wanted:
            self._held[sid] = wanted
        else:
            self._held.pop(sid, None)
            self._made_for.pop(sid, None)

    def release(self, sid: int) -> None:
        """Drop snapshot `sid`'s records, and the pins nobody else uses, if it has any."""
        if sid not in self._recorded:
            return
        with self._lock:
            self._release(sid)

    def _release(self, sid: int) -> None:
        self._drop_records(str(sid))
        self._hold(sid, ())
        self._targets.pop(sid, None)

    def _drop_records(self, sid: str) -> None:
        """Remove a records dir (records first: a pin outlives every record naming it)."""
        base = f"{self.dir}/{sid}"
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(base):
                self._remove_record(f"{base}/{entry}")
        try:
            os.rmdir(base)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", base, exc)
            return
        if sid.isdigit():
            self._recorded.discard(int(sid))

    def _remove_record(self, record: str) -> None:
        if os.path.islink(record) or not os.path.isdir(record):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record)
        else:
            self._remove_pin(record)  # the older layout's pin

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
