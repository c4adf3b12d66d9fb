"""containerd's snapshot keys: from the name ctr users know to the key the backend sees."""

from __future__ import annotations

import pytest

from addlower.core.errors import InvalidArgument, NotFound
from addlower.core.keys import resolve_key, split_key

KEYS = ["default/3/c1", "k8s.io/9/abc", "ci/4/abc", "plain-key", "default/x/c2"]


def test_split_key_takes_containerds_form_only():
    assert split_key("k8s.io/6/abc/def") == ("k8s.io", "abc/def")  # a client key may hold slashes
    assert [split_key(k) for k in ("plain-key", "default/x/c2", "/3/c1", "default/3/")] == [None] * 4


@pytest.mark.parametrize(
    "wanted, namespace, key",
    [
        ("default/3/c1", None, "default/3/c1"),  # a whole key is itself
        ("c1", None, "default/3/c1"),  # the name ctr snapshots info takes
        ("abc", "ci", "ci/4/abc"),
        ("plain-key", None, "plain-key"),
    ],
)
def test_a_name_resolves_to_its_one_key(wanted, namespace, key):
    assert resolve_key(wanted, KEYS, namespace) == key


@pytest.mark.parametrize(
    "wanted, namespace, error, says",
    [
        ("abc", None, InvalidArgument, "several namespaces (ci, k8s.io): choose one with --namespace"),
        ("c1", "ci", NotFound, "'c1' does not exist in namespace 'ci'"),
        ("c2", None, NotFound, "'c2' does not exist"),  # default/x/c2 is not containerd's form
        ("default/3/c1", "default", NotFound, "does not exist in namespace 'default'"),  # -n: names only
    ],
)
def test_no_key_or_several_are_refused_saying_how_to_choose(wanted, namespace, error, says):
    with pytest.raises(error) as err:
        resolve_key(wanted, KEYS, namespace)
    assert says in str(err.value)
