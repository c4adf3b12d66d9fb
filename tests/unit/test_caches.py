"""Managed caches' pure rules: their config tables, who may promote, sizes."""

from __future__ import annotations

import tomllib

import pytest

from addlower.core.caches import CachePolicy, Promote, parse_duration, parse_scopes, parse_size, scopes_label
from addlower.core.config import ConfigError, parse_config
from addlower.core.errors import InvalidArgument


def test_a_cache_table_as_the_issue_writes_it():
    config = parse_config(
        tomllib.loads(
            '[lowers.named.maven]\ncache = true\ntarget = "/root/.m2"\npromote = "on-success"\n'
            'promote_namespaces = ["ci"]\nmax_generations = 8\nmax_bytes = "20GiB"\nseed = "/var/cache/ci/m2"\n'
        )
    )
    maven = config.named_lowers["maven"]
    assert maven.target == "/root/.m2" and maven.path == ""
    assert maven.cache == CachePolicy(Promote.ON_SUCCESS, ("ci",), 8, 20 * 1024**3, "/var/cache/ci/m2")
    assert maven.entry("maven").cache and maven.entry("maven").shown == "cache 'maven'"


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ("cache = true\n", "a cache needs a target"),
        ('cache = true\ntarget = "/m2"\npath = "/var/cache/m2"\n', "path: a cache's contents live under"),
        ('path = "/var/cache/m2"\npromote = "always"\n', "promote: unknown key (a key of caches: cache = true)"),
        ('cache = true\ntarget = "/m2"\npromote = "sometimes"\n', "one of never, on-success, always"),
        ('cache = true\ntarget = "/m2"\nmax_bytes = "lots"\n', "max_bytes: a size in bytes"),
        ('cache = true\ntarget = "/m2"\nmax_generations = 0\n', "max_generations: a number from 1 to 64"),
        ('cache = true\ntarget = "/m2"\nseed = "/etc/ssl"\n', "seed '/etc/ssl': overlaps the system dir /etc"),
        ('cache = true\ntarget = "/proc/x"\n', "not under /proc"),
        ('cache = true\ntarget = "/m2"\npromote_namespaces = ["Bad_NS"]\n', "is not a Kubernetes namespace name"),
    ],
)
def test_a_bad_cache_table_is_refused_naming_the_key(table: str, says: str):
    with pytest.raises(ConfigError, match=None) as refused:
        parse_config(tomllib.loads("[lowers.named.m2]\n" + table))
    assert says in str(refused.value)


@pytest.mark.parametrize(
    ("value", "size"),
    [(1, 1), ("512", 512), ("20GiB", 20 * 1024**3), ("500M", 500 * 1000**2), ("1T", 10**12), ("3 KiB", 3072)],
)
def test_sizes(value: object, size: int):
    assert parse_size("max_bytes", value) == size


@pytest.mark.parametrize("value", [0, -1, True, "1.5G", "GiB", "10 parsecs", None])
def test_bad_sizes(value: object):
    with pytest.raises(InvalidArgument, match="max_bytes"):
        parse_size("max_bytes", value)


@pytest.mark.parametrize(
    ("promote", "namespace", "status", "promotes"),
    [
        (Promote.NEVER, None, 0, False),
        (Promote.ALWAYS, None, None, True),  # a label user, root-equivalent already
        (Promote.ALWAYS, "ci", 1, True),
        (Promote.ALWAYS, "pr", 0, False),  # a namespace not allowed never promotes
        (Promote.ON_SUCCESS, "ci", 0, True),
        (Promote.ON_SUCCESS, "ci", 1, False),
        (Promote.ON_SUCCESS, None, None, False),  # an exit not seen is no success
    ],
)
def test_who_may_promote(promote: Promote, namespace: str | None, status: int | None, promotes: bool):
    assert CachePolicy(promote, ("ci",)).may_promote(namespace, status) is promotes


def test_what_a_container_creator_named_reaches_the_operators_terminal_escaped():
    from addlower.ops.render import Column, render_table

    [_, row] = render_table([Column("KEY"), Column("FROM")], [["ns/1/\x1b[2Jjob", "a\u202eb\nc"]], None)
    assert row == "ns/1/\\x1b[2Jjob  a\\u202eb\\nc"


SCOPED = CachePolicy(Promote.ON_SUCCESS, ("ci-main",), scopes={"ci-pr": "pr-*", "ci-main": "*"})


@pytest.mark.parametrize(
    ("namespace", "scope", "promotes"),
    [
        ("ci-main", None, True),  # the default chain: promote_namespaces
        ("ci-pr", None, False),
        ("ci-pr", "pr-7", True),  # its own scope
        ("ci-pr", "main", False),  # not its pattern
        ("other", "pr-7", False),  # no scope rights
        (None, "anything", True),  # a label user
    ],
)
def test_who_may_promote_into_a_scope(namespace: str | None, scope: str | None, promotes: bool):
    assert SCOPED.may_promote(namespace, 0, scope) is promotes
    assert SCOPED.may_promote(namespace, 1, scope) is False


@pytest.mark.parametrize(
    ("namespace", "scope", "says"),
    [
        ("ci-pr", "main", "scope 'main' is not one namespace 'ci-pr' may use ('pr-*')"),
        ("other", "pr-1", "pods of namespace 'other' may not use scopes"),
        ("ci-pr", "pr-1/../x", "is no scope name"),
        ("ci-pr", "-pr", "is no scope name"),
        ("ci-pr", "pr-" + "x" * 70, "is no scope name"),
        (None, "pr\n1", "is no scope name"),
    ],
)
def test_a_scope_outside_the_namespaces_pattern_or_no_scope_name_is_refused(
    namespace: str | None, scope: str, says: str
):
    with pytest.raises(InvalidArgument, match=None) as refused:
        SCOPED.check_scope("m2", namespace, scope)
    assert says in str(refused.value)


def test_scope_labels_and_durations():
    assert parse_scopes("pr-1", "label") == {None: "pr-1"}
    assert parse_scopes("m2=pr-1,npm=pr-2", "label") == {"m2": "pr-1", "npm": "pr-2"}
    assert parse_scopes(scopes_label({"npm": "b", "m2": "a"}), "label") == {"m2": "a", "npm": "b"}
    with pytest.raises(InvalidArgument, match="is no scope name"):
        parse_scopes("m2=../x", "label")
    assert [parse_duration("ttl", v) for v in ("7d", "12h", "30m", "45s", 90)] == [604800, 43200, 1800, 45, 90]
    for bad in ("0d", "1w", "-1h", True, None):
        with pytest.raises(InvalidArgument, match="ttl"):
            parse_duration("ttl", bad)


def test_a_scoped_cache_table():
    config = parse_config(
        tomllib.loads(
            '[lowers.named.m2]\ncache = true\ntarget = "/root/.m2"\npromote = "on-success"\n'
            'promote_namespaces = ["ci-main"]\nscopes = { "ci-pr" = "pr-*", "ci-main" = "*" }\n'
            'scope_ttl = "7d"\nmax_scopes = 200\n'
        )
    )
    policy = config.named_lowers["m2"].cache
    assert policy is not None and (policy.scopes, policy.scope_ttl, policy.max_scopes) == (
        {"ci-pr": "pr-*", "ci-main": "*"},
        7 * 86400,
        200,
    )
    for table, says in (
        ('scopes = { "ci-pr" = "pr/*" }', "a pattern of scope names"),
        ('scopes = { "Bad_NS" = "*" }', "is not a Kubernetes namespace name"),
        ("max_scopes = 0", "max_scopes: a positive number"),
        ('scope_ttl = "soon"', "scope_ttl: a duration"),
    ):
        with pytest.raises(ConfigError) as refused:
            parse_config(tomllib.loads(f'[lowers.named.m2]\ncache = true\ntarget = "/m2"\n{table}\n'))
        assert says in str(refused.value)
