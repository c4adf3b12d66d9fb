"""Which extra lowers a snapshot gets, and under which policy: its label, checked against the
label users' policy; or, for a pod's container in containerd's CRI namespace, its pod's annotation
(or label), checked against the pod's namespace's policy, the pod found through containerd until
the snapshot's labels record it. Every refusal is counted and logged here. The policy is one
object, replaced whole when the config is reloaded. Must not touch the store, directories or
mounts: callers hand it keys and labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from addlower.core.caches import parse_scopes, scopes_label
from addlower.core.config import Config
from addlower.core.errors import InvalidArgument
from addlower.core.labels import EXTRA_LOWERS_LABEL, POD_LABEL, SCOPE_LABEL
from addlower.core.logformat import fields
from addlower.core.lowers import Lower, LowerPolicy, parse_lowers, with_scopes
from addlower.core.model import Kind
from addlower.core.pods import KubernetesConfig, Lookup, check_for_pod, in_namespace, normalised_value
from addlower.engine import metrics
from addlower.engine.podlookup import PodLowers

log = logging.getLogger(__name__)

LABEL_SOURCE = f"label {EXTRA_LOWERS_LABEL}"

T = TypeVar("T")

# Accepted label values a policy keeps parsed: a container's every Mounts checks the same value
# again, and parsing it costs more than the rest of the call. Beyond this, it starts over.
MAX_PARSED = 1024


@dataclass(frozen=True)
class Request:
    """The extra lowers a Mounts call resolved: the entries, where they came from (for messages
    and the refusal metric), and the labels to record once they are pinned."""

    lowers: tuple[Lower, ...] = ()
    source: str = LABEL_SOURCE
    metric: str = "label"
    record: Mapping[str, str] = field(default_factory=dict)
    pod: Mapping[str, str] = field(default_factory=dict)  # namespace, pod, container: for the logs


@dataclass(frozen=True)
class Policy:
    """Which host dirs may be lowers, from one config: replaced whole when the config is reloaded."""

    lowers: LowerPolicy  # containerd clients' labels
    kubernetes: KubernetesConfig  # pods' roots, by namespace
    # (whose policy: False for the label users', else (True, a pods' namespace or None), value,
    # source) -> its entries; kept with the policy, so a reload drops them with it.
    _parsed: dict[tuple[object, str, str], tuple[Lower, ...]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, root: str, config: Config) -> Policy:
        return cls(LowerPolicy(root, tuple(config.allowed_roots), dict(config.named_lowers)), config.kubernetes)

    def for_pods(self, namespace: str | None) -> LowerPolicy:
        return self.kubernetes.policy(self.lowers.root, self.lowers.named, namespace)

    def parse(self, value: str, source: str) -> tuple[Lower, ...]:
        """The entries of `value` that the label users' policy allows (parse_lowers, remembered)."""
        return self._remembered(False, value, source, lambda: self.lowers)

    def parse_for_pods(self, namespace: str | None, value: str, source: str) -> tuple[Lower, ...]:
        """The entries of `value` that pods of `namespace` may use (None: some pod may)."""
        return self._remembered((True, namespace), value, source, lambda: self.for_pods(namespace))

    def scoped(self, lowers: tuple[Lower, ...], value: str, namespace: str | None) -> tuple[Lower, ...]:
        """`lowers` with the caches' scopes the scope label's `value` asks for, checked."""
        if not value or not any(lower.cache for lower in lowers):
            return lowers
        return with_scopes(lowers, parse_scopes(value, f"label {SCOPE_LABEL}"), namespace, self.lowers.named)

    def _remembered(
        self, whose: object, value: str, source: str, policy: Callable[[], LowerPolicy]
    ) -> tuple[Lower, ...]:
        key = (whose, value, source)
        lowers = self._parsed.get(key)
        if lowers is None:
            lowers = parse_lowers(value, policy(), source)  # a refusal raises, and is not kept
            if len(self._parsed) >= MAX_PARSED:
                self._parsed.clear()
            self._parsed[key] = lowers
        return lowers


def counted(source: str, check: Callable[[], T], **context: str) -> T:
    """check(), with a refusal counted by `source` ("label" or "annotation") and logged with
    `context` (key, and a pod's namespace, pod and container) as fields."""
    try:
        return check()
    except InvalidArgument as exc:
        metrics.LOWERS_REFUSED.inc(source)
        log.warning("refused extra lowers: %s", exc, extra=fields(source=source, **context))
        raise


class Resolver:
    """The extra lowers of snapshots under `root`, by the policy of `config`; `pods` looks up a
    CRI container's pod (None: Kubernetes lookups off)."""

    def __init__(self, root: str, config: Config, pods: PodLowers | None):
        self.policy = Policy.of(root, config)
        self.pods = pods

    def reload(self, config: Config) -> None:
        """Swap in `config`'s policy, whole: each check sees the old one or the new one."""
        self.policy = Policy.of(self.policy.lowers.root, config)

    def held_for_pods(self, key: str) -> bool:
        """Whether a snapshot's lowers answer to the pods' policy: with Kubernetes lookups on,
        everything in containerd's CRI namespace (a direct CRI client can set the label there)."""
        return self.pods is not None and in_namespace(key, self.pods.config.namespace)

    def for_create(self, kind: Kind, key: str, labels: Mapping[str, str]) -> tuple[Lower, ...]:
        """The entries a new snapshot's label asks for, refused before anything is created. In the
        CRI namespace they wait for the container's pod (none before), so none for now."""
        return counted("label", lambda: self._created(kind, key, labels), key=key)

    def _created(self, kind: Kind, key: str, labels: Mapping[str, str]) -> tuple[Lower, ...]:
        value = labels.get(EXTRA_LOWERS_LABEL, "")
        if not self.held_for_pods(key):
            return self.policy.scoped(self.policy.parse(value, LABEL_SOURCE), labels.get(SCOPE_LABEL, ""), None)
        if value and kind != Kind.ACTIVE:
            raise InvalidArgument(
                f"{LABEL_SOURCE}: a {kind.label} in containerd's CRI namespace cannot "
                "have extra lowers; only pods' containers can"
            )
        self.policy.parse_for_pods(None, value, LABEL_SOURCE)  # fails early what no pod may use
        return ()

    def check_update(self, key: str, labels: Mapping[str, str]) -> None:
        """A new lowers value in a label update, checked now (against the pods' policy in the CRI
        namespace); it is pinned at the next Mounts."""
        if EXTRA_LOWERS_LABEL in labels:
            value, policy = labels[EXTRA_LOWERS_LABEL], self.policy
            if self.held_for_pods(key):
                counted("label", lambda: policy.parse_for_pods(None, value, LABEL_SOURCE), key=key)
            else:
                counted("label", lambda: policy.parse(value, LABEL_SOURCE), key=key)

    def for_mounts(self, key: str, labels: Mapping[str, str]) -> Request:
        """The lowers a Mounts of `key` (whose labels are `labels`) gets, checked again."""
        stored = self._stored(key, labels)
        if stored is None:
            return self._pod_lowers(key, labels)
        source, who, parse = stored
        return Request(counted("label", parse, key=key, **who), source, pod=who)

    def allowed_quietly(self, key: str, labels: Mapping[str, str]) -> tuple[Lower, ...] | None:
        """The entries for_mounts answers when it needs no lookup and refuses nothing (else None,
        with nothing counted or logged: the call itself will be)."""
        stored = self._stored(key, labels)
        if stored is None:
            return None
        try:
            return stored[2]()
        except InvalidArgument:
            return None

    def _stored(
        self, key: str, labels: Mapping[str, str]
    ) -> tuple[str, dict[str, str], Callable[[], tuple[Lower, ...]]] | None:
        """How the label's lowers are checked when the labels hold all it takes (a containerd
        client's, or a pod's container whose pod is recorded): (source, the pod's fields, the
        check); None when the pod is still to be found."""
        value, policy, scope = labels.get(EXTRA_LOWERS_LABEL, ""), self.policy, labels.get(SCOPE_LABEL, "")
        if not self.held_for_pods(key):
            return LABEL_SOURCE, {}, lambda: policy.scoped(policy.parse(value, LABEL_SOURCE), scope, None)
        recorded = labels.get(POD_LABEL)
        if recorded is None:
            return None
        source = f"pod {recorded}: {LABEL_SOURCE}"
        namespace, _, pod = recorded.partition("/")
        return (
            source,
            {"namespace": namespace, "pod": pod},
            lambda: policy.scoped(policy.parse_for_pods(namespace, value, source), scope, namespace),
        )

    def _pod_lowers(self, key: str, labels: Mapping[str, str]) -> Request:
        """A CRI-namespace snapshot's lowers, its pod not recorded yet: held to its pod's
        namespace, found through containerd; none while no pod is known."""
        assert self.pods is not None
        label = labels.get(EXTRA_LOWERS_LABEL)
        found = self.pods.find(key)
        if found is Lookup.NOT_A_POD:  # a containerd client's own container: the label's policy
            own = self.policy
            return Request(counted("label", lambda: own.parse(label or "", LABEL_SOURCE), key=key))
        if isinstance(found, Lookup):
            return Request()
        if label is not None:
            source, value = LABEL_SOURCE, label
        elif found.request is not None:
            source, value = f"pod annotation {found.request[0]}", found.request[1]
        else:
            return Request()
        who = {"namespace": found.namespace, "pod": found.pod, "container": found.container}
        policy = self.policy.for_pods(found.namespace)
        lowers = counted("annotation", lambda: check_for_pod(found, source, value, policy), key=key, **who)
        record = {EXTRA_LOWERS_LABEL: normalised_value(value), POD_LABEL: f"{found.namespace}/{found.pod}"}
        scopes = {lower.name: lower.scope for lower in lowers if lower.name and lower.scope}
        if scopes:
            record[SCOPE_LABEL] = scopes_label(scopes)
        return Request(lowers, f"{found.describe()}: {source}", "annotation", record, who)
