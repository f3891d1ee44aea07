"""The admin socket itself: file mode, stale sockets, limits, hostile input, TCP tokens."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from cachemgr.admin import AdminClient, AdminError, AdminServer, ErrorCode
from cachemgr.admin.protocol import MAX_REQUEST_BYTES
from tests.admin.conftest import TOKEN, FakeDaemon, cache_prompt, raw_exchange


def codes(lines: list[bytes]) -> list[str]:
    """The error code of each reply line ("ok" for a success)."""
    out = []
    for line in lines:
        reply = json.loads(line)
        out.append("ok" if reply["ok"] else reply["error"]["code"])
    return out


async def test_socket_is_0600_in_a_0700_dir_and_removed_on_stop(server: AdminServer) -> None:
    st = os.lstat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o700
    await server.stop()
    assert not server.path.exists()
    await server.stop()  # idempotent


async def test_stale_socket_is_replaced_live_one_and_plain_file_are_refused(
    daemon: FakeDaemon, short_dir: Path
) -> None:
    path = short_dir / "admin.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: what a killed daemon leaves behind
    stale.close()
    first = AdminServer(daemon, path)
    await first.start()
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    second = AdminServer(daemon, path)
    with pytest.raises(RuntimeError, match="another process is serving"):
        await second.start()
    assert await asyncio.to_thread(lambda: AdminClient(path=path).call("check")) == {
        "healthy": True,
        "message": "ok",
    }
    await first.stop()

    plain = short_dir / "not-a-socket"
    plain.write_text("keep me")
    with pytest.raises(ValueError, match="is not a socket"):
        await AdminServer(daemon, plain).start()
    assert plain.read_text() == "keep me"


def test_constructor_rejects_unsafe_or_bad_settings(daemon: FakeDaemon, short_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs a token"):
        AdminServer(daemon, short_dir / "a.sock", tcp_port=0)
    with pytest.raises(ValueError, match="needs a token"):
        AdminServer(daemon, short_dir / "a.sock", tcp_port=0, token="short")
    with pytest.raises(ValueError, match="without tcp_port"):
        AdminServer(daemon, short_dir / "a.sock", tcp_host="0.0.0.0", token=TOKEN)
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        AdminServer(daemon, short_dir / ("x" * 120))


async def test_garbage_gets_errors_and_the_server_keeps_serving(
    server: AdminServer, daemon: FakeDaemon
) -> None:
    cache_prompt(daemon.cache, list(range(1, 9)))
    requests = [
        b"not json",
        b'{"cmd": 5}',
        b"[1, 2]",
        b'{"cmd": "stats", "extra": 1}',
        b'{"cmd": "nope"}',
        b'{"cmd": "evict", "args": {"pages": -1}}',
        b'{"cmd": "evict", "args": {"pages": "x"}}',
        b'{"cmd": "evict", "args": {}}',
        b'{"cmd": "tree", "args": {"max_nodes": 0}}',
        b'{"cmd": "pin", "args": {"text": "a", "token_ids": [1]}}',
        b'{"cmd": "pin", "args": {"token_ids": [-1]}}',
        b'{"cmd": "pin", "args": {"token_ids": [1], "colour": "red"}}',
        b'{"cmd": "stats", "args": null}',
        b"",
        b"\xff\xfe\x00garbage",
        b'{"cmd": "check"}',
    ]
    lines = await raw_exchange(server.path, b"\n".join(requests) + b"\n")
    assert codes(lines) == [
        "malformed",
        "malformed",
        "malformed",
        "malformed",
        "unknown_command",
        "bad_args",
        "bad_args",
        "bad_args",
        "bad_args",
        "bad_args",
        "bad_args",
        "bad_args",
        "malformed",
        "malformed",
        "malformed",
        "ok",
    ]
    assert json.loads(lines[-1])["result"] == {"healthy": True, "message": "ok"}
    assert daemon.cache.stats().cached == 2  # no bad request changed the cache
    daemon.cache.check()


async def test_oversize_request_is_refused_and_closed(server: AdminServer) -> None:
    huge = b'{"cmd": "pin", "args": {"text": "' + b"a" * (3 * MAX_REQUEST_BYTES) + b'"}}\n{"cmd": "check"}\n'
    lines = await raw_exchange(server.path, huge)
    assert codes(lines) == ["too_large"]  # the connection ends: the rest of that line can't be trusted
    assert await raw_exchange(server.path, b'{"cmd": "check"}\n') != []  # the next client is served


async def test_idle_and_surplus_connections_are_closed(daemon: FakeDaemon, short_dir: Path) -> None:
    admin = AdminServer(daemon, short_dir / "admin.sock", idle_timeout_s=0.2, max_connections=1)
    await admin.start()
    reader, writer = await asyncio.open_unix_connection(str(admin.path))
    surplus = await raw_exchange(admin.path, b'{"cmd": "check"}\n')
    assert [json.loads(line)["error"]["message"] for line in surplus] == ["too many admin connections"]
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the idle connection was closed
    writer.close()
    assert codes(await raw_exchange(admin.path, b'{"cmd": "check"}\n')) == ["ok"]
    await admin.stop()


async def test_command_failure_inside_the_daemon_is_an_internal_error(
    server: AdminServer, daemon: FakeDaemon
) -> None:
    def broken() -> list[dict[str, object]]:
        raise RuntimeError("worker table is corrupt")

    daemon.workers_info = broken  # type: ignore[method-assign]
    lines = await raw_exchange(server.path, b'{"cmd": "workers"}\n{"cmd": "leases"}\n')
    assert codes(lines) == ["internal", "ok"]
    assert "worker table" not in lines[0].decode()  # details go to the log, not to the client


async def test_tcp_requires_the_token(server: AdminServer) -> None:
    assert server.tcp_address is not None
    host, port = server.tcp_address

    async def tcp_exchange(payload: bytes) -> list[bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(payload)
        writer.write_eof()
        lines = []
        while line := await asyncio.wait_for(reader.readline(), 5):
            lines.append(line)
        writer.close()
        return lines

    # A missing or wrong token ends the connection: the second request is never read.
    assert codes(await tcp_exchange(b'{"cmd": "stats"}\n{"cmd": "stats"}\n')) == ["unauthorized"]
    wrong = json.dumps({"cmd": "stats", "token": TOKEN[:-1] + "x"}).encode() + b"\n"
    assert codes(await tcp_exchange(wrong + wrong)) == ["unauthorized"]
    right = json.dumps({"cmd": "check", "token": TOKEN}).encode() + b"\n"
    assert codes(await tcp_exchange(right + right)) == ["ok", "ok"]

    def client_calls() -> object:
        with pytest.raises(AdminError) as denied:
            AdminClient(tcp=(host, port), token="wrong-token-of-some-length").call("stats")
        assert denied.value.code is ErrorCode.UNAUTHORIZED
        with AdminClient(tcp=(host, port), token=TOKEN) as client:
            return client.call("evict", pages=1)

    assert await asyncio.to_thread(client_calls) == {"requested": 1, "evicted": 0}
