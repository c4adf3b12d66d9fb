"""The daemon: the HTTP/2 gRPC transport, the Snapshots service on it, signals and start-up.
Must never import addlower.ops or addlower.dev.
"""
