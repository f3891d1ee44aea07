"""Fixtures for the hardening tests: an in-process Daemon on real ZeroMQ sockets and a real shm pool,
optionally with its HTTP app on a test server, and worker processes (scripted or real).

`serving(...)` is the one place a stack is built, so every test tears down the same way: streams end,
workers stop, the daemon's check() holds, no lease is left and the pool file is removed.
"""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from cachemgr.cache import Namespace, PrefixCache
from cachemgr.daemon import Daemon, DaemonSettings
from cachemgr.http import build_http_app
from shared.kv_layout import KVLayout
from shared.pool import OwnedPool, create_pool
from shared.protocol import FinishReason
from tests.helpers.procs import ProcessGroup
from tests.http.doubles import TagTokenizer

MODEL = "tiny-llama"
VOCAB = 1024
CONTEXT = 4096
NS = Namespace(MODEL)


@dataclass
class Stack:
    """What a hardening test drives: the daemon, its pool, worker processes and (maybe) an HTTP client."""

    daemon: Daemon
    pool: OwnedPool
    procs: ProcessGroup
    client: TestClient | None
    tmp: Path

    def start_scripted(self, name: str, *extra: str) -> object:
        return self.procs.start_worker(self.daemon.endpoint, name, "--model", MODEL, *extra)

    def start_worker_module(self, module: str, name: str, *extra: str) -> object:
        """A worker process from another module speaking the scripted worker's flags."""
        log = str(self.tmp / "events.jsonl")
        args = ["-m", module, "--daemon", self.daemon.endpoint, "--name", name, "--log", log]
        return self.procs.spawn([*args, "--model", MODEL, *extra], f"worker-{name}.log")


@asynccontextmanager
async def serving(
    tmp_path: Path,
    *,
    num_pages: int = 256,
    page_size: int = 16,
    http: bool = False,
    api_keys: frozenset[str] = frozenset(),
    salt_from_api_key: bool = False,
    metrics: bool = False,
    **settings: object,
) -> AsyncIterator[Stack]:
    layout = KVLayout(num_layers=2, num_pages=num_pages, page_size=page_size, num_kv_heads=1, head_dim=2)
    pool = create_pool(layout, "shm", name=f"hard-{os.getpid()}-{tmp_path.name[-24:]}")
    options: dict[str, object] = dict(heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0)
    options.update(settings)
    daemon = Daemon(
        cache=PrefixCache(num_pages, page_size=page_size),
        pool=pool.descriptor(),
        settings=DaemonSettings(endpoint=f"ipc://{tmp_path}/workers.sock", **options),  # type: ignore[arg-type]
        model_name=MODEL,
        max_context_len=CONTEXT,
        vocab_size=VOCAB,
    )
    client: TestClient | None = None
    await daemon.start()
    try:
        if metrics:
            from cachemgr.metrics import Metrics

            daemon.metrics = Metrics(daemon)
        if http:
            app = build_http_app(
                daemon,
                TagTokenizer(),
                model_name=MODEL,
                metrics=daemon.metrics,
                api_keys=api_keys,
                salt_from_api_key=salt_from_api_key,
                vocab_size=VOCAB,
            )
            client = TestClient(TestServer(app))
            await client.start_server()
        with ProcessGroup(tmp_path) as procs:
            yield Stack(daemon, pool, procs, client, tmp_path)
            daemon.check()
    finally:
        if client is not None:
            await client.close()
        await daemon.stop()
        pool.close()
    daemon.check()
    stats = daemon.cache.stats()
    assert (stats.leased, stats.num_leases, stats.locked) == (0, 0, 0)


async def until(predicate: object, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what} not met within {timeout_s}s")
        await asyncio.sleep(0.01)


async def collect(stream: object) -> tuple[list[int], FinishReason]:
    """All tokens of a daemon stream and its finish reason."""
    tokens: list[int] = []
    reason = None
    async for event in stream:  # type: ignore[attr-defined]
        tokens.extend(event.token_ids)
        reason = event.finish_reason
    assert reason is not None
    return tokens, reason


def rss_mib() -> float:
    """This process's resident set size now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def assert_idle_baseline(daemon: Daemon) -> None:
    """Nothing leased or locked; after a flush every page is free again (a leaked page would not be)."""
    daemon.check()
    stats = daemon.cache.stats()
    assert (stats.leased, stats.num_leases, stats.locked) == (0, 0, 0)
    daemon.cache.flush()
    stats = daemon.cache.stats()
    assert (stats.free, stats.cached, stats.num_nodes) == (stats.num_pages, 0, 0)
    daemon.check()
