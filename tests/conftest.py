"""Options for the whole suite: which containerd lines the end-to-end tests run against."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--containerd-bin-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="run the end-to-end tests against the containerd, ctr and shim in DIR ('system': the ones "
        "on PATH); repeatable. Default: $ADDLOWER_CONTAINERD_BIN_DIR, else the installed containerd "
        "and every line scripts/containerd-versions.sh unpacked.",
    )
