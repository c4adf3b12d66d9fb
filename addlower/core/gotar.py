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

from collections.abc import Mapping
from dataclasses import dataclass, field

BLOCK = 512
END = b"\0" * (2 * BLOCK)  # Go's Writer.Close: two zero blocks, no padding to a record

REG, LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO, XHEADER = b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"x"

NAME_SIZE, PREFIX_SIZE = 100, 155
# (offset, size) of each field of a USTAR header block
_NAME, _MODE, _UID, _GID = (0, 100), (100, 8), (108, 8), (116, 8)
_SIZE, _MTIME, _CHKSUM = (124, 12), (136, 12), (148, 8)
_TYPE, _LINK, _MAGIC, _VERSION = (156, 1), (157, 100), (257, 6), (263, 2)
_UNAME, _GNAME, _DEVMAJOR, _DEVMINOR, _PREFIX = (265, 32), (297, 32), (329, 8), (337, 8), (345, 155)


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


def _fits_octal(size: int, n: int) -> bool:
    return 0 <= n < 8 ** (size - 1)


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


def _put_string(block: bytearray, where: tuple[int, int], s: bytes) -> None:
    """Go's formatString: copied, cut to the field, NUL-terminated when shorter; a cut that ends
    in '/' loses its trailing slashes."""
    offset, size = where
    block[offset : offset + min(len(s), size)] = s[:size]
    if len(s) < size:
        block[offset + len(s)] = 0
    elif len(s) > size and s[size - 1 : size] == b"/":
        block[offset + len(s[: size - 1].rstrip(b"/"))] = 0


def _put_octal(block: bytearray, where: tuple[int, int], n: int) -> None:
    """Go's formatOctal: zero-padded octal with room for a NUL; 0 when it does not fit."""
    size = where[1]
    if not _fits_octal(size, n):
        n = 0
    _put_string(block, where, format(n, "o").rjust(size - 1, "0").encode())


def _finish(block: bytearray) -> bytes:
    """USTAR magic and version, then the checksum (6 octal digits, NUL, space)."""
    block[_MAGIC[0] : _MAGIC[0] + 6] = b"ustar\0"
    block[_VERSION[0] : _VERSION[0] + 2] = b"00"
    block[_CHKSUM[0] : _CHKSUM[0] + 8] = b" " * 8
    _put_string(block, (_CHKSUM[0], 7), format(sum(block), "o").rjust(6, "0").encode())
    block[_CHKSUM[0] + 7] = 0x20
    return bytes(block)


def _main_block(h: Header, name: bytes, linkname: bytes, fit: bool) -> bytearray:
    """Go's templateV7Plus; `fit`: numbers that do not fit are written as 0 (a PAX main header)."""
    block = bytearray(BLOCK)
    block[_TYPE[0] : _TYPE[0] + 1] = h.typeflag
    _put_string(block, _NAME, name)
    _put_string(block, _LINK, linkname)
    for where, n in (
        (_MODE, h.mode),
        (_UID, h.uid),
        (_GID, h.gid),
        (_SIZE, h.size),
        (_MTIME, h.mtime),
        (_DEVMAJOR, h.devmajor),
        (_DEVMINOR, h.devminor),
    ):
        _put_octal(block, where, 0 if fit and not _fits_octal(where[1], n) else n)
    _put_string(block, _UNAME, b"")
    _put_string(block, _GNAME, b"")
    return block


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
        split = _split_ustar(h.name)
        block = _main_block(h, split[1] if split else h.name, h.linkname, fit=False)
        _put_string(block, _PREFIX, split[0] if split else b"")
        return _finish(block)
    data = b"".join(_pax_record(k, records[k]) for k in sorted(records))
    cut = h.name.rfind(b"/") + 1  # Go's path.Split, then path.Join (which cleans: no empty parts)
    parts = (h.name[:cut], b"PaxHeaders.0", h.name[cut:])
    xname = b"/".join(p for part in parts for p in part.split(b"/") if p)
    xname = _to_ascii(xname)[:NAME_SIZE].rstrip(b"/")
    xblock = bytearray(BLOCK)
    xblock[_TYPE[0] : _TYPE[0] + 1] = XHEADER
    _put_string(xblock, _NAME, xname)
    for where, n in ((_MODE, 0), (_UID, 0), (_GID, 0), (_SIZE, len(data)), (_MTIME, 0)):
        _put_octal(xblock, where, n)
    main = _main_block(h, _to_ascii(h.name), _to_ascii(h.linkname), fit=True)
    return _finish(xblock) + data + _padding(len(data)) + _finish(main)


def padding(size: int) -> bytes:
    """The zeros after `size` bytes of data, to the next block."""
    return _padding(size)
