from collections.abc import Sequence

import pytest

from addlower.core.errors import InvalidArgument
from addlower.core.filters import Adaptor, parse_filters


def snapshot(
    name: str = "sha256:abc", kind: str = "active", parent: str = "", labels: dict[str, str] | None = None
) -> Adaptor:
    """A tiny adaptor shaped like the snapshot one: labels.<rest> looks up the key ".".join(rest)."""
    fields = {"kind": (kind, True), "name": (name, name != ""), "parent": (parent, parent != "")}
    label_map = labels or {}

    def field(path: Sequence[str]) -> tuple[str, bool]:
        if path[0] == "labels":
            key = ".".join(path[1:])
            return (label_map[key], True) if key in label_map else ("", False)
        return fields[path[0]] if len(path) == 1 and path[0] in fields else ("", False)

    return field


def matches(filters: list[str], obj: Adaptor) -> bool:
    return parse_filters(filters).match(obj)


REF = "containerd.io/snapshot.ref"
ACTIVE = snapshot("foo-1", kind="active", parent="base", labels={REF: "sha256:abc", "foo": "true"})
COMMITTED = snapshot("base", kind="committed", labels={"foo": ""})
VIEW = snapshot("barview", kind="view", parent="base")
CORPUS = {"active": ACTIVE, "committed": COMMITTED, "view": VIEW}


def selected(filters: list[str]) -> set[str]:
    f = parse_filters(filters)
    return {name for name, obj in CORPUS.items() if f.match(obj)}


# --- everything / nothing --------------------------------------------------------------------


@pytest.mark.parametrize("filters", [[], [""], ["", ""], ["kind==nope", ""]])
def test_no_filters_or_an_empty_string_match_everything(filters):
    assert selected(filters) == set(CORPUS)


def test_an_empty_string_does_not_excuse_a_bad_sibling():
    with pytest.raises(InvalidArgument, match="name=="):
        parse_filters(["", "name=="])


def test_whitespace_only_is_not_empty_and_is_refused():
    with pytest.raises(InvalidArgument, match="expected a field name"):
        parse_filters(["  "])


def test_a_bare_string_is_refused_rather_than_parsed_per_character():
    with pytest.raises(TypeError):
        parse_filters("kind==active")


# --- operators --------------------------------------------------------------------------------


def test_equality_on_plain_fields():
    assert selected(["kind==active"]) == {"active"}
    assert selected(["name==base"]) == {"committed"}
    assert selected(["parent==base"]) == {"active", "view"}


def test_bare_values_may_hold_punctuation_up_to_a_comma():
    obj = snapshot(labels={"foo": "omg_asdf.asdf-qwer:x/y=z"})
    assert matches(["labels.foo==omg_asdf.asdf-qwer:x/y=z"], obj)
    assert not matches(["labels.foo==omg_asdf"], obj)


def test_not_equal_also_matches_an_absent_field_like_containerd():
    assert selected(["kind!=active"]) == {"committed", "view"}
    # VIEW has no "foo" label: its value reads as "" which differs from "true".
    assert selected(["labels.foo!=true"]) == {"committed", "view"}


def test_equality_needs_the_field_present():
    assert selected(['labels.foo==""']) == {"committed"}  # present with an empty value
    assert not matches(['parent==""'], COMMITTED)  # absent parent


def test_presence():
    assert selected(["parent"]) == {"active", "view"}
    assert selected(["labels.foo"]) == {"active", "committed"}  # an empty value is still present
    assert selected(["labels.nope"]) == set()


def test_and_within_one_filter():
    assert selected(["kind==active,labels.foo"]) == {"active"}
    assert selected(["kind==committed,parent"]) == set()


def test_or_across_filters():
    assert selected(["kind==committed", "name==barview"]) == {"committed", "view"}
    assert selected(["kind==committed", "kind==nope"]) == {"committed"}


def test_whitespace_around_tokens_and_after_commas_is_skipped():
    assert selected(["  kind ==  active, labels.foo"]) == {"active"}


def test_whitespace_before_a_comma_is_refused_as_containerd_does():
    with pytest.raises(InvalidArgument, match="unexpected input ' '"):
        parse_filters(["kind==active ,parent"])


# --- quoting ------------------------------------------------------------------------------------


def test_quoted_field_part_keeps_dots_and_slashes_in_one_label_key():
    seen: list[tuple[str, ...]] = []

    def recording(path: Sequence[str]) -> tuple[str, bool]:
        seen.append(tuple(path))
        return ACTIVE(path)

    assert parse_filters([f'labels."{REF}"==sha256:abc']).match(recording)
    assert seen == [("labels", REF)]
    assert selected([f'labels."{REF}"==sha256:abd']) == set()


def test_unquoted_dots_split_the_path_and_the_adaptor_rejoins_them():
    obj = snapshot(labels={"a.b": "1"})
    assert matches(["labels.a.b==1"], obj)


def test_a_dash_is_part_of_a_bare_field_name():
    assert matches(["labels.foo-bar==x"], snapshot(labels={"foo-bar": "x"}))


def test_double_quoted_value_with_escapes():
    value = 'say "hi"\\\t\n'
    obj = snapshot(labels={"k": value})
    assert matches([r'labels.k=="say \"hi\"\\\t\n"'], obj)
    assert not matches([r'labels.k=="say \"hi\"\\\t"'], obj)


def test_numeric_escapes_are_go_string_escapes():
    obj = snapshot(labels={"k": "AAé😀"})
    assert matches([r'labels.k=="\x41\101\u00e9\U0001F600"'], obj)


def test_quoted_values_may_hold_commas_and_spaces():
    obj = snapshot(labels={"other": "too complex, yo"})
    assert matches(['labels.other=="too complex, yo",kind==active'], obj)


def test_quoted_field_with_escaped_quote_and_backslash():
    obj = snapshot(labels={'with \\ and ".post': "present"})
    assert matches([r'labels."with \\ and \"".post==present'], obj)


def test_single_quotes_are_not_quotes_so_they_stay_in_a_bare_value():
    assert matches(["name=='x'"], snapshot(name="'x'"))
    assert not matches(["name=='x'"], snapshot(name="x"))


def test_slash_and_pipe_quote_only_regexp_values():
    with pytest.raises(InvalidArgument, match="may only quote the value of ~="):
        parse_filters(["labels.|foo|==x"])
    with pytest.raises(InvalidArgument, match="may only quote the value of ~="):
        parse_filters(["name==|x|"])


# --- regular expressions -------------------------------------------------------------------------


def test_regexp_searches_anywhere_like_go_matchstring():
    assert selected(["name~=^foo"]) == {"active"}
    assert selected(["name~=view"]) == {"view"}
    assert selected(["name~=^(base|barview)$"]) == {"committed", "view"}


def test_regexp_quoted_with_slashes_or_pipes_may_hold_commas():
    assert selected(["name~=/^[a-z]{3,4}$/,kind==committed"]) == {"committed"}
    assert matches(["name~=|a/b|"], snapshot(name="xa/by"))
    assert matches([r"name~=/a\/b/"], snapshot(name="a/b"))


def test_regexp_on_an_absent_field_sees_an_empty_string():
    assert selected(["labels.nope~=^$"]) == set(CORPUS)


def test_go_dollar_is_end_of_text_not_before_a_final_newline():
    assert not matches([r'name~="^x\\d+$"'], snapshot(name="x1\n"))
    assert matches([r'name~="^x\\d+$"'], snapshot(name="x1"))
    assert matches([r'name~="(?m)^x\\d+$"'], snapshot(name="x1\ny"))


def test_go_perl_classes_are_ascii_only():
    assert not matches([r"name~=^\d$"], snapshot(name="٣"))  # ARABIC-INDIC DIGIT THREE
    assert not matches([r"name~=^\w$"], snapshot(name="é"))
    assert matches([r"name~=\bfoo\b"], snapshot(name="a-foo-b"))
    assert matches([r"name~=\bfoo"], snapshot(name="éfoo"))  # é is not an ASCII word character


def test_go_flags_and_classes():
    assert matches(["name~=(?i)FOO"], snapshot(name="xfoo"))
    assert matches(["name~=a(?i)b"], snapshot(name="aB"))  # flags may appear mid-pattern in Go
    assert not matches(["name~=(?i:a)b"], snapshot(name="AB"))
    assert matches(["name~=^[[:alpha:]]+[[:digit:]]$"], snapshot(name="abc1"))
    assert matches(["name~=(?P<x>ab)(?<y>c)"], snapshot(name="abc"))


def test_a_brace_that_is_not_a_count_is_literal_in_go():
    assert matches(["name~=^a{01}$"], snapshot(name="a{01}"))
    assert matches(["name~=/^a{,2}$/"], snapshot(name="a{,2}"))  # quoted: a bare value ends at ","
    assert not matches(["name~=/^a{,2}$/"], snapshot(name="aa"))


def test_unicode_classes_work_as_in_go():
    assert matches([r"name~=^\pL+$"], snapshot(name="éa"))
    assert not matches([r"name~=^\p{Greek}$"], snapshot(name="a"))


def test_regexp_is_compiled_at_parse_time():
    with pytest.raises(InvalidArgument):
        parse_filters(["name~=("])  # no object needed to find out


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, problem",
    [
        ("name==", "offset 6 (end of input): expected a value"),
        ("name==foo,", "offset 10 (end of input): expected a field name"),
        ("labels.", "expected a field name"),
        ("==foo", "offset 0 ('='): expected a field name"),
        ("labels.?foo", "offset 7 ('?'): expected a field name"),
        ("'name'==x", 'offset 0 ("\'"): expected a field name'),
        ('labels."unterminated', "offset 7 ('\"'): quoted literal not terminated"),
        ('labels."a\nb"==x', "quoted literal not terminated"),
        ("labels.ns/key==value", "offset 9 ('/'): quoted literal not terminated"),
        ("labels.key==/value", "offset 12 ('/'): quoted literal not terminated"),
        (r'labels."\g"', "illegal escape sequence"),
        (r'labels."\xZZ"', "illegal numeric escape sequence"),
        (r'name=="\400"', "above \\377"),
        ("name=foo", "unsupported operator '='"),
        ("name===foo", "unsupported operator '==='"),
        ("name<foo", "offset 4 ('<'): expected an operator"),
        ("name foo", "expected an operator"),
        ("name==foo bar", "unexpected input ' '"),
        ('name=="foo"bar', "unexpected input 'b'"),
        ("name==,kind", "offset 6 (','): expected a value"),
        ("name\0==x", "unexpected NUL character"),
        ("name~=[", "invalid regular expression '['"),
        ("name~=a)", "unexpected )"),
        ("name~=(?=x)", "invalid perl operator"),  # lookahead is Python, not Go
        (r"name~=(a)\1", "invalid escape sequence"),  # backreference
        (r"name~=a\Z", "invalid escape sequence"),  # Go spells it \z
        ("name~=a**", "bad repetition operator"),
        ("name~=*a", "no argument for repetition operator"),
        ("name~=a{1001}", "invalid repetition size"),
        ("name~=/a{2,1}/", "invalid repetition size"),
        ("name~=(?x)a", "invalid perl operator"),  # Python's verbose flag
        ("name~=/(a{100}){11}/", "invalid repetition size"),  # nested counts above 1000
        ("name~=[z-a]", "invalid character class range"),
        ("name~=[[:nope:]]", "invalid character class"),
    ],
)
def test_parse_errors_name_the_filter_and_the_place(text, problem):
    with pytest.raises(InvalidArgument) as caught:
        parse_filters(["kind==active", text])
    message = str(caught.value)
    assert repr(text) in message
    assert problem in message
