"""Every admin command through the real CLI (`main(argv)` in a thread, and `python -m cachemgr admin` as a
subprocess) against a real admin socket over a real PrefixCache."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from cachemgr.admin.cli import build_parser, default_socket_path, main
from cachemgr.admin.server import AdminServer
from cachemgr.cache import DEFAULT_POLICY, IntegrityError, Namespace
from tests.admin.conftest import MODEL, NUM_PAGES, PAGE_SIZE, TOKEN, FakeDaemon, cache_prompt

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fixed_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")


async def cli(server: AdminServer, *argv: str) -> int:
    """Run the CLI in a thread (it blocks) while this loop serves the socket."""
    return await asyncio.to_thread(main, [*argv, "--socket", str(server.path)], {})


async def cli_json(server: AdminServer, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    assert await cli(server, *argv, "--json") == 0
    return json.loads(capsys.readouterr().out)


def fill(daemon: FakeDaemon) -> None:
    cache_prompt(daemon.cache, list(range(1, 14)))  # 3 pages
    cache_prompt(daemon.cache, [*range(1, 9), 50, 51, 52, 53])  # shares 2 pages, adds 1
    cache_prompt(daemon.cache, [7] * 8, Namespace(MODEL, "tenant-1"))  # 2 pages, salted


async def test_stats(server: AdminServer, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fill(daemon)
    daemon.cache.match(Namespace(MODEL), list(range(1, 11)))  # 10 queried, 8 hit
    result = await cli_json(server, capsys, "stats")
    assert result == {
        "cache": {
            "num_pages": NUM_PAGES,
            "page_size": PAGE_SIZE,
            "free": NUM_PAGES - 6,
            "cached": 6,
            "leased": 0,
            "locked": 0,
            "pinned": 0,
            "tokens_queried": 10,
            "tokens_hit": 8,
            "evictions": 0,
            "num_leases": 0,
            "num_nodes": 4,
            "policy": DEFAULT_POLICY,
        },
        "daemon": {"workers": 2, "ready_workers": 1, "queue_depth": 3, "running": 1, "requests_total": 7},
    }
    assert await cli(server, "stats") == 0
    out = capsys.readouterr().out
    assert "│ free           │    26 │" in out
    assert "│ hit_rate       │ 80.0% │" in out
    assert "│ queue_depth    │ 3 │" in out


async def test_tree(server: AdminServer, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fill(daemon)
    assert await cli(server, "tree") == 0
    salt_id = (await cli_json(server, capsys, "tree"))["namespaces"][1]["salt"]
    assert len(salt_id) == 8 and salt_id != "tenant-1"  # the salt itself never leaves the daemon
    assert await cli(server, "tree") == 0
    assert capsys.readouterr().out.splitlines() == [
        "prefix cache: 4 of 4 nodes",
        "├── test-model · 4 pages",
        "│   └── [1 2 3 4 5 6 7 8]  2 pages at depth 0 · last access #3",
        "│       ├── [50 51 52 53]  1 page at depth 2 · last access #4",
        "│       └── [9 10 11 12]  1 page at depth 2 · last access #2",
        f"└── test-model  (salt {salt_id}) · 2 pages",
        "    └── [7 7 7 7 7 7 7 7]  2 pages at depth 0 · last access #6",
    ]
    assert await cli(server, "tree", "--max-nodes", "2") == 0
    assert capsys.readouterr().out.splitlines() == [
        "prefix cache: 2 of 4 nodes (truncated: raise --max-nodes to see more)",
        "├── test-model · 4 pages",
        "│   └── [1 2 3 4 5 6 7 8]  2 pages at depth 0 · last access #3",
        "│       └── … 2 more",
        f"└── test-model  (salt {salt_id}) · 2 pages",
        "    └── [7 7 7 7 7 7 7 7]  2 pages at depth 0 · last access #6",
    ]
    lease = daemon.cache.open_lease(Namespace(MODEL), list(range(1, 30)))  # locks 3 pages of A
    assert await cli(server, "tree", "--max-nodes", "2") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "│   └── [1 2 3 4 5 6 7 8]  2 pages at depth 0 · locks 1 · last access #7"
    daemon.cache.release(lease.lease_id)


async def test_workers_and_leases(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await cli_json(server, capsys, "workers") == [
        {"worker_id": "w1", "pid": 101, "device": "cpu", "running": 1, "capacity": 4},
        {"worker_id": "w2", "pid": 102, "device": "cpu", "running": 0, "capacity": 4},
    ]
    assert await cli_json(server, capsys, "leases") == [
        {"lease_id": 5, "request_id": "0102", "worker_id": "w1", "owned_pages": 2}
    ]
    assert await cli(server, "workers") == 0
    out = capsys.readouterr().out
    assert "┃ worker_id ┃ pid ┃ device ┃ running ┃ capacity ┃" in out
    assert "│ w2        │ 102 │ cpu    │ 0       │ 4        │" in out
    assert await cli(server, "leases") == 0
    assert "│ 5        │ 0102       │ w1        │ 2           │" in capsys.readouterr().out


async def test_evict_flush_pin_unpin(
    server: AdminServer, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(daemon)
    cache = daemon.cache
    # pin by token ids (salted namespace) and by text (tokenized by the daemon: one token per char)
    assert await cli_json(server, capsys, "pin", "--tokens", "7,7,7,7,7,7,7,7", "--salt", "tenant-1") == {
        "model": MODEL,
        "salted": True,
        "tokens": 8,
        "pinned_tokens": 8,
    }
    cache_prompt(cache, [ord(c) for c in "system prompt!"])  # 14 chars: 3 full pages
    assert await cli(server, "pin", "system prompt!") == 0
    assert capsys.readouterr().out == "pinned the first 12 tokens of a 14-token prefix in test-model\n"
    assert daemon.tokenized == ["system prompt!"]
    assert cache.stats().pinned == 5
    assert await cli(server, "pin", "--tokens", "99 98 97 96") == 0
    assert capsys.readouterr().out == "nothing pinned: no page of a 4-token prefix in test-model is cached\n"

    assert await cli_json(server, capsys, "evict", "100") == {"requested": 100, "evicted": 4}
    assert cache.stats().cached == 5  # only the pinned pages are left
    assert await cli(server, "flush") == 0
    assert capsys.readouterr().out == "flushed: 0 pages freed\n"

    assert await cli_json(server, capsys, "unpin", "--tokens", "7,7,7,7,7,7,7,7", "--salt", "tenant-1") == {
        "model": MODEL,
        "salted": True,
        "tokens": 8,
        "unpinned_tokens": 8,
    }
    text_file = server.path.parent / "prompt.txt"
    text_file.write_text("system prompt!")
    assert await cli(server, "unpin", "--file", str(text_file)) == 0
    assert capsys.readouterr().out == "unpinned the first 12 tokens of a 14-token prefix in test-model\n"
    assert await cli(server, "unpin", "--tokens", "1,2,3,4") == 0
    assert capsys.readouterr().out == "nothing unpinned: no pin of a 4-token prefix in test-model\n"
    assert await cli_json(server, capsys, "flush") == {"freed": 5}
    stats = cache.stats()
    assert (stats.free, stats.cached, stats.pinned, stats.evictions) == (NUM_PAGES, 0, 0, 4)
    cache.check()


async def test_check_reports_a_broken_invariant(
    server: AdminServer, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(daemon)
    assert await cli(server, "check") == 0
    assert capsys.readouterr().out == "ok: page accounting and locks are consistent\n"
    daemon.cache._cached_pages += 1  # simulate a bookkeeping bug inside the cache
    with pytest.raises(IntegrityError) as broken:
        daemon.cache.check()
    assert await cli(server, "check") == 1
    assert capsys.readouterr().out.startswith("integrity check failed: IntegrityError: ")
    assert await asyncio.to_thread(main, ["check", "--json", "--socket", str(server.path)], {}) == 1
    assert json.loads(capsys.readouterr().out) == {
        "healthy": False,
        "message": f"IntegrityError: {broken.value}",
    }
    daemon.cache._cached_pages -= 1
    daemon.bookkeeping_error = "lease 3 has no request"  # the daemon's own invariant (daemon.check())
    assert await asyncio.to_thread(main, ["check", "--json", "--socket", str(server.path)], {}) == 1
    assert json.loads(capsys.readouterr().out) == {
        "healthy": False,
        "message": "DaemonIntegrityError: lease 3 has no request",
    }
    daemon.bookkeeping_error = None
    assert await cli(server, "check") == 0


async def test_errors_exit_1_with_a_clear_message(
    server: AdminServer, short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert await cli(server, "evict", "0") == 1
    assert capsys.readouterr().err == "error (bad_args): evict: pages must be at least 1\n"
    missing = short_dir / "nobody.sock"
    assert main(["stats", "--socket", str(missing)], {}) == 1
    assert capsys.readouterr().err == f"error: no admin socket at {missing}: is the daemon running?\n"
    dead = short_dir / "dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(dead))
    sock.close()
    assert main(["stats", "--socket", str(dead)], {}) == 1
    assert capsys.readouterr().err == f"error: nothing listens at {dead}: is the daemon running?\n"
    with pytest.raises(SystemExit) as usage:
        main(["evict"], {})
    assert usage.value.code == 2


async def test_tcp_with_token_from_env(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert server.tcp_address is not None
    host, port = server.tcp_address
    env = {"RADIXKV_ADMIN_TCP": f"{host}:{port}", "RADIXKV_ADMIN_TOKEN": TOKEN}
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["check", "--json"], env) == 0
    assert json.loads(capsys.readouterr().out) == {"healthy": True, "message": "ok"}
    env["RADIXKV_ADMIN_TOKEN"] = "not-the-right-token-at-all"
    assert await asyncio.to_thread(main, ["check"], env) == 1
    assert capsys.readouterr().err == "error (unauthorized): missing or wrong token\n"


@pytest.mark.parametrize(
    ("argv", "json_out", "timeout"),
    [
        (["--json", "stats"], True, 30.0),
        (["stats", "--json"], True, 30.0),
        (["stats"], False, 30.0),
        (["--timeout", "5", "workers"], False, 5.0),
        (["--timeout", "5", "workers", "--timeout", "7"], False, 7.0),  # after the command wins
    ],
)
def test_connection_options_go_before_or_after_the_command(
    argv: list[str], json_out: bool, timeout: float
) -> None:
    ns = build_parser({"RADIXKV_ADMIN_TOKEN": "t"}).parse_args(argv)
    assert (ns.json, ns.timeout, ns.token, ns.tcp) == (json_out, timeout, "t", None)
    assert ns.socket == default_socket_path({})


def test_default_socket_path() -> None:
    assert default_socket_path({}) == Path(f"/tmp/radixkv-{os.getuid()}/admin.sock")
    assert default_socket_path({"RADIXKV_RUN_DIR": "/run/rk"}) == Path("/run/rk/admin.sock")
    assert default_socket_path({"RADIXKV_RUN_DIR": "/run/rk", "RADIXKV_ADMIN_SOCKET": "/x/a.sock"}) == Path(
        "/x/a.sock"
    )


async def test_cachemgr_admin_as_a_process(server: AdminServer, daemon: FakeDaemon) -> None:
    fill(daemon)
    env = {**os.environ, "RADIXKV_ADMIN_SOCKET": str(server.path), "PYTHONPATH": str(REPO)}

    async def run(*argv: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, env=env, cwd=REPO, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    code, out = await run("-m", "cachemgr", "admin", "evict", "2", "--json")
    assert (code, json.loads(out)) == (0, {"requested": 2, "evicted": 2})
    code, out = await run("-m", "cachemgr.admin", "check", "--json")
    assert (code, json.loads(out)) == (0, {"healthy": True, "message": "ok"})
    # LRU took the two oldest leaves: A's tail page, then B's; the salted namespace is untouched.
    ns = Namespace(MODEL)
    assert daemon.cache.match(ns, list(range(1, 14))).matched_len == 8
    assert daemon.cache.match(ns, [*range(1, 9), 50, 51, 52, 53]).matched_len == 8
    assert daemon.cache.match(Namespace(MODEL, "tenant-1"), [7] * 8).matched_len == 8
    assert daemon.cache.stats().cached == 4
