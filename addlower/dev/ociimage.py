"""Build small OCI image layout tarballs locally, for demos, tests and benchmarks.

There is no registry on the machines we run on, so images are made here from the host's static
busybox and loaded with `ctr images import`. Output is deterministic (fixed mtimes, owners, gzip
header and member order): the same inputs give the same digests. This module knows the OCI image
format only; it must not know about containerd, snapshots or the daemon.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from addlower.core.cacheimage import oci_architecture

BUSYBOX = Path("/bin/busybox")
BUSYBOX_REF = "localhost/addlower/busybox:latest"
PAUSE_REF = "localhost/addlower/pause:latest"
# Sleeps forever but, unlike a bare `sleep` as pid 1, exits on SIGTERM so stopping a sandbox is quick.
PAUSE_CMD = ("/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done")
# Fixed timestamp (2000-01-01T00:00:00Z) for every tar member and the image config.
EPOCH = 946684800
EPOCH_ISO = "2000-01-01T00:00:00Z"
APPLETS = (
    "[",
    "awk",
    "basename",
    "cat",
    "chgrp",
    "chmod",
    "chown",
    "cp",
    "cut",
    "date",
    "dd",
    "df",
    "dirname",
    "du",
    "echo",
    "env",
    "false",
    "find",
    "grep",
    "head",
    "hostname",
    "id",
    "kill",
    "ln",
    "ls",
    "mkdir",
    "mount",
    "mv",
    "printf",
    "ps",
    "pwd",
    "readlink",
    "realpath",
    "rm",
    "rmdir",
    "sed",
    "seq",
    "sh",
    "sha256sum",
    "sleep",
    "sort",
    "stat",
    "sync",
    "tail",
    "tee",
    "test",
    "touch",
    "tr",
    "true",
    "umount",
    "uname",
    "wc",
    "whoami",
    "xargs",
)
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "user:x:1000:1000:user:/home/user:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class Entry:
    """One member of a layer tar; build with `file`, `directory`, `symlink` or `whiteout`.

    Parent directories need not be listed: containerd's applier creates missing ones (0755).
    """

    path: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


def file(path: str, data: bytes | str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path, data=data.encode() if isinstance(data, str) else data, mode=mode, uid=uid, gid=gid)


def directory(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path, type=tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, type=tarfile.SYMTYPE, linkname=target, mode=0o777)


def whiteout(path: str) -> Entry:
    """An OCI whiteout: the layer deletes `path` from the layers below it."""
    head, _, name = path.rstrip("/").rpartition("/")
    return file(f"{head}/.wh.{name}" if head else f".wh.{name}", b"")


@dataclass(frozen=True)
class OciImage:
    """What was built: the tarball and the identifiers a test needs to find its snapshots."""

    path: Path
    ref: str
    manifest_digest: str
    diff_ids: tuple[str, ...]

    @property
    def chain_ids(self) -> tuple[str, ...]:
        """containerd names committed layer snapshots by chain ID; the last one is the top layer."""
        chain: list[str] = []
        for diff_id in self.diff_ids:
            chain.append(diff_id if not chain else _digest(f"{chain[-1]} {diff_id}".encode()))
        return tuple(chain)


@dataclass
class _Blobs:
    """Content-addressed blobs of one image layout, in insertion order."""

    blobs: dict[str, bytes] = field(default_factory=dict)

    def add(self, media_type: str, data: bytes) -> dict:
        digest = _digest(data)
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}


def build_busybox_image(
    out_tar: Path,
    ref: str = BUSYBOX_REF,
    cmd: Sequence[str] = ("/bin/sh",),
    extra_layers: Sequence[Iterable[Entry]] = (),
    volumes: Sequence[str] = (),
) -> OciImage:
    """Write an OCI layout tarball: a busybox base layer, then `extra_layers` in order (top last);
    `volumes` are the image's VOLUME entries."""
    layers = [_tar(_busybox_entries()), *(_tar(entries) for entries in extra_layers)]
    blobs = _Blobs()
    layer_descs = [blobs.add(MEDIA_LAYER, _gzip(tar)) for tar in layers]
    diff_ids = tuple(_digest(tar) for tar in layers)
    arch = _oci_arch()
    config = {
        "created": EPOCH_ISO,
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": [PATH_ENV],
            "Cmd": list(cmd),
            "WorkingDir": "/",
            **({"Volumes": {v: {} for v in volumes}} if volumes else {}),
        },
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": EPOCH_ISO, "created_by": "addlower.ociimage"} for _ in layers],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": blobs.add(MEDIA_CONFIG, _json(config)),
        "layers": layer_descs,
    }
    manifest_desc = blobs.add(MEDIA_MANIFEST, _json(manifest))
    manifest_desc["platform"] = {"architecture": arch, "os": "linux"}
    # `ctr images import` names the image from io.containerd.image.name; other tools use ref.name.
    manifest_desc["annotations"] = {
        "io.containerd.image.name": ref,
        "org.opencontainers.image.ref.name": _tag(ref),
    }
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [manifest_desc]}
    members = [
        ("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
        ("index.json", _json(index)),
        *((f"blobs/sha256/{d.removeprefix('sha256:')}", data) for d, data in sorted(blobs.blobs.items())),
    ]
    out_tar.parent.mkdir(parents=True, exist_ok=True)
    out_tar.write_bytes(_tar([file(name, data) for name, data in members]))
    return OciImage(path=out_tar, ref=ref, manifest_digest=manifest_desc["digest"], diff_ids=diff_ids)


def build_pause_image(out_tar: Path, ref: str = PAUSE_REF) -> OciImage:
    """The busybox image whose default command idles until stopped: a CRI sandbox image."""
    return build_busybox_image(out_tar, ref=ref, cmd=PAUSE_CMD)


def _busybox_entries() -> list[Entry]:
    return [
        *(directory(d) for d in ("bin", "dev", "etc", "home", "proc", "sys", "usr", "var")),
        directory("home/user", uid=1000, gid=1000),
        directory("root", mode=0o700),
        directory("tmp", mode=0o1777),
        file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
        *(symlink(f"bin/{name}", "busybox") for name in APPLETS),
        file("etc/passwd", PASSWD),
        file("etc/group", GROUP),
    ]


def _tar(entries: Iterable[Entry]) -> bytes:
    """A tar with fixed metadata; entries keep their order (later duplicates override earlier)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.path)
            info.type, info.linkname, info.mode = e.type, e.linkname, e.mode
            info.uid, info.gid, info.mtime, info.uname, info.gname = e.uid, e.gid, EPOCH, "", ""
            info.size = len(e.data) if e.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(e.data) if info.size else None)
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    """gzip with an empty file name and zero mtime in the header, so the blob digest is stable."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buf.getvalue()


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tag(ref: str) -> str:
    name = ref.rpartition("/")[2]
    return name.rpartition(":")[2] if ":" in name else "latest"


def _oci_arch() -> str:
    return oci_architecture(platform.machine())
