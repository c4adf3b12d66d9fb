"""Prometheus metrics: what the daemon counts, and the HTTP endpoint that serves them.

Per-call figures (durations by method, answers by method and code) are plain integers that the
event loop's thread keeps (it completes every call, inline or from a pool) and the scrape copies:
no lock, label lookup or metric object per call, since CRI stats every snapshot every 10 s. The
lowers' counters are plain too (under a lock: pools count them), and the store is read when
scraped (snapshots by kind, containers per lower, the metadata size). prometheus_client (3-4 MiB
with the http.server it brings) is loaded only to serve, which is off unless metrics_address is
given. Must not change any behaviour it observes; must not import the server.
"""

from __future__ import annotations

import os
import platform
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from addlower import __version__
from addlower.core.codes import Code

DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Answers that mean a call failed. The others are answers a client acts on (a Stat's NOT_FOUND
# tells containerd a snapshot is not there, an unpack race gets ALREADY_EXISTS, a refusal
# INVALID_ARGUMENT): addlower_rpc_handled_total counts those, addlower_rpc_errors_total does not.
FAILURES = frozenset(
    {Code.UNKNOWN, Code.INTERNAL, Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED, Code.UNIMPLEMENTED}
)

LOWER_SOURCES = ("label", "annotation")  # where extra lowers come from
MAX_LOWER_SERIES = 1000  # lowers with a series of their own; the rest are summed under OTHER_LOWERS
OTHER_LOWERS = "(other)"


class Tally:
    """A counter by one or more labels, with a sample for each expected value from the start (so
    rate() and alerts see the first event)."""

    def __init__(self, name: str, help_text: str, label: str | tuple[str, ...], expected: Iterable[Any] = ()):
        self.name, self.help = name, help_text
        self.labels = (label,) if isinstance(label, str) else label
        self._counts = {(v,) if isinstance(v, str) else tuple(v): 0 for v in expected}
        self._lock = threading.Lock()

    def expect(self, values: Iterable[tuple[str, ...]]) -> None:
        """Give each of `values` its series at 0, if it has none yet (e.g. the caches configured)."""
        with self._lock:
            for v in values:
                self._counts.setdefault(tuple(v), 0)

    def inc(self, *values: str) -> None:
        with self._lock:
            self._counts[values] = self._counts.get(values, 0) + 1

    def family(self, core: Any) -> Any:
        with self._lock:
            counts = dict(self._counts)
        family = core.CounterMetricFamily(self.name, self.help, labels=list(self.labels))
        for values, n in sorted(counts.items()):
            family.add_metric(list(values), n)
        return family


class Seconds:
    """How long something took, by one label: a count and a sum (a Prometheus summary)."""

    def __init__(self, name: str, help_text: str, label: str):
        self.name, self.help, self.label = name, help_text, label
        self._seen: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def observe(self, value: str, seconds: float) -> None:
        with self._lock:
            count, total = self._seen.get(value, (0, 0.0))
            self._seen[value] = (count + 1, total + seconds)

    def family(self, core: Any) -> Any:
        with self._lock:
            seen = dict(self._seen)
        family = core.SummaryMetricFamily(self.name, self.help, labels=[self.label])
        for value, (count, total) in sorted(seen.items()):
            family.add_metric([value], count_value=count, sum_value=total)
        return family


LOWERS_RESOLVED = Tally(
    "addlower_extra_lowers_resolved",
    "Containers (active snapshots) and views that got "
    "extra lower dirs, by where they came from: a label, or a pod's annotation.",
    "source",
    LOWER_SOURCES,
)
LOWERS_REFUSED = Tally(
    "addlower_extra_lowers_refused",
    "Extra lower dirs refused by the policy, by where they came from.",
    "source",
    LOWER_SOURCES,
)
CONFIG_RELOADS = Tally(
    "addlower_config_reloads",
    "Config file reloads (SIGHUP), by result: a failed one keeps the running config.",
    "result",
    ("success", "failure"),
)
LOWERS_CREATED = Tally(
    "addlower_extra_lowers_created",
    "Missing extra lower dirs made, empty: under an allowed "
    "root (entry=path) or for a named lower with create = true (entry=named).",
    "entry",
    ("path", "named"),
)
CACHE_PROMOTIONS = Tally(
    "addlower_cache_promotions",
    "Jobs' writes to managed caches at their Remove, by cache and result: promoted (a new "
    "generation), empty (nothing written), refused (logged with the reason), failed (the job's "
    "exit status was not 0), unseen (promote = on-success, and its exit was not seen) or denied "
    "(its pod's namespace is not in promote_namespaces).",
    ("cache", "result"),
)
CACHE_SQUASHES = Tally(
    "addlower_cache_squashes",
    "Squashes of managed caches' chains, by cache and result (squashed, or failed: logged).",
    ("cache", "result"),
)
PROMOTION_RESULTS = ("promoted", "empty", "refused", "failed", "unseen", "denied")
SQUASH_RESULTS = ("squashed", "failed")


def expect_caches(names: Iterable[str]) -> None:
    """Every series of the caches `names` at 0, from the start (and after a reload adds one)."""
    names = tuple(names)
    CACHE_PROMOTIONS.expect((n, r) for n in names for r in PROMOTION_RESULTS)
    CACHE_SQUASHES.expect((n, r) for n in names for r in SQUASH_RESULTS)


CACHE_SQUASH_SECONDS = Seconds(
    "addlower_cache_squash_seconds", "Time to squash a managed cache's chain into one generation.", "cache"
)
TALLIES = (LOWERS_RESOLVED, LOWERS_REFUSED, LOWERS_CREATED, CONFIG_RELOADS, CACHE_PROMOTIONS, CACHE_SQUASHES)


class CallStats:
    """Durations and answers of the Snapshots API calls, by method (and code)."""

    def __init__(self, methods: Iterable[str]):
        self._buckets = {m: [0] * (len(DURATION_BUCKETS) + 1) for m in methods}
        self._sums = dict.fromkeys(self._buckets, 0.0)
        self._handled: dict[tuple[str, Code], int] = {}

    def observe(self, method: str, seconds: float, code: Code) -> None:
        """One answered call; from the event loop's thread only."""
        self._buckets[method][bisect_left(DURATION_BUCKETS, seconds)] += 1
        self._sums[method] += seconds
        key = (method, code)
        self._handled[key] = self._handled.get(key, 0) + 1

    def collect(self) -> Iterator[Any]:
        from prometheus_client import core

        durations = core.HistogramMetricFamily(
            "addlower_rpc_duration_seconds", "Time to answer a Snapshots API call, by method.", labels=["method"]
        )
        for method, counts in sorted(self._buckets.items()):
            counts = list(counts)  # copies are atomic under the GIL; the loop goes on counting
            cumulative, buckets = 0, []
            for bound, n in zip((*map(str, DURATION_BUCKETS), "+Inf"), counts, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            durations.add_metric([method], buckets, sum_value=self._sums[method])
        yield durations
        handled = core.CounterMetricFamily(
            "addlower_rpc_handled", "Snapshots API calls answered, by method and gRPC code.", labels=["method", "code"]
        )
        errors = core.CounterMetricFamily(
            "addlower_rpc_errors",
            "Snapshots API calls that failed (codes "
            f"{', '.join(sorted(c.name for c in FAILURES))}), by method and code.",
            labels=["method", "code"],
        )
        seen = dict(self._handled)
        for method in self._buckets:  # every series from the start: a rate() reads 0, not nothing
            seen.setdefault((method, Code.OK), 0)
            for code in FAILURES:
                seen.setdefault((method, code), 0)
        for (method, code), n in sorted(seen.items(), key=lambda item: (item[0][0], item[0][1].name)):
            handled.add_metric([method, code.name], n)
            if code in FAILURES:
                errors.add_metric([method, code.name], n)
        yield handled
        yield errors


@dataclass(frozen=True)
class StoreView:
    """What the store tells at scrape time."""

    counts: Callable[[], dict[str, int]]  # snapshots by kind
    lowers: Callable[[], list[str]]  # the extra lowers label of each active snapshot that has one
    db: Path
    root: Path  # the snapshotter's root: its filesystem's free room
    host_mounts: Callable[[], tuple[int, int]]  # pins and target mounts of extra lowers, and their budget
    # (cache, scope, generations, bytes, containers, hits) of each chain
    caches: Callable[[], list[tuple[str, str, int, int, int, int]]] = list
    committed: Callable[[], tuple[int, int]] = lambda: (0, 0)  # committed snapshots' bytes, inodes


def lower_users(values: Iterable[str]) -> dict[str, int]:
    """Active snapshots per lower entry (as written in the label), the most used first; past
    MAX_LOWER_SERIES entries summed under OTHER_LOWERS, since labels are a client's to choose."""
    tally = Counter(entry for value in values for entry in dict.fromkeys(e for e in value.split(":") if e))
    users = dict(tally.most_common(MAX_LOWER_SERIES))
    rest = sum(tally.values()) - sum(users.values())
    if rest:
        users[OTHER_LOWERS] = rest
    return users


class StoreCollector:
    """The tallies, the build, and from the store: snapshots by kind, containers per lower and the
    metadata database's size, read when scraped."""

    def __init__(self, view: StoreView):
        self._view = view

    def collect(self) -> Iterator[Any]:
        from prometheus_client import core

        for tally in TALLIES:
            yield tally.family(core)
        yield CACHE_SQUASH_SECONDS.family(core)
        gauges = {
            "generations": core.GaugeMetricFamily(
                "addlower_cache_generations",
                'Generations in each managed cache\'s chain (scope: "" for its default chain).',
                labels=["cache", "scope"],
            ),
            "bytes": core.GaugeMetricFamily(
                "addlower_cache_bytes",
                "Bytes of regular files in each managed cache's chain.",
                labels=["cache", "scope"],
            ),
            "containers": core.GaugeMetricFamily(
                "addlower_cache_containers", "Snapshots (containers) using each chain.", labels=["cache", "scope"]
            ),
            "hits": core.GaugeMetricFamily(
                "addlower_cache_scope_hits",
                "Containers created with each scope since it was made.",
                labels=["cache", "scope"],
            ),
        }
        for name, scope, generations, size, containers, hits in self._view.caches():
            for gauge, value in zip(gauges.values(), (generations, size, containers, hits), strict=True):
                gauge.add_metric([name, scope], value)
        yield from gauges.values()
        build = core.InfoMetricFamily("addlower_build", "The running daemon's version.")
        build.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield build
        kinds = core.GaugeMetricFamily("addlower_snapshots", "Snapshots in the store, by kind.", labels=["kind"])
        for kind, n in sorted(self._view.counts().items()):
            kinds.add_metric([kind], n)
        yield kinds
        users = core.GaugeMetricFamily(
            "addlower_extra_lower_containers",
            "Active snapshots (containers) with each extra lower, as the label names it.",
            labels=["lower"],
        )
        for lower, n in lower_users(self._view.lowers()).items():
            users.add_metric([lower], n)
        yield users
        committed = core.GaugeMetricFamily(
            "addlower_committed_bytes",
            "Bytes and inodes of the committed snapshots (layers), as counted at their Commit "
            "(active snapshots' upper dirs are counted only when asked, by Usage).",
            labels=["unit"],
        )
        size_of, inodes_of = self._view.committed()
        committed.add_metric(["bytes"], size_of)
        committed.add_metric(["inodes"], inodes_of)
        yield committed
        db = self._view.db
        size = sum(os.path.getsize(p) for p in (db, Path(f"{db}-wal")) if p.exists())
        yield core.GaugeMetricFamily("addlower_metadata_bytes", "Size of metadata.db and its WAL.", value=size)
        used, budget = self._view.host_mounts()
        yield core.GaugeMetricFamily(
            "addlower_host_mounts",
            "Host mounts that extra lowers take: a pin per host dir in use (shared by the "
            "snapshots using it) and a mount per container path.",
            value=used,
        )
        yield core.GaugeMetricFamily(
            "addlower_host_mounts_budget",
            "lowers.max_host_mounts: the most host mounts extra lowers may take on the node.",
            value=budget,
        )
        room = os.statvfs(self._view.root)
        yield core.GaugeMetricFamily(
            "addlower_root_free_bytes",
            "Bytes free (to unprivileged writers) on the root's filesystem.",
            value=room.f_bavail * room.f_frsize,
        )
        yield core.GaugeMetricFamily(
            "addlower_root_free_inodes",
            "Inodes free (to unprivileged writers) on the root's filesystem.",
            value=room.f_favail,
        )


def serve(address: str, calls: CallStats, store: StoreView) -> None:
    """Serve /metrics on `address` ("host:port"; loopback when the host is left out), in a
    background thread."""
    from prometheus_client import REGISTRY, start_http_server

    host, _, port = address.rpartition(":")
    REGISTRY.register(calls)
    REGISTRY.register(StoreCollector(store))
    start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1")
