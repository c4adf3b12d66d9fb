"""Read a bolt database file (go.etcd.io/bbolt's format): its buckets, keys and values as a tree.

Enough of the format to read what the Go original's containerd storage wrote, and nothing else: no
writes, no freelist. Hand-written because PyPI's only port (`boltdb` 0.0.2, last released 2020)
is a writable database engine that trusts the file: page ids, element offsets and tree depth are
used as found. Here the file is input from outside: every offset is checked against the bytes it
points into, every page is visited at most once, and depth and size have named limits, so a
damaged or crafted file ends in BoltError and never in a loop, a crash or unbounded memory.

Pure: it takes the file's bytes (an mmap or bytes) and does no I/O.

The format, as bbolt lays it out (little-endian throughout):
- pages of `page_size` bytes; each starts with a 16-byte header: id u64, flags u16, count u16,
  overflow u32 (the page spans 1 + overflow pages);
- pages 0 and 1 are meta pages (the newer valid one counts): magic, version, page size, flags,
  the root bucket (root page id u64, sequence u64), freelist, high water mark, txid, and an FNV-1a
  64 checksum of the preceding 56 bytes;
- a branch page holds `count` 16-byte elements (pos u32, ksize u32, child page id u64); a leaf
  page `count` 16-byte elements (flags u32, pos u32, ksize u32, vsize u32); `pos` is counted from
  the element itself;
- a leaf element with flag 1 is a nested bucket: its value is the bucket's header (root page id,
  sequence), followed, when the root is 0, by the bucket's own leaf page inline.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAGIC = 0xED0CDAED
VERSION = 2
PAGE_HEADER = 16
ELEMENT = 16
BUCKET_HEADER = 16
META_CHECKED = 56  # the meta fields the checksum covers

BRANCH_PAGE, LEAF_PAGE, META_PAGE = 0x01, 0x02, 0x04
BUCKET_LEAF = 0x01

MIN_PAGE_SIZE, MAX_PAGE_SIZE = 512, 1 << 20
MAX_HEIGHT = 32  # branch levels of one bucket's tree (bolt's are a handful deep)
MAX_NESTING = 16  # buckets within buckets
MAX_ENTRIES = 50_000_000  # keys and buckets in the whole file

_HEADER = struct.Struct("<QHHI")
_META = struct.Struct("<IIII QQ QQQ Q")
_BRANCH = struct.Struct("<IIQ")
_LEAF = struct.Struct("<IIII")
_BUCKET = struct.Struct("<QQ")

_FNV_OFFSET, _FNV_PRIME, _MASK64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1


class BoltError(ValueError):
    """The bytes are not a bolt database this reader can read, or are damaged."""


@dataclass
class Bucket:
    """One bucket: its sequence (NextSequence's last answer), values and nested buckets."""

    sequence: int = 0
    values: dict[bytes, bytes] = field(default_factory=dict)
    buckets: dict[bytes, Bucket] = field(default_factory=dict)


@dataclass(frozen=True)
class Meta:
    page_size: int
    root: int
    sequence: int
    high_water: int  # pages in use: ids at or past it are no part of the database
    txid: int


def is_bolt(head: bytes) -> bool:
    """Whether a file starting with `head` (at least 24 bytes) is a bolt database."""
    if len(head) < PAGE_HEADER + 8:
        return False
    magic, version = struct.unpack_from("<II", head, PAGE_HEADER)
    return magic == MAGIC and version == VERSION


def fnv1a64(data: bytes) -> int:
    value = _FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV_PRIME) & _MASK64
    return value


def _meta_at(buf: bytes | memoryview, offset: int) -> Meta | None:
    """The meta page at `offset`, or None if it is missing or does not check out."""
    if offset + PAGE_HEADER + _META.size > len(buf):
        return None
    _, flags, _, _ = _HEADER.unpack_from(buf, offset)
    fields = _META.unpack_from(buf, offset + PAGE_HEADER)
    magic, version, page_size, _, root, sequence, _, high_water, txid, checksum = fields
    if not flags & META_PAGE or magic != MAGIC or version != VERSION:
        return None
    start = offset + PAGE_HEADER
    if checksum != fnv1a64(bytes(buf[start : start + META_CHECKED])):
        return None
    if page_size & (page_size - 1) or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
        return None
    return Meta(page_size, root, sequence, high_water, txid)


def read_meta(buf: bytes | memoryview) -> Meta:
    """The current meta: of the two meta pages, the valid one of the higher txid (as bbolt picks)."""
    first = _meta_at(buf, 0)
    sizes = (first.page_size,) if first else tuple(1 << n for n in range(9, 21))
    second = next((m for m in (_meta_at(buf, size) for size in sizes) if m), None)
    metas = [m for m in (first, second) if m is not None]
    if not metas:
        raise BoltError("no valid meta page: not a bolt database, or a damaged one")
    return max(metas, key=lambda m: m.txid)


class _Reader:
    def __init__(self, buf: bytes | memoryview, meta: Meta):
        self.buf = memoryview(buf)
        self.meta = meta
        self.seen: set[int] = set()
        self.entries = 0

    def page(self, pgid: int) -> memoryview:
        """Page `pgid` with its overflow pages, checked once: in the file, in use, never seen."""
        size = self.meta.page_size
        if pgid < 2 or pgid >= self.meta.high_water or (pgid + 1) * size > len(self.buf):
            raise BoltError(f"page {pgid} is outside the database")
        if pgid in self.seen:
            raise BoltError(f"page {pgid} is referenced twice")
        self.seen.add(pgid)
        found, _, _, overflow = _HEADER.unpack_from(self.buf, pgid * size)
        if found != pgid:
            raise BoltError(f"page {pgid} says it is page {found}")
        end = (pgid + 1 + overflow) * size
        if pgid + 1 + overflow > self.meta.high_water or end > len(self.buf):
            raise BoltError(f"page {pgid}'s {overflow} overflow pages run past the database")
        self.seen.update(range(pgid + 1, pgid + 1 + overflow))
        return self.buf[pgid * size : end]

    def bucket(self, header: bytes | memoryview, inline: memoryview, nesting: int) -> Bucket:
        if nesting > MAX_NESTING:
            raise BoltError(f"buckets nested deeper than {MAX_NESTING}")
        root, sequence = _BUCKET.unpack_from(header)
        bucket = Bucket(sequence)
        if root == 0:  # the bucket's leaf page sits in its value
            self.fill(bucket, self.leaf(inline), nesting)
        else:
            self.walk(bucket, root, nesting, 0)
        return bucket

    def walk(self, bucket: Bucket, pgid: int, nesting: int, height: int) -> None:
        if height > MAX_HEIGHT:
            raise BoltError(f"a bucket's tree is deeper than {MAX_HEIGHT}")
        page = self.page(pgid)
        _, flags, count, _ = _HEADER.unpack_from(page)
        if flags & BRANCH_PAGE:
            for n in range(count):
                at = PAGE_HEADER + n * ELEMENT
                if at + ELEMENT > len(page):
                    raise BoltError(f"page {pgid}'s {count} elements run past it")
                self.walk(bucket, _BRANCH.unpack_from(page, at)[2], nesting, height + 1)
        elif flags & LEAF_PAGE:
            self.fill(bucket, self.leaf(page), nesting)
        else:
            raise BoltError(f"page {pgid} is neither a branch nor a leaf (flags {flags:#x})")

    def leaf(self, page: memoryview) -> list[tuple[int, memoryview, memoryview]]:
        """A leaf page's (flags, key, value) elements, each checked to lie inside the page."""
        if len(page) < PAGE_HEADER:
            raise BoltError("an inline bucket is shorter than a page header")
        _, flags, count, _ = _HEADER.unpack_from(page)
        if count and not flags & LEAF_PAGE:
            raise BoltError(f"a bucket's page is no leaf (flags {flags:#x})")
        items = []
        for n in range(count):
            at = PAGE_HEADER + n * ELEMENT
            if at + ELEMENT > len(page):
                raise BoltError(f"a leaf's {count} elements run past its page")
            eflags, pos, ksize, vsize = _LEAF.unpack_from(page, at)
            start = at + pos
            if start + ksize + vsize > len(page):
                raise BoltError("a leaf element's key or value runs past its page")
            items.append((eflags, page[start : start + ksize], page[start + ksize : start + ksize + vsize]))
        return items

    def fill(self, bucket: Bucket, items: list[tuple[int, memoryview, memoryview]], nesting: int) -> None:
        self.entries += len(items)
        if self.entries > MAX_ENTRIES:
            raise BoltError(f"more than {MAX_ENTRIES} entries")
        for flags, key, value in items:
            name = bytes(key)
            if name in bucket.values or name in bucket.buckets:
                raise BoltError(f"key {name!r} appears twice in one bucket")
            if flags & BUCKET_LEAF:
                if len(value) < BUCKET_HEADER:
                    raise BoltError(f"bucket {name!r}'s header is {len(value)} bytes")
                bucket.buckets[name] = self.bucket(value[:BUCKET_HEADER], value[BUCKET_HEADER:], nesting + 1)
            else:
                bucket.values[name] = bytes(value)


def read(buf: bytes | memoryview) -> Bucket:
    """The database's root bucket, with every bucket under it, from the file's bytes."""
    meta = read_meta(buf)
    reader = _Reader(buf, meta)
    root = Bucket(meta.sequence)
    if meta.root:
        reader.walk(root, meta.root, 0, 0)
    return root
