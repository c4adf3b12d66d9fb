"""A raw HTTP/2 client for a daemon's socket: sends exactly the frames a test needs, however
invalid, and reads what comes back (tests of the transport under abuse)."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import hpack

from addlower.server.http2 import END_HEADERS, GOAWAY, HEADERS, PREFACE, SETTINGS, frame

SERVICE = "/containerd.services.snapshots.v1.Snapshots/"


class RawClient:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.sock.settimeout(5)  # a daemon that stops reading from us makes sends fail, not hang
        self.encoder = hpack.Encoder()
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))

    def headers(self, sid: int, method: str, end_headers: bool = True) -> bytes:
        block = self.encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", SERVICE + method),
                ("content-type", "application/grpc"),
            ]
        )
        return frame(HEADERS, END_HEADERS if end_headers else 0, sid, block)

    def send(self, data: bytes) -> bool:
        """False once the daemon has closed the connection (or stopped reading from it)."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def goaway(self, timeout: float = 10.0) -> int | None:
        """The error code of the GOAWAY the daemon sends, reading until it closes; None if none came."""
        data, deadline = b"", time.monotonic() + timeout
        self.sock.settimeout(1)
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        while len(data) >= 9:
            n = int.from_bytes(data[:3], "big")
            if data[3] == GOAWAY:
                return struct.unpack(">II", data[9:17])[1]
            data = data[9 + n :]
        return None

    def close(self) -> None:
        self.sock.close()
