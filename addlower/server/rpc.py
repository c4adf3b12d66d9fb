"""gRPC over HTTP/2 streams, with no I/O: what a request's headers and body mean (method, deadline,
the metadata a handler may read, one length-prefixed message), running a handler, and an
answer's framing and status (a unary answer, or a streaming one pulled message by message, its
status in the trailers). Routes say where a call runs; the asyncio adapter (grpcserver) acts on it.

Never imports asyncio or sockets; of addlower only core.codes and http2.
"""

from __future__ import annotations

import contextvars
import functools
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from addlower.core.codes import Code
from addlower.server.http2 import Body, header_block

MAX_MESSAGE = 4 << 20  # one request message (containerd's largest are label maps of a few kB)
# Request headers a handler may read (call_metadata()): containerd's namespace and lease, which a
# differ passes on when it writes to containerd's content store. Nothing else is kept.
KEPT_METADATA = frozenset({b"containerd-namespace", b"containerd-lease"})
HEAD_FIELDS = frozenset({b":path", b"grpc-timeout"}) | KEPT_METADATA  # what the HTTP/2 layer decodes for us

# grpc-timeout: up to 8 digits and a unit (gRPC over HTTP/2, "Timeout").
_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}

RESPONSE_HEADERS = header_block([(b":status", b"200"), (b"content-type", b"application/grpc")])
OK_TRAILERS = header_block([(b"grpc-status", b"0")])
MESSAGE_HEAD = struct.Struct(">BI")  # gRPC length-prefixed message: compressed flag, length

Metadata = Mapping[str, str]  # the KEPT_METADATA a call came with
ErrorMapper = Callable[[BaseException], tuple[Code, str]]
Result = tuple[Iterable[bytes], Code, str]  # a call's serialized messages and its status

_metadata: contextvars.ContextVar[Metadata] = contextvars.ContextVar("metadata", default=MappingProxyType({}))


def call_metadata() -> Metadata:
    """The KEPT_METADATA of the call the running handler answers."""
    return _metadata.get()


def grpc_timeout(value: bytes) -> float | None:
    """Seconds from a grpc-timeout header value; None when it is not one."""
    found = _TIMEOUT.fullmatch(value)
    return int(found.group(1)) * _TIMEOUT_UNITS[found.group(2)] if found else None


def _status_message(text: str) -> bytes:
    """Percent-encode a status message as gRPC requires."""
    return b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in text.encode())


def trailers(code: Code, message: str) -> bytes:
    if code == Code.OK:
        return OK_TRAILERS
    return header_block([(b"grpc-status", str(int(code)).encode()), (b"grpc-message", _status_message(message))])


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What a call's headers say: the method, the timeout (seconds) and the kept metadata."""

    path: bytes
    timeout: float | None
    metadata: Metadata

    @classmethod
    def of(cls, fields: dict[bytes, bytes]) -> RequestHead:
        """From the decoded HEAD_FIELDS (the HTTP/2 layer remembers it per header block)."""
        timeout = fields.get(b"grpc-timeout")
        kept = {n.decode("latin-1"): v.decode("latin-1") for n, v in fields.items() if n in KEPT_METADATA}
        return cls(fields.get(b":path", b""), None if timeout is None else grpc_timeout(timeout), kept)


@dataclass(frozen=True)
class Route:
    """One method: how to parse its request, what answers it, and where to run it."""

    request: Any  # a protobuf message class
    handler: Callable[[Any], Any]  # request -> response (a message or its bytes), or an iterator of them
    streaming: bool = False
    pool: str | None = None  # the thread pool for calls that may take long; None: on the loop
    describe: Callable[[Any], str] = lambda request: ""  # for the per-call log line
    # Where a call runs when it depends on the request: decided on the loop (so quickly) before
    # the call starts; overrides `pool`.
    place: Callable[[Any], str | None] | None = None

    @functools.cached_property
    def name(self) -> str:
        """The method, for metrics and logs."""
        return self.handler.__name__

    def where(self, request: Any) -> str | None:
        """The pool (None: the loop) for `request`; the loop when picking fails (the handler then
        answers with the error)."""
        if self.place is None:
            return self.pool
        try:
            return self.place(request)
        except Exception:
            return None


@dataclass(frozen=True, slots=True)
class Refused:
    """A request that reaches no handler, and the status it gets."""

    code: Code
    message: str


def parse(routes: Mapping[bytes, Route], head: RequestHead, body: bytes) -> tuple[Route, Any] | Refused:
    """The route and the request message a whole request carries."""
    route = routes.get(head.path)
    if route is None:
        return Refused(Code.UNIMPLEMENTED, f"unknown method {head.path.decode('latin-1')}")
    if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
        return Refused(Code.INTERNAL, "expected one uncompressed gRPC message")
    try:
        return route, route.request.FromString(body[5:])
    except Exception as exc:  # protobuf's DecodeError and friends
        return Refused(Code.INTERNAL, f"cannot parse request: {exc}")


def run(route: Route, request: Any, metadata: Metadata, errors: ErrorMapper) -> Result:
    """Run a handler: its serialized answer (a list of one message, or lazily an iterator for
    streaming routes) and the status."""
    token = _metadata.set(metadata)
    try:
        result = route.handler(request)
        if route.streaming:
            return (r if isinstance(r, bytes) else r.SerializeToString() for r in result), Code.OK, ""
        return [result if isinstance(result, bytes) else result.SerializeToString()], Code.OK, ""
    except Exception as exc:
        code, message = errors(exc)
        return iter(()), code, message
    finally:
        _metadata.reset(token)


def framed(messages: Iterable[bytes], code: Code, message: str, errors: ErrorMapper) -> Body:
    """An answer's body for the HTTP/2 layer: each message length-prefixed, then the trailers;
    a streaming handler that fails midway ends with its error's status."""
    try:
        for m in messages:
            yield MESSAGE_HEAD.pack(0, len(m)) + m
    except Exception as exc:
        return trailers(*errors(exc))
    return trailers(code, message)
