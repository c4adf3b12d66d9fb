"""addlower: a containerd overlayfs snapshotter served as a proxy plugin, with extra host lower dirs."""

__version__ = "0.1.0"
