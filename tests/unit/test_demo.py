"""`addlower demo` works in a dir no other user can own or write: a new private one by default."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from addlower.dev.demo import DemoError, private_workdir


def test_each_demo_gets_a_new_private_dir():
    first, second = private_workdir(None), private_workdir(None)
    try:
        assert first != second
        for d in (first, second):
            st = os.lstat(d)
            assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o700
    finally:
        first.rmdir()
        second.rmdir()


def test_a_given_dir_is_made_private(tmp_path: Path):
    made = private_workdir(tmp_path / "demo")
    assert made == tmp_path / "demo" and made.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    "make",
    [
        lambda d: (d.mkdir(), d.chmod(0o777)),  # anyone may plant files or symlinks in it
        lambda d: (d.with_name("real").mkdir(), d.symlink_to(d.with_name("real"))),  # may point anywhere next time
        lambda d: d.write_text("a file"),
    ],
)
def test_a_dir_others_may_change_is_refused(tmp_path: Path, make):
    workdir = tmp_path / "demo"
    make(workdir)
    with pytest.raises(DemoError, match="only you may write in"):
        private_workdir(workdir)
