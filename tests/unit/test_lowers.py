"""The extra-lowers label: parsing, the path policy, named lowers, kernel limits; the config file."""

from __future__ import annotations

import pytest

from addlower.config import ConfigError, parse_config
from addlower.errors import InvalidArgument
from addlower.lowers import LowerPolicy, check_mount_limits, parse_lowers
from addlower.mounts import Kind, Layout, Mount, compute_mounts

ROOT = "/var/lib/addlower"
POLICY = LowerPolicy(ROOT, ("/srv/cache", "/tmp"), {"maven": "/var/cache/ci/m2"})
SRC = "label x"


def test_entries_keep_their_order_and_empty_segments_are_ignored():
    assert parse_lowers(":/srv/cache/a::/tmp/b:", POLICY, SRC) == ("/srv/cache/a", "/tmp/b")


def test_named_lower_resolves_to_its_host_dir():
    assert parse_lowers("maven:/tmp/x", POLICY, SRC) == ("/var/cache/ci/m2", "/tmp/x")


@pytest.mark.parametrize(
    "value, says",
    [
        ("/tmp/x,upperdir=/etc", "character ','"),  # the original spliced this into the options
        ("/tmp/a=b", "character '='"),
        ("/tmp/a b", "character ' '"),
        ("/tmp/a\tb", "character '\\t'"),
        ("/tmp/a\\b", "character '\\\\'"),
        ("/tmp/a\x01", "character '\\x01'"),
        ("relative/dir", "must be an absolute path"),
        ("/tmp/../etc", "must not contain '..'"),
        ("/tmp/./x", "must be normalised"),
        ("/tmp//x", "must be normalised"),
        ("/tmp/x/", "must be normalised"),
        ("/etc", "outside the allowed roots"),
        ("/tmpfoo", "outside the allowed roots"),
        ("gradle", "'gradle' is not a named lower"),
    ],
)
def test_bad_entries_are_refused_naming_the_entry(value, says):
    with pytest.raises(InvalidArgument) as err:
        parse_lowers(f"/tmp/ok:{value}", POLICY, SRC)
    assert says in str(err.value)
    assert str(err.value).startswith(SRC)


@pytest.mark.parametrize("path", [ROOT, f"{ROOT}/snapshots/1/fs", "/var/lib", "/"])
def test_the_snapshotters_root_its_insides_and_its_ancestors_are_refused(path):
    policy = LowerPolicy(ROOT)
    with pytest.raises(InvalidArgument, match="overlaps the snapshotter's root"):
        parse_lowers(path, policy, SRC)


def test_default_policy_allows_any_absolute_path_outside_the_root():
    assert parse_lowers("/opt/cache", LowerPolicy(ROOT), SRC) == ("/opt/cache",)


def test_policy_refuses_bad_named_lowers():
    with pytest.raises(InvalidArgument, match="named lower 'm2'"):
        LowerPolicy(ROOT, named={"m2": "cache/m2"})
    with pytest.raises(InvalidArgument, match="named lower 'a b'"):
        LowerPolicy(ROOT, named={"a b": "/x"})


L = Layout("/r")
X = ("/h/a", "/h/b")


@pytest.mark.parametrize(
    "kind, parents, lowerdir, upper",
    [
        (Kind.ACTIVE, (), "/h/a:/h/b", True),  # was a bind mount
        (Kind.VIEW, (), "/r/snapshots/9/fs:/h/a:/h/b", False),  # was a bind mount
        (Kind.VIEW, (3,), "/h/a:/h/b:/r/snapshots/3/fs", False),  # was a bind of the parent
        (Kind.ACTIVE, (3,), "/h/a:/h/b:/r/snapshots/3/fs", True),
        (Kind.ACTIVE, (5, 3), "/h/a:/h/b:/r/snapshots/5/fs:/r/snapshots/3/fs", True),
        (Kind.VIEW, (5, 3), "/h/a:/h/b:/r/snapshots/5/fs:/r/snapshots/3/fs", False),
    ],
)
def test_extra_lowers_in_every_mount_case(kind, parents, lowerdir, upper):
    [m] = compute_mounts(L, kind, 9, parents, ("index=off",), X)
    assert (m.type, m.source) == ("overlay", "overlay")
    expected = ["index=off"]
    if upper:
        expected += ["workdir=/r/snapshots/9/work", "upperdir=/r/snapshots/9/fs"]
    assert list(m.options) == [*expected, f"lowerdir={lowerdir}"]


def test_options_longer_than_a_page_are_refused():
    m = Mount("overlay", "overlay", ("lowerdir=" + ":".join(f"/cache/{'x' * 60}{i}" for i in range(70)),))
    with pytest.raises(InvalidArgument, match=r"label x: the overlay options would be \d+ bytes"):
        check_mount_limits([m], SRC)


def test_more_layers_than_overlayfs_stacks_are_refused():
    m = Mount("overlay", "overlay", ("lowerdir=" + ":".join(f"/{i}" for i in range(501)),))
    with pytest.raises(InvalidArgument, match="501 lower layers"):
        check_mount_limits([m], SRC)


def test_config_file_values():
    c = parse_config({"async_remove": False, "lowers": {"allowed_roots": ["/srv"], "named": {"npm": "/srv/npm"}}})
    assert (c.async_remove, c.allowed_roots, dict(c.named_lowers)) == (False, ("/srv",), {"npm": "/srv/npm"})


@pytest.mark.parametrize(
    "data, key",
    [
        ({"async_remove": "no"}, "async_remove: expected a bool"),
        ({"rootdir": "/x"}, "rootdir: unknown key"),
        ({"lowers": {"allowed": []}}, "lowers.allowed: unknown key"),
        ({"lowers": {"allowed_roots": ["srv"]}}, "allowed root 'srv': must be an absolute path"),
        ({"lowers": {"named": {"m2": 3}}}, "lowers.named.m2: expected a str"),
        ({"log_level": "loud"}, "log_level: one of"),
    ],
)
def test_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        parse_config(data)
