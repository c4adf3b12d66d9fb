"""The engine on disk: the metadata store, the snapshotter that turns operations into directories
and mounts, pinned lowers, filesystem helpers, and the containerd lookups it needs (a pod, the
version). Must never import addlower.server, .ops or .dev.
"""
