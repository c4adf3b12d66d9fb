"""What the metrics count, without a daemon: per-call figures and containers per lower."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from addlower.core.codes import Code
from addlower.engine import metrics


def test_containers_per_lower_count_each_container_once_and_stay_bounded():
    users = metrics.lower_users(["maven:/var/cache/a", "maven", "/var/cache/a:/var/cache/a", ""])
    assert users == {"maven": 2, "/var/cache/a": 2}
    many = metrics.lower_users([f"/var/cache/{i}" for i in range(metrics.MAX_LOWER_SERIES + 5)])
    assert len(many) == metrics.MAX_LOWER_SERIES + 1 and many[metrics.OTHER_LOWERS] == 5


def test_calls_are_counted_by_code_and_only_failures_are_errors():
    calls = metrics.CallStats(["Stat", "Prepare"])
    calls.observe("Stat", 0.0002, Code.OK)
    calls.observe("Stat", 0.0003, Code.NOT_FOUND)
    calls.observe("Prepare", 3.0, Code.INTERNAL)
    registry = CollectorRegistry()
    registry.register(calls)
    text = generate_latest(registry).decode()
    assert 'addlower_rpc_handled_total{code="NOT_FOUND",method="Stat"} 1.0' in text
    assert 'addlower_rpc_errors_total{code="INTERNAL",method="Prepare"} 1.0' in text
    assert 'addlower_rpc_errors_total{code="NOT_FOUND"' not in text
    assert 'addlower_rpc_duration_seconds_bucket{le="0.00025",method="Stat"} 1.0' in text
    assert 'addlower_rpc_duration_seconds_bucket{le="0.0005",method="Stat"} 2.0' in text
    assert 'addlower_rpc_duration_seconds_count{method="Prepare"} 1.0' in text
