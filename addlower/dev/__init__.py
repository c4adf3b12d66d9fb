"""The developer's harness: a private containerd, locally built OCI images, mounting what the
snapshotter returns, and `addlower demo`. May use every layer; addlower.core, .engine and
.server must never import it (the daemon runs without it).
"""
