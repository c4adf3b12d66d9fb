"""Snapshotter errors and the gRPC status code each one maps to.

The snapshotter raises these; only the gRPC service turns them into status codes. containerd's
garbage collector and unpacker branch on NOT_FOUND, ALREADY_EXISTS and FAILED_PRECONDITION, so the
mapping is part of the contract. This module must not know the transport or the filesystem.
"""

from __future__ import annotations

from addlower.core.codes import Code


class SnapshotError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    code: Code = Code.UNKNOWN


class NotFound(SnapshotError):
    code = Code.NOT_FOUND


class AlreadyExists(SnapshotError):
    code = Code.ALREADY_EXISTS


class InvalidArgument(SnapshotError):
    code = Code.INVALID_ARGUMENT


class FailedPrecondition(SnapshotError):
    code = Code.FAILED_PRECONDITION


class ResourceExhausted(SnapshotError):
    """A node-wide budget is spent, or the root's filesystem is full: nothing the caller can fix by
    asking differently, but removing things frees room."""

    code = Code.RESOURCE_EXHAUSTED


class Unimplemented(SnapshotError):
    """Not ours to answer: containerd then asks the next plugin (its diff service falls through
    its differs on this code)."""

    code = Code.UNIMPLEMENTED


class Unavailable(SnapshotError):
    """A service we depend on (containerd, for Kubernetes pods) did not answer in time."""

    code = Code.UNAVAILABLE


def status_code(exc: BaseException) -> Code:
    """The gRPC code for an exception; anything unexpected is UNKNOWN, as containerd's errdefs does."""
    return exc.code if isinstance(exc, SnapshotError) else Code.UNKNOWN
