"""Prometheus metrics: what the daemon counts, and the HTTP endpoint that serves them.

Counters and histograms are process-wide (prometheus_client's default registry); snapshot counts
by kind and the metadata size are read from the store at scrape time. Serving is off unless
--metrics-address is given. Must not change any behaviour it observes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

RPC_SECONDS = Histogram(
    "addlower_rpc_duration_seconds", "Time to answer a Snapshots API call, by method.", ["method"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RPC_ERRORS = Counter("addlower_rpc_errors_total", "Snapshots API calls that failed, by method and gRPC code.",
                     ["method", "code"])
LOWERS_RESOLVED = Counter("addlower_extra_lowers_resolved_total",
                          "Extra lower dirs applied to a mount (source=label) or found in a pod's "
                          "annotation (source=annotation).", ["source"])
LOWERS_REFUSED = Counter("addlower_extra_lowers_refused_total",
                         "Extra lower dirs refused by the policy, by where they came from.", ["source"])
LOWERS_CREATED = Counter("addlower_extra_lowers_created_total",
                         "Missing extra lower dirs made, empty: under an allowed root (entry=path) or for a "
                         "named lower with create = true (entry=named).", ["entry"])


def observe_call(method: str, seconds: float, code: str) -> None:
    RPC_SECONDS.labels(method).observe(seconds)
    if code != "OK":
        RPC_ERRORS.labels(method, code).inc()


class StoreCollector(Collector):
    """Snapshots by kind and the metadata database's size, read when scraped."""

    def __init__(self, counts: Callable[[], dict[str, int]], db: Path):
        self._counts = counts
        self._db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        kinds = GaugeMetricFamily("addlower_snapshots", "Snapshots in the store, by kind.", labels=["kind"])
        for kind, n in sorted(self._counts().items()):
            kinds.add_metric([kind], n)
        yield kinds
        size = sum(os.path.getsize(p) for p in (self._db, Path(f"{self._db}-wal")) if p.exists())
        yield GaugeMetricFamily("addlower_metadata_bytes", "Size of metadata.db and its WAL.", value=size)


def serve(address: str, counts: Callable[[], dict[str, int]], db: Path) -> None:
    """Serve /metrics on `address` ("host:port"), in a background thread."""
    host, _, port = address.rpartition(":")
    REGISTRY.register(StoreCollector(counts, db))
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
