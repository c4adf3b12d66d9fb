"""A cache as an OCI image: which paths a pushed layer leaves out, chain ids, the documents a push
writes and the checks on those a pull reads (what a registry sent is hostile)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addlower.core import cacheimage
from addlower.core.cacheimage import Descriptor, ImageError
from addlower.core.config import ConfigError, load_config
from addlower.core.errors import InvalidArgument
from addlower.dev import ociimage

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "path, patterns, out",
    [
        (b"home/.npmrc", (".npmrc",), True),
        (b".npmrc", (".npmrc",), True),
        (b"a/.npmrc.bak", (".npmrc",), False),
        (b"root/.docker/config.json", (".docker/config.json",), True),
        (b"root/config.json", (".docker/config.json",), False),
        (b"root/.docker", (".docker/config.json",), False),  # the dir itself stays: only the file goes
        (b"secrets/deep/key.pem", ("secrets",), True),  # everything under an excluded dir
        (b"a/b/id_rsa", ("id_*",), True),
        (b"repository/org/one.jar", cacheimage.DEFAULT_EXCLUDE, False),
        (b".m2/settings-security.xml", cacheimage.DEFAULT_EXCLUDE, True),
        (b"x/.git-credentials", cacheimage.DEFAULT_EXCLUDE, True),
        (b"h/.docker/config.json/a/b", (".docker/config.json",), True),  # under a two-part match
        (b"h/.docker/a/config.json", (".docker/config.json",), False),
        (b"a/b", (), False),
    ],
)
def test_excluded(path, patterns, out):
    assert cacheimage.Exclusions(patterns)(path) is out


def test_exclusions_remember_dirs_whatever_order_paths_come_in():
    exclusions = cacheimage.Exclusions(("secrets", ".docker/config.json"))
    asked = [b"a/secrets/x/y", b"a/secrets", b"a/b", b"a/secrets/z", b"c/.docker/config.json/k", b"c/.docker/k"]
    assert [exclusions(p) for p in asked] == [True, True, False, True, True, False]
    assert [exclusions(p) for p in reversed(asked)] == [False, True, True, False, True, True]


def test_chain_ids_are_containerds(tmp_path: Path):
    image = ociimage.build_busybox_image(tmp_path / "busybox.tar", extra_layers=[[ociimage.file("a", "a")]])
    assert cacheimage.chain_ids(image.diff_ids) == list(image.chain_ids)


def test_a_pushed_images_documents_read_back():
    layers = [Descriptor("application/vnd.oci.image.layer.v1.tar", f"sha256:{n:064x}", 10 * n) for n in range(1, 4)]
    config = cacheimage.config_document([f"sha256:{n:064x}" for n in range(7, 10)], "amd64", "m2")
    config_desc = cacheimage.descriptor_of(cacheimage.CONFIG, config)
    manifest = cacheimage.parse_manifest(cacheimage.manifest_document(config_desc, layers, "m2"))
    assert manifest.config == config_desc and list(manifest.layers) == layers
    assert cacheimage.parse_diff_ids(config, 3) == [f"sha256:{n:064x}" for n in range(7, 10)]
    assert json.loads(config)["config"]["Labels"] == {cacheimage.CACHE_LABEL: "m2"}


def manifest(**changes: object) -> bytes:
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": cacheimage.MANIFEST,
        "config": {"mediaType": cacheimage.CONFIG, "digest": DIGEST, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": DIGEST, "size": 1}],
    }
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"[]", "not a JSON object"),
        (b"{", "not JSON"),
        (manifest(schemaVersion=1), "no OCI or Docker v2 image manifest"),
        (manifest(mediaType="application/vnd.oci.image.index.v1+json"), "no OCI or Docker v2 image manifest"),
        (manifest(layers=[]), "has no layers"),
        (manifest(layers=[{"mediaType": "text/plain", "digest": DIGEST, "size": 1}]), "layer 1's media type"),
        (manifest(layers=[{"mediaType": cacheimage.MANIFEST, "digest": DIGEST, "size": 1}]), "layer 1's media type"),
        (
            manifest(layers=[{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "md5:x", "size": 1}]),
            "layer 1's digest 'md5:x' is no sha256 digest",
        ),
        (
            manifest(config={"mediaType": cacheimage.CONFIG, "digest": DIGEST, "size": -1}),
            "the config's size -1 is no size",
        ),
        (
            manifest(layers=[json.loads(manifest())["layers"][0]] * (cacheimage.MAX_LAYERS + 1)),
            f"more than {cacheimage.MAX_LAYERS}",
        ),
        (b" " * (cacheimage.MAX_MANIFEST_BYTES + 1), "more than"),
    ],
)
def test_a_manifest_a_cache_cannot_come_from_is_refused_by_part(data, message):
    with pytest.raises(ImageError, match=message.replace("(", r"\(")):
        cacheimage.parse_manifest(data)


def test_diff_ids_must_match_the_layers():
    config = cacheimage.config_document([DIGEST], "amd64", "m2")
    with pytest.raises(ImageError, match="do not list the manifest's 2 layers"):
        cacheimage.parse_diff_ids(config, 2)
    with pytest.raises(ImageError, match="diff_id 1 'nope' is no sha256 digest"):
        cacheimage.parse_diff_ids(json.dumps({"rootfs": {"diff_ids": ["nope"]}}).encode(), 1)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=2000)
    | st.recursive(st.none() | st.integers() | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c)).map(
        lambda v: json.dumps(v).encode()
    )
)
def test_anything_a_registry_sends_ends_in_a_manifest_or_a_refusal(data):
    with contextlib.suppress(ImageError):
        cacheimage.parse_manifest(data)
    with contextlib.suppress(ImageError):
        cacheimage.parse_diff_ids(data, 1)


@pytest.mark.parametrize(
    "ref, ok",
    [
        ("127.0.0.1:5000/ci/m2:main", True),
        ("registry.example/team/cache/maven:2026-12", True),
        (f"registry.example/ci/m2@{DIGEST}", True),
        ("m2", False),  # a registry is named: a cache never goes to a default one by accident
        ("-registry.example/ci/m2", False),
        ("registry.example/CI/m2", False),
        ("registry.example/ci/m2:ta g", False),
        ("registry.example/ci/m2;rm", False),
    ],
)
def test_references(ref, ok):
    if ok:
        assert cacheimage.check_reference(ref, "image") == ref
    else:
        with pytest.raises(InvalidArgument, match="is not an image reference"):
            cacheimage.check_reference(ref, "image")


@pytest.mark.parametrize(
    "keys, message",
    [
        ('image = "nope"', "lowers.named.m2.image: 'nope' is not an image reference"),
        ("push = 3", "lowers.named.m2.push: an image reference, not 3"),
        ('exclude = ".npmrc"', "lowers.named.m2.exclude: a list of paths"),
        ('exclude = ["/"]', "lowers.named.m2.exclude: a list of paths"),
    ],
)
def test_cache_image_keys_are_checked_by_name(tmp_path: Path, keys: str, message: str):
    path = tmp_path / "config.toml"
    path.write_text(f'[lowers.named.m2]\ncache = true\ntarget = "/root/.m2"\n{keys}\n')
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_exclude_replaces_the_defaults(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text('[lowers.named.m2]\ncache = true\ntarget = "/root/.m2"\nexclude = ["*.key"]\n')
    assert load_config(path).caches["m2"].exclude == ("*.key",)
    path.write_text('[lowers.named.m2]\ncache = true\ntarget = "/root/.m2"\n')
    assert load_config(path).caches["m2"].exclude == cacheimage.DEFAULT_EXCLUDE
