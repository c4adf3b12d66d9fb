"""The package layout is the architecture: each layer imports only the layers below it (what every
package's __init__ says), checked on the source of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "addlower"
# layer -> the addlower packages it must never import
FORBIDDEN = {
    "core": {"engine", "server", "ops", "dev"},
    "engine": {"server", "ops", "dev"},
    "server": {"ops", "dev"},
    "ops": {"server", "dev"},
}


# module -> top-level modules it must never import: the HTTP/2 and gRPC cores do no I/O
# (bytes and events in and out, time from a clock they are given), so they are tested and fuzzed
# without a loop or a socket.
SANS_IO = {"asyncio", "socket", "threading", "concurrent", "selectors", "time", "uvloop", "os"}
MODULE_FORBIDDEN = {
    "server/http2.py": SANS_IO | {"addlower"},
    "server/rpc.py": SANS_IO,
}


def imported_modules(path: Path) -> set[str]:
    """The top-level modules a module imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("module", sorted(MODULE_FORBIDDEN))
def test_the_protocol_cores_do_no_io(module):
    assert imported_modules(PACKAGE / module) & MODULE_FORBIDDEN[module] == set()


def imported_packages(path: Path) -> set[str]:
    """The addlower subpackages a module imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] == "addlower" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_one_it_must_not(layer):
    offences = {
        str(p.relative_to(PACKAGE)): sorted(imported_packages(p) & FORBIDDEN[layer])
        for p in (PACKAGE / layer).glob("*.py")
    }
    assert {m: f for m, f in offences.items() if f} == {}


def test_every_layer_says_what_it_must_never_import():
    for layer in ("core", "engine", "server", "ops", "dev"):
        assert "never" in (PACKAGE / layer / "__init__.py").read_text()
