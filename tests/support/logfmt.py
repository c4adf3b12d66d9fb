"""A strict reader of the daemon's log lines, in logfmt or JSON: what a log shipper would parse."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

_PAIR = re.compile(r'([^\s="]+)=("(?:\\.|[^"\\])*"|[^\s="]*)')
LEVELS = {"debug", "info", "warning", "error", "critical"}


def parse_logfmt(line: str) -> dict[str, str]:
    """key=value pairs split by single spaces; quoted values unescaped. ValueError unless the whole
    line is such pairs."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        found = _PAIR.match(line, pos)
        if not found or found.group(1) in out:
            raise ValueError(f"not logfmt at {pos}: {line!r}")
        value = found.group(2)
        out[found.group(1)] = json.loads(value) if value.startswith('"') else value
        pos = found.end()
        if pos < len(line):
            if line[pos] != " ":
                raise ValueError(f"not logfmt at {pos}: {line!r}")
            pos += 1
    return out


def parse(text: str, fmt: str) -> list[dict]:
    """Every line of a log, each checked to be one record with an RFC 3339 UTC time and a level."""
    entries = [parse_logfmt(line) if fmt == "text" else json.loads(line) for line in text.splitlines()]
    for e in entries:
        assert list(e)[:4] == ["time", "level", "logger", "msg"], e
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]), e
        assert datetime.fromisoformat(e["time"].replace("Z", "+00:00")).tzinfo == UTC
        assert e["level"] in LEVELS, e
    return entries
