"""Access control (issue 5, item 5), checked on the real daemon:

- the admin Unix socket is 0600, owned by the daemon's user, in a 0700 directory, and serves;
- a TCP admin listener refuses to start without a (long enough) token and rejects a missing or wrong one;
- HTTP API keys: 401 without a key, with a wrong one or a malformed header, 200 with a right one;
  /health and /metrics stay open;
- /metrics carries no prompt content: no marker text, token ids, salts or keys after real requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachemgr.admin.protocol import encode_request
from cachemgr.admin.server import AdminServer
from cachemgr.config import build_config
from cachemgr.http.auth import derive_key_salt
from tests.hardening.conftest import MODEL, serving, until

KEY_A = "key-access-a-0123456789"
KEY_B = "key-access-b-9876543210"
TOKEN = "admin-token-0123456789abcdef"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path holds 107 bytes; pytest's tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="h3acc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> dict:
    writer.write(line)
    await writer.drain()
    return json.loads(await asyncio.wait_for(reader.readline(), 5))


async def test_admin_unix_socket_is_0600_owned_by_the_daemon_user(tmp_path: Path, short_dir: Path) -> None:
    async with serving(tmp_path) as stack:
        admin = AdminServer(stack.daemon, short_dir / "run" / "admin.sock")
        await admin.start()
        try:
            st = os.stat(admin.path)
            assert stat.S_ISSOCK(st.st_mode)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, os.getuid(), os.getgid())
            parent = os.stat(admin.path.parent)
            assert (stat.S_IMODE(parent.st_mode), parent.st_uid) == (0o700, os.getuid())
            reader, writer = await asyncio.open_unix_connection(str(admin.path))
            reply = await _exchange(reader, writer, encode_request("check", {}))
            assert reply == {"ok": True, "result": {"healthy": True, "message": "ok"}}
            writer.close()
        finally:
            await admin.stop()
        assert not admin.path.exists()


async def test_tcp_admin_needs_a_token_and_rejects_a_wrong_one(tmp_path: Path, short_dir: Path) -> None:
    # Refused before anything listens: by the config (flags/env) and by the server itself.
    with pytest.raises(ValueError, match="--admin-tcp-port needs --admin-token"):
        build_config(["--admin-tcp-port", "0"], env={})
    with pytest.raises(ValueError, match="--admin-tcp-port needs --admin-token"):
        build_config([], env={"RADIXKV_ADMIN_TCP_PORT": "0"})
    async with serving(tmp_path) as stack:
        for token in (None, "", "too-short-token"):  # 15 characters: under the 16 minimum
            with pytest.raises(ValueError, match="needs a token of at least 16 characters"):
                AdminServer(stack.daemon, short_dir / "a.sock", tcp_port=0, token=token)
        admin = AdminServer(stack.daemon, short_dir / "b.sock", tcp_port=0, token=TOKEN, idle_timeout_s=2.0)
        await admin.start()
        try:
            assert admin.tcp_address is not None
            host, port = admin.tcp_address
            assert host == "127.0.0.1"  # loopback unless told otherwise
            for token in (None, "", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), 12345, ["x"]):
                reader, writer = await asyncio.open_connection(host, port)
                request: dict[str, object] = {"cmd": "flush", "args": {}}
                if token is not None:
                    request["token"] = token
                reply = await _exchange(reader, writer, json.dumps(request).encode() + b"\n")
                assert reply["ok"] is False
                # A token of the wrong JSON type is a malformed request; a wrong string is unauthorized.
                want = "malformed" if isinstance(token, (int, list)) else "unauthorized"
                assert reply["error"]["code"] == want, (token, reply)
                if want == "unauthorized":  # and the connection is closed after the one reply
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
            reader, writer = await asyncio.open_connection(host, port)
            reply = await _exchange(reader, writer, encode_request("stats", {}, token=TOKEN))
            assert reply["ok"] is True and reply["result"]["cache"]["num_pages"] == 256
            reply = await _exchange(reader, writer, encode_request("check", {}, token=TOKEN))
            assert reply == {"ok": True, "result": {"healthy": True, "message": "ok"}}  # still open
            writer.close()
        finally:
            await admin.stop()


async def test_http_api_keys(tmp_path: Path) -> None:
    async with serving(tmp_path, http=True, metrics=True, api_keys=frozenset({KEY_A, KEY_B})) as stack:
        stack.start_scripted("w0")
        await until(lambda: len(stack.daemon.workers_info()) == 1, what="worker registered")
        client = stack.client
        assert client is not None
        body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2}
        bad_headers: list[dict[str, str]] = [
            {},
            {"Authorization": ""},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer "},
            {"Authorization": f"Basic {KEY_A}"},
            {"Authorization": f"Bearer {KEY_A}x"},
            {"Authorization": f"Bearer {KEY_A[:-1]}"},
            {"Authorization": "Bearer wrong-key"},
            {"Authorization": KEY_A},
            {"X-Api-Key": KEY_A},
        ]
        for headers in bad_headers:
            for method, path, payload in (
                ("POST", "/v1/completions", body),
                ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                ("GET", "/v1/models", None),
            ):
                resp = await client.request(method, path, json=payload, headers=headers)
                assert resp.status == 401, (headers, path)
                error = (await resp.json())["error"]
                assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
        for key in (KEY_A, KEY_B):
            for scheme in ("Bearer", "bearer"):
                resp = await client.post(
                    "/v1/completions", json=body, headers={"Authorization": f"{scheme} {key}"}
                )
                assert resp.status == 200
                assert (await resp.json())["usage"]["completion_tokens"] == 2
            resp = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert resp.status == 200 and (await resp.json())["data"][0]["id"] == MODEL
        for path in ("/health", "/metrics"):  # open for probes and scrapers
            assert (await client.get(path)).status == 200
        await until(lambda: stack.daemon.cache.stats().num_leases == 0, what="leases released")


async def test_metrics_carry_no_prompt_content(tmp_path: Path) -> None:
    marker = "ZQXJ-marker-7f3e9a1c"
    salt = "salt-VUWKQ-31415926"
    ids = [911, 733, 977, 619, 887, 653, 941, 709, 823, 599, 967, 757, 829, 601, 919, 743, 853, 617]
    keys = frozenset({KEY_A, KEY_B})
    async with serving(tmp_path, http=True, metrics=True, api_keys=keys, salt_from_api_key=True) as stack:
        stack.start_scripted("w0")
        await until(lambda: len(stack.daemon.workers_info()) == 1, what="worker registered")
        client = stack.client
        assert client is not None
        auth = {"Authorization": f"Bearer {KEY_A}"}
        prompts: list[dict[str, object]] = [
            {"prompt": f"{marker} please repeat {marker}"},
            {"prompt": ids},
            {"prompt": ids, "stream": True},
            {"prompt": [*ids, *ids]},
        ]
        for extra in prompts:
            resp = await client.post(
                "/v1/completions",
                json={"model": MODEL, "max_tokens": 3, "cache_salt": salt, **extra},
                headers=auth,
            )
            assert resp.status == 200
            await resp.read()
        resp = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": marker}], "max_tokens": 3, "cache_salt": salt},
            headers=auth,
        )
        assert resp.status == 200
        # A refused request (unknown model named after the marker) must not leak through labels either.
        resp = await client.post(
            "/v1/completions", json={"model": marker, "prompt": ids, "max_tokens": 3}, headers=auth
        )
        assert resp.status == 404
        await until(lambda: stack.daemon.cache.stats().num_leases == 0, what="leases released")
        assert stack.daemon.cache.stats().cached > 0  # the prompts really are in the cache now

        resp = await client.get("/metrics")
        assert resp.status == 200
        text = await resp.text()
        assert "radixkv_" in text
        secrets = [marker, salt, KEY_A, KEY_B, derive_key_salt(KEY_A), derive_key_salt(KEY_B)]
        for secret in secrets:
            assert secret not in text, secret
        for sep in (",", ", ", " ", "\n"):
            assert sep.join(map(str, ids[:4])) not in text
        label_values: set[str] = set()
        num_samples = 0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                num_samples += 1
                label_values.update(sample.labels.values())
        assert num_samples > 10
        id_strings = {str(i) for i in ids}
        assert not (label_values & id_strings)
        assert not any(secret in value for value in label_values for secret in secrets)
