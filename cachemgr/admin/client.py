"""A blocking admin client for the CLI and scripts: one connection, one request/reply per call."""

from __future__ import annotations

import os
import socket
from types import TracebackType
from typing import Any

from cachemgr.admin.protocol import (
    MAX_REQUEST_BYTES,
    AdminError,
    ErrorCode,
    decode_reply,
    encode_request,
)

# Replies (a tree dump of many nodes) can be larger than requests.
MAX_REPLY_BYTES = 256 * 1024 * 1024
_CLOSING_CODES = (ErrorCode.UNAUTHORIZED, ErrorCode.TOO_LARGE)


class AdminUnavailable(Exception):
    """No daemon answers at the given address (not running, wrong path, permission denied)."""


class AdminClient:
    """Talks to a running daemon's admin socket: a Unix socket path, or a TCP (host, port) with a token.

    Connects lazily on the first call and keeps the connection for later calls. `call` returns the
    command's result or raises protocol.AdminError (an error reply) or AdminUnavailable.
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,
        tcp: tuple[str, int] | None = None,
        token: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        if (path is None) == (tcp is None):
            raise ValueError("give exactly one of path or tcp")
        if tcp is not None and not token:
            raise ValueError("the TCP admin listener needs a token")
        self._path = None if path is None else os.fspath(path)
        self._tcp = tcp
        self._token = token if tcp is not None else None
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    @property
    def address(self) -> str:
        return self._path if self._path is not None else f"{self._tcp[0]}:{self._tcp[1]}"  # type: ignore[index]

    def call(self, cmd: str, **args: Any) -> Any:
        """Run one admin command and return its result."""
        request = encode_request(cmd, args, self._token)
        if len(request) > MAX_REQUEST_BYTES:
            raise ValueError(f"request of {len(request)} bytes is over the server's {MAX_REQUEST_BYTES}")
        sock = self._connect()
        try:
            sock.sendall(request)
            line = self._read_line(sock)
        except OSError as exc:
            self.close()
            raise AdminUnavailable(f"lost the connection to {self.address}: {exc}") from None
        try:
            return decode_reply(line)
        except AdminError as exc:
            if exc.code in _CLOSING_CODES:
                self.close()  # the server hangs up after these replies
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buffer = bytearray()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        try:
            if self._path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._timeout_s)
                try:
                    sock.connect(self._path)
                except OSError:
                    sock.close()
                    raise
            else:
                assert self._tcp is not None
                sock = socket.create_connection(self._tcp, timeout=self._timeout_s)
        except FileNotFoundError:
            raise AdminUnavailable(f"no admin socket at {self.address}: is the daemon running?") from None
        except ConnectionRefusedError:
            raise AdminUnavailable(f"nothing listens at {self.address}: is the daemon running?") from None
        except PermissionError:
            raise AdminUnavailable(
                f"permission denied for {self.address}: run as the daemon's user"
            ) from None
        except OSError as exc:
            raise AdminUnavailable(f"cannot connect to {self.address}: {exc}") from None
        self._sock = sock
        return sock

    def _read_line(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_REPLY_BYTES:
                raise OSError(f"reply longer than {MAX_REPLY_BYTES} bytes")
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise OSError("the daemon closed the connection")
            self._buffer += chunk
        end = self._buffer.index(b"\n")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line
