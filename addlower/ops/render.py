"""How the operator's commands show snapshots: sizes, ages, tables and trees that fit the
terminal, and their JSON. Pure presentation: no store, no daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import click

from addlower.core.labels import EXTRA_LOWERS_LABEL
from addlower.core.model import Info, Kind, Usage

WIDTH = 80  # columns of a terminal that does not say
GAP = "  "  # between table columns
MIN_FLEXIBLE = 8  # a shrinking column keeps at least this many characters
INDENT = 4  # tree: characters per level


# --- presentation --------------------------------------------------------------------------------


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


_AGE_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def human_age(seconds: float) -> str:
    for suffix, length in _AGE_UNITS:
        if seconds >= length:
            return f"{int(seconds // length)}{suffix}"
    return "0s"


def terminal_columns() -> int:
    """COLUMNS, else the terminal's width, else WIDTH (shutil's rule)."""
    return shutil.get_terminal_size((WIDTH, 24)).columns


def fit_width(wide: bool) -> int | None:
    """How wide tables and trees may be: the terminal's width (or COLUMNS); None, nothing cut, with
    --wide or when stdout is no terminal and COLUMNS is unset (a pipe into grep gets whole names)."""
    if wide or ("COLUMNS" not in os.environ and not sys.stdout.isatty()):
        return None
    return terminal_columns()


wide_option = click.option("--wide", is_flag=True, help="Never cut names to fit the terminal.")


def ellipsize(text: str, width: int) -> str:
    """`text` cut to `width` characters by an ellipsis in the middle."""
    if len(text) <= width:
        return text
    keep = max(width - 1, 0)
    head = (keep + 1) // 2
    return text[:head] + "…" + text[len(text) - (keep - head) :]


def iso_time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="seconds")


def age_text(ns: int) -> str:
    return human_age((time.time_ns() - ns) / 1e9)


def kind_text(info: Info) -> str:
    return info.kind.label


@dataclass(frozen=True)
class Column:
    header: str
    flexible: bool = False  # shrinks, by an ellipsis in the middle, for the table to fit
    right: bool = False


def shown(text: str) -> str:
    """`text` safe for a terminal: keys, labels and paths are a container creator's to choose,
    so control and other unprintable characters are shown escaped, never sent as they are."""
    return text if text.isprintable() else "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def render_table(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None) -> list[str]:
    """Rows under headers (every cell shown()), fitting `width` (None: any) by shrinking the
    widest flexible column first."""
    table = [[c.header for c in columns], *([shown(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    excess = 0 if width is None else sum(widths) + len(GAP) * (len(columns) - 1) - width
    while excess > 0:
        shrinkable = [i for i, c in enumerate(columns) if c.flexible and widths[i] > MIN_FLEXIBLE]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
        excess -= 1
    return [
        GAP.join(
            ellipsize(cell, w).rjust(w) if c.right else ellipsize(cell, w).ljust(w)
            for cell, w, c in zip(row, widths, columns, strict=True)
        ).rstrip()
        for row in table
    ]


def snapshot_json(info: Info, usage: Usage | None) -> dict[str, Any]:
    return {
        "name": info.name,
        "kind": kind_text(info),
        "parent": info.parent,
        "created_at": iso_time(info.created_at),
        "updated_at": iso_time(info.updated_at),
        "size": usage.size if usage is not None else None,
        "inodes": usage.inodes if usage is not None else None,
        "extra_lowers": info.labels.get(EXTRA_LOWERS_LABEL, ""),
        "labels": dict(info.labels),
    }


def size_text(usage: Usage | None) -> str:
    return human_size(usage.size) if usage is not None else "?"


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


@dataclass
class Node:
    info: Info
    children: list[Node] = field(default_factory=list)


def build_forest(infos: Sequence[Info]) -> list[Node]:
    """Parent chains as trees: roots have no parent (or one not listed), children sorted by name."""
    nodes = {info.name: Node(info) for info in sorted(infos, key=lambda i: i.name)}
    roots: list[Node] = []
    for node in nodes.values():
        parent = nodes.get(node.info.parent)
        (parent.children if parent else roots).append(node)
    return roots


def _tree_line(prefix: str, info: Info, width: int | None) -> str:
    suffix = "" if info.kind == Kind.COMMITTED else f" ({kind_text(info)})"
    name = shown(info.name)
    if width is None:
        return prefix + name + suffix
    most = width // 2  # deeper indentation is cut on the left, keeping the innermost levels whole
    if len(prefix) > most:
        prefix = "…" + prefix[len(prefix) - (most - 1) // INDENT * INDENT :]
    return prefix + ellipsize(name, max(width - len(prefix) - len(suffix), MIN_FLEXIBLE)) + suffix


def draw_tree(node: Node, width: int | None, prefix: str = "", continuation: str = "") -> list[str]:
    """`node` and its descendants in box-drawing characters, `width` columns wide (None: any)."""
    lines = [_tree_line(prefix, node.info, width)]
    for i, child in enumerate(node.children):
        last = i == len(node.children) - 1
        lines += draw_tree(
            child, width, continuation + ("└── " if last else "├── "), continuation + ("    " if last else "│   ")
        )
    return lines


def tree_json(node: Node) -> dict[str, Any]:
    return {"name": node.info.name, "kind": kind_text(node.info), "children": [tree_json(c) for c in node.children]}
