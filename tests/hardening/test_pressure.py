"""Memory pressure over HTTP: the KV pool is small and traffic is not.

1. Ten times the pool's capacity in distinct prefixes: every request is served with the exact output,
   cached pages are evicted to make room (the eviction counter shows it) and latency stays bounded.
2. Every page locked by running requests: a new request waits for pages, then fails after the page-wait
   timeout with a clear 503 (no deadlock); a prompt that can never fit the pool gets a 400 at once even
   then; once the running requests finish, the waiting prompt is served.

In-process daemon on real sockets and a real shm pool with scripted worker processes (see
tests/hardening/conftest.py), so the figures measure the daemon's cache and scheduling, not a model.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path

from aiohttp.test_utils import TestClient

from tests.hardening.conftest import assert_idle_baseline, rss_mib, serving, until
from tests.hardening.figures import record
from tests.helpers.scripted_worker import expected_output

NUM_PAGES = 64
PAGE = 16
MAX_TOKENS = 8


def tag_text(tokens: list[int]) -> str:
    """What the HTTP layer answers for these output ids (the conftest's TagTokenizer)."""
    return "".join(f"<{t}>" for t in tokens)


async def complete(client: TestClient, prompt: list[int], max_tokens: int = MAX_TOKENS) -> tuple[int, dict]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    resp = await client.post("/v1/completions", json=body)
    return resp.status, await resp.json()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def test_ten_times_the_pool_in_distinct_prefixes_keeps_serving(tmp_path: Path) -> None:
    rng = random.Random(6)
    prompt_len = 6 * PAGE + 4  # 7 pages with the partial last one
    num_requests = 96  # 96 x 7 = 672 prompt pages: 10.5 x the pool
    prompts = [[rng.randrange(3, 1000) for _ in range(prompt_len)] for _ in range(num_requests)]
    async with serving(tmp_path, num_pages=NUM_PAGES, page_size=PAGE, http=True) as stack:
        for name in ("a", "b"):
            stack.start_scripted(name, "--max-running", "4")
        await until(lambda: len(stack.daemon.workers_info()) == 2, what="2 workers registered")
        assert stack.client is not None
        rss_before = rss_mib()
        latencies: list[float] = []
        gate = asyncio.Semaphore(8)

        async def one(prompt: list[int]) -> None:
            async with gate:
                started = time.monotonic()
                status, body = await complete(stack.client, prompt)  # type: ignore[arg-type]
                latencies.append(time.monotonic() - started)
            assert status == 200, body
            assert body["choices"][0]["text"] == tag_text(expected_output(prompt, MAX_TOKENS))
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # all distinct

        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 60.0)
        wall_s = time.monotonic() - started
        stats = stack.daemon.cache.stats()
        # Each request commits its 6 full prompt pages (the 7th, partial, holds the output and is
        # committed at finish only once full: 4 + 8 tokens are not). All of it went through 64 pages.
        committed_pages = num_requests * 6
        assert stats.evictions >= committed_pages - NUM_PAGES
        assert stats.cached <= NUM_PAGES and stats.leased == 0
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        assert p99 < 2.0, latencies  # bounded: no request starves while others evict around it
        assert stack.daemon.stats()["requests_failed"] == 0
        rss_after = rss_mib()
        assert_idle_baseline(stack.daemon)
    record(
        "pressure_10x",
        pool_pages=NUM_PAGES,
        requests=num_requests,
        prompt_pages_requested=num_requests * 7,
        evictions=stats.evictions,
        wall_seconds=round(wall_s, 2),
        latency_p50_ms=round(p50 * 1e3, 1),
        latency_p99_ms=round(p99 * 1e3, 1),
        latency_max_ms=round(max(latencies) * 1e3, 1),
        latency_mean_ms=round(statistics.fmean(latencies) * 1e3, 1),
        test_process_rss_mib=(round(rss_before, 1), round(rss_after, 1)),
    )


async def test_every_page_locked_then_timeout_then_recovery(tmp_path: Path) -> None:
    rng = random.Random(7)
    holder_len = 15 * PAGE  # 15 prompt pages + 1 decode page each: 4 holders lock all 64 pages
    holders = [[rng.randrange(3, 1000) for _ in range(holder_len)] for _ in range(4)]
    waiter = [rng.randrange(3, 1000) for _ in range(2 * PAGE)]
    too_big = [5] * (NUM_PAGES * PAGE - PAGE + 1)  # 64 pages of prompt + 1 to decode into > 64
    async with serving(
        tmp_path, num_pages=NUM_PAGES, page_size=PAGE, http=True, page_wait_timeout_s=1.0, decode_page_chunk=1
    ) as stack:
        daemon = stack.daemon
        # Prefill takes 3 s: the holders sit on their pages well past the waiter's 1 s page wait.
        for name in ("a", "b"):
            stack.start_scripted(name, "--max-running", "4", "--prefill-delay", "3.0")
        await until(lambda: len(daemon.workers_info()) == 2, what="2 workers registered")
        client = stack.client
        assert client is not None
        running = [asyncio.ensure_future(complete(client, p, max_tokens=1)) for p in holders]
        await until(lambda: daemon.cache.stats().free == 0, 10.0, "every page leased")
        assert daemon.cache.stats().leased == NUM_PAGES

        started = time.monotonic()
        status, body = await complete(client, too_big)
        refused_s = time.monotonic() - started
        assert (status, body["error"]["code"]) == (400, "context_length_exceeded")
        assert body["error"]["message"] == (
            f"prompt of {len(too_big)} tokens can never fit the KV pool of {NUM_PAGES} pages of {PAGE}"
        )
        assert refused_s < 0.5  # at once, not after a page wait

        started = time.monotonic()
        status, body = await asyncio.wait_for(complete(client, waiter), 10.0)
        waited_s = time.monotonic() - started
        assert (status, body["error"]["code"]) == (503, "request_failed")
        assert body["error"]["message"] == "The request failed: no KV pages freed up within 1.0s"
        assert 1.0 <= waited_s < 2.5
        assert daemon.cache.stats().leased == NUM_PAGES  # the failed request left nothing behind
        daemon.check()

        results = await asyncio.wait_for(asyncio.gather(*running), 20.0)
        for prompt, (status, body) in zip(holders, results, strict=True):
            assert (status, body["choices"][0]["text"]) == (200, tag_text(expected_output(prompt, 1)))
        started = time.monotonic()
        status, body = await complete(client, waiter)  # recovered: pages are evictable again
        recovered_s = time.monotonic() - started
        assert (status, body["choices"][0]["text"]) == (200, tag_text(expected_output(waiter, MAX_TOKENS)))
        assert daemon.stats()["requests_failed"] == 1
        await until(lambda: daemon.cache.stats().num_leases == 0, 5.0, "no lease left")
        assert_idle_baseline(daemon)
    record(
        "pressure_all_locked",
        pool_pages=NUM_PAGES,
        page_wait_timeout_s=1.0,
        too_big_refused_ms=round(refused_s * 1e3, 1),
        waiter_failed_after_s=round(waited_s, 2),
        recovered_request_s=round(recovered_s, 2),
    )
