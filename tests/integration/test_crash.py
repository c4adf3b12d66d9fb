"""kill -9 at random instants of a prepare/commit/remove loop: the store must stay consistent.

After each kill the daemon restarts on the same root. Then: every acknowledged commit is still
there, every snapshot in the metadata has its directories, and after Cleanup the directories
under snapshots/ are exactly the live snapshots.

Then restarts between the kills (SIGTERM, no Cleanup): the disk as a create killed between its
dir's rename and its COMMIT leaves it, built by hand (its id must never be handed out again, and
the daemon must come back); and a kill loop over every operation, pins of extra lowers included.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, TypeVar

import grpc
import pytest

from addlower.core.labels import EXTRA_LOWERS_LABEL as LOWERS
from addlower.core.model import Kind
from addlower.dev.devcontainerd import unmount_under
from addlower.engine import fsutil
from addlower.ops.client import SnapshotsClient
from tests.support.daemon import Daemon, allowing

ROUNDS = 12

T = TypeVar("T")


def workload(client: SnapshotsClient, acked: set[str], stop: threading.Event, seed: int) -> None:
    """Chains of prepare -> write -> commit, with removals; records what was acknowledged."""
    rng = random.Random(seed)
    parent = ""
    n = 0
    while not stop.is_set():
        n += 1
        key, name = f"s{seed}-{n}-active", f"s{seed}-{n}"
        try:
            client.prepare(key, parent)
            if rng.random() < 0.2:
                client.remove(key)
                continue
            client.commit(name, key)
            acked.add(name)
            parent = name
            if rng.random() < 0.3:
                acked.discard(parent)  # from here on it may or may not exist
                client.remove(parent)
                parent = ""
        except grpc.RpcError:
            return  # the daemon died under us


def check_consistent(root: Path, acked: set[str]) -> None:
    db = sqlite3.connect(f"file:{root / 'metadata.db'}?mode=ro", uri=True)
    rows = db.execute("SELECT id, key, kind, parent_id FROM snapshots").fetchall()
    db.close()
    ids = {r[0] for r in rows}
    keys = {r[1] for r in rows}
    assert acked <= keys, f"acknowledged commits lost: {sorted(acked - keys)}"
    for sid, key, kind, parent_id in rows:
        d = root / "snapshots" / str(sid)
        assert (d / "fs").is_dir(), f"snapshot {key} (id {sid}) has no fs directory"
        if kind == Kind.ACTIVE:  # committed ones keep theirs, as in containerd
            assert (d / "work").is_dir(), f"active snapshot {key} has no work dir"
        assert parent_id is None or parent_id in ids, f"{key} points at missing parent {parent_id}"


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_kill_9_at_random_points_leaves_a_consistent_store(tmp_path: Path, mode: str):
    root = tmp_path / "root"
    args = [] if mode == "async" else ["--async-remove=false"]
    rng = random.Random(1234)
    acked: set[str] = set()
    for round_ in range(ROUNDS):
        d = Daemon(root=root, args=args).start()
        stop = threading.Event()
        with d.channel() as ch:
            client = SnapshotsClient(ch)
            workers = [threading.Thread(target=workload, args=(client, acked, stop, round_ * 10 + w)) for w in range(2)]
            for w in workers:
                w.start()
            time.sleep(rng.uniform(0.05, 0.4))
            d.kill()
            stop.set()
            for w in workers:
                w.join(timeout=30)
        d = Daemon(root=root, args=args).start()
        try:
            check_consistent(root, acked)
            with d.channel() as ch:
                client = SnapshotsClient(ch)
                listed = {i.name for i in client.list()}
                assert acked <= listed
                client.cleanup()
            db = sqlite3.connect(f"file:{root / 'metadata.db'}?mode=ro", uri=True)
            live = {str(r[0]) for r in db.execute("SELECT id FROM snapshots")}
            db.close()
            assert set(os.listdir(root / "snapshots")) == live
        finally:
            d.stop()
    assert acked, "the workload never got a commit acknowledged"


# --- restarts between kills: the id a killed create had taken, and every operation ------------

MODES = {"async": [], "sync": ["--async-remove=false"]}


@pytest.fixture
def reaper(tmp_path: Path):
    """The daemons a test starts (append before starting): all killed at the end, pass or fail,
    and whatever is still mounted under tmp_path (pins outlive a daemon) unmounted."""
    daemons: list[Daemon] = []
    yield daemons
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
    unmount_under(tmp_path)


def hard_kill(d: Daemon) -> None:
    """kill -9 and nothing else: unlike Daemon.kill, its pins stay mounted, as on a real node."""
    assert d.proc is not None
    d.proc.kill()
    d.proc.wait()


def term(d: Daemon) -> int:
    """SIGTERM and wait; unlike Daemon.stop, nothing is unmounted afterwards."""
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    try:
        return d.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        d.proc.wait()
        return -9


def read_db(root: Path) -> tuple[dict[str, tuple[int, Kind, str, dict]], int]:
    """The store as it is on disk, opened read-only: key -> (id, kind, parent key, labels), and
    the last id handed out (sqlite_sequence)."""
    db = sqlite3.connect(f"file:{root / 'metadata.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT s.id, s.key, s.kind, p.key, s.labels FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"
        ).fetchall()
        seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'snapshots'").fetchone()
    finally:
        db.close()
    return {key: (sid, Kind(kind), parent or "", json.loads(labels)) for sid, key, kind, parent, labels in rows}, (
        seq[0] if seq else 0
    )


def live_ids(root: Path) -> set[int]:
    return {row[0] for row in read_db(root)[0].values()}


def pin_problems(root: Path, live: set[int]) -> list[str]:
    """Records under <root>/lowers of no live snapshot, records naming no pin, pins (and bind
    mounts, in /proc/self/mountinfo: the daemon shares our mount namespace) that no record names,
    and pins not read-only."""
    lowers, shared = root / "lowers", root / "lowers" / "pins"
    problems, named = [], set()
    for e in os.listdir(lowers) if lowers.is_dir() else []:
        if e == "pins":
            continue
        if not (e.isdigit() and int(e) in live):
            problems.append(f"records lowers/{e} belong to no live snapshot")
            continue
        for record in os.listdir(lowers / e):
            pin = os.readlink(lowers / e / record)
            named.add(pin)
            if not (shared / pin).is_dir():
                problems.append(f"record lowers/{e}/{record} names {pin}, which is not there")
    pins = set(os.listdir(shared)) if shared.is_dir() else set()
    problems += [f"pin {p} is named by no record: leaked" for p in sorted(pins - named)]
    writable = [p for p in sorted(pins & named) if not os.statvfs(shared / p).f_flag & os.ST_RDONLY]
    problems += [f"pin {p} is writable" for p in writable]
    prefix = f"{shared}/"
    for m in fsutil.mount_points():
        if m.startswith(f"{lowers}/") and not (m.startswith(prefix) and m[len(prefix) :] in named):
            problems.append(f"bind mount {m} is left, and no snapshot uses it")
    return problems


def start_failure(d: Daemon) -> str | None:
    """Start `d`; None once it serves, else why not (it exited: its code and log)."""
    try:
        d.start()
        return None
    except (RuntimeError, TimeoutError) as exc:
        return str(exc)


def log_tail(d: Daemon, lines: int = 40) -> str:
    return "\n".join(d.log().splitlines()[-lines:])


@pytest.mark.parametrize(
    "mode, order", [("async", "restart-first"), ("sync", "restart-first"), ("sync", "remove-first")]
)
def test_restart_after_a_create_killed_between_rename_and_commit_keeps_serving(
    tmp_path: Path, mode: str, order: str, reaper: list[Daemon]
):
    """The disk exactly as a kill -9 between a create's rename to snapshots/<id> and its COMMIT
    leaves it: the dir of the id after the last one, with no row. Start-up sets it aside; a later
    create must not get that id again: a restart before any Cleanup must come back serving with
    the new snapshot and its files untouched, and (sync) its Remove, which renames its dir to
    rm-<id>, must succeed, before a restart or after."""
    root = tmp_path / "root"
    where = f"[{mode}, {order}]"

    def start(what: str) -> Daemon:
        d = Daemon(root=root, args=MODES[mode])
        reaper.append(d)
        failure = start_failure(d)
        if failure:
            pytest.fail(
                f"{where} the daemon did not come back {what} (snapshots/ holds "
                f"{sorted(os.listdir(root / 'snapshots'))}):\n{failure}"
            )
        return d

    d = start("at first")
    with d.channel() as ch:
        client = SnapshotsClient(ch)
        client.prepare("l1-active")
        client.commit("l1", "l1-active")
        client.prepare("l2-active", "l1")
        client.commit("l2", "l2-active")
        client.prepare("kept-active", "l2")
    assert term(d) == 0
    before, last = read_db(root)
    assert last == max(row[0] for row in before.values()) == 3

    # What the killed create left: snapshots/<last + 1> with fs and work, and no row.
    unrecorded = last + 1
    orphan = root / "snapshots" / str(unrecorded)
    (orphan / "fs").mkdir(parents=True)
    (orphan / "work").mkdir()
    (orphan / "fs" / "from-the-killed-create").write_text("half made\n")

    d = start("with the unrecorded dir")  # sets it aside
    with d.channel() as ch:
        client = SnapshotsClient(ch)
        client.prepare("new-active", "l2")
        new_id = read_db(root)[0]["new-active"][0]
        upper = root / "snapshots" / str(new_id) / "fs"
        (upper / "written").write_text("mine\n")
        if order == "remove-first":
            remove_and_clean_up(client, root, before, where)
    assert term(d) == 0  # no Cleanup (restart-first): whatever was set aside is still there

    d = start(f"after a create got id {new_id} (the unrecorded dir's was {unrecorded})")
    assert new_id != unrecorded, f"{where} the id of the unrecorded dir was handed out again"
    with d.channel() as ch:
        client = SnapshotsClient(ch)
        for key in ("l1", "l2", "kept-active"):
            client.stat(key)
        if order == "restart-first":
            info = client.stat("new-active")
            assert info.kind == Kind.ACTIVE and info.parent == "l2"
            assert (upper / "written").read_text() == "mine\n"
            assert not (upper / "from-the-killed-create").exists()
            remove_and_clean_up(client, root, before, where)
    assert term(d) == 0
    d = start("once more, with nothing set aside")
    with d.channel() as ch:
        assert {i.name for i in SnapshotsClient(ch).list()} == {"l1", "l2", "kept-active"}
    assert term(d) == 0


def remove_and_clean_up(client: SnapshotsClient, root: Path, before: dict, where: str) -> None:
    """Remove new-active (sync: its dir goes to rm-<id> first), then Cleanup: snapshots/ is
    exactly the snapshots there were before it."""
    try:
        client.remove("new-active")
    except grpc.RpcError as exc:
        pytest.fail(
            f"{where} Remove of the snapshot made after the set-aside dir failed: {exc.code()} "
            f"{exc.details()} (snapshots/ holds {sorted(os.listdir(root / 'snapshots'))})"
        )
    with pytest.raises(grpc.RpcError) as gone:
        client.stat("new-active")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    client.cleanup()
    live = {str(i) for i in live_ids(root)}
    assert set(os.listdir(root / "snapshots")) == live == {str(row[0]) for row in before.values()}, where


# --- kill -9 over every operation, with plain restarts between the kills -----------------------

KILL_ROUNDS = 24  # per mode
WORKERS = 3
CLEANUP_CHANCE = 0.3  # of a Cleanup (and its checks) at the start of a round: set-aside dirs often outlive restarts
RESTART_CHANCE = 0.5  # of plain restarts (SIGTERM, no Cleanup) after a kill
Code = grpc.StatusCode


class Killed(Exception):
    """The daemon was killed under a call: the worker is done."""


@dataclass
class Snap:
    kind: Kind
    parent: str
    labels: dict[str, str]


class Model:
    """What the daemon acknowledged: key -> its snapshot, or None once its removal (or, for an
    active's key, its commit) was acknowledged. A key with a call in flight when the daemon was
    killed is unsure until the next start reads what the store says. Keys are never reused."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.known: dict[str, Snap | None] = {}
        self.unsure: set[str] = set()
        self.commits_in_flight: set[tuple[str, str]] = set()  # (key, name)

    def owned(self, owner: str) -> list[tuple[str, Snap]]:
        with self.lock:
            return [
                (k, s)
                for k, s in self.known.items()
                if s is not None and k not in self.unsure and k.split(".")[0] == owner
            ]

    def committed(self) -> list[str]:
        with self.lock:
            return [k for k, s in self.known.items() if s is not None and s.kind == Kind.COMMITTED]

    def acked_commits(self) -> set[str]:
        with self.lock:
            return {
                k for k, s in self.known.items() if s is not None and s.kind == Kind.COMMITTED and k not in self.unsure
            }

    def reconcile(self, rows: dict[str, tuple[int, Kind, str, dict]]) -> list[str]:
        """What the store holds against what was acknowledged; then the unsure keys take what the
        store says. Returns the differences."""
        problems = []
        with self.lock:
            for key, snap in self.known.items():
                if key in self.unsure:
                    continue
                row = rows.get(key)
                if snap is None and row is not None:
                    problems.append(f"{key}: its removal (or commit) was acknowledged, yet it is there: {row}")
                elif snap is not None and row is None:
                    problems.append(f"{key}: acknowledged {snap.kind.label} snapshot is gone")
                elif (
                    snap is not None
                    and row is not None
                    and (row[1], row[2], row[3]) != (snap.kind, snap.parent, snap.labels)
                ):
                    problems.append(
                        f"{key}: acknowledged as {snap.kind.label} on {snap.parent!r} with "
                        f"{snap.labels}, the store says {row[1].label} on {row[2]!r} with {row[3]}"
                    )
            problems += [f"{key}: in the store, never asked for" for key in rows if key not in self.known]
            problems += [
                f"commit of {key} as {name} killed: neither is in the store"
                for key, name in self.commits_in_flight
                if key not in rows and name not in rows
            ]
            for key in self.unsure:
                row = rows.get(key)
                self.known[key] = None if row is None else Snap(row[1], row[2], row[3])
            self.unsure.clear()
            self.commits_in_flight.clear()
        return problems


class Workload:
    """One client's calls, as `owner`: it creates keys <owner>.<tag>.<n> and alone calls
    Commit, Remove, Update, Mounts and Usage on keys of its owner; Prepare and View may take
    anyone's committed snapshot as parent (which its owner may remove meanwhile: NOT_FOUND)."""

    OPS = ("prepare", "view", "commit", "remove", "update", "mounts", "usage", "cleanup")

    def __init__(
        self,
        client: SnapshotsClient,
        model: Model,
        host: list[Path],
        made: Path,
        killed: threading.Event,
        counts: Counter,
        problems: list[str],
        owner: str,
        tag: str,
        rng: random.Random,
    ):
        self.client, self.model, self.host, self.made = client, model, host, made
        self.killed, self.counts, self.problems = killed, counts, problems
        self.owner, self.tag, self.rng, self.n = owner, tag, rng, 0
        # Cleanup in some rounds only: it would take what start-up set aside before a restart
        # could trip over it.
        self.cleanups = rng.choice((0, 0, 3))

    def run(self) -> None:
        try:
            while not self.killed.is_set():
                self.step()
        except Killed:
            pass
        except Exception as exc:  # a bug of the test: say so rather than hang or pass
            with self.model.lock:
                self.problems.append(f"worker {self.owner}/{self.tag} crashed: {exc!r}")

    def step(self, ops: tuple[str, ...] = OPS) -> None:
        mine = self.model.owned(self.owner)
        weights = {
            "prepare": 20,
            "view": 8,
            "commit": 14,
            "remove": 8 + 4 * max(0, len(mine) - 8),
            "update": 10,
            "mounts": 20,
            "usage": 8,
            "cleanup": self.cleanups,
        }
        getattr(self, rng_pick(self.rng, {op: weights[op] for op in ops}))(mine)

    def _lowers_value(self) -> str:
        picks = self.rng.sample(self.host, self.rng.randint(1, 2))
        if self.rng.random() < 0.1:  # a dir the daemon makes under the allowed root
            picks.append(self.made / f"{self.owner}-{self.tag}-{self.n}")
        return ":".join(map(str, picks))

    def _call(
        self,
        op: str,
        touched: dict[str, Snap | None],
        call: Callable[[], T],
        tolerated: tuple[grpc.StatusCode, ...] = (),
        commit: tuple[str, str] | None = None,
    ) -> T | None:
        with self.model.lock:
            for key in touched:
                self.model.known.setdefault(key, None)  # a new key: none until acknowledged
            self.model.unsure.update(touched)
            if commit:
                self.model.commits_in_flight.add(commit)
        try:
            result = call()
        except grpc.RpcError as exc:
            if self.killed.is_set():  # in flight at the kill: its keys stay unsure
                raise Killed from None
            with self.model.lock:  # answered: nothing changed
                self.model.unsure.difference_update(touched)
                self.model.commits_in_flight.discard(commit)
                self.counts[f"{op} answered {exc.code().name}"] += 1
                if exc.code() not in tolerated:
                    self.problems.append(
                        f"{op} {sorted(touched) or ''} by {self.owner}: {exc.code().name} {exc.details()}"
                    )
            return None
        with self.model.lock:
            self.model.known.update(touched)
            self.model.unsure.difference_update(touched)
            self.model.commits_in_flight.discard(commit)
            self.counts[op] += 1
        return result

    def _new_key(self) -> str:
        self.n += 1
        return f"{self.owner}.{self.tag}.{self.n}"

    def _create(self, kind: Kind) -> None:
        key = self._new_key()
        committed = self.model.committed()
        with_parent = committed and self.rng.random() < (0.6 if kind == Kind.ACTIVE else 0.8)
        parent = self.rng.choice(committed) if with_parent else ""
        labels = {LOWERS: self._lowers_value()} if self.rng.random() < 0.5 else {}
        if self.rng.random() < 0.3:
            labels["u"] = "0"
        call = self.client.prepare if kind == Kind.ACTIVE else self.client.view
        self._call(
            kind.label if kind == Kind.VIEW else "prepare",
            {key: Snap(kind, parent, labels)},
            lambda: call(key, parent, labels),
            (Code.NOT_FOUND,) if parent else (),
        )

    def prepare(self, mine: list[tuple[str, Snap]]) -> None:
        self._create(Kind.ACTIVE)

    def view(self, mine: list[tuple[str, Snap]]) -> None:
        self._create(Kind.VIEW)

    def commit(self, mine: list[tuple[str, Snap]]) -> None:
        actives = [(k, s) for k, s in mine if s.kind == Kind.ACTIVE]
        if not actives:
            return self.prepare(mine)
        key, snap = self.rng.choice(actives)
        name, labels = f"{key}c", ({"c": "1"} if self.rng.random() < 0.5 else {})
        self._call(
            "commit",
            {key: None, name: Snap(Kind.COMMITTED, snap.parent, labels)},
            lambda: self.client.commit(name, key, labels),
            commit=(key, name),
        )

    def remove(self, mine: list[tuple[str, Snap]]) -> None:
        if not mine:
            return self.prepare(mine)
        key, _ = self.rng.choice(mine)
        self._call("remove", {key: None}, lambda: self.client.remove(key), (Code.FAILED_PRECONDITION,))

    def update(self, mine: list[tuple[str, Snap]]) -> None:
        if not mine:
            return self.prepare(mine)
        key, snap = self.rng.choice(mine)
        label = LOWERS if snap.kind != Kind.COMMITTED and self.rng.random() < 0.5 else "u"
        value = (self._lowers_value() if label == LOWERS else str(self.n)) if self.rng.random() < 0.7 else None
        labels = dict(snap.labels)
        labels.pop(label, None)
        if value is not None:
            labels[label] = value
        sent = {label: value} if value is not None else {}
        self._call(
            "update",
            {key: Snap(snap.kind, snap.parent, labels)},
            lambda: self.client.update(key, sent, [f"labels.{label}"]),
        )

    def mounts(self, mine: list[tuple[str, Snap]]) -> None:
        mountable = [(k, s) for k, s in mine if s.kind != Kind.COMMITTED]
        pinned = [(k, s) for k, s in mountable if s.labels.get(LOWERS)]
        if not mountable:
            return self.prepare(mine)
        key, snap = self.rng.choice(pinned if pinned and self.rng.random() < 0.7 else mountable)
        mounts = self._call("mounts", {}, lambda: self.client.mounts(key))
        if (
            mounts is not None
            and snap.labels.get(LOWERS)
            and not any("/lowers/" in o for m in mounts for o in m.options)
        ):
            with self.model.lock:
                self.problems.append(f"mounts of {key} (lowers {snap.labels[LOWERS]}) have no pin: {mounts}")

    def usage(self, mine: list[tuple[str, Snap]]) -> None:
        if not mine:
            return self.prepare(mine)
        key, _ = self.rng.choice(mine)
        self._call("usage", {}, lambda: self.client.usage(key))

    def cleanup(self, mine: list[tuple[str, Snap]]) -> None:
        self._call("cleanup", {}, self.client.cleanup)


class Where(TypedDict):
    """Where the kill loop is, for its failure messages."""

    round: int
    phase: str


def rng_pick(rng: random.Random, weights: dict[str, int]) -> str:
    names = list(weights)
    return rng.choices(names, [weights[n] for n in names])[0]


@pytest.mark.parametrize("mode", MODES)
def test_kill_9_over_every_operation_with_restarts_between_the_kills(tmp_path: Path, mode: str, reaper: list[Daemon]):
    """Three clients call every operation (Prepare with and without a parent, View, Commit,
    Remove, Update, Mounts that pin extra lowers, Usage, Cleanup) until a kill -9 at a random
    instant; between the kills, sometimes plain restarts (SIGTERM, no Cleanup), some after a few
    creates. After every start the daemon serves and the store holds what was acknowledged; at
    each Cleanup, snapshots/ is exactly the live snapshots and no pin is left of one that is gone.
    ADDLOWER_KILL_SEED=<n> replays another seed."""
    seed = int(os.environ.get("ADDLOWER_KILL_SEED") or 0) or {"async": 90210, "sync": 90211}[mode]
    rng = random.Random(seed)
    root = tmp_path / "root"
    allowed = tmp_path / "host"
    host = []
    for i in range(4):
        (allowed / f"cache{i}").mkdir(parents=True)
        (allowed / f"cache{i}" / f"file{i}").write_text(f"{i}\n")
        host.append(allowed / f"cache{i}")
    args = [*MODES[mode], *allowing(tmp_path / "config.toml", allowed)]
    model = Model()
    counts: Counter[str] = Counter()
    problems: list[str] = []
    at: Where = {"round": 0, "phase": "first start"}
    set_aside: set[int] = set()  # ids of the snapshot dirs start-up set aside: never to be live

    def where() -> str:
        return (
            f"seed={seed} mode={mode} round={at['round']}/{KILL_ROUNDS} ({at['phase']}); "
            f"kills={counts['kills']} restarts={counts['restarts']} counts={dict(sorted(counts.items()))}"
        )

    def start(phase: str) -> Daemon:
        at["phase"] = phase
        d = Daemon(root=root, args=args)
        reaper.append(d)
        offset = d.log_path.stat().st_size if d.log_path.exists() else 0
        failure = start_failure(d)
        if failure:
            pytest.fail(
                f"{where()}: the daemon did not come back (snapshots/ holds "
                f"{sorted(os.listdir(root / 'snapshots'))}):\n{failure}"
            )
        counts["starts"] += 1
        with open(d.log_path, "rb") as f:
            f.seek(offset)
            started = f.read().decode(errors="replace")
        counts["dirs set aside at start"] += started.count("set aside unrecorded snapshot directory")
        counts["dirs restored at start"] += started.count("restored directory")
        counts["pins released at start"] += started.count("released the pinned lowers")
        counts["ids reserved at start"] += started.count("are taken by directories on disk")
        set_aside.update(int(i) for i in re.findall(r"set aside unrecorded snapshot directory rm-(\d+)\b", started))
        with d.channel() as ch:
            listed = {i.name for i in SnapshotsClient(ch).list()}
        rows, _ = read_db(root)
        assert listed == set(rows), f"{where()}: List and the store differ: {sorted(listed ^ set(rows))}"
        found = model.reconcile(rows)
        assert not found, f"{where()}: the store is not what was acknowledged:\n" + "\n".join(found[:20])
        try:
            check_consistent(root, model.acked_commits())
        except AssertionError as exc:
            raise AssertionError(f"{where()}: {exc}\n{log_tail(d)}") from None
        reused = set_aside & {row[0] for row in rows.values()}
        assert not reused, f"{where()}: ids {sorted(reused)} of dirs set aside at a start were handed out again"
        pins = pin_problems(root, {row[0] for row in rows.values()})  # start-up releases those of the gone
        assert not pins, f"{where()}: " + "\n".join(pins) + f"\n{log_tail(d)}"
        return d

    def clean_up(client: SnapshotsClient, d: Daemon) -> None:
        at["phase"] += ", Cleanup"
        client.cleanup()
        counts["cleanups checked"] += 1
        rows, _ = read_db(root)
        live = {row[0] for row in rows.values()}
        entries = set(os.listdir(root / "snapshots"))
        assert entries == {str(i) for i in live}, (
            f"{where()}: after Cleanup, snapshots/ holds {sorted(entries - {str(i) for i in live})} of no "
            f"live snapshot and lacks {sorted({str(i) for i in live} - entries)}\n{log_tail(d)}"
        )
        pins = pin_problems(root, live)
        assert not pins, f"{where()}: after Cleanup: " + "\n".join(pins) + f"\n{log_tail(d)}"
        committed = {row[0] for row in rows.values() if row[1] == Kind.COMMITTED}
        kept = sorted(int(e) for e in os.listdir(root / "lowers") if e.isdigit() and int(e) in committed)
        assert not kept, f"{where()}: after Cleanup, committed snapshots {kept} keep their pins\n{log_tail(d)}"

    def workload(client: SnapshotsClient, killed: threading.Event, owner: str, tag: str) -> Workload:
        return Workload(
            client, model, host, allowed / "made", killed, counts, problems, owner, tag, random.Random(rng.random())
        )

    t0 = time.monotonic()
    for round_ in range(KILL_ROUNDS):
        at["round"] = round_
        d = start("start after a kill" if round_ else "first start")
        with d.channel() as ch:
            client = SnapshotsClient(ch)
            if round_ and rng.random() < CLEANUP_CHANCE:
                clean_up(client, d)
            at["phase"] = "workload"
            killed = threading.Event()
            workers = [
                threading.Thread(target=workload(client, killed, f"w{w}", f"r{round_}").run, daemon=True)
                for w in range(WORKERS)
            ]
            assert d.proc is not None
            try:
                for w in workers:
                    w.start()
                time.sleep(rng.uniform(0.05, 0.5))
                exited = d.proc.poll()
            finally:  # whatever happens, the workers stop
                killed.set()
                hard_kill(d)
                for w in workers:
                    w.join(timeout=30)
            if exited is not None:
                pytest.fail(f"{where()}: the daemon exited {exited} under the workload\n{log_tail(d)}")
            counts["kills"] += 1
            assert not any(w.is_alive() for w in workers), f"{where()}: a worker hangs after the kill"
        assert not problems, f"{where()}: unexpected answers:\n" + "\n".join(problems[:20]) + f"\n{log_tail(d)}"
        if rng.random() < RESTART_CHANCE:
            for k in range(rng.randint(1, 3)):
                d = start(f"plain restart {k + 1}")
                if rng.random() < 0.6:  # a few creates: they take the next ids
                    with d.channel() as ch:
                        creator = workload(
                            SnapshotsClient(ch), threading.Event(), f"w{rng.randrange(WORKERS)}", f"x{round_}.{k}"
                        )
                        for _ in range(rng.randint(1, 4)):
                            creator.step(("prepare", "prepare", "view", "mounts", "commit"))
                    assert not problems, f"{where()}: unexpected answers:\n" + "\n".join(problems[:20])
                code = term(d)
                assert code == 0, f"{where()}: SIGTERM: exit code {code}\n{log_tail(d)}"
                counts["restarts"] += 1
    at["round"] = KILL_ROUNDS
    d = start("final start")
    with d.channel() as ch:
        clean_up(SnapshotsClient(ch), d)
    assert term(d) == 0
    acked = model.acked_commits()
    log = d.log()
    counts["cleanup errors logged"] = log.count("cleanup could not remove")
    counts["error lines logged"] = log.count("level=error")
    print(
        f"\nkill loop [{mode}] seed={seed}: {KILL_ROUNDS} rounds in {time.monotonic() - t0:.1f}s, "
        f"kills={counts['kills']} restarts={counts['restarts']} starts={counts['starts']}, "
        f"{len(acked)} commits kept; counts: {dict(sorted(counts.items()))}"
    )
    assert acked and counts["mounts"] and counts["remove"], f"{where()}: the workload did too little"
    assert counts["cleanup errors logged"] == 0, f"{where()}: a Cleanup logged a false error\n{log_tail(d)}"
