"""containerd's filter language: parse the ``filters`` strings of a List/Walk request and match objects.

A re-implementation of containerd's ``filters`` package (scanner, parser, quoting and matching),
including the Go ``regexp`` dialect that ``~=`` uses, compiled with RE2 (google-re2) at parse time.
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
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

from addlower.core.errors import InvalidArgument

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
    regexp: Any = None  # a compiled RE2 pattern

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
# `~=` values are Go regexps: RE2 is the engine family of Go's regexp package (same syntax, same
# Perl-flag defaults: ASCII \d \w \b, ^ and $ at the text's ends, {n,m} up to 1000, no lookaround
# or backreferences), and it matches in linear time, so a hostile pattern cannot stall the daemon.

# google-re2 is loaded at the first `~=` (2.6 MiB a daemon need not carry: containerd's own
# calls never send one).


@cache
def _re2() -> tuple[Any, Any]:
    """The re2 module and the options every pattern is compiled with."""
    import re2

    options = re2.Options()
    options.log_errors = False  # RE2 would print refusals on stderr; we return them
    return re2, options


def _compile_go_regexp(pattern: str) -> Any:
    """A compiled RE2 pattern; InvalidArgument's caller adds where the filter went wrong."""
    re2, options = _re2()
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        raise _RegexpError(
            exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        ) from None


class _RegexpError(Exception):
    """Go (and RE2) would not compile this pattern."""
