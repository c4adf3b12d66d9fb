"""The extra-lowers label: parsing, the path policy, named lowers, kernel limits; the config file."""

from __future__ import annotations

import re

import pytest

from addlower.core.config import ConfigError, parse_config
from addlower.core.errors import InvalidArgument
from addlower.core.lowers import (
    DEFAULT_ALLOWED_ROOTS,
    LowerPolicy,
    NamedLower,
    check_mount_limits,
    compact_lowerdirs,
    parse_lowers,
    target_count,
)
from addlower.core.model import Kind
from addlower.core.mounts import Layout, Mount, compute_mounts

ROOT = "/var/lib/addlower"
POLICY = LowerPolicy(ROOT, ("/srv/cache", "/tmp", "/srv/cache/deep"), {"maven": NamedLower("/var/cache/ci/m2")})
SRC = "label x"


def paths(lowers):
    return tuple(lower.path for lower in lowers)


def test_entries_keep_their_order_and_empty_segments_are_ignored():
    assert paths(parse_lowers(":/srv/cache/a::/tmp/b:", POLICY, SRC)) == ("/srv/cache/a", "/tmp/b")


def test_at_most_so_many_entries_each_a_bind_mount_on_the_host():
    assert len(parse_lowers(":".join(f"/tmp/{i}" for i in range(128)), POLICY, SRC)) == 128
    with pytest.raises(InvalidArgument, match="label x: more than 128 entries"):
        parse_lowers(":".join(f"/tmp/{i}" for i in range(129)), POLICY, SRC)


def test_an_entry_may_name_its_container_path():
    named = {"maven": NamedLower("/srv/cache/m2", target="/root/.m2")}
    policy = LowerPolicy(ROOT, ("/srv/cache",), named)
    assert [
        (lower.path, lower.target)
        for lower in parse_lowers("maven:maven@/home/ci/.m2:/srv/cache/npm@/root/.npm:/srv/cache/tools", policy, SRC)
    ] == [
        ("/srv/cache/m2", "/root/.m2"),
        ("/srv/cache/m2", "/home/ci/.m2"),
        ("/srv/cache/npm", "/root/.npm"),
        ("/srv/cache/tools", "/"),
    ]


@pytest.mark.parametrize(
    "entry, says",
    [
        ("/tmp/a@/", "leave the target out"),
        ("/tmp/a@root", "must be an absolute path"),
        ("/tmp/a@/proc/x", "not under /proc"),
        ("/tmp/a@/sys", "not under /sys"),
        ("/tmp/a@/x/../etc", "must not contain '..'"),
        ("/tmp/a@/x\x85", "character '\\x85'"),
        ("/tmp/a@/x@/y", "one '@' separates"),
    ],
)
def test_bad_targets_are_refused(entry, says):
    with pytest.raises(InvalidArgument, match=re.escape(says)):
        parse_lowers(entry, POLICY, SRC)


@pytest.mark.parametrize(
    "value, inner, outer",
    [
        ("/tmp/x@/a/b:/tmp/y@/a", "'/tmp/x' at '/a/b'", "'/tmp/y' at '/a'"),
        ("/tmp/y@/a:/tmp/x@/a/b", "'/tmp/x' at '/a/b'", "'/tmp/y' at '/a'"),
        ("maven:/tmp/x@/root", "named lower 'maven' (/srv/m2) at '/root/.m2'", "'/tmp/x' at '/root'"),
    ],
)
def test_targets_that_nest_are_refused_naming_both(value, inner, outer):
    policy = LowerPolicy(ROOT, ("/tmp",), {"maven": NamedLower("/srv/m2", target="/root/.m2")})
    with pytest.raises(InvalidArgument, match="targets must not nest") as refused:
        parse_lowers(value, policy, SRC)
    assert f"entry {inner} lies inside entry {outer}" in str(refused.value)


def test_the_same_target_twice_stacks_and_siblings_that_share_a_prefix_do_not_nest():
    lowers = parse_lowers("/tmp/x@/a:/tmp/y@/a:/tmp/z@/ab:/tmp/w@/a-b", POLICY, SRC)
    assert [lower.target for lower in lowers] == ["/a", "/a", "/ab", "/a-b"]


def test_target_count_of_an_accepted_value_counts_each_container_path_once():
    named = {"maven": NamedLower("/srv/m2", target="/root/.m2"), "tools": NamedLower("/srv/tools")}
    assert target_count("maven:tools:/tmp/x@/a:/tmp/y@/a:maven@/b:gone", named) == 3  # /root/.m2, /a, /b
    assert target_count("", named) == 0


def test_named_lower_resolves_to_its_host_dir():
    assert paths(parse_lowers("maven:/tmp/x", POLICY, SRC)) == ("/var/cache/ci/m2", "/tmp/x")


def test_missing_dirs_may_be_made_only_within_the_allowed_root_or_as_a_creatable_named_dir_itself():
    policy = LowerPolicy(
        ROOT,
        ("/srv/cache", "/srv/cache/deep"),
        {"maven": NamedLower("/var/cache/ci/m2"), "npm": NamedLower("/var/cache/ci/npm", create=True)},
    )
    path, maven, npm = parse_lowers("/srv/cache/deep/a/b:maven:npm", policy, SRC)
    assert [path.may_create(d) for d in ("/srv/cache/deep/a", "/srv/cache/deep", "/srv/cache", "/srv")] == [
        True,
        True,
        False,
        False,
    ]  # the deepest allowed root
    assert not maven.may_create("/var/cache/ci/m2")
    assert [npm.may_create(d) for d in ("/var/cache/ci/npm", "/var/cache/ci")] == [True, False]


def test_a_missing_named_dir_is_refused_saying_which_name_and_how_to_allow_creating_it():
    maven = parse_lowers("maven", POLICY, SRC)[0]
    assert maven.shown == "named lower 'maven' (/var/cache/ci/m2)"
    assert maven.missing_text("/var/cache/ci/m2") == (
        "/var/cache/ci/m2 does not exist; create = true in its table (lowers.named.maven = "
        '{ path = "/var/cache/ci/m2", create = true }) lets the snapshotter make it, empty'
    )
    creatable = NamedLower("/var/cache/ci/m2", create=True).entry("maven")
    assert "makes only the named dir itself" in creatable.missing_text("/var/cache/ci")
    assert parse_lowers("/tmp/x", POLICY, SRC)[0].missing_text("/tmp/x") == "/tmp/x does not exist"


@pytest.mark.parametrize(
    "value, says",
    [
        ("/tmp/x,upperdir=/etc", "character ','"),  # the original spliced this into the options
        ("/tmp/a=b", "character '='"),
        ("/tmp/a b", "character ' '"),
        ("/tmp/a\tb", "character '\\t'"),
        ("/tmp/a\\b", "character '\\\\'"),
        ("/tmp/a\x01", "character '\\x01'"),
        ("/tmp/a\x85b", "character '\\x85'"),  # C1 control (NEL)
        ("/tmp/a\u202eb", "character '\\u202e'"),  # bidi override, a format character
        ("/tmp/a\u2028b", "character '\\u2028'"),  # line separator
        ("/tmp/a\u00a0b", "character '\\xa0'"),  # no-break space
        ("/tmp/" + "x" * 256, "is longer than 255 bytes"),
        ("/tmp" + "/x" * 2100, "longer than 4095 bytes"),
        ("relative/dir", "must be an absolute path"),
        ("/tmp/../etc", "must not contain '..'"),
        ("/tmp/./x", "must be normalised"),
        ("/tmp//x", "must be normalised"),
        ("/tmp/x/", "must be normalised"),
        ("/etc", "outside the allowed roots"),
        ("/etc", "lowers.allowed_roots"),  # says how to allow more
        ("/tmpfoo", "outside the allowed roots"),
        ("gradle", "'gradle' is not a named lower"),
    ],
)
def test_bad_entries_are_refused_naming_the_entry(value, says):
    with pytest.raises(InvalidArgument) as err:
        parse_lowers(f"/tmp/ok:{value}", POLICY, SRC)
    assert says in str(err.value)
    assert str(err.value).startswith(SRC)


@pytest.mark.parametrize("path", [ROOT, f"{ROOT}/snapshots/1/fs", "/srv/lib"])
def test_the_snapshotters_root_its_insides_and_its_ancestors_are_never_allowed(path):
    root = "/srv/lib/addlower"
    with pytest.raises(InvalidArgument, match="overlaps the snapshotter's root"):
        LowerPolicy(root if path == "/srv/lib" else ROOT, allowed_roots=(path,))
    with pytest.raises(InvalidArgument, match="overlaps the snapshotter's root"):
        LowerPolicy(root if path == "/srv/lib" else ROOT, named={"n": NamedLower(path)})


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/etc",
        "/etc/ssl",
        "/var",
        "/var/lib",
        "/var/lib/kubelet/pods",
        "/run",
        "/proc/1/root",
        "/usr/local",
        "/root/.m2",
        "/var/lib/containerd",
    ],
)
def test_system_dirs_and_other_workloads_data_are_never_allowed(path):
    with pytest.raises(InvalidArgument, match="overlaps the system dir"):
        LowerPolicy(ROOT, allowed_roots=(path,))
    with pytest.raises(InvalidArgument, match="overlaps the system dir"):
        LowerPolicy(ROOT, named={"n": NamedLower(path)})


def test_the_default_policy_allows_the_cache_root_and_the_originals_demo_dir_only():
    policy = LowerPolicy(ROOT)
    assert policy.allowed_roots == DEFAULT_ALLOWED_ROOTS == ("/var/cache/addlower", "/tmp/overlayfs-custom-lower")
    assert paths(parse_lowers("/var/cache/addlower/m2:/tmp/overlayfs-custom-lower", policy, SRC)) == (
        "/var/cache/addlower/m2",
        "/tmp/overlayfs-custom-lower",
    )
    for other in ("/opt/cache", "/tmp/x", "/home/ci"):
        with pytest.raises(InvalidArgument, match="outside the allowed roots"):
            parse_lowers(other, policy, SRC)


def test_policy_refuses_bad_named_lowers():
    with pytest.raises(InvalidArgument, match="named lower 'm2'"):
        LowerPolicy(ROOT, named={"m2": NamedLower("cache/m2")})
    with pytest.raises(InvalidArgument, match="named lower 'a b'"):
        LowerPolicy(ROOT, named={"a b": NamedLower("/x")})


def test_a_named_lower_kept_for_some_namespaces_is_refused_to_others_but_not_to_label_users():
    named = {"teamb": NamedLower("/srv/teamb", ("team-b",))}
    assert paths(parse_lowers("teamb", LowerPolicy(ROOT, named=named), SRC)) == ("/srv/teamb",)
    assert paths(parse_lowers("teamb", LowerPolicy(ROOT, named=named, namespace="team-b"), SRC)) == ("/srv/teamb",)
    with pytest.raises(InvalidArgument, match="'teamb' is not available to namespace 'team-a'"):
        parse_lowers("teamb", LowerPolicy(ROOT, named=named, namespace="team-a"), SRC)


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
    m = Mount("overlay", "overlay", ("lowerdir=" + ":".join(f"/c{i}/{'x' * 60}" for i in range(70)),))
    with pytest.raises(InvalidArgument, match=r"label x: the overlay options would be \d+ bytes"):
        check_mount_limits([m], SRC)


def test_long_lowerdir_lists_under_one_root_are_shortened_as_containerd_does():
    dirs = [f"/r/lowers/7/{i}" for i in range(40)] + [f"/r/snapshots/{i}/fs" for i in range(100, 300)]
    opts = ("index=off", "workdir=/r/snapshots/9/work", "upperdir=/r/snapshots/9/fs", "lowerdir=" + ":".join(dirs))
    compacted, cwd = compact_lowerdirs(opts)
    assert cwd == "/r/"
    assert compacted[:3] == list(opts[:3])
    assert compacted[3] == "lowerdir=" + ":".join(d.removeprefix("/r/") for d in dirs)
    check_mount_limits([Mount("overlay", "overlay", opts)], SRC)  # 5.7 kB before, under a page after
    assert compact_lowerdirs(opts[:3] + ("lowerdir=/r/a:/r/b",)) == (list(opts[:3]) + ["lowerdir=/r/a:/r/b"], None)


def test_more_layers_than_overlayfs_stacks_are_refused():
    m = Mount("overlay", "overlay", ("lowerdir=" + ":".join(f"/{i}" for i in range(501)),))
    with pytest.raises(InvalidArgument, match="501 lower layers"):
        check_mount_limits([m], SRC)


def test_config_file_values():
    c = parse_config(
        {
            "async_remove": False,
            "lowers": {
                "allowed_roots": ["/srv"],
                "named": {
                    "npm": "/srv/npm",
                    "teamb": {"path": "/srv/teamb", "namespaces": ["team-b"]},
                    "m2": {"path": "/srv/m2", "create": True},
                },
            },
            "kubernetes": {"allowed_roots": ["/srv/pods"], "namespaces": {"team-a": {"allowed_roots": ["/srv/a"]}}},
        }
    )
    assert (c.async_remove, c.allowed_roots) == (False, ("/srv",))
    assert dict(c.named_lowers) == {
        "npm": NamedLower("/srv/npm"),
        "teamb": NamedLower("/srv/teamb", ("team-b",)),
        "m2": NamedLower("/srv/m2", create=True),
    }
    assert (c.kubernetes.allowed_roots, dict(c.kubernetes.namespaces)) == (("/srv/pods",), {"team-a": ("/srv/a",)})


def test_without_a_config_file_only_the_default_roots_are_allowed():
    assert parse_config({}).allowed_roots == DEFAULT_ALLOWED_ROOTS


@pytest.mark.parametrize(
    "data, key",
    [
        ({"async_remove": "no"}, "async_remove: expected a bool"),
        ({"lowers": {"max_host_mounts": 0}}, "lowers.max_host_mounts: must be positive"),
        ({"rootdir": "/x"}, "rootdir: unknown key"),
        ({"lowers": {"allowed": []}}, "lowers.allowed: unknown key"),
        ({"lowers": {"allowed_roots": ["srv"]}}, "allowed root 'srv': must be an absolute path"),
        ({"lowers": {"named": {"m2": 3}}}, "lowers.named.m2: expected a dict"),
        ({"lowers": {"named": {"m2": {"namespaces": []}}}}, "lowers.named.m2: a table needs a path"),
        ({"lowers": {"named": {"m2": {"path": "/srv/m2", "ns": []}}}}, "lowers.named.m2.ns: unknown key"),
        ({"lowers": {"named": {"m2": {"path": "/srv/m2", "create": "yes"}}}}, "m2.create: expected a bool"),
        ({"lowers": {"named": {"m2": {"path": "/srv/m2", "namespaces": ["Team_A"]}}}}, "not a Kubernetes namespace"),
        ({"lowers": {"allowed_roots": ["/"]}}, "overlaps the system dir"),
        ({"lowers": {"named": {"etc": "/etc"}}}, "named lower 'etc' '/etc': overlaps the system dir /etc"),
        ({"kubernetes": {"allowed_roots": ["/var/lib/kubelet"]}}, "kubernetes: allowed root"),
        ({"kubernetes": {"namespaces": {"a": {"allowed_roots": ["/run"]}}}}, "kubernetes.namespaces.a: allowed root"),
        ({"kubernetes": {"namespaces": {"a": {"roots": []}}}}, "kubernetes.namespaces.a.roots: unknown key"),
        ({"mount_targets": "maybe"}, "mount_targets: one of auto, on, off"),
        ({"lowers": {"named": {"m2": {"path": "/srv/m2", "target": "/proc/x"}}}}, "target '/proc/x': not under /proc"),
        ({"log_level": "loud"}, "log_level: one of"),
    ],
)
def test_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        parse_config(data)
