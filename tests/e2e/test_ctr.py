"""The issue's end-to-end scenario with `ctr`: import an image into the snapshotter, run containers
on it, remove everything and let containerd's garbage collector clean up.

Each test runs against containerd's built-in overlayfs first (the reference) and then against ours.
"""

from __future__ import annotations

import pytest

from addlower.dev.ociimage import OciImage

from .conftest import SnapshotRow, Target

pytestmark = pytest.mark.e2e

# First start: write the note. Later starts of the same container: say so and show the note.
WRITER = "if [ -e /root/note ]; then echo again; else echo secret > /root/note; fi; cat /root/note"


def test_run_prints_and_leaves_only_the_image_layer(target: Target, busybox_image: OciImage, namespace: str) -> None:
    target.import_image(busybox_image, namespace)

    out = target.run(busybox_image.ref, "hello", "sh", "-c", "echo hi", namespace=namespace)

    assert out.stdout == "hi\n"
    top = busybox_image.chain_ids[-1]
    assert target.snapshots(namespace) == {top: SnapshotRow(top, "", "Committed")}


def test_container_write_stays_in_its_own_snapshot(target: Target, busybox_image: OciImage, namespace: str) -> None:
    target.import_image(busybox_image, namespace)
    top = busybox_image.chain_ids[-1]

    first = target.run(busybox_image.ref, "writer", "sh", "-c", WRITER, namespace=namespace, rm=False)

    assert first.stdout == "secret\n"
    assert target.snapshots(namespace)["writer"] == SnapshotRow("writer", top, "Active")
    upper = target.upperdir("writer", namespace)
    assert upper.parent.parent == target.snapshots_dir
    assert (upper / "root" / "note").read_text() == "secret\n"
    assert sorted(target.snapshots_dir.glob("*/fs/root/note")) == [upper / "root" / "note"]

    other = target.run(
        busybox_image.ref, "reader", "sh", "-c", "cat /root/note 2>/dev/null || echo absent", namespace=namespace
    )
    assert other.stdout == "absent\n"

    again = target.ctr("tasks", "start", "writer", namespace=namespace)
    assert again.stdout == "again\nsecret\n"
    target.ctr("containers", "rm", "writer", namespace=namespace)


def test_removing_container_and_image_leaves_nothing(fresh_target: Target, busybox_image: OciImage) -> None:
    """containerd's GC removes every snapshot and then calls Cleanup, which empties `snapshots/`."""
    t, ns, top = fresh_target, "gc", busybox_image.chain_ids[-1]
    t.import_image(busybox_image, ns)
    t.run(busybox_image.ref, "c1", "sh", "-c", "echo x > /root/x", namespace=ns, rm=False)
    assert set(t.snapshots(ns)) == {"c1", top}
    assert len(t.snapshot_dirs()) == 2
    # What an interrupted removal leaves behind: a dir with no snapshot. Only Cleanup deletes it.
    (t.snapshots_dir / "999999" / "fs").mkdir(parents=True)

    t.ctr("containers", "rm", "c1", namespace=ns)
    assert set(t.snapshots(ns)) == {top}
    t.ctr("images", "rm", "--sync", busybox_image.ref, namespace=ns)

    assert t.snapshots(ns) == {}
    assert t.snapshot_dirs() == []
