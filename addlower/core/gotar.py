"""Tar headers as Go's archive/tar writes them, which is what containerd's differs produce: a layer
we write for containerd must be the same bytes as the one its walking differ would write.

Hand-written, not Python's tarfile: tarfile names PAX headers `././@PaxHeader`, never splits a
long name into the USTAR prefix when PAX is allowed, and pads the archive to 10 KiB; any of these
changes the layer's digest (its diffID). The rules (from Go's archive/tar writer): a header is
USTAR unless a field cannot be one (a name that neither fits 100 bytes nor splits at a '/' into
155 + 100 ASCII bytes, a non-ASCII name or link, numbers too large, any PAX record), then PAX: an
extended header `<dir>/PaxHeaders.0/<base>` holding sorted `len key=value` records, then the main
header with what fits. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

BLOCK = 512
END = b"\0" * (2 * BLOCK)  # Go's Writer.Close: two zero blocks, no padding to a record

REG, LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO, XHEADER = b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"x"

NAME_SIZE, PREFIX_SIZE = 100, 155
# A USTAR header block: name, mode, uid, gid, size, mtime, checksum, typeflag, linkname, magic,
# version, uname, gname, devmajor, devminor, prefix, 12 unused bytes. One struct packs it: a
# layer has a header per file, and this is the differ's hot loop.
_USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s12x")
_CHKSUM_AT, _CHKSUM_SPACES = 148, b" " * 8
_MAGIC, _VERSION = b"ustar\0", b"00"


@dataclass(frozen=True)
class Header:
    """One entry's header fields, as containerd fills them (names as bytes: file names need not
    be UTF-8)."""

    name: bytes
    typeflag: bytes
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0  # whole seconds
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    pax: Mapping[str, bytes] = field(default_factory=dict)  # e.g. SCHILY.xattr.security.capability


def _is_ascii(s: bytes) -> bool:
    return s.isascii() and b"\0" not in s


def _to_ascii(s: bytes) -> bytes:
    """Go's toASCII over a string's runes: invalid UTF-8 bytes become U+FFFD and go with the rest."""
    if _is_ascii(s):
        return s
    return bytes(c for c in s.decode("utf-8", "replace").encode("utf-8") if c < 0x80 and c != 0)


_OCTAL_LIMIT = {8: 8**7, 12: 8**11}  # a field of 8 or 12 bytes holds that many octal digits, then NUL


def _fits_octal(size: int, n: int) -> bool:
    return 0 <= n < _OCTAL_LIMIT[size]


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """Go's splitUSTARPath: (prefix, name) for a long ASCII name, or None."""
    length = len(name)
    if length <= NAME_SIZE or not _is_ascii(name):
        return None
    if length > PREFIX_SIZE + 1:
        length = PREFIX_SIZE + 1
    elif name[length - 1 : length] == b"/":
        length -= 1
    i = name.rfind(b"/", 0, length)
    nlen, plen = len(name) - i - 1, i
    if i <= 0 or nlen > NAME_SIZE or nlen == 0 or plen > PREFIX_SIZE:
        return None
    return name[:i], name[i + 1 :]


def _string(s: bytes, size: int) -> bytes:
    """Go's formatString for a `size`-byte field (the struct pads with NULs): cut to the field;
    a cut that ends in '/' has its first trailing slash made a NUL."""
    if len(s) > size and s[size - 1 : size] == b"/":
        n = len(s[:size].rstrip(b"/"))
        return s[:n] + b"\0" + s[n + 1 : size]
    return s


def _octal(size: int, n: int) -> bytes:
    """Go's formatOctal: zero-padded octal with room for a NUL; 0 when it does not fit."""
    return b"%0*o" % (size - 1, n if _fits_octal(size, n) else 0)


def _block(h: Header, name: bytes, linkname: bytes, prefix: bytes = b"") -> bytes:
    """Go's templateV7Plus filled in, then the checksum (6 octal digits, NUL, space) over the
    block with the checksum field as spaces. A PAX extended header's block leaves the device
    numbers empty, as Go's writer does."""
    devices = h.typeflag != XHEADER
    block = _USTAR.pack(
        _string(name, NAME_SIZE),
        _octal(8, h.mode),
        _octal(8, h.uid),
        _octal(8, h.gid),
        _octal(12, h.size),
        _octal(12, h.mtime),
        _CHKSUM_SPACES,
        h.typeflag,
        _string(linkname, NAME_SIZE),
        _MAGIC,
        _VERSION,
        b"",
        b"",
        _octal(8, h.devmajor) if devices else b"",
        _octal(8, h.devminor) if devices else b"",
        _string(prefix, PREFIX_SIZE),
    )
    return b"%s%06o\0 %s" % (block[:_CHKSUM_AT], sum(block), block[_CHKSUM_AT + 8 :])


def _pax_record(key: str, value: bytes) -> bytes:
    """`<len> key=value\\n`, the length counting itself."""
    body = b" " + key.encode() + b"=" + value + b"\n"
    size = len(body) + 1
    while len(str(size)) + len(body) != size:
        size = len(str(size)) + len(body)
    return str(size).encode() + body


def _pax_records(h: Header) -> dict[str, bytes]:
    """The records a header needs (Go's allowedFormats): fields USTAR cannot hold, and its own."""
    records: dict[str, bytes] = {}
    if (not _is_ascii(h.name) or len(h.name) > NAME_SIZE) and _split_ustar(h.name) is None:
        records["path"] = h.name
    if not _is_ascii(h.linkname) or len(h.linkname) > NAME_SIZE:
        records["linkpath"] = h.linkname
    for key, size, n in (("uid", 8, h.uid), ("gid", 8, h.gid), ("size", 12, h.size), ("mtime", 12, h.mtime)):
        if not _fits_octal(size, n):
            records[key] = str(n).encode()
    for key, value in h.pax.items():
        records.setdefault(key, value)
    return records


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def header(h: Header) -> bytes:
    """The header block(s) of one entry (its data follows, then padding(h.size))."""
    records = _pax_records(h)
    if not records:
        prefix, name = _split_ustar(h.name) or (b"", h.name)
        return _block(h, name, h.linkname, prefix)
    data = b"".join(_pax_record(k, records[k]) for k in sorted(records))
    cut = h.name.rfind(b"/") + 1  # Go's path.Split, then path.Join (which cleans: no empty parts)
    parts = (h.name[:cut], b"PaxHeaders.0", h.name[cut:])
    xname = b"/".join(p for part in parts for p in part.split(b"/") if p)
    xname = _to_ascii(xname)[:NAME_SIZE].rstrip(b"/")
    xheader = _block(Header(xname, XHEADER, size=len(data)), xname, b"")
    main = _block(h, _to_ascii(h.name), _to_ascii(h.linkname))
    return xheader + data + _padding(len(data)) + main


def padding(size: int) -> bytes:
    """The zeros after `size` bytes of data, to the next block."""
    return _padding(size)
