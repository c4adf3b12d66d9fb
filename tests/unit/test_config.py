"""What a reload applies of a re-read config, and what waits for a restart."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from addlower.core.config import Config, reloaded
from addlower.core.lowers import NamedLower
from addlower.core.pods import KubernetesConfig


def test_a_reload_takes_the_policy_and_names_what_needs_a_restart():
    running = Config(kubernetes=KubernetesConfig(enabled=True))
    new = replace(
        running,
        allowed_roots=("/var/cache/b",),
        named_lowers={"m2": NamedLower("/var/cache/m2")},
        log_level="debug",
        root_dir=Path("/elsewhere"),
        metrics_address="127.0.0.1:1",
        kubernetes=KubernetesConfig(
            enabled=True, allowed_roots=("/var/cache/pods",), namespaces={"team-a": ("/var/cache/a",)}, timeout=9.0
        ),
    )
    applied, later = reloaded(running, new)
    assert applied.allowed_roots == ("/var/cache/b",) and set(applied.named_lowers) == {"m2"}
    assert applied.log_level == "debug"
    assert applied.kubernetes.allowed_roots == ("/var/cache/pods",) and set(applied.kubernetes.namespaces) == {"team-a"}
    assert applied.root_dir == running.root_dir and applied.metrics_address is None
    assert applied.kubernetes.timeout == running.kubernetes.timeout
    assert later == ["root_dir", "metrics_address", "kubernetes.timeout"]
    assert reloaded(running, running) == (running, [])
