"""Tar headers as Go's archive/tar writes them: data/gotar-golden.tar was written by Go 1.19's
archive/tar from the same headers (the program is in GOLDEN_PROGRAM), with Format = FormatPAX as
containerd's ChangeWriter sets it, except for the whiteout (no format, as containerd writes those).
Our writer must give the same bytes: USTAR when it can, the prefix split of long names, PAX
headers named PaxHeaders.0 for what USTAR cannot hold, no padding past the two end blocks."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from addlower.core.gotar import BLOCKDEV, CHAR, DIR, END, LINK, REG, SYMLINK, Header, header, padding

GOLDEN = Path(__file__).parent / "data" / "gotar-golden.tar"
GOLDEN_PROGRAM = """
tw := tar.NewWriter(os.Stdout)   // each w(h, data, pax): h.Format = FormatPAX if pax; WriteHeader; Write
w(&tar.Header{Name: "a/", Typeflag: TypeDir, Mode: 0755, ModTime: Unix(1700000000)}, "", true)
w(&tar.Header{Name: "a/f", Typeflag: TypeReg, Mode: 0644, Uid: 1000, Gid: 1000, Size: 5,
              ModTime: Unix(1700000001)}, "hello", true)
w(&tar.Header{Name: d*120 + "/" + f*90, Typeflag: TypeReg, Mode: 0644, Size: 1, ModTime: Unix(1)}, "x", true)
w(&tar.Header{Name: "é"*60, Typeflag: TypeReg, Mode: 0600, ModTime: Unix(2)}, "", true)
w(&tar.Header{Name: "cap", Typeflag: TypeReg, Mode: 0755, ModTime: Unix(3),
              PAXRecords: {"SCHILY.xattr.security.capability": "\\x01\\x00\\x00\\x02"}}, "", true)
w(&tar.Header{Name: z*200 + "/", Typeflag: TypeDir, Mode: 0755, ModTime: Unix(3)}, "", true)
w(&tar.Header{Name: "a/.wh.gone", Typeflag: TypeReg, ModTime: Unix(0)}, "", false)
w(&tar.Header{Name: "ln", Typeflag: TypeSymlink, Linkname: t*130, Mode: 0777, ModTime: Unix(4)}, "", true)
w(&tar.Header{Name: "dev", Typeflag: TypeChar, Mode: 0666, Devmajor: 1, Devminor: 3, ModTime: Unix(5)}, "", true)
w(&tar.Header{Name: "hl", Typeflag: TypeLink, Linkname: "a/f", Mode: 0644, Uid: 1000, Gid: 1000,
              ModTime: Unix(1700000001)}, "", true)
w(&tar.Header{Name: "big-uid", Typeflag: TypeReg, Mode: 0644, Uid: 3000000, ModTime: Unix(6)}, "", true)
w(&tar.Header{Name: q*99 + "é", Typeflag: TypeReg, Mode: 0644, ModTime: Unix(7)}, "", true)
w(&tar.Header{Name: "p/" + r*150 + "/" + s*100 + "/", Typeflag: TypeDir, Mode: 0700, ModTime: Unix(8)}, "", true)
tw.Close()
"""

ENTRIES = [
    (Header(b"a/", DIR, 0o755, mtime=1700000000), b""),
    (Header(b"a/f", REG, 0o644, 1000, 1000, 5, 1700000001), b"hello"),  # a plain USTAR header
    (Header(b"d" * 120 + b"/" + b"f" * 90, REG, 0o644, size=1, mtime=1), b"x"),  # split into the prefix
    (Header("é".encode() * 60, REG, 0o600, mtime=2), b""),  # non-ASCII: a PAX path
    (Header(b"cap", REG, 0o755, mtime=3, pax={"SCHILY.xattr.security.capability": b"\x01\x00\x00\x02"}), b""),
    (Header(b"z" * 200 + b"/", DIR, 0o755, mtime=3), b""),  # too long to split: PAX, name cut in the header
    (Header(b"a/.wh.gone", REG), b""),  # a whiteout
    (Header(b"ln", SYMLINK, 0o777, mtime=4, linkname=b"t" * 130), b""),  # a PAX linkpath
    (Header(b"dev", CHAR, 0o666, mtime=5, devmajor=1, devminor=3), b""),
    (Header(b"hl", LINK, 0o644, 1000, 1000, mtime=1700000001, linkname=b"a/f"), b""),
    (Header(b"big-uid", REG, 0o644, uid=3000000, mtime=6), b""),  # a PAX uid, 0 in the header
    (Header(b"q" * 99 + "é".encode(), REG, 0o644, mtime=7), b""),
    (Header(b"p/" + b"r" * 150 + b"/" + b"s" * 100 + b"/", DIR, 0o700, mtime=8), b""),
]


def archive(entries: list[tuple[Header, bytes]]) -> bytes:
    return b"".join(header(h) + data + padding(len(data)) for h, data in entries) + END


def test_the_same_bytes_as_gos_archive_tar():
    assert archive(ENTRIES) == GOLDEN.read_bytes()


def test_what_a_reader_makes_of_it():
    with tarfile.open(fileobj=io.BytesIO(archive(ENTRIES))) as tar:
        members = tar.getmembers()
    assert [m.name for m in members][:4] == ["a", "a/f", "d" * 120 + "/" + "f" * 90, "é" * 60]
    assert members[4].pax_headers["SCHILY.xattr.security.capability"] == "\x01\x00\x00\x02"
    assert members[7].linkname == "t" * 130 and members[10].uid == 3000000
    assert (members[8].devmajor, members[8].devminor, members[8].type) == (1, 3, CHAR)
    assert len(archive([(Header(b"b", BLOCKDEV, devmajor=8), b"")])) == 3 * 512  # one header, two end blocks
