"""containerd's filter language: parse the ``filters`` strings of a List/Walk request and match objects.

A re-implementation of containerd's ``filters`` package (scanner, parser, quoting and matching),
including the Go ``regexp`` dialect that ``~=`` uses, translated to Python ``re`` at parse time.
Objects are seen only through an adaptor that maps a field path to ``(value, present)``; this
module must not know about snapshots, labels, storage or gRPC.

Grammar (as containerd parses it)::

    selectors := selector ("," selector)*
    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_-]+
    operator  := "==" | "!=" | "~="
    value     := quoted | run of printable characters up to "," or whitespace
    quoted    := Go string syntax delimited by '"'; '/' and '|' also delimit ~= values

Error offsets count characters, where containerd counts UTF-8 bytes.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from addlower.errors import InvalidArgument

Adaptor = Callable[[Sequence[str]], tuple[str, bool]]
"""Maps a field path such as ``("labels", "a.b")`` to ``(value, present)`` for one object."""


class Filter(Protocol):
    def match(self, field: Adaptor) -> bool: ...


class Operator(enum.Enum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


@dataclass(frozen=True)
class Selector:
    """One ``fieldpath[operator value]`` term; ``regexp`` is compiled once, when parsing."""

    fieldpath: tuple[str, ...]
    operator: Operator
    value: str = ""
    regexp: re.Pattern[str] | None = None

    def match(self, field: Adaptor) -> bool:
        value, present = field(self.fieldpath)
        if self.operator is Operator.PRESENT:
            return present
        if self.operator is Operator.EQUAL:
            return present and value == self.value
        if self.operator is Operator.NOT_EQUAL:
            # containerd does not check presence here: an absent field is "" and so differs.
            return value != self.value
        assert self.regexp is not None
        # Nor here: an absent field is matched as "" (Go's MatchString searches anywhere).
        return self.regexp.search(value) is not None


@dataclass(frozen=True)
class AllOf:
    """The selectors of one filter string: all must match."""

    selectors: tuple[Selector, ...]

    def match(self, field: Adaptor) -> bool:
        return all(selector.match(field) for selector in self.selectors)


@dataclass(frozen=True)
class AnyOf:
    """Several filter strings: any may match."""

    filters: tuple[Filter, ...]

    def match(self, field: Adaptor) -> bool:
        return any(f.match(field) for f in self.filters)


@dataclass(frozen=True)
class MatchAll:
    """What no filters, or an empty filter string, mean to containerd."""

    def match(self, field: Adaptor) -> bool:
        return True


MATCH_ALL = MatchAll()


def parse_filters(filters: Sequence[str]) -> Filter:
    """Parse a request's filter strings into one Filter, raising InvalidArgument on bad syntax.

    Like containerd's ParseAll: no strings match everything, each string is parsed on its own and
    the results are OR-ed, and an empty string matches everything, so it makes the whole list do so.
    """
    if isinstance(filters, str):
        raise TypeError("parse_filters takes a sequence of filter strings, not one string")
    parsed = [MATCH_ALL if text == "" else _Parser(text).parse() for text in filters]
    if not parsed or MATCH_ALL in parsed:
        return MATCH_ALL
    return parsed[0] if len(parsed) == 1 else AnyOf(tuple(parsed))


# ---------------------------------------------------------------------------------------------
# Scanner (containerd filters/scanner.go)


class _Kind(enum.Enum):
    EOF = enum.auto()
    QUOTED = enum.auto()
    VALUE = enum.auto()
    FIELD = enum.auto()
    SEPARATOR = enum.auto()
    OPERATOR = enum.auto()
    ILLEGAL = enum.auto()
    CHAR = enum.auto()  # any other single character; the parser reports it as unexpected


@dataclass(frozen=True)
class _Token:
    kind: _Kind
    pos: int
    text: str
    problem: str = ""  # why an ILLEGAL token is illegal


# Go's unicode.IsSpace; Python's str.isspace also counts U+001C..U+001F, which Go does not.
_SPACES = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    map(chr, range(0x2000, 0x200B))
)
_QUOTES = frozenset('"/|')
_OPERATOR_CHARS = frozenset("=!~")
_FIELD_CHARS = frozenset("-_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_OCTAL = "01234567"
_HEX = "0123456789abcdefABCDEF"
_NUMERIC_ESCAPES = {"x": 2, "u": 4, "U": 8}  # hex digits each takes
_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}


def _is_value_char(c: str) -> bool:
    """Go's isValueRune: a letter, mark, number, punctuation or symbol other than ','."""
    return c != "," and unicodedata.category(c)[0] in "LMNPS"


class _Scanner:
    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0

    @property
    def offset(self) -> int:
        return self._pos

    def peek(self) -> str:
        """The next character as is ("" at the end): containerd's parser peeks without skipping spaces."""
        return self._text[self._pos : self._pos + 1]

    def scan(self, value: bool = False) -> _Token:
        """The next token; ``value`` is set right after an operator, where a bare value may follow."""
        text, n = self._text, len(self._text)
        pos = self._pos
        while pos < n and text[pos] in _SPACES:
            pos += 1
        if pos >= n:
            self._pos = n
            return _Token(_Kind.EOF, n, "")
        c = text[pos]
        if c == "\0":
            self._pos = pos + 1
            return _Token(_Kind.ILLEGAL, pos, c, "unexpected NUL character")
        if c in _QUOTES:
            return self._scan_quoted(pos)
        if c in ",.":
            self._pos = pos + 1
            return _Token(_Kind.SEPARATOR, pos, c)
        if c in _OPERATOR_CHARS:
            return self._run(_Kind.OPERATOR, pos, _OPERATOR_CHARS.__contains__)
        if value:
            return self._run(_Kind.VALUE, pos, _is_value_char)
        if c in _FIELD_CHARS:
            return self._run(_Kind.FIELD, pos, _FIELD_CHARS.__contains__)
        self._pos = pos + 1
        return _Token(_Kind.CHAR, pos, c)

    def _run(self, kind: _Kind, start: int, accepts: Callable[[str], bool]) -> _Token:
        """A token of the character at ``start`` and as many following ones as ``accepts``."""
        text, end = self._text, start + 1
        while end < len(text) and accepts(text[end]):
            end += 1
        self._pos = end
        return _Token(kind, start, text[start:end])

    def _scan_quoted(self, start: int) -> _Token:
        """A quoted literal, checked but not decoded; the first problem found makes it ILLEGAL."""
        text, n = self._text, len(self._text)
        quote, i, problem = text[start], start + 1, ""
        while True:
            if i >= n or text[i] in "\n\0":
                if i < n and text[i] == "\0":
                    problem = problem or "unexpected NUL character"
                problem = problem or "quoted literal not terminated"
                self._pos = min(i + 1, n)
                return _Token(_Kind.ILLEGAL, start, text[start : self._pos], problem)
            c = text[i]
            if c == quote:
                break
            if c == "\\":
                i, bad = self._scan_escape(i + 1, quote)
                problem = problem or bad
            else:
                i += 1
        self._pos = i + 1
        return _Token(_Kind.ILLEGAL if problem else _Kind.QUOTED, start, text[start : i + 1], problem)

    def _scan_escape(self, i: int, quote: str) -> tuple[int, str]:
        """Check the escape whose letter is at ``i``; return where scanning resumes and any problem."""
        c = self._text[i : i + 1]
        if c and (c in _SIMPLE_ESCAPES or c == quote):
            return i + 1, ""
        if c and c in _OCTAL:
            return self._scan_digits(i, _OCTAL, 3)
        if c in _NUMERIC_ESCAPES:
            return self._scan_digits(i + 1, _HEX, _NUMERIC_ESCAPES[c])
        # The offending character is scanned again as ordinary text, as containerd does.
        return i, "illegal escape sequence"

    def _scan_digits(self, i: int, digits: str, count: int) -> tuple[int, str]:
        end = i
        while end < min(len(self._text), i + count) and self._text[end] in digits:
            end += 1
        return end, "" if end - i == count else "illegal numeric escape sequence"


def _unquote(literal: str) -> str:
    """Decode a literal the scanner accepted, as containerd's quote.go does; ValueError if out of range.

    Go strings are bytes, so ``\\x`` and octal escapes add single bytes; bytes that do not form
    UTF-8 come back as lone surrogates (surrogateescape), which never equal a real label value.
    """
    quote, body = literal[0], literal[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        e, i = body[i + 1], i + 2
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
        elif e == quote:
            out += e.encode()
        elif e in _OCTAL:
            byte = int(body[i - 1 : i + 2], 8)
            if byte > 0xFF:
                raise ValueError(f"octal escape \\{body[i - 1 : i + 2]} is above \\377")
            out.append(byte)
            i += 2
        elif e == "x":
            out.append(int(body[i : i + 2], 16))
            i += 2
        else:  # u or U
            width = _NUMERIC_ESCAPES[e]
            code = int(body[i : i + width], 16)
            if code > 0x10FFFF:
                raise ValueError(f"escape \\{e}{body[i : i + width]} is beyond U+10FFFF")
            # Go encodes a surrogate code point as U+FFFD.
            out += ("\ufffd" if 0xD800 <= code <= 0xDFFF else chr(code)).encode()
            i += width
    return out.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------
# Parser (containerd filters/parser.go)


class _Parser:
    def __init__(self, text: str) -> None:
        self._text = text
        self._scanner = _Scanner(text)

    def parse(self) -> AllOf:
        selectors = [self._selector()]
        while True:
            c = self._scanner.peek()
            if c == ",":
                self._scanner.scan()
                selectors.append(self._selector())
            elif c == "":
                return AllOf(tuple(selectors))
            else:
                raise self._error(self._scanner.offset, f"unexpected input {c!r}")

    def _selector(self) -> Selector:
        fieldpath = self._fieldpath()
        if self._scanner.peek() in (",", ""):
            return Selector(fieldpath, Operator.PRESENT)
        operator = self._operator()
        token, value = self._value(alternative_quotes=operator is Operator.MATCHES)
        if operator is not Operator.MATCHES:
            return Selector(fieldpath, operator, value)
        try:
            regexp = _compile_go_regexp(value)
        except _RegexpError as exc:
            raise self._error(token.pos, f"invalid regular expression {value!r}: {exc}") from None
        return Selector(fieldpath, operator, value, regexp)

    def _fieldpath(self) -> tuple[str, ...]:
        parts = [self._field()]
        while self._scanner.peek() == ".":
            self._scanner.scan()
            parts.append(self._field())
        return tuple(parts)

    def _field(self) -> str:
        token = self._scanner.scan()
        if token.kind is _Kind.FIELD:
            return token.text
        if token.kind is _Kind.QUOTED:
            return self._unquote(token, alternative_quotes=False)
        raise self._unexpected(token, "a field name or a quoted string")

    def _operator(self) -> Operator:
        token = self._scanner.scan()
        if token.kind is _Kind.OPERATOR:
            for operator in (Operator.EQUAL, Operator.NOT_EQUAL, Operator.MATCHES):
                if token.text == operator.value:
                    return operator
            raise self._error(token.pos, f"unsupported operator {token.text!r} (use ==, != or ~=)")
        raise self._unexpected(token, "an operator (==, != or ~=)")

    def _value(self, alternative_quotes: bool) -> tuple[_Token, str]:
        token = self._scanner.scan(value=True)
        if token.kind is _Kind.VALUE:
            return token, token.text
        if token.kind is _Kind.QUOTED:
            return token, self._unquote(token, alternative_quotes)
        raise self._unexpected(token, "a value or a quoted string")

    def _unquote(self, token: _Token, alternative_quotes: bool) -> str:
        if token.text[0] != '"' and not alternative_quotes:
            raise self._error(token.pos, f"{token.text[0]!r} may only quote the value of ~=; use '\"'")
        try:
            return _unquote(token.text)
        except ValueError as exc:
            raise self._error(token.pos, f"bad quoted string: {exc}") from None

    def _unexpected(self, token: _Token, wanted: str) -> InvalidArgument:
        if token.kind is _Kind.ILLEGAL:
            return self._error(token.pos, token.problem)
        return self._error(token.pos, f"expected {wanted}")

    def _error(self, pos: int, problem: str) -> InvalidArgument:
        at = repr(self._text[pos]) if pos < len(self._text) else "end of input"
        return InvalidArgument(f"filters: cannot parse {self._text!r} at offset {pos} ({at}): {problem}")


# ---------------------------------------------------------------------------------------------
# Go regexp (RE2 syntax, Go regexp/syntax with the Perl flags) translated to Python re.
#
# Differences handled: Go's $ is the end of text (Python's also matches before a final newline);
# \d \s \w \b and the [:name:] classes are ASCII-only; (?flags) may appear anywhere and last to the
# end of the group; {n,m} counts are at most 1000 and a { that does not start one is literal;
# lookaround, backreferences, possessive and atomic forms do not exist. Captures are dropped,
# since only whether a match exists matters. \p{...} Unicode classes have no Python re
# equivalent and are refused.


class _RegexpError(Exception):
    """Go would not compile this pattern (or it cannot be expressed in Python re)."""


_MAX_REPEAT = 1000
_MAX_RUNE = 0x10FFFF
_Ranges = list[tuple[int, int]]

_PERL_CLASSES: dict[str, _Ranges] = {
    "d": [(0x30, 0x39)],
    "s": [(0x09, 0x0A), (0x0C, 0x0D), (0x20, 0x20)],
    "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
}
_POSIX_CLASSES: dict[str, _Ranges] = {
    "alnum": [(0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)],
    "alpha": [(0x41, 0x5A), (0x61, 0x7A)],
    "ascii": [(0x00, 0x7F)],
    "blank": [(0x09, 0x09), (0x20, 0x20)],
    "cntrl": [(0x00, 0x1F), (0x7F, 0x7F)],
    "digit": [(0x30, 0x39)],
    "graph": [(0x21, 0x7E)],
    "lower": [(0x61, 0x7A)],
    "print": [(0x20, 0x7E)],
    "punct": [(0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)],
    "space": [(0x09, 0x0D), (0x20, 0x20)],
    "upper": [(0x41, 0x5A)],
    "word": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    "xdigit": [(0x30, 0x39), (0x41, 0x46), (0x61, 0x66)],
}
_WORD = "[0-9A-Za-z_]"
# Spelled out: Python's \b is Unicode-aware and its \B never matches an empty string.
_WORD_BOUNDARY = f"(?:(?<={_WORD})(?!{_WORD})|(?<!{_WORD})(?={_WORD}))"
_NOT_WORD_BOUNDARY = f"(?:(?<={_WORD})(?={_WORD})|(?<!{_WORD})(?!{_WORD}))"
_ASSERTIONS = {"A": r"\A", "z": r"\Z", "b": _WORD_BOUNDARY, "B": _NOT_WORD_BOUNDARY}
_C_ESCAPES = {"a": 7, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}
_COUNTED_REPEAT = re.compile(r"\{(0|[1-9][0-9]*)(?:(,)(0|[1-9][0-9]*)?)?\}")


def _compile_go_regexp(pattern: str) -> re.Pattern[str]:
    source = _GoRegexp(pattern).translate()
    try:
        return re.compile(source)
    except (re.error, RecursionError, OverflowError) as exc:
        raise _RegexpError(f"too complex for this implementation ({exc})") from None


def _normalized(ranges: _Ranges) -> _Ranges:
    merged: _Ranges = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _complement(ranges: _Ranges) -> _Ranges:
    out: _Ranges = []
    next_lo = 0
    for lo, hi in _normalized(ranges):
        if lo > next_lo:
            out.append((next_lo, lo - 1))
        next_lo = hi + 1
    if next_lo <= _MAX_RUNE:
        out.append((next_lo, _MAX_RUNE))
    return out


def _fold_ascii(ranges: _Ranges) -> _Ranges:
    """An ASCII class plus everything Go's case folding adds to it: other-case letters, ſ and K."""
    letters = {cp for lo, hi in ranges for cp in range(max(lo, 0x41), min(hi, 0x7A) + 1) if chr(cp).isalpha()}
    letters |= {ord(chr(cp).swapcase()) for cp in letters}
    extra = [(cp, cp) for cp in letters]
    if ord("s") in letters:
        extra.append((0x17F, 0x17F))
    if ord("k") in letters:
        extra.append((0x212A, 0x212A))
    return ranges + extra


def _counts(m: re.Match[str]) -> tuple[int, int | None]:
    """The bounds of a matched {lo}, {lo,} or {lo,hi}; Go allows at most 1000."""

    def count(digits: str) -> int:
        return int(digits) if len(digits) <= 9 else _MAX_REPEAT + 1

    lo = count(m[1])
    hi = lo if m[2] is None else None if m[3] is None else count(m[3])
    if lo > _MAX_REPEAT or (hi is not None and (hi > _MAX_REPEAT or lo > hi)):
        raise _RegexpError(f"invalid repeat count {m[0]}")
    return lo, hi


@dataclass(frozen=True)
class _Piece:
    """One repeatable unit of output, and the product of the counted repeats inside it.

    Go refuses x{a}{b}-style nesting whose product of counts exceeds 1000; a {0} hides its inside.
    """

    source: str
    weight: int = 1


@dataclass
class _Group:
    outer_flags: frozenset[str]  # restored when the group closes
    branches: list[list[_Piece]]

    def source(self) -> str:
        return "|".join("".join(piece.source for piece in branch) for branch in self.branches)

    def weight(self) -> int:
        return max((piece.weight for branch in self.branches for piece in branch), default=1)


class _GoRegexp:
    """Translate one Go regexp, left to right, into a Python pattern with the same matches.

    Go's flags (i, m, s, U) are tracked here and applied per piece ((?i:x), (?m:^), (?s:.)), so
    the output never needs Python's global flags and (?i) may appear anywhere, as in Go.
    """

    def __init__(self, pattern: str) -> None:
        self._p = pattern
        self._i = 0
        self._flags: frozenset[str] = frozenset()
        self._groups = [_Group(frozenset(), [[]])]
        self._after_repeat = False

    def translate(self) -> str:
        while self._i < len(self._p):
            self._after_repeat = self._step()
        if len(self._groups) > 1:
            raise _RegexpError("missing closing )")
        return self._groups[0].source()

    def _step(self) -> bool:
        """Translate the next element; True if it was a repetition operator."""
        c = self._p[self._i]
        if c in "*+?":
            self._i += 1
            self._repeat(c)
            return True
        if c == "{":
            m = _COUNTED_REPEAT.match(self._p, self._i)
            if m is not None:
                self._i = m.end()
                self._repeat(m[0], _counts(m))
                return True
            self._literal(ord(c))  # Go: a { that does not start a count is literal
            self._i += 1
        elif c == "(":
            if self._p.startswith("(?", self._i):
                self._perl_group()
            else:
                self._groups.append(_Group(self._flags, [[]]))
                self._i += 1
        elif c == ")":
            self._close_group()
        elif c == "|":
            self._groups[-1].branches.append([])
            self._i += 1
        elif c == "[":
            self._class()
        elif c == "\\":
            self._escape()
        else:
            if c == "^":
                self._emit("(?m:^)" if "m" in self._flags else r"\A")
            elif c == "$":
                self._emit("(?m:$)" if "m" in self._flags else r"\Z")
            elif c == ".":
                self._emit("(?s:.)" if "s" in self._flags else ".")
            else:
                self._literal(ord(c))
            self._i += 1
        return False

    def _emit(self, source: str, weight: int = 1) -> None:
        self._groups[-1].branches[-1].append(_Piece(source, weight))

    def _literal(self, cp: int) -> None:
        source = re.escape(chr(cp))
        self._emit(f"(?i:{source})" if "i" in self._flags else source)

    def _emit_class(self, ranges: _Ranges, negate: bool) -> None:
        body = "".join(
            f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in _normalized(ranges)
        )
        source = f"[{'^' if negate else ''}{body}]"
        self._emit(f"(?i:{source})" if "i" in self._flags else source)

    def _named_ranges(self, ranges: _Ranges, negated: bool) -> _Ranges:
        """A Perl or POSIX class: folded first, then negated, as Go does."""
        if "i" in self._flags:
            ranges = _fold_ascii(ranges)
        return _complement(ranges) if negated else ranges

    def _repeat(self, quantifier: str, counts: tuple[int, int | None] | None = None) -> None:
        """Apply *, +, ? or {lo,hi} (``counts``, hi None if unbounded) to the last piece."""
        lazy = self._p.startswith("?", self._i)
        if lazy:
            self._i += 1
        if self._after_repeat:
            raise _RegexpError(f"invalid nested repetition operator {quantifier!r}")
        branch = self._groups[-1].branches[-1]
        if not branch:
            raise _RegexpError(f"missing argument to repetition operator {quantifier!r}")
        piece = branch[-1]
        weight = piece.weight
        if counts is not None:
            lo, hi = counts
            factor = lo if hi is None else hi
            weight = 1 if hi == 0 else weight * (factor or 1)
            if (lo >= 2 or (hi or 0) >= 2) and weight > _MAX_REPEAT:
                raise _RegexpError(f"invalid repeat count {quantifier}: nested counts exceed {_MAX_REPEAT}")
        non_greedy = lazy != ("U" in self._flags)
        branch[-1] = _Piece(f"(?:{piece.source}){quantifier}{'?' if non_greedy else ''}", weight)

    def _perl_group(self) -> None:
        """(?P<name>, (?<name>, (?flags) or (?flags: ... ; anything else is not Go syntax."""
        p, i = self._p, self._i
        prefix = 4 if p.startswith("(?P<", i) else 3 if p.startswith("(?<", i) else 0
        if prefix:
            end = p.find(">", i)
            name = p[i + prefix : end] if end >= 0 else ""
            if not name or not all(c == "_" or (c.isascii() and c.isalnum()) for c in name):
                raise _RegexpError(f"invalid named capture {p[i : end + 1] if end >= 0 else p[i:]!r}")
            self._groups.append(_Group(self._flags, [[]]))
            self._i = end + 1
            return
        j, on, off, negated, saw_flag = i + 2, set(), set(), False, False
        while j < len(p):
            c = p[j]
            j += 1
            if c in "imsU":
                (off if negated else on).add(c)
                saw_flag = True
            elif c == "-" and not negated:
                negated, saw_flag = True, False
            elif c in ":)" and (saw_flag or not negated):
                outer = self._flags
                self._flags = (outer | on) - off
                if c == ":":
                    self._groups.append(_Group(outer, [[]]))
                self._i = j
                return
            else:
                break
        raise _RegexpError(f"invalid or unsupported Perl syntax {p[i:j]!r}")

    def _close_group(self) -> None:
        if len(self._groups) == 1:
            raise _RegexpError("unexpected )")
        group = self._groups.pop()
        self._flags = group.outer_flags
        self._i += 1
        self._emit(f"(?:{group.source()})", group.weight())

    def _escape(self) -> None:
        p, i = self._p, self._i
        c = p[i + 1 : i + 2]
        if not c:
            raise _RegexpError("trailing backslash at end of expression")
        if c in _ASSERTIONS:
            self._emit(_ASSERTIONS[c])
            self._i += 2
        elif c == "Q":  # literal text up to \E or the end
            end = p.find("\\E", i + 2)
            for ch in p[i + 2 :] if end < 0 else p[i + 2 : end]:
                self._literal(ord(ch))
            self._i = len(p) if end < 0 else end + 2
        elif c in ("p", "P"):
            raise _RegexpError("Unicode classes (\\p, \\P) are not supported")
        elif c.lower() in _PERL_CLASSES:
            self._emit_class(self._named_ranges(_PERL_CLASSES[c.lower()], c.isupper()), negate=False)
            self._i += 2
        else:
            cp, self._i = self._escaped_char(i)
            self._literal(cp)

    def _escaped_char(self, i: int) -> tuple[int, int]:
        """The character a Go escape at ``i`` stands for, and the index after it (parseEscape)."""
        p = self._p
        c, j = p[i + 1 : i + 2], i + 2
        if not c:
            raise _RegexpError("trailing backslash at end of expression")
        # \1-\7 alone would be a backreference, which Go does not have.
        if c == "0" or (c in "1234567" and j < len(p) and p[j] in _OCTAL):
            end = j
            while end < min(len(p), j + 2) and p[end] in _OCTAL:
                end += 1
            return int(p[i + 1 : end], 8), end
        if c == "x":
            if p.startswith("{", j):
                close = p.find("}", j)
                digits = p[j + 1 : close] if close >= 0 else ""
                if digits and all(d in _HEX for d in digits) and int(digits, 16) <= _MAX_RUNE:
                    return int(digits, 16), close + 1
            elif len(p[j : j + 2]) == 2 and all(d in _HEX for d in p[j : j + 2]):
                return int(p[j : j + 2], 16), j + 2
        elif c in _C_ESCAPES:
            return _C_ESCAPES[c], j
        elif c.isascii() and not c.isalnum():
            return ord(c), j
        raise _RegexpError(f"invalid escape sequence {p[i : j + 1] if c == 'x' else p[i:j]!r}")

    def _class(self) -> None:
        p, n = self._p, len(self._p)
        i = self._i + 1
        negate = p.startswith("^", i)
        if negate:
            i += 1
        ranges: _Ranges = []
        first = True  # a ] right after [ or [^ is literal
        while True:
            if i >= n:
                raise _RegexpError(f"missing closing ] in {p[self._i :]!r}")
            if p[i] == "]" and not first:
                break
            first = False
            if p.startswith("[:", i) and i + 2 < n and (end := p.find(":]", i + 2)) >= 0:
                name = p[i + 2 : end]
                table = _POSIX_CLASSES.get(name.removeprefix("^"))
                if table is None:
                    raise _RegexpError(f"invalid character class {p[i : end + 2]!r}")
                ranges += self._named_ranges(table, name.startswith("^"))
                i = end + 2
                continue
            if p.startswith("\\", i) and p[i + 1 : i + 2] in ("p", "P"):
                raise _RegexpError("Unicode classes (\\p, \\P) are not supported")
            if p.startswith("\\", i) and p[i + 1 : i + 2].lower() in _PERL_CLASSES:
                c = p[i + 1]
                ranges += self._named_ranges(_PERL_CLASSES[c.lower()], c.isupper())
                i += 2
                continue
            lo, i = self._class_char(i)
            hi = lo
            if i + 1 < n and p[i] == "-" and p[i + 1] != "]":
                hi, i = self._class_char(i + 1)
                if hi < lo:
                    raise _RegexpError(f"invalid character class range {chr(lo)!r}-{chr(hi)!r}")
            ranges.append((lo, hi))
        self._i = i + 1
        self._emit_class(ranges, negate)

    def _class_char(self, i: int) -> tuple[int, int]:
        if i >= len(self._p):
            raise _RegexpError(f"missing closing ] in {self._p[self._i :]!r}")
        if self._p[i] == "\\":
            return self._escaped_char(i)
        return ord(self._p[i]), i + 1
