"""containerd's config as doctor reads it: how CRI uses a snapshotter, per config version."""

from __future__ import annotations

import tomllib

import pytest

from addlower.core.ctrdconfig import CriUse, cri_use

V2 = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "{default}"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.addlower]
  snapshotter = "{handler}"
"""
V3 = """version = 3
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "{default}"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.addlower]
  snapshotter = "{handler}"
"""


@pytest.mark.parametrize("template", [V2, V3], ids=["v2", "v3"])
def test_cri_use_names_the_default_and_the_runtime_handlers_of_either_version(template):
    mine = tomllib.loads(template.format(default="ours", handler="other"))
    assert cri_use(mine, "ours") == CriUse(True, "ours", ())
    scoped = tomllib.loads(template.format(default="overlayfs", handler="ours"))
    assert cri_use(scoped, "ours") == CriUse(True, "overlayfs", ("addlower",))


def test_cri_use_without_settings_is_overlayfs_and_sees_cri_disabled():
    assert cri_use({"version": 2}, "ours") == CriUse(True, "overlayfs", ())
    assert not cri_use({"version": 3, "disabled_plugins": ["io.containerd.grpc.v1.cri"]}, "ours").enabled
