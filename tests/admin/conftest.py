"""Fixtures for the admin, metrics and KV events tests: a real PrefixCache behind a small fake daemon.

The fake daemon only provides what the admin socket and metrics read (stats, workers, leases,
tokenize); the cache is always the real cache core.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachemgr.admin.server import AdminServer
from cachemgr.cache import Namespace, PrefixCache
from cachemgr.daemon.errors import DaemonIntegrityError

MODEL = "test-model"
PAGE_SIZE = 4
NUM_PAGES = 32
TOKEN = "s3cret-admin-token-0123456789"


class FakeDaemon:
    """The daemon attributes the admin socket and metrics use, over a real cache."""

    def __init__(self, cache: PrefixCache) -> None:
        self.cache = cache
        self.model_name = MODEL
        self.tokenized: list[str] = []
        self.bookkeeping_error: str | None = None  # set by a test to break the daemon's own invariant

    def stats(self) -> dict[str, Any]:
        return {"workers": 2, "ready_workers": 1, "queue_depth": 3, "running": 1, "requests_total": 7}

    def workers_info(self) -> list[dict[str, Any]]:
        return [
            {"worker_id": "w1", "pid": 101, "device": "cpu", "running": 1, "capacity": 4},
            {"worker_id": "w2", "pid": 102, "device": "cpu", "running": 0, "capacity": 4},
        ]

    def leases_info(self) -> list[dict[str, Any]]:
        return [{"lease_id": 5, "request_id": b"\x01\x02".hex(), "worker_id": "w1", "owned_pages": 2}]

    def check(self) -> None:
        self.cache.check()
        if self.bookkeeping_error is not None:
            raise DaemonIntegrityError(self.bookkeeping_error)

    async def tokenize(self, text: str) -> list[int]:
        # One token per character: deterministic, and enough to exercise the text path.
        self.tokenized.append(text)
        return [ord(c) for c in text]


def cache_prompt(cache: PrefixCache, tokens: list[int], ns: Namespace | None = None) -> np.ndarray:
    """Run one request's full lifecycle on the cache (lease, allocate, commit, release); returns the pages
    now backing the prompt's full pages."""
    ns = ns or Namespace(MODEL)
    lease = cache.open_lease(ns, tokens)
    num_full = len(tokens) // cache.page_size
    num_new = num_full - lease.matched_len // cache.page_size
    new = cache.allocate(lease.lease_id, num_new)
    assert new is not None
    pages = np.concatenate([lease.prefix_page_ids, new]).astype(np.int32)
    result = cache.commit(lease.lease_id, tokens[: num_full * cache.page_size], pages)
    cache.release(lease.lease_id)
    return result.page_ids


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory path (Unix socket paths are limited to 107 bytes; tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="radixkv-admin-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cache() -> PrefixCache:
    return PrefixCache(NUM_PAGES, page_size=PAGE_SIZE)


@pytest.fixture
def daemon(cache: PrefixCache) -> FakeDaemon:
    return FakeDaemon(cache)


@pytest.fixture
async def server(daemon: FakeDaemon, short_dir: Path) -> AsyncIterator[AdminServer]:
    admin = AdminServer(daemon, short_dir / "run" / "admin.sock", tcp_port=0, token=TOKEN, idle_timeout_s=2.0)
    await admin.start()
    yield admin
    await admin.stop()


async def raw_exchange(path: Path, payload: bytes) -> list[bytes]:
    """Send raw bytes to the Unix socket and return every reply line until the server closes or idles."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    lines = []
    while line := await asyncio.wait_for(reader.readline(), 5):
        lines.append(line)
    writer.close()
    return lines
