"""The operator's tools: the Snapshots client, the admin commands (ls, info, tree, du, cleanup,
doctor) and the node installer. Must never import addlower.server: they talk to the daemon over
its socket or read its store read-only.
"""
