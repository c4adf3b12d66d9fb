"""Prometheus metrics: what the daemon counts, and the HTTP endpoint that serves them.

Per-call figures (durations by method, answers by method and code) are plain integers that the
event loop's thread keeps (it completes every call, inline or from a pool) and the scrape copies:
no lock, label lookup or metric object per call, since CRI stats every snapshot every 10 s. The
rest are prometheus_client's default registry, or read from the store when scraped (snapshots
by kind, containers per lower, the metadata size). Serving is off unless metrics_address is
given. Must not change any behaviour it observes; must not import the server.
"""

from __future__ import annotations

import os
import platform
from bisect import bisect_left
from collections import Counter as Tally
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from addlower import __version__
from addlower.core.codes import Code

DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Answers that mean a call failed. The others are answers a client acts on (a Stat's NOT_FOUND
# tells containerd a snapshot is not there, an unpack race gets ALREADY_EXISTS, a refusal
# INVALID_ARGUMENT): addlower_rpc_handled_total counts those, addlower_rpc_errors_total does not.
FAILURES = frozenset({Code.UNKNOWN, Code.INTERNAL, Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED,
                      Code.RESOURCE_EXHAUSTED, Code.UNIMPLEMENTED})

LOWER_SOURCES = ("label", "annotation")  # where extra lowers come from
MAX_LOWER_SERIES = 1000  # lowers with a series of their own; the rest are summed under OTHER_LOWERS
OTHER_LOWERS = "(other)"

LOWERS_RESOLVED = Counter("addlower_extra_lowers_resolved_total",
                          "Containers (active snapshots) and views that got extra lower dirs, by where "
                          "they came from: a label, or a pod's annotation.", ["source"])
LOWERS_REFUSED = Counter("addlower_extra_lowers_refused_total",
                         "Extra lower dirs refused by the policy, by where they came from.", ["source"])
for _source in LOWER_SOURCES:  # a series from the start, so rate() and alerts see the first one
    LOWERS_RESOLVED.labels(_source)
    LOWERS_REFUSED.labels(_source)
Info("addlower_build", "The running daemon's version.").info(
    {"version": __version__, "python": platform.python_version()})


class CallStats(Collector):
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

    def collect(self) -> Iterator[Metric]:
        durations = HistogramMetricFamily("addlower_rpc_duration_seconds",
                                          "Time to answer a Snapshots API call, by method.", labels=["method"])
        for method, counts in sorted(self._buckets.items()):
            counts = list(counts)  # copies are atomic under the GIL; the loop goes on counting
            cumulative, buckets = 0, []
            for bound, n in zip((*map(str, DURATION_BUCKETS), "+Inf"), counts):
                cumulative += n
                buckets.append((bound, cumulative))
            durations.add_metric([method], buckets, sum_value=self._sums[method])
        yield durations
        handled = CounterMetricFamily("addlower_rpc_handled", "Snapshots API calls answered, by method and "
                                      "gRPC code.", labels=["method", "code"])
        errors = CounterMetricFamily("addlower_rpc_errors", "Snapshots API calls that failed (codes "
                                     f"{', '.join(sorted(c.name for c in FAILURES))}), by method and code.",
                                     labels=["method", "code"])
        for (method, code), n in sorted(dict(self._handled).items()):
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


def lower_users(values: Iterable[str]) -> dict[str, int]:
    """Active snapshots per lower entry (as written in the label), the most used first; past
    MAX_LOWER_SERIES entries summed under OTHER_LOWERS, since labels are a client's to choose."""
    tally = Tally(entry for value in values for entry in dict.fromkeys(e for e in value.split(":") if e))
    users = dict(tally.most_common(MAX_LOWER_SERIES))
    rest = sum(tally.values()) - sum(users.values())
    if rest:
        users[OTHER_LOWERS] = rest
    return users


class StoreCollector(Collector):
    """Snapshots by kind, containers per lower and the metadata database's size, read when scraped."""

    def __init__(self, view: StoreView):
        self._view = view

    def collect(self) -> Iterator[GaugeMetricFamily]:
        kinds = GaugeMetricFamily("addlower_snapshots", "Snapshots in the store, by kind.", labels=["kind"])
        for kind, n in sorted(self._view.counts().items()):
            kinds.add_metric([kind], n)
        yield kinds
        users = GaugeMetricFamily("addlower_extra_lower_containers",
                                  "Active snapshots (containers) with each extra lower, as the label names it.",
                                  labels=["lower"])
        for lower, n in lower_users(self._view.lowers()).items():
            users.add_metric([lower], n)
        yield users
        db = self._view.db
        size = sum(os.path.getsize(p) for p in (db, Path(f"{db}-wal")) if p.exists())
        yield GaugeMetricFamily("addlower_metadata_bytes", "Size of metadata.db and its WAL.", value=size)


def serve(address: str, calls: CallStats, store: StoreView) -> None:
    """Serve /metrics on `address` ("host:port"; loopback when the host is left out), in a
    background thread."""
    host, _, port = address.rpartition(":")
    REGISTRY.register(calls)
    REGISTRY.register(StoreCollector(store))
    start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1")
