"""A container's layer from its snapshot's upper dir: what containerd's walking differ finds between
the snapshot's parent and the snapshot, without its extra lowers and targets, and without walking
the image.

The walking differ mounts both sides and walks them whole (continuity's doubleWalkDiff). Only a
path in the upper dir can differ, so this walks the upper dir alone and looks each path up in
the parent's layers (merged as overlayfs merges them: whiteouts hide, opaque dirs stop), applying
the walking differ's rules: a whiteout is a deletion if the parent has the path; in an opaque dir
every parent entry the upper dir lacks is a deletion; a file is changed unless it is the "same
file" (type, mode, owner, rdev, capabilities, size, mtime; contents when both mtimes are whole
seconds); a dir is never changed by itself and is written only as a changed entry's parent.
Entries go out in the walking differ's order (depth first, names sorted bytewise) through a copy
of containerd's ChangeWriter (parents first, hardlinks, whiteouts `.wh.<name>`), as Go's tar
(addlower.core.gotar). Must not know the store, gRPC or containerd's API.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Protocol

from addlower.core import gotar
from addlower.core.gotar import Header

WHITEOUT_PREFIX = b".wh."
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
CAPABILITY_XATTR = "security.capability"
COPY_CHUNK = 1 << 20

# Media types containerd's walking differ writes, and whether each is gzip-compressed.
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPES = {LAYER_TAR: False, LAYER_GZIP: True}
GZIP_LEVEL = 6  # Go's gzip.DefaultCompression


class Sink(Protocol):
    """Where a layer goes: a file, or containerd's content store as it is written."""

    def write(self, data: bytes, /) -> int: ...


class Change(Enum):
    ADD = "add"
    MODIFY = "modify"
    DELETE = "delete"
    UNMODIFIED = "unmodified"  # the same file, reported only when hardlinked (the writer may need it)


@dataclass(frozen=True)
class Layers:
    """A snapshot's own dir (an overlay upper dir) and its parent's layer dirs, nearest first."""

    upper: bytes
    lowers: tuple[bytes, ...]


def _lstat(path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _xattr(where: bytes | int, name: str) -> bytes:
    """The attribute `name` of the entry at path `where` (never through a final symlink) or of
    the file open at fd `where`; empty when it has none."""
    try:
        return os.getxattr(where, name) if isinstance(where, int) else os.getxattr(where, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return b""
        raise


def is_whiteout(st: os.stat_result) -> bool:
    """overlayfs's mark of a deleted entry: a character device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(where: bytes | int) -> bool:
    """overlayfs's mark of a dir (a path, or open at an fd) that hides the layers below it
    (trusted., or user. with userxattr)."""
    for name in OPAQUE_XATTRS:
        value = _xattr(where, name)
        if value:
            return value == b"y"
    return False


class _Parent:
    """The parent's layers merged as overlayfs merges them, looked up one path at a time."""

    def __init__(self, lowers: tuple[bytes, ...]):
        roots = []
        for layer in lowers:
            roots.append(layer)
            if is_opaque(layer):
                break
        self._dirs: dict[bytes, list[bytes]] = {b"": roots}  # merged dir -> its layers' dirs, top first

    def lookup(self, rel: bytes) -> tuple[bytes, os.stat_result] | None:
        """The entry the merged parent shows at `rel` (its topmost layer's), or None."""
        parent, _, name = rel.rpartition(b"/")
        found = self._entry(parent, name)
        return found[0] if found else None

    def _entry(self, parent: bytes, name: bytes) -> tuple[tuple[bytes, os.stat_result], list[bytes]] | None:
        layers = self._layers(parent)
        top: tuple[bytes, os.stat_result] | None = None
        below: list[bytes] = []
        for layer in layers:
            path = layer + b"/" + name
            st = _lstat(path)
            if st is None:
                continue
            if is_whiteout(st) or (top is not None and not stat.S_ISDIR(st.st_mode)):
                break
            if top is None:
                top = (path, st)
            if not stat.S_ISDIR(st.st_mode):
                break
            below.append(path)
            if is_opaque(path):
                break
        return (top, below) if top is not None else None

    def _layers(self, rel: bytes) -> list[bytes]:
        """The dirs that make up merged dir `rel` (none when the parent has no dir there)."""
        known = self._dirs.get(rel)
        if known is None:
            parent, _, name = rel.rpartition(b"/")
            found = self._entry(parent, name)
            known = found[1] if found and stat.S_ISDIR(found[0][1].st_mode) else []
            self._dirs[rel] = known
        return known

    def names(self, rel: bytes) -> set[bytes]:
        """What the merged parent lists in dir `rel`."""
        shown: set[bytes] = set()
        hidden: set[bytes] = set()
        for layer in self._layers(rel):
            with os.scandir(layer) as entries:
                for entry in entries:
                    name = entry.name
                    if name in shown or name in hidden:
                        continue
                    if is_whiteout(entry.stat(follow_symlinks=False)):
                        hidden.add(name)
                    else:
                        shown.add(name)
        return shown


@dataclass(frozen=True)
class At:
    """An entry of the upper dir as the walk found it: its parent dir, open (an fd the walk holds
    while it is there), its name and its lstat. The container may still write its upper dir (a
    diff of a running container): everything read goes through the open dir, never a path it could
    have swapped for a symlink to the host, and a file is read only if it is the inode listed."""

    dirfd: int
    name: bytes
    st: os.stat_result

    def xattr(self, attr: str) -> bytes:
        return _xattr(b"/proc/self/fd/%d/%s" % (self.dirfd, self.name), attr)  # lgetxattr under the open dir

    def readlink(self) -> bytes:
        return os.readlink(self.name, dir_fd=self.dirfd)

    def fd(self) -> int:
        """The file open for reading, if it is still the inode listed (a bare fd: a layer reads
        one per file, and a file object costs more than the read of a small one)."""
        fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dirfd)
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (self.st.st_dev, self.st.st_ino):
            os.close(fd)
            raise OSError(errno.EBUSY, f"{os.fsdecode(self.name)} changed while the layer was written")
        return fd


def same_file(lower: tuple[bytes, os.stat_result], upper: At) -> bool:
    """continuity's sameFile: whether the walking differ takes `upper` for unchanged."""
    (lpath, a), b = lower, upper.st
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        return True
    if (a.st_mode, a.st_uid, a.st_gid, a.st_rdev) != (b.st_mode, b.st_uid, b.st_gid, b.st_rdev):
        return False
    if _xattr(lpath, CAPABILITY_XATTR) != upper.xattr(CAPABILITY_XATTR):
        return False
    if stat.S_ISDIR(a.st_mode):
        return True
    if a.st_size != b.st_size or a.st_mtime_ns // 10**9 != b.st_mtime_ns // 10**9:
        return False
    a_ns, b_ns = a.st_mtime_ns % 10**9, b.st_mtime_ns % 10**9
    if a_ns or b_ns:
        return a_ns == b_ns
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(lpath) == upper.readlink()
    if a.st_size == 0:
        return True
    with open(lpath, "rb") as fa, os.fdopen(upper.fd(), "rb") as fb:
        while True:
            ca, cb = fa.read(COPY_CHUNK), fb.read(COPY_CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


# A dir of the upper dir as the walk opens it: never through a symlink.
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


Dirs = dict[bytes, tuple[os.stat_result, bytes]]  # path -> (lstat, security.capability) of each dir walked


def changes(layers: Layers, dirs: Dirs | None = None) -> Iterator[tuple[Change, bytes, At | None]]:
    """(kind, path relative to the root, the upper entry; None for a deletion), in the walking
    differ's order. Each dir walked into goes into `dirs`. An entry's At is valid until the walk
    moves on."""
    parent = _Parent(layers.lowers)
    top = os.open(layers.upper, _O_DIR)
    try:
        yield from _changes_in(top, b"", parent, {} if dirs is None else dirs)
    finally:
        os.close(top)


def _changes_in(fd: int, rel: bytes, parent: _Parent, dirs: Dirs) -> Iterator[tuple[Change, bytes, At | None]]:
    with os.scandir(fd) as entries:
        present = {os.fsencode(e.name): e.stat(follow_symlinks=False) for e in entries}
    names = set(present)
    if rel and is_opaque(fd):  # it hides the parent's entries: each one it lacks is deleted
        names |= parent.names(rel)
    for name in sorted(names):
        path = rel + b"/" + name if rel else name
        st = present.get(name)
        if st is None or is_whiteout(st):
            if parent.lookup(path) is not None:
                yield Change.DELETE, path, None
            continue
        at = At(fd, name, st)
        lower = parent.lookup(path)
        if lower is None:
            yield Change.ADD, path, at
        elif not same_file(lower, at):
            yield Change.MODIFY, path, at
        elif not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            yield Change.UNMODIFIED, path, at
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, _O_DIR, dir_fd=fd)
            try:
                now = os.fstat(sub)
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    raise OSError(errno.EBUSY, f"{os.fsdecode(path)} changed while the layer was written")
                dirs[path] = st, _xattr(sub, CAPABILITY_XATTR)
                yield from _changes_in(sub, path, parent, dirs)
            finally:
                os.close(sub)


_TYPES = (
    (stat.S_ISREG, gotar.REG),
    (stat.S_ISDIR, gotar.DIR),
    (stat.S_ISLNK, gotar.SYMLINK),
    (stat.S_ISCHR, gotar.CHAR),
    (stat.S_ISBLK, gotar.BLOCKDEV),
    (stat.S_ISFIFO, gotar.FIFO),
)


@dataclass
class ChangeWriter:
    """containerd's archive.ChangeWriter over the walk of the upper dir: each change as tar
    entries, parents first (their lstat and capability as the walk recorded them in `dirs`, so
    nothing is looked up again by path). `whiteout_time`: containerd 2.x writes 0, 1.7 the
    SOURCE_DATE_EPOCH or now; `mtime_bound`: SOURCE_DATE_EPOCH, which no mtime may pass (ns)."""

    out: Sink
    dirs: Dirs
    whiteout_time: int = 0
    mtime_bound: int | None = None
    added_dirs: set[bytes] = field(default_factory=set)
    inode_source: dict[int, bytes] = field(default_factory=dict)
    inode_refs: dict[int, list[bytes]] = field(default_factory=dict)

    def handle(self, kind: Change, path: bytes, at: At | None) -> None:
        if kind is Change.DELETE:
            parent, _, base = path.rpartition(b"/")
            name = (parent + b"/" if parent else b"") + WHITEOUT_PREFIX + base
            self._write(Header(name, gotar.REG, mtime=self.whiteout_time))
            return
        assert at is not None
        link = at.readlink() if stat.S_ISLNK(at.st.st_mode) else b""
        self._entry(kind, path, at.st, at.xattr(CAPABILITY_XATTR), link, at)

    def _entry(
        self, kind: Change, path: bytes, st: os.stat_result, capability: bytes, link: bytes, at: At | None
    ) -> None:
        mode = st.st_mode
        if stat.S_ISSOCK(mode):
            return
        typeflag = next(flag for test, flag in _TYPES if test(mode))
        mtime = st.st_mtime_ns if self.mtime_bound is None else min(st.st_mtime_ns, self.mtime_bound)
        header = Header(
            name=path + b"/" if typeflag == gotar.DIR else path,
            typeflag=typeflag,
            mode=stat.S_IMODE(mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if typeflag == gotar.REG else 0,
            mtime=mtime // 10**9,
            linkname=link,
            devmajor=os.major(st.st_rdev) if typeflag in (gotar.CHAR, gotar.BLOCKDEV) else 0,
            devminor=os.minor(st.st_rdev) if typeflag in (gotar.CHAR, gotar.BLOCKDEV) else 0,
            pax={f"SCHILY.xattr.{CAPABILITY_XATTR}": capability} if capability else {},
        )
        more: list[bytes] = []
        if typeflag != gotar.DIR and st.st_nlink > 1:
            first = self.inode_source.get(st.st_ino)
            if first is not None:
                header = replace(header, typeflag=gotar.LINK, linkname=first, size=0)
            elif kind is Change.UNMODIFIED:
                self.inode_refs.setdefault(st.st_ino, []).append(header.name)
                return
            else:
                self.inode_source[st.st_ino] = header.name
                more = self.inode_refs.pop(st.st_ino, [])
        elif kind is Change.UNMODIFIED:
            return
        self._write(header, at if header.typeflag == gotar.REG and header.size else None)
        for name in more:
            self._write(replace(header, name=name, typeflag=gotar.LINK, linkname=header.name, size=0))

    def _write(self, header: Header, data: At | None = None) -> None:
        self._include_parents(header)
        head = gotar.header(header)
        if data is None:
            self.out.write(head)
            return
        left = header.size
        fd = data.fd()  # the very inode the walk listed, or an error
        try:
            while left:
                chunk = os.read(fd, min(COPY_CHUNK, left))
                if not chunk:
                    raise OSError(errno.EIO, f"short write copying file {header.name.decode(errors='replace')}")
                left -= len(chunk)
                # A small file is one write: header, data and padding.
                self.out.write(b"".join((head, chunk, b"" if left else gotar.padding(header.size))))
                head = b""
        finally:
            os.close(fd)

    def _include_parents(self, header: Header) -> None:
        name = header.name.rstrip(b"/")
        parent = name.rpartition(b"/")[0]
        if parent and parent not in self.added_dirs:
            self.added_dirs.add(parent)
            st, capability = self.dirs[parent]
            self._entry(Change.MODIFY, parent, st, capability, b"", None)
        if header.typeflag == gotar.DIR:
            self.added_dirs.add(name)

    def close(self) -> None:
        self.out.write(gotar.END)


class _Digesting:
    """Writes the tar through: its digest (the diffID), then compressed (or not) into `out`,
    with the blob's digest and size."""

    def __init__(self, out: Sink, compress: bool):
        self.out = out
        self.tar = hashlib.sha256()
        self._zip = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31) if compress else None
        self.blob = hashlib.sha256() if compress else self.tar  # a plain tar is its own blob
        self.size = 0

    def write(self, data: bytes) -> int:
        self.tar.update(data)
        if self._zip:
            self._put(self._zip.compress(data))
        else:
            self.size += len(data)
            self.out.write(data)
        return len(data)

    def _put(self, data: bytes) -> None:
        """Compressed bytes out."""
        if data:
            self.blob.update(data)
            self.size += len(data)
            self.out.write(data)

    def finish(self) -> None:
        if self._zip:
            self._put(self._zip.flush())


@dataclass(frozen=True)
class Layer:
    """A written layer: its blob's digest and size, and the uncompressed tar's digest (diffID)."""

    digest: str
    size: int
    diff_id: str


def write_layer(
    layers: Layers,
    out: Sink,
    media_type: str,
    whiteout_time: int = 0,
    mtime_bound: int | None = None,
    exclude: Callable[[bytes], bool] | None = None,
) -> Layer:
    """The layer of `layers` as `media_type` (one of MEDIA_TYPES) into `out`, without the paths
    `exclude` names (a cache's credentials: neither they nor their deletion go in)."""
    sink = _Digesting(out, MEDIA_TYPES[media_type])
    dirs: Dirs = {}
    writer = ChangeWriter(sink, dirs, whiteout_time, mtime_bound)
    for kind, path, at in changes(layers, dirs):
        if exclude is None or not exclude(path):
            writer.handle(kind, path, at)
    writer.close()
    sink.finish()
    return Layer(f"sha256:{sink.blob.hexdigest()}", sink.size, f"sha256:{sink.tar.hexdigest()}")
