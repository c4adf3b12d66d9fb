"""Label names and label validation rules (pure, no I/O).

Holds the well-known label keys and the size rule containerd applies to labels. Must not know
about the store, the filesystem or gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping

from addlower.core.errors import InvalidArgument

# containerd's limit: a label's key and value together fit in this many bytes.
MAX_LABEL_SIZE = 4096

# Added to every snapshot's Info when --upperdir-label is on; never stored.
UPPERDIR_LABEL = "containerd.io/snapshot/overlay.upperdir"

# The original's label: colon-separated host dirs stacked as extra lower layers.
EXTRA_LOWERS_LABEL = "containerd.io/snapshot/overlay-custom-add-lower.paths"

# "<namespace>/<pod>" of the Kubernetes pod whose policy a CRI container's lowers are held to;
# recorded by the snapshotter when it found the pod, never accepted from a client.
POD_LABEL = "containerd.io/snapshot/overlay-custom-add-lower.pod"

# The scope of the managed caches among its extra lowers: one name for all of them, or
# `cache=scope` pairs separated by commas (what the snapshotter records for a pod's container).
SCOPE_LABEL = "containerd.io/snapshot/overlay-custom-add-lower.scope"


def validate_labels(labels: Mapping[str, str]) -> None:
    """Refuse any label whose key and value exceed containerd's size limit, naming the key."""
    for key, value in labels.items():
        size = len(key.encode()) + len(value.encode())
        if size > MAX_LABEL_SIZE:
            shown = key if len(key) <= 64 else key[:64] + "..."
            raise InvalidArgument(
                f"label {shown!r}: key and value are {size} bytes, more than the maximum of {MAX_LABEL_SIZE} bytes"
            )
        if not key:
            raise InvalidArgument("label with an empty key")
