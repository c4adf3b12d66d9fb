"""Fixtures for integration tests: a real daemon process on a temp root, and a client for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from addlower.ops.client import SnapshotsClient
from tests.support.daemon import Daemon, allowing


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.root)


@pytest.fixture(autouse=True)
def _needs_root():
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (real overlay mounts)")


@pytest.fixture
def daemon(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon whose root lies beside the test's tmp_path, and which allows extra lowers from
    anywhere under tmp_path."""
    where = tmp_path_factory.mktemp("snapshotter")
    d = Daemon(root=where / "root", args=allowing(where / "config.toml", tmp_path)).start()
    yield d
    d.kill()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[SnapshotsClient]:
    with daemon.channel() as channel:
        yield SnapshotsClient(channel)
