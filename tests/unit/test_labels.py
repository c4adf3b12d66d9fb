import grpc
import pytest

from addlower.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, status_code
from addlower.core.labels import MAX_LABEL_SIZE, validate_labels


def test_label_at_the_limit_is_accepted():
    validate_labels({"k": "v" * (MAX_LABEL_SIZE - 1)})


def test_label_over_the_limit_is_refused_naming_the_key():
    with pytest.raises(InvalidArgument, match="'big'.*4097 bytes"):
        validate_labels({"ok": "x", "big": "v" * (MAX_LABEL_SIZE - 2)})


def test_size_counts_utf8_bytes_not_characters():
    with pytest.raises(InvalidArgument):
        validate_labels({"k": "é" * 2048})


def test_empty_key_is_refused():
    with pytest.raises(InvalidArgument, match="empty key"):
        validate_labels({"": "v"})


@pytest.mark.parametrize(
    "exc, code",
    [
        (NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (OSError("disk"), grpc.StatusCode.UNKNOWN),
    ],
)
def test_errors_map_to_the_codes_containerd_branches_on(exc, code):
    assert status_code(exc) == code.value[0]  # the wire number grpcio clients see
