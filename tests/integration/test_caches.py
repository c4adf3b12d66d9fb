"""Managed caches through the daemon's socket, mounted for real: a job's writes become the next
generation when its snapshot is removed (promote = "always"); a running job keeps the chain it
got; deletions stay deleted; what must not be promoted is not, and a kill during a promotion
leaves a whole generation or none."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from grpc import StatusCode as Code

from addlower.cli import admin
from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.core.labels import SCOPE_LABEL as SCOPE
from addlower.dev.mounting import mounted
from addlower.ops.client import SnapshotsClient
from tests.integration.layers import expect_code
from tests.support.daemon import Daemon, config_args

TARGET = "/root/.m2"


def cache_config(tmp_path: Path, promote: str = "always", extra: str = "") -> list[str]:
    seed = tmp_path / "seed"
    seed.mkdir(exist_ok=True)
    (seed / "seeded.jar").write_text("from the seed\n")
    (seed / "old").mkdir(exist_ok=True)
    (seed / "old" / "a.jar").write_text("old a\n")
    toml = (
        'mount_targets = "on"\n'
        "[lowers.named.m2]\n"
        f'cache = true\ntarget = "{TARGET}"\npromote = "{promote}"\nseed = "{seed}"\n{extra}'
    )
    return config_args(tmp_path / "config.toml", toml)


def at_target(mounts: Sequence[Any]) -> list[Any]:
    found = [m for m in mounts if m.target == TARGET]
    assert len(found) == 1, mounts
    return found


def lowerdirs(m: Any) -> list[str]:
    return next(o for o in m.options if o.startswith("lowerdir=")).removeprefix("lowerdir=").split(":")


@contextmanager
def serving(tmp_path: Path, args: list[str]) -> Iterator[tuple[Daemon, SnapshotsClient]]:
    d = Daemon(root=tmp_path / "root", args=args).start()
    try:
        with d.channel() as ch:
            yield d, SnapshotsClient(ch)
    finally:
        d.kill()


def job(c: SnapshotsClient, key: str) -> list[Any]:
    """A job's container: its mount at the cache's target."""
    return at_target(c.prepare(key, labels={LOWERS: "m2"}))


def test_a_jobs_writes_become_the_next_jobs_cache_and_a_running_job_keeps_its_view(tmp_path: Path):
    with serving(tmp_path, cache_config(tmp_path)) as (d, c):
        first = job(c, "job1")
        assert lowerdirs(first[0]) == [f"{d.root}/caches/m2/1"]  # the seed, copied in
        assert "redirect_dir=off" in first[0].options and "metacopy=off" in first[0].options
        running = job(c, "running")  # made before job1 ends
        assert lowerdirs(running[0]) == lowerdirs(first[0])
        with mounted(first, tmp_path / "job1") as m:
            assert (m / "seeded.jar").read_text() == "from the seed\n"
            (m / "new.jar").write_text("downloaded by job1\n")
            (m / "seeded.jar").unlink()  # a deletion: a whiteout in the upper
            subprocess.run(["rm", "-rf", str(m / "old")], check=True)
            (m / "old").mkdir()  # a replaced dir: opaque
            (m / "old" / "b.jar").write_text("new b\n")
        c.remove("job1")
        assert sorted(os.listdir(d.root / "caches" / "m2")) == ["1", "2"]

        second = job(c, "job2")
        assert lowerdirs(second[0]) == [f"{d.root}/caches/m2/2", f"{d.root}/caches/m2/1"]
        with mounted(second, tmp_path / "job2") as m:
            assert (m / "new.jar").read_text() == "downloaded by job1\n"
            assert not (m / "seeded.jar").exists()
            assert sorted(os.listdir(m / "old")) == ["b.jar"]
        with mounted(at_target(c.mounts("running")), tmp_path / "running") as m:  # its chain, as it got it
            assert (m / "seeded.jar").exists() and not (m / "new.jar").exists()

        c.remove("job2")  # wrote nothing: no generation
        assert sorted(os.listdir(d.root / "caches" / "m2")) == ["1", "2"]

        config = ["--config", str(tmp_path / "config.toml"), "--root-dir", str(d.root), "--json"]
        shown = CliRunner().invoke(admin, ["cache", "ls", *config])
        assert shown.exit_code == 0, shown.output
        [m2] = json.loads(shown.output)
        assert (m2["cache"], m2["target"], m2["generations"], m2["containers"]) == ("m2", TARGET, 2, 1)
        logged = CliRunner().invoke(admin, ["cache", "log", "m2", *config])
        assert [(g["generation"], g["source"]) for g in json.loads(logged.output)] == [(1, "seed"), (2, "job1")]
    assert 'msg="promoted a job\'s writes" key=job1' in d.log()


def test_a_cache_that_does_not_promote_keeps_no_writes(tmp_path: Path):
    with serving(tmp_path, cache_config(tmp_path, promote="never")) as (d, c):
        with mounted(job(c, "job1"), tmp_path / "job1") as m:
            (m / "new.jar").write_text("x\n")
        c.remove("job1")
        assert os.listdir(d.root / "caches" / "m2") == ["1"]


def test_an_upper_holding_a_redirect_or_still_mounted_is_not_promoted(tmp_path: Path):
    with serving(tmp_path, cache_config(tmp_path)) as (d, c):
        [redirect] = job(c, "redirect")
        upper = next(o for o in redirect.options if o.startswith("upperdir=")).removeprefix("upperdir=")
        (Path(upper) / "moved").mkdir()
        os.setxattr(Path(upper) / "moved", "trusted.overlay.redirect", b"/old")
        c.remove("redirect")
        with mounted(job(c, "mounted"), tmp_path / "mounted") as m:
            (m / "new.jar").write_text("x\n")
            c.remove("mounted")  # its upper is still in use: never a lower while written
        assert os.listdir(d.root / "caches" / "m2") == ["1"]
    log = d.log()
    assert "moved carries the overlay xattr trusted.overlay.redirect" in log
    assert "its upper dir is still mounted" in log


def test_generations_survive_a_restart_and_a_stray_one_goes(tmp_path: Path):
    args = cache_config(tmp_path)
    with serving(tmp_path, args) as (d, c):
        with mounted(job(c, "job1"), tmp_path / "job1") as m:
            (m / "new.jar").write_text("kept\n")
        c.remove("job1")
    stray = tmp_path / "root" / "caches" / "m2" / "3"  # a kill after a promotion's rename, before its COMMIT
    stray.mkdir()
    (stray / "half.jar").write_text("never seen\n")
    with serving(tmp_path, args) as (d, c):
        assert sorted(os.listdir(d.root / "caches" / "m2")) == ["1", "2"]
        with mounted(job(c, "job2"), tmp_path / "job2") as m:
            assert (m / "new.jar").read_text() == "kept\n"


def tree_of(top: Path) -> dict[str, tuple]:
    """Every entry under `top` as a user would compare it: type, mode, owner, and contents or
    link target."""
    seen: dict[str, tuple] = {}
    for path in sorted(top.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(top))
        if path.is_symlink():
            seen[rel] = ("link", os.readlink(path), st.st_uid, st.st_gid)
        elif path.is_dir():
            seen[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        else:
            seen[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, path.read_bytes())
    return seen


def wait_for(check: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_long_chain_is_squashed_to_the_same_tree_and_old_generations_go_once_unused(tmp_path: Path):
    args = cache_config(tmp_path, extra="max_generations = 4\n")
    with serving(tmp_path, args) as (d, c):
        writes = [
            "mkdir -p lib && echo a > lib/a.jar && echo k > lib/keep.jar && chmod 600 lib/keep.jar "
            "&& chown 1234:5678 lib/keep.jar && rm seeded.jar",
            "ln -s lib/a.jar link && rm -rf old && mkdir old && echo b > old/b.jar && mkdir -p empty",
            "echo c > lib/c.jar && rm lib/a.jar && echo again > lib/a.jar",  # deleted, then made again
            "echo d > lib/d.jar",  # the fifth generation: past max_generations, the chain is squashed
        ]
        for n, script in enumerate(writes, 1):
            if n == len(writes):
                before = job(c, "before")  # a chain of four: the seed and three jobs' writes
            with mounted(job(c, f"job{n}"), tmp_path / f"job{n}") as m:
                subprocess.run(["sh", "-c", script], cwd=m, check=True)
            c.remove(f"job{n}")
        assert len(lowerdirs(before[0])) == 4
        chain = d.root / "caches" / "m2"
        log = ["--root-dir", str(d.root), "--config", str(tmp_path / "config.toml"), "--json"]

        def generations() -> list[dict]:
            shown = CliRunner().invoke(admin, ["cache", "log", "m2", *log])
            assert shown.exit_code == 0, shown.output
            return json.loads(shown.output)

        wait_for(lambda: [g["state"] for g in generations()].count("chain") == 1, "the squash")
        after = job(c, "after")
        assert lowerdirs(after[0]) == [f"{chain}/6"] and generations()[-1]["source"] == "squash of 1-5"
        with mounted(before, tmp_path / "before") as old, mounted(after, tmp_path / "after") as new:
            squashed = tree_of(new)
            assert squashed.pop("lib/d.jar")[-1] == b"d\n"
            assert squashed == tree_of(old)  # contents, modes, owners, links, deletions
            assert squashed["lib/a.jar"] == ("file", 0o644, 0, 0, b"again\n") and "seeded.jar" not in squashed
            assert squashed["lib/keep.jar"] == ("file", 0o600, 1234, 5678, b"k\n")
            assert squashed["link"] == ("link", "lib/a.jar", 0, 0)
            assert [k for k in squashed if k.startswith("old/")] == ["old/b.jar"]  # the replaced dir
        c.cleanup()  # "before" still has the first four; the fifth is in the squash alone
        assert sorted(os.listdir(chain), key=int) == ["1", "2", "3", "4", "6"]
        c.remove("before")
        c.cleanup()
        assert os.listdir(chain) == ["6"]
        assert [g["state"] for g in generations()] == ["removed"] * 5 + ["chain"]


def test_what_a_kill_leaves_of_a_squash_goes_at_start_up_and_the_chain_stays(tmp_path: Path):
    args = cache_config(tmp_path)
    with serving(tmp_path, args) as (d, c):
        c.prepare("job", labels={LOWERS: "m2"})  # the seed is copied in
    caches = tmp_path / "root" / "caches" / "m2"
    mount, temp = caches / ".mnt-squash-x", caches / ".new-squash-y"
    mount.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(caches / "1"), str(mount)], check=True)
    temp.mkdir()
    (temp / "half.jar").write_text("half\n")
    with serving(tmp_path, args) as (d, c):
        assert os.listdir(caches) == ["1"]
        assert (caches / "1" / "seeded.jar").read_text() == "from the seed\n"  # nothing deleted through the mount
        assert lowerdirs(job(c, "next")[0]) == [str(caches / "1")]


def test_an_operator_diffs_promotes_squashes_and_rolls_back_by_hand(tmp_path: Path):
    args = cache_config(tmp_path)  # promote = "always"
    with serving(tmp_path, args) as (d, c):
        cli = ["--root-dir", str(d.root), "--config", str(tmp_path / "config.toml")]

        def cache(*argv: str) -> str:
            done = CliRunner().invoke(admin, ["cache", *argv, *cli])
            assert done.exit_code == 0, done.output
            return done.output

        with mounted(job(c, "stopped"), tmp_path / "stopped") as m:
            (m / "new.jar").write_text("new\n")
            (m / "seeded.jar").write_text("rewritten\n")
            (m / "old" / "a.jar").unlink()
            refused = CliRunner().invoke(admin, ["cache", "promote", "stopped", *cli])
            assert refused.exit_code != 0 and "still mounted; stop it first" in refused.output
        assert cache("diff", "stopped").splitlines() == [  # a live container: its upper over its chain
            f"A {TARGET}/new.jar  (m2)",
            f"C {TARGET}/seeded.jar  (m2)",
            f"D {TARGET}/old/a.jar  (m2)",
        ]
        assert "cache m2: generation 2" in cache("promote", "stopped")
        c.remove("stopped")  # promoted by hand already: its upper starts empty, nothing more
        assert sorted(os.listdir(d.root / "caches" / "m2")) == ["1", "2"]
        assert cache("diff", "stopped").splitlines() == [  # removed: the generation it became
            "A new.jar  (m2)",
            "C seeded.jar  (m2)",
            "D old/a.jar  (m2)",
        ]
        [g2] = [g for g in json.loads(cache("log", "m2", "--json")) if g["generation"] == 2]
        assert (g2["added"], g2["changed"], g2["deleted"], g2["bytes"]) == (1, 1, 1, len("new\nrewritten\n"))

        assert "squashed into generation 3" in cache("squash", "m2")
        assert "nothing to squash" in cache("squash", "m2")
        with mounted(job(c, "squashed"), tmp_path / "squashed") as m:
            assert (m / "seeded.jar").read_text() == "rewritten\n" and not (m / "old" / "a.jar").exists()
        assert "chain [3] -> []" in cache("rollback", "m2")
        with mounted(job(c, "empty"), tmp_path / "empty") as m:
            assert os.listdir(m) == []
        missing = CliRunner().invoke(admin, ["cache", "rollback", "m2", "7", *cli])
        assert missing.exit_code != 0
        assert "INVALID_ARGUMENT: generation 7 is not in the chain of cache 'm2': []" in missing.output
        unknown = CliRunner().invoke(admin, ["cache", "squash", "npm", *cli])
        assert unknown.exit_code != 0 and "NOT_FOUND: cache 'npm' is not configured" in unknown.output


@pytest.mark.parametrize("during", ["promotion", "squash"])
def test_a_kill_during_a_promotion_or_a_squash_leaves_a_consistent_cache(tmp_path: Path, during: str):
    """kill -9 while the daemon walks a big upper to promote it, or copies a chain out to squash
    it: the next daemon has a whole chain (from before or after), the job's writes are either a
    generation or still its own, and nothing half made is left."""
    args = cache_config(tmp_path)
    root, caches = tmp_path / "root", tmp_path / "root" / "caches" / "m2"
    d = Daemon(root=root, args=args).start()
    with d.channel() as ch:
        c = SnapshotsClient(ch)
        for n in (1, 2):
            with mounted(job(c, f"job{n}"), tmp_path / f"job{n}") as m:
                many_files(m / f"job{n}", 20_000)
            if during == "squash" or n == 1:
                c.remove(f"job{n}")
    cli = ["--root-dir", str(root), "--config", str(tmp_path / "config.toml")]
    if during == "squash":
        started = threading.Thread(
            target=CliRunner().invoke, args=(admin, ["cache", "squash", "m2", *cli]), daemon=True
        )
    else:
        started = threading.Thread(target=remove_quietly, args=(d, "job2"), daemon=True)
    started.start()
    if during == "squash":  # until it copies the chain out
        wait_for(lambda: any(e.startswith(".new-squash") for e in os.listdir(caches)), "the squash to start")
    else:  # while it walks the upper
        time.sleep(0.05)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    d = Daemon(root=root, args=args).start()
    try:
        with d.channel() as ch:
            c = SnapshotsClient(ch)
            assert all(e.isdigit() for e in os.listdir(caches)), os.listdir(caches)  # nothing half made
            try:
                c.stat("job2")
                promoted = False
            except grpc.RpcError:
                promoted = True
            with mounted(job(c, "after"), tmp_path / "after") as m:
                seen = sorted(os.listdir(m))
                assert seen == sorted(["job1", *(["job2"] if promoted else []), "old", "seeded.jar"])
                assert sum(len(os.listdir(m / "job1" / sub)) for sub in os.listdir(m / "job1")) == 20_000
            if not promoted:  # the Remove never committed: the job's writes are still its own
                c.remove("job2")
                with mounted(job(c, "last"), tmp_path / "last") as m:
                    assert sum(len(os.listdir(m / "job2" / sub)) for sub in os.listdir(m / "job2")) == 20_000
    finally:
        d.kill()


def remove_quietly(d: Daemon, key: str) -> None:
    """Remove `key` on a channel of its own; the daemon may be killed meanwhile."""
    with contextlib.suppress(grpc.RpcError), d.channel() as ch:
        SnapshotsClient(ch).remove(key)


def many_files(top: Path, n: int) -> None:
    """`n` small files under `top`, a thousand per dir."""
    for i in range(n):
        sub = top / f"d{i // 1000}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        (sub / f"f{i % 1000}").write_text("x")


def test_two_jobs_that_end_together_both_count_stacked_in_the_order_they_end(tmp_path: Path):
    with serving(tmp_path, cache_config(tmp_path)) as (d, c):
        for key in ("a", "b"):
            with mounted(job(c, key), tmp_path / key) as m:
                (m / f"{key}.jar").write_text(f"{key}\n")
                (m / "both.jar").write_text(f"{key}\n")
        ended = [threading.Thread(target=remove_quietly, args=(d, key)) for key in ("a", "b")]
        for t in ended:
            t.start()
        for t in ended:
            t.join()
        log = json.loads(
            CliRunner()
            .invoke(
                admin,
                ["cache", "log", "m2", "--json", "--root-dir", str(d.root), "--config", str(tmp_path / "config.toml")],
            )
            .output
        )
        order = [g["source"] for g in log[1:]]
        assert sorted(order) == ["a", "b"] and [g["state"] for g in log] == ["chain"] * 3
        with mounted(job(c, "next"), tmp_path / "next") as m:
            assert (m / "a.jar").exists() and (m / "b.jar").exists()
            assert (m / "both.jar").read_text() == f"{order[-1]}\n"  # the one that ended last is on top


def scoped_job(c: SnapshotsClient, key: str, scope: str | None) -> list[Any]:
    labels = {LOWERS: "m2", **({SCOPE: scope} if scope else {})}
    return at_target(c.prepare(key, labels=labels))


def run_scoped(c: SnapshotsClient, tmp_path: Path, key: str, scope: str | None, script: str) -> str:
    """A job with the cache (in `scope`): runs `script` in its view, then is removed; what it saw."""
    with mounted(scoped_job(c, key, scope), tmp_path / key) as m:
        seen = subprocess.run(["sh", "-c", f"ls; {script}"], cwd=m, check=True, capture_output=True, text=True)
    c.remove(key)
    return seen.stdout


def test_scopes_stack_on_the_default_chain_and_keep_their_writes_to_themselves(tmp_path: Path):
    args = cache_config(tmp_path, extra="scope_ttl = 1\nmax_scopes = 2\n")
    with serving(tmp_path, args) as (d, c):
        run_scoped(c, tmp_path, "main-1", None, "echo main > main.jar")
        assert run_scoped(c, tmp_path, "pr1-a", "pr-1", "echo one > pr1.jar; rm seeded.jar").split() == [
            "main.jar",
            "old",
            "seeded.jar",
        ]
        assert run_scoped(c, tmp_path, "pr2-a", "pr-2", "echo two > pr2.jar").split() == [
            "main.jar",
            "old",
            "seeded.jar",
        ]
        assert run_scoped(c, tmp_path, "pr1-b", "pr-1", "true").split() == ["main.jar", "old", "pr1.jar"]
        assert run_scoped(c, tmp_path, "main-2", None, "true").split() == ["main.jar", "old", "seeded.jar"]
        refused = expect_code(Code.RESOURCE_EXHAUSTED, c.prepare, "pr3", labels={LOWERS: "m2", SCOPE: "pr-3"})
        assert "cache 'm2' has 2 scopes, its max_scopes: scope 'pr-3' cannot be made" in refused.details()
        bad = expect_code(Code.INVALID_ARGUMENT, c.prepare, "bad", labels={LOWERS: "m2", SCOPE: "../main"})
        assert "scope '../main' is no scope name" in bad.details()

        cli = ["--root-dir", str(d.root), "--config", str(tmp_path / "config.toml")]
        shown = json.loads(CliRunner().invoke(admin, ["cache", "ls", "--json", *cli]).output)
        assert [(r["scope"], r["generations"]) for r in shown] == [("", 2), ("pr-1", 1), ("pr-2", 1)]
        rolled = CliRunner().invoke(admin, ["cache", "rollback", "m2", "--scope", "pr-2", *cli])
        assert rolled.exit_code == 0 and "cache m2 scope 'pr-2': chain [" in rolled.output, rolled.output
        assert run_scoped(c, tmp_path, "pr2-b", "pr-2", "true").split() == ["main.jar", "old", "seeded.jar"]

        scoped_job(c, "holder", "pr-1")  # a live container keeps pr-1 from expiring
        time.sleep(1.5)
        c.cleanup()  # pr-2 is past its scope_ttl, unused: it goes, and its generation with it
        shown = json.loads(CliRunner().invoke(admin, ["cache", "ls", "--json", *cli]).output)
        assert [(r["scope"], r["containers"]) for r in shown] == [("", 0), ("pr-1", 1)]
        log = json.loads(CliRunner().invoke(admin, ["cache", "log", "m2", "--json", *cli]).output)
        assert [g["state"] for g in log if g["source"] == "pr2-a"] == ["removed"]  # pr-2's generation went

        moved = CliRunner().invoke(admin, ["cache", "promote", "--to-default", "holder", *cli])
        assert moved.exit_code == 0 and "moved to the default chain" in moved.output, moved.output
        assert run_scoped(c, tmp_path, "main-3", None, "true").split() == ["main.jar", "old", "pr1.jar"]
    assert "a cache's scope expired" in d.log() and "scope=pr-2" in d.log()
