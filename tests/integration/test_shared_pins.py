"""One pin per host dir in use, shared by every snapshot that uses that very dir: the node's mount
table grows with the distinct dirs, not with containers times lowers. The pins' users are
recorded under the root, so a restart (or a kill -9) finds them again: no pin goes while a
snapshot uses it, none is left when the last one goes. A dir swapped at its path gets a pin of
its own, so a new container never sees the old dir through an old pin."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.dev.mounting import mounted
from addlower.engine import fsutil
from addlower.ops.client import SnapshotsClient
from tests.integration.test_crash import pin_problems
from tests.support.daemon import Daemon, allowing


def lowerdirs(mounts: list) -> list[str]:
    [root] = [m for m in mounts if not m.target]
    return next(o for o in root.options if o.startswith("lowerdir=")).removeprefix("lowerdir=").split(":")


def pin_mounts(root: Path) -> list[str]:
    """The mounts under the daemon's pins dir, as the kernel lists them."""
    return [m for m in fsutil.mount_points() if m.startswith(f"{root}/lowers/")]


def a_cache(tmp_path: Path, name: str, text: str) -> tuple[Path, list[str]]:
    """host/cache holding one file `name`, and daemon arguments allowing host."""
    cache = tmp_path / "host" / "cache"
    cache.mkdir(parents=True)
    (cache / name).write_text(text)
    return cache, allowing(tmp_path / "c.toml", cache.parent)


def test_containers_sharing_dirs_share_their_pins(tmp_path: Path):
    caches = [tmp_path / "host" / name for name in ("m2", "npm", "pip")]
    for cache in caches:
        cache.mkdir(parents=True)
    root = tmp_path / "root"
    d = Daemon(root=root, args=allowing(tmp_path / "c.toml", tmp_path / "host")).start()
    try:
        with d.channel() as ch:
            client = SnapshotsClient(ch)
            value = ":".join(map(str, caches))
            firsts = {tuple(lowerdirs(client.prepare(f"c{i}", labels={LOWERS: value}))) for i in range(20)}
            assert len(firsts) == 1  # every container is handed the same pins
            assert len(pin_mounts(root)) == 3 and len(os.listdir(root / "lowers" / "pins")) == 3
            for i in range(20):
                assert tuple(lowerdirs(client.mounts(f"c{i}"))) in firsts  # Mounts re-checks, re-uses
            assert len(pin_mounts(root)) == 3
            for i in range(20):
                client.remove(f"c{i}")
            assert pin_mounts(root) == [] and os.listdir(root / "lowers") == ["pins"]
    finally:
        assert d.stop() == 0


def test_shared_pins_survive_a_kill_and_go_with_their_last_user(tmp_path: Path):
    cache, args = a_cache(tmp_path, "dep.jar", "v1\n")
    host, root = cache.parent, tmp_path / "root"
    d = Daemon(root=root, args=args).start()
    with d.channel() as ch:
        client = SnapshotsClient(ch)
        for key in ("a", "b", "c"):
            client.prepare(key, labels={LOWERS: str(cache)})
    [pin] = os.listdir(root / "lowers" / "pins")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)  # not d.stop(): the harness would unmount the pins
    d.proc.wait()
    # A kill between making a pin and recording it leaves a pin nobody names: start-up removes it.
    stray = root / "lowers" / "pins" / "1-1"
    stray.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(host), str(stray)], check=True)
    d = Daemon(root=root, args=args).start()
    try:
        assert os.listdir(root / "lowers" / "pins") == [pin]
        assert pin_problems(root, {1, 2, 3}) == []
        with d.channel() as ch:
            client = SnapshotsClient(ch)
            client.remove("a")
            client.remove("b")  # one user left: the pin stays, read-only, showing the host dir
            assert os.listdir(root / "lowers" / "pins") == [pin]
            assert pin_problems(root, {3}) == []
            with mounted(client.mounts("c"), tmp_path / "rootfs") as rootfs:
                assert (rootfs / "dep.jar").read_text() == "v1\n"
            client.remove("c")
            assert os.listdir(root / "lowers" / "pins") == [] and pin_mounts(root) == []
    finally:
        assert d.stop() == 0
    assert "removing the pin 1-1, which no snapshot uses" in d.log()


def test_a_swapped_dir_never_reaches_a_new_container_through_the_old_pin(tmp_path: Path):
    cache, args = a_cache(tmp_path, "which", "old\n")
    host, root = cache.parent, tmp_path / "root"
    d = Daemon(root=root, args=args).start()
    try:
        with d.channel() as ch:
            client = SnapshotsClient(ch)
            [old_pin] = lowerdirs(client.prepare("running", labels={LOWERS: str(cache)}))
            with mounted(client.mounts("running"), tmp_path / "running") as running:
                cache.rename(host / "old")  # a job swaps the cache for another dir at the same path
                cache.mkdir()
                (cache / "which").write_text("new\n")
                [new_pin] = lowerdirs(client.prepare("new", labels={LOWERS: str(cache)}))
                assert new_pin != old_pin
                with mounted(client.mounts("new"), tmp_path / "new") as new:
                    assert (new / "which").read_text() == "new\n"
                assert (running / "which").read_text() == "old\n"  # the running one keeps its view
                assert sorted(os.listdir(root / "lowers" / "pins")) == sorted(Path(p).name for p in (old_pin, new_pin))
                # The old container's next Mounts (a task started again) keeps the dir it was
                # checked with: its entry is the one its pin was made for, and still allowed.
                assert lowerdirs(client.mounts("running")) == [old_pin]
            client.remove("running")  # the old pin, used by nobody now, goes
            assert os.listdir(root / "lowers" / "pins") == [Path(new_pin).name]
    finally:
        assert d.stop() == 0


def test_pins_of_the_older_layout_are_replaced_at_the_next_mounts_and_go_with_their_snapshot(tmp_path: Path):
    """Before pins were shared, each snapshot had its own at lowers/<id>/<n>: an upgraded daemon
    leaves them to containers that may still mount them, and replaces them as snapshots come back."""
    cache, args = a_cache(tmp_path, "dep.jar", "v1\n")
    root = tmp_path / "root"
    d = Daemon(root=root, args=args).start()
    with d.channel() as ch:
        for key in ("a", "b"):
            SnapshotsClient(ch).prepare(key, labels={LOWERS: str(cache)})
    d.stop()  # the harness unmounts the pins: make the older layout by hand
    for sid in ("1", "2"):
        record = root / "lowers" / sid / "0"
        record.unlink()
        record.mkdir()
        subprocess.run(["mount", "--bind", "-o", "ro", str(cache), str(record)], check=True)
    for pin in os.listdir(root / "lowers" / "pins"):
        (root / "lowers" / "pins" / pin).rmdir()
    d = Daemon(root=root, args=args).start()
    try:
        assert len(pin_mounts(root)) == 2  # left alone at start-up
        with d.channel() as ch:
            client = SnapshotsClient(ch)
            [pin] = lowerdirs(client.mounts("a"))
            assert Path(pin).parent == root / "lowers" / "pins"
            with mounted(client.mounts("a"), tmp_path / "rootfs") as rootfs:
                assert (rootfs / "dep.jar").read_text() == "v1\n"
            assert sorted(pin_mounts(root)) == sorted([pin, f"{root}/lowers/2/0"])
            client.remove("b")  # its older pin goes with it
            assert pin_mounts(root) == [pin] and pin_problems(root, {1}) == []
            client.remove("a")
            assert pin_mounts(root) == []
    finally:
        assert d.stop() == 0
