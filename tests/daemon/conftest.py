"""An in-process Daemon on the test's event loop, with a real shm pool and a real ROUTER socket; the
workers are real processes (tests.helpers.scripted_worker). check() runs after every test."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cachemgr.cache import Namespace, PrefixCache
from cachemgr.daemon import Daemon, DaemonSettings
from shared.kv_layout import KVLayout
from shared.pool import OwnedPool, create_pool
from tests.helpers.procs import ProcessGroup

PAGE = 4
NS = Namespace("tiny-llama")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    with ProcessGroup(tmp_path) as group:
        yield group


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[OwnedPool]:
    layout = KVLayout(num_layers=2, num_pages=64, page_size=PAGE, num_kv_heads=1, head_dim=2, dtype="float32")
    owned = create_pool(layout, "shm", name=f"test-{os.getpid()}-{tmp_path.name}")
    yield owned
    owned.close()


def make_daemon(pool: OwnedPool, tmp_path: Path, **overrides: object) -> Daemon:
    settings = DaemonSettings(
        endpoint=f"ipc://{tmp_path}/workers.sock",
        heartbeat_interval_s=0.1,
        heartbeat_timeout_s=0.6,
        page_wait_timeout_s=2.0,
        worker_wait_timeout_s=3.0,
        decode_page_chunk=2,
        **overrides,  # type: ignore[arg-type]
    )
    cache = PrefixCache(pool.layout.num_pages, page_size=PAGE)
    return Daemon(
        cache=cache,
        pool=pool.descriptor(),
        settings=settings,
        model_name="tiny-llama",
        max_context_len=4096,
        vocab_size=1024,
    )


@pytest.fixture
async def daemon(pool: OwnedPool, tmp_path: Path) -> AsyncIterator[Daemon]:
    d = make_daemon(pool, tmp_path)
    await d.start()
    yield d
    d.check()
    await d.stop()
    d.check()
    stats = d.cache.stats()
    assert (stats.leased, stats.num_leases) == (0, 0)


async def wait_until(predicate: object, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


async def collect(stream: object) -> list[int]:
    """All tokens of a stream (asserts it ends with a finish reason)."""
    tokens: list[int] = []
    last = None
    async for event in stream:  # type: ignore[attr-defined]
        tokens.extend(event.token_ids)
        last = event
    assert last is not None and last.finish_reason is not None
    return tokens
