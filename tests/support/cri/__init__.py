"""A minimal Kubernetes CRI (runtime.v1) client for end-to-end tests; see README.md."""
