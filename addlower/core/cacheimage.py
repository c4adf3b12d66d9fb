"""A managed cache as an OCI image: one layer per generation, bottom first, so any containerd can
pull and unpack it, and what a pulled one's manifest and config say.

Pure: the image's JSON documents in and out, chain ids, references and the paths a pushed layer
leaves out (credentials a job may have written into a cache). A manifest and a config come from a
registry, through containerd: each is bounded by a named limit and checked field by field before
anything is taken from it. The layers themselves are containerd's to unpack.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from addlower.core.errors import InvalidArgument

# The containerd namespace holding the caches' images and the snapshots they unpack into.
NAMESPACE = "addlower-caches"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    }
)
MAX_MANIFEST_BYTES = 4 << 20  # containerd's own limit on a manifest it fetches
MAX_CONFIG_BYTES = 8 << 20
MAX_LAYERS = 128  # a cache's chain is at most 2 x 64 generations
# Files a pushed layer never holds unless the cache's `exclude` says otherwise: credentials of the
# usual build tools. A pattern matches a path's trailing components (fnmatch, per component).
DEFAULT_EXCLUDE = (
    "settings-security.xml",
    ".npmrc",
    ".pypirc",
    ".docker/config.json",
    ".git-credentials",
    ".netrc",
)
# The image label that names the cache a pushed image was made from.
CACHE_LABEL = "io.addlower.cache"

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# An image reference as containerd's reference.Parse takes it: [host[:port]/]path[:tag][@digest].
_REFERENCE = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?(?::[0-9]{1,5})?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)
MAX_REFERENCE = 255


class ImageError(ValueError):
    """A manifest or config a cache cannot be made from; the message names the part."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


def oci_architecture(machine: str) -> str:
    """The OCI architecture of a `uname -m` machine name."""
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)


def check_reference(ref: str, what: str) -> str:
    """`ref` when it is an image reference (what containerd and the registry take), else an
    InvalidArgument naming `what`."""
    if len(ref) > MAX_REFERENCE or not _REFERENCE.fullmatch(ref) or "/" not in ref:
        raise InvalidArgument(f"{what}: {ref[:100]!r} is not an image reference such as registry.example/ci/maven:main")
    return ref


class Exclusions:
    """Whether a path (relative, '/'-separated) or a dir above it ends with one of `patterns`'
    components: ".npmrc" matches every .npmrc, ".docker/config.json" that file in any .docker.
    A layer asks for each of its paths, parents first: each dir is decided once and remembered,
    and a path is matched only at its own end (0.1 ms a file otherwise, 40% of a push)."""

    def __init__(self, patterns: Sequence[str]):
        self._wanted = [tuple(p for p in pattern.strip("/").split("/") if p) for pattern in patterns]
        self._depth = max((len(w) for w in self._wanted), default=0)
        # Any pattern's last component, as one regex: most names match none, and that is all they cost.
        self._last = re.compile("|".join(fnmatch.translate(w[-1]) for w in self._wanted) or "(?!)")
        self._dirs: dict[bytes, bool] = {}

    def __call__(self, path: bytes) -> bool:
        path = path.strip(b"/")
        parent, _, name = path.rpartition(b"/")
        return self._ends(path, name) or (bool(parent) and self._dir(parent))

    def _dir(self, path: bytes) -> bool:
        known = self._dirs.get(path)
        if known is None:
            known = self._dirs[path] = self(path)
        return known

    def _ends(self, path: bytes, name: bytes) -> bool:
        if not self._last.match(name.decode(errors="surrogateescape")):
            return False
        parts = [p.decode(errors="surrogateescape") for p in path.rsplit(b"/", self._depth)[-self._depth :] if p]
        return any(
            len(want) <= len(parts)
            and all(fnmatch.fnmatchcase(part, w) for part, w in zip(parts[len(parts) - len(want) :], want, strict=True))
            for want in self._wanted
        )


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain id of each layer (the key containerd commits its snapshot under)."""
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append(
            diff_id if not chain else "sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest()
        )
    return chain


def _document(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def config_document(diff_ids: Sequence[str], architecture: str, cache: str) -> bytes:
    """The image config: no command to run, only the layers (`rootfs.diff_ids`)."""
    return _document(
        {
            "architecture": architecture,
            "os": "linux",
            "config": {"Labels": {CACHE_LABEL: cache}},
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        }
    )


def manifest_document(config: Descriptor, layers: Sequence[Descriptor], cache: str) -> bytes:
    return _document(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": config.json(),
            "layers": [layer.json() for layer in layers],
            "annotations": {CACHE_LABEL: cache},
        }
    )


def descriptor_of(media_type: str, data: bytes) -> Descriptor:
    return Descriptor(media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def _load(data: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(data) > limit:
        raise ImageError(f"the {what} is {len(data)} bytes, more than {limit}")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"the {what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ImageError(f"the {what} is not a JSON object")
    return doc


def _descriptor(value: object, what: str, types: frozenset[str]) -> Descriptor:
    if not isinstance(value, dict):
        raise ImageError(f"{what} is not a descriptor")
    media, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if media not in types:
        raise ImageError(f"{what}'s media type {str(media)[:100]!r} is not one of {sorted(types)}")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ImageError(f"{what}'s digest {str(digest)[:100]!r} is no sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{what}'s size {size!r} is no size")
    return Descriptor(media, digest, size)


def parse_manifest(data: bytes) -> Manifest:
    doc = _load(data, MAX_MANIFEST_BYTES, "manifest")
    if doc.get("schemaVersion") != 2 or doc.get("mediaType", MANIFEST) not in (MANIFEST, DOCKER_MANIFEST):
        raise ImageError(f"the manifest is no OCI or Docker v2 image manifest ({str(doc.get('mediaType'))[:100]!r})")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ImageError("the manifest has no layers")
    if len(layers) > MAX_LAYERS:
        raise ImageError(f"the manifest has {len(layers)} layers, more than {MAX_LAYERS}")
    return Manifest(
        _descriptor(doc.get("config"), "the config", frozenset({CONFIG, DOCKER_CONFIG})),
        tuple(_descriptor(layer, f"layer {n + 1}", LAYER_TYPES) for n, layer in enumerate(layers)),
    )


def parse_diff_ids(data: bytes, layers: int) -> list[str]:
    """The config's `rootfs.diff_ids`, one per layer of its manifest."""
    doc = _load(data, MAX_CONFIG_BYTES, "config")
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != layers:
        raise ImageError(f"the config's rootfs.diff_ids do not list the manifest's {layers} layers")
    for n, diff_id in enumerate(diff_ids):
        if not isinstance(diff_id, str) or not _DIGEST.fullmatch(diff_id):
            raise ImageError(f"the config's diff_id {n + 1} {str(diff_id)[:100]!r} is no sha256 digest")
    return diff_ids
