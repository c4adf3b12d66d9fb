"""Log lines: logfmt (the default, as containerd writes) and JSON, one record per line.

A call site gives structured fields with `extra=fields(method=..., key=...)`; both formats print
each as a key of its own, after time (RFC 3339, UTC), level (lowercase, as containerd spells it),
logger and msg. Whatever a client put in a key or label is escaped: no value can end a line or
start a forged field. Pure: formats the records it is handed; must not configure logging or
write anywhere (cli.py does).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

FIELDS_ATTR = "fields"  # where fields() puts them on a LogRecord

# Characters that never appear raw in a line: C0, DEL, C1, Unicode line and paragraph separators.
_ESCAPES = {c: f"\\u{c:04x}" for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)}
_ESCAPES.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})
_QUOTE_IF = frozenset(' ="\\') | {chr(c) for c in _ESCAPES}


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    """`extra=` for a log call: fields printed as keys of their own."""
    return {FIELDS_ATTR: values}


def rfc3339(created: float) -> str:
    """A record's time as 2026-12-02T03:37:15.660Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def entries(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, Any]:
    """The keys of one line, in order."""
    entry: dict[str, Any] = {
        "time": rfc3339(record.created),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    entry.update(getattr(record, FIELDS_ATTR, {}))
    if record.exc_info:
        entry["error"] = formatter.formatException(record.exc_info)
    return entry


def logfmt_value(value: Any) -> str:
    """A value as logfmt writes it: bare when it can be, else quoted with escapes."""
    if isinstance(value, float):
        return f"{value:.6f}"
    text = value if isinstance(value, str) else str(value)
    if text and not _QUOTE_IF.intersection(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').translate(_ESCAPES) + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={logfmt_value(v)}" for k, v in entries(record, self).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(entries(record, self), default=str)


FORMATTERS: dict[str, type[logging.Formatter]] = {"text": LogfmtFormatter, "json": JsonFormatter}


# syslog priorities by level, as systemd's journal reads a `<N>` at the start of a line on a
# unit's stderr (SyslogLevelPrefix=, on by default): `journalctl -p warning` then shows refusals.
JOURNAL_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalPrefix(logging.Formatter):
    """Another formatter's line with its record's syslog priority in front (`<4>time=...`)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = JOURNAL_PRIORITIES.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{priority}>{self.inner.format(record)}"
