"""The registry harness itself: an image pushed from an OCI layout comes back from the registry byte for
byte (manifest by tag, then every blob by digest), as a CRI pull would fetch it."""

from __future__ import annotations

import hashlib
import json
import tarfile
import urllib.request
from pathlib import Path

from addlower.dev import ociimage
from tests.support.registry import MANIFEST_ACCEPT, Registry, push_oci_layout

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, accept: str = "*/*") -> tuple[bytes, str, str]:
    """Body, Content-Type and Docker-Content-Digest of a GET."""
    with _OPENER.open(urllib.request.Request(url, headers={"Accept": accept}), timeout=30) as resp:
        return resp.read(), resp.headers["Content-Type"], resp.headers["Docker-Content-Digest"]


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _index_digest(layout_tar: Path) -> str:
    with tarfile.open(layout_tar) as tar:
        member = tar.extractfile("index.json")
        assert member is not None, f"{layout_tar}: index.json is not a regular file"
        index = json.load(member)
    return index["manifests"][0]["digest"]


def _assert_pulls(host: str, repository: str, tag: str, image: ociimage.OciImage) -> None:
    """What containerd does on a pull: resolve the tag, then fetch config and layers by digest."""
    base = f"http://{host}/v2/{repository}"
    manifest, media_type, digest = _get(f"{base}/manifests/{tag}", MANIFEST_ACCEPT)
    assert media_type == ociimage.MEDIA_MANIFEST
    assert digest == _sha256(manifest) == _index_digest(image.path) == image.manifest_digest
    parsed = json.loads(manifest)
    assert len(parsed["layers"]) == len(image.diff_ids)
    for desc in [parsed["config"], *parsed["layers"]]:
        data, _, _ = _get(f"{base}/blobs/{desc['digest']}")
        assert (_sha256(data), len(data)) == (desc["digest"], desc["size"])


def test_pushed_image_is_served_by_tag(tmp_path: Path) -> None:
    image = ociimage.build_busybox_image(tmp_path / "busybox.tar")
    with Registry(tmp_path / "registry") as registry:
        ref = push_oci_layout(registry.host, image.path, "addlower/busybox", "v1")
        assert ref == f"{registry.host}/addlower/busybox:v1"
        _assert_pulls(registry.host, "addlower/busybox", "v1", image)


def test_images_sharing_a_base_layer_share_a_repository(tmp_path: Path) -> None:
    """The second push finds the busybox layer already there (HEAD) and uploads only what is new."""
    base = ociimage.build_busybox_image(tmp_path / "base.tar")
    child = ociimage.build_busybox_image(tmp_path / "child.tar", extra_layers=[[ociimage.file("etc/motd", "hello\n")]])
    with Registry(tmp_path / "registry") as registry:
        push_oci_layout(registry.host, base.path, "addlower/busybox", "base")
        push_oci_layout(registry.host, child.path, "addlower/busybox", "child")
        tags, _, _ = _get(f"http://{registry.host}/v2/addlower/busybox/tags/list")
        assert sorted(json.loads(tags)["tags"]) == ["base", "child"]
        _assert_pulls(registry.host, "addlower/busybox", "base", base)
        _assert_pulls(registry.host, "addlower/busybox", "child", child)
