"""The rules, pure: mount computation, containerd's filter language, labels, the extra-lowers
policy, pods' annotations, status codes and errors, the daemon's configuration and containerd's,
and the log line formats. Tested without root. Must never import addlower.engine, .server, .ops
or .dev, nor do I/O beyond reading a config file.
"""
