"""Log lines: whatever a value holds, a line stays one record that reads back to the same fields."""

from __future__ import annotations

import json
import logging

import pytest

from addlower.core.logformat import FORMATTERS, fields
from tests.support.logfmt import parse


@pytest.mark.parametrize("fmt", sorted(FORMATTERS))
@pytest.mark.parametrize(
    "hostile",
    [
        "plain",
        "",
        "a b",
        'q"uote',
        "back\\slash",
        "x=y",
        "nl\nlevel=error",
        "sep\u2028x",
        "c1\x85x",
        "tab\tx",
        "ünïcode",
    ],
)
def test_values_read_back_as_written(fmt: str, hostile: str):
    record = logging.LogRecord("addlower", logging.WARNING, __file__, 1, "refused %s", (hostile,), None)
    record.__dict__.update(fields(key=hostile, duration_s=0.25))
    line = FORMATTERS[fmt]().format(record)
    assert "\n" not in line and "\u2028" not in line and "\x85" not in line
    (entry,) = parse(line, fmt)
    assert entry["msg"] == f"refused {hostile}" and entry["key"] == hostile and entry["level"] == "warning"
    assert float(entry["duration_s"]) == 0.25
    if fmt == "json":
        assert json.loads(line)["duration_s"] == 0.25
