"""The admin socket server: a Unix socket (mode 0600) and, optionally, a token-protected TCP listener.

Access rules:
- Unix socket: filesystem permissions are the authentication. The socket is bound under umask 0177, so
  it is never visible with wider permissions than 0600, and its parent directory is created 0700 when
  absent. It belongs to the user the daemon runs as.
- TCP: refused at construction without a token; every request must carry it (compared in constant
  time), and a connection that sends a wrong or missing token is answered once and closed.

Robustness: request lines are bounded (MAX_REQUEST_BYTES; an oversize line gets a TOO_LARGE reply and the
connection is closed, since the rest of it can't be skipped safely), idle connections are closed after
`idle_timeout_s`, at most `max_connections` are served at once, and every failure becomes an error
reply: no request can stop the server or the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import stat
from pathlib import Path

from cachemgr.admin.commands import AdminCommands, AdminTarget
from cachemgr.admin.protocol import (
    MAX_REQUEST_BYTES,
    AdminError,
    ErrorCode,
    encode_error,
    encode_ok,
    parse_request,
)

logger = logging.getLogger(__name__)

MIN_TOKEN_LEN = 16
# After a reply that ends a connection: how long, and how much input, to drain before closing.
LINGER_S = 1.0
LINGER_MAX_BYTES = 16 * 1024 * 1024
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_UNIX_PATH_BYTES = 107


class AdminServer:
    """Serves admin commands for one daemon on its event loop.

    `start()` creates the socket(s) and begins accepting; `stop()` closes them, ends open connections and
    removes the socket file. Both must be awaited on the daemon's event loop.
    """

    def __init__(
        self,
        daemon: AdminTarget,
        path: str | os.PathLike[str],
        *,
        tcp_host: str | None = None,
        tcp_port: int | None = None,
        token: str | None = None,
        idle_timeout_s: float = 30.0,
        max_connections: int = 64,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.path = Path(path)
        if len(os.fsencode(self.path)) > MAX_UNIX_PATH_BYTES:
            raise ValueError(f"admin socket path is longer than {MAX_UNIX_PATH_BYTES} bytes: {self.path}")
        if tcp_port is not None:
            if token is None or len(token) < MIN_TOKEN_LEN:
                raise ValueError(f"a TCP admin listener needs a token of at least {MIN_TOKEN_LEN} characters")
            if not 0 <= tcp_port <= 65535:
                raise ValueError(f"tcp_port out of range: {tcp_port}")
        elif tcp_host is not None:
            raise ValueError("tcp_host given without tcp_port")
        if idle_timeout_s <= 0 or max_connections < 1 or max_request_bytes < 1024:
            raise ValueError("idle_timeout_s, max_connections and max_request_bytes must be positive")
        self._commands = AdminCommands(daemon)
        self._tcp_host = tcp_host or "127.0.0.1"
        self._tcp_port = tcp_port
        self._token = token.encode() if token is not None else None
        self._idle_timeout_s = idle_timeout_s
        self._max_connections = max_connections
        self._max_request_bytes = max_request_bytes
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[asyncio.StreamWriter] = set()
        self._socket_inode: tuple[int, int] | None = None
        self.tcp_address: tuple[str, int] | None = None  # (host, port) actually bound, once started

    async def start(self) -> None:
        """Bind and listen. Raises RuntimeError if another process serves the socket path, ValueError if
        the path exists and is not a socket, OSError for bind failures."""
        if self._servers:
            raise ValueError("AdminServer already started")
        sock = self._bind_unix()
        try:
            unix_server = await asyncio.start_unix_server(
                self._serve_unix, sock=sock, limit=self._max_request_bytes
            )
        except BaseException:
            sock.close()
            self._remove_socket_file()
            raise
        self._servers.append(unix_server)
        if self._tcp_port is not None:
            try:
                tcp_server = await asyncio.start_server(
                    self._serve_tcp, self._tcp_host, self._tcp_port, limit=self._max_request_bytes
                )
            except BaseException:
                await self.stop()
                raise
            self._servers.append(tcp_server)
            host, port = tcp_server.sockets[0].getsockname()[:2]
            self.tcp_address = (host, port)
            logger.info("admin TCP listener on %s:%d (token required)", host, port)
        logger.info("admin socket at %s", self.path)

    async def stop(self) -> None:
        """Stop accepting, close every open connection and remove the socket file. Idempotent."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for writer in list(self._connections):
            writer.close()
        for server in servers:
            await server.wait_closed()
        self._remove_socket_file()

    # Socket file -----------------------------------------------------------------------------------

    def _bind_unix(self) -> socket.socket:
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._clear_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # umask is process-wide, but only this synchronous stretch on the loop thread creates files.
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(self.path))
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)  # no-op under the umask; states the intent if the umask changes
        st = os.stat(self.path)
        self._socket_inode = (st.st_dev, st.st_ino)
        sock.setblocking(False)
        return sock

    def _clear_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ValueError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(os.fspath(self.path))
        except OSError:
            os.unlink(self.path)  # nobody listens: left over from a daemon that died
            logger.info("removed stale admin socket %s", self.path)
            return
        finally:
            probe.close()
        raise RuntimeError(f"another process is serving the admin socket {self.path}")

    def _remove_socket_file(self) -> None:
        if self._socket_inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            # Only our own socket: a newer daemon may have replaced it after we were told to stop.
            if (st.st_dev, st.st_ino) == self._socket_inode:
                os.unlink(self.path)
        self._socket_inode = None

    # Connections -----------------------------------------------------------------------------------

    async def _serve_unix(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve(reader, writer, need_token=False)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve(reader, writer, need_token=True)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, need_token: bool
    ) -> None:
        if len(self._connections) >= self._max_connections:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                writer.write(encode_error(ErrorCode.INTERNAL, "too many admin connections"))
                await asyncio.wait_for(writer.drain(), self._idle_timeout_s)
            writer.close()
            return
        self._connections.add(writer)
        try:
            while True:
                reply, keep_open = await self._next_reply(reader, need_token)
                if reply is None:
                    break
                writer.write(reply)
                await asyncio.wait_for(writer.drain(), self._idle_timeout_s)
                if not keep_open:
                    await self._lingering_close(reader, writer)
                    break
        except (OSError, asyncio.TimeoutError):
            pass  # the client went away or stopped reading: nothing to tell it
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _lingering_close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then read and drop what the client still sends for a moment. Closing a socket with
        unread input makes the kernel send a reset, which can destroy the error reply before the client
        reads it (the client of an oversize request is typically still sending)."""
        if writer.can_write_eof():
            writer.write_eof()
        deadline = asyncio.get_running_loop().time() + LINGER_S
        discarded = 0
        while discarded < LINGER_MAX_BYTES:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(1 << 16), remaining)
            except (asyncio.TimeoutError, ValueError):
                break
            if not chunk:
                break
            discarded += len(chunk)

    async def _next_reply(self, reader: asyncio.StreamReader, need_token: bool) -> tuple[bytes | None, bool]:
        """Read one request and produce (reply, keep the connection open). (None, False) on EOF or idle."""
        try:
            line = await asyncio.wait_for(reader.readline(), self._idle_timeout_s)
        except asyncio.TimeoutError:
            return None, False
        except ValueError:  # StreamReader's limit: the line is longer than max_request_bytes
            message = f"request line longer than {self._max_request_bytes} bytes"
            return encode_error(ErrorCode.TOO_LARGE, message), False
        if not line:
            return None, False
        if not line.strip():
            return encode_error(ErrorCode.MALFORMED, "empty request"), True
        try:
            request = parse_request(line)
            if need_token and not self._token_ok(request.token):
                return encode_error(ErrorCode.UNAUTHORIZED, "missing or wrong token"), False
            result = await self._commands.run(request.cmd, request.args)
            return encode_ok(result), True
        except AdminError as exc:
            return encode_error(exc.code, exc.message), True
        except Exception:
            logger.exception("admin command failed")
            return encode_error(ErrorCode.INTERNAL, "internal error (see the daemon's log)"), True

    def _token_ok(self, token: str | None) -> bool:
        assert self._token is not None  # the constructor requires one for TCP
        return token is not None and hmac.compare_digest(token.encode(), self._token)
