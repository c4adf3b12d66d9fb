"""Snapshotter errors and the gRPC status code each one maps to.

The snapshotter raises these; only the gRPC service turns them into status codes. containerd's
garbage collector and unpacker branch on NOT_FOUND, ALREADY_EXISTS and FAILED_PRECONDITION, so the
mapping is part of the contract. This module must not import grpc servers or filesystem code.
"""

from __future__ import annotations

import grpc


class SnapshotError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class NotFound(SnapshotError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SnapshotError):
    code = grpc.StatusCode.ALREADY_EXISTS


class InvalidArgument(SnapshotError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(SnapshotError):
    code = grpc.StatusCode.FAILED_PRECONDITION


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code for an exception; anything unexpected is UNKNOWN, as containerd's errdefs does."""
    return exc.code if isinstance(exc, SnapshotError) else grpc.StatusCode.UNKNOWN
