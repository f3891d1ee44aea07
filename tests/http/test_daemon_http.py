"""The HTTP app wired to a real in-process Daemon (real cache, shm pool, ROUTER socket) with scripted
worker processes (tests.helpers.scripted_worker): what crosses the whole request path, exactly."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import openai
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from cachemgr.cache import PrefixCache
from cachemgr.daemon import Daemon, DaemonSettings
from cachemgr.http import build_http_app
from shared.kv_layout import KVLayout
from shared.pool import OwnedPool, create_pool
from tests.helpers.procs import ProcessGroup
from tests.helpers.scripted_worker import expected_output
from tests.http.doubles import TagTokenizer

PAGE = 16
MODEL = "tiny-llama"
CONTEXT = 512
MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")  # the tests sharing one daemon share its loop


def _text(ids: list[int]) -> str:
    return "".join(f"<{i}>" for i in ids)


def _make_daemon(tmp_path: Path) -> tuple[Daemon, OwnedPool]:
    layout = KVLayout(num_layers=2, num_pages=64, page_size=PAGE, num_kv_heads=1, head_dim=2)
    pool = create_pool(layout, "shm", name=f"test-http-{os.getpid()}-{tmp_path.name}")
    settings = DaemonSettings(
        endpoint=f"ipc://{tmp_path}/workers.sock", heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0
    )
    daemon = Daemon(
        cache=PrefixCache(layout.num_pages, page_size=PAGE),
        pool=pool.descriptor(),
        settings=settings,
        model_name=MODEL,
        max_context_len=CONTEXT,
        vocab_size=1024,
    )
    return daemon, pool


@asynccontextmanager
async def _serving(tmp_path: Path, num_workers: int) -> AsyncIterator[tuple[Daemon, TestClient]]:
    """A started daemon, its HTTP app on a test server, and num_workers scripted workers registered."""
    daemon, pool = _make_daemon(tmp_path)
    await daemon.start()
    client = TestClient(TestServer(build_http_app(daemon, TagTokenizer(), model_name=MODEL, vocab_size=1024)))
    await client.start_server()
    try:
        with ProcessGroup(tmp_path) as procs:
            for i in range(num_workers):
                # a small per-token delay keeps a request running long enough to disconnect from it
                procs.start_worker(daemon.endpoint, f"w{i}", "--model", MODEL, "--token-delay", "0.01")
            await _until(lambda: len(daemon.workers_info()) == num_workers)
            yield daemon, client
            daemon.cache.check()
    finally:
        await client.close()
        await daemon.stop()
        pool.close()
    stats = daemon.cache.stats()
    assert (stats.leased, stats.num_leases) == (0, 0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Daemon, TestClient]]:
    async with _serving(tmp_path_factory.mktemp("http-daemon"), num_workers=1) as pair:
        yield pair


async def _until(predicate: object, timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _complete(client: TestClient, prompt: list[int], **body: object) -> dict:
    r = await client.post(
        "/v1/completions", json={"prompt": prompt, "temperature": 0, "max_tokens": 5, **body}
    )
    assert r.status == 200, await r.text()
    return await r.json()


async def test_no_workers_and_prompt_too_large(tmp_path: Path) -> None:
    async with _serving(tmp_path, num_workers=0) as (_, client):
        r = await client.get("/health")
        assert (r.status, await r.json()) == (
            503,
            {"status": "no_workers", "workers": 0, "ready_workers": 0, "model": MODEL},
        )
        r = await client.post("/v1/completions", json={"prompt": [5, 6]})
        assert (r.status, (await r.json())["error"]["code"]) == (503, "no_workers")
        r = await client.post("/v1/completions", json={"prompt": [5] * CONTEXT})
        body = await r.json()
        assert (r.status, body["error"]["code"], body["error"]["param"]) == (
            400,
            "context_length_exceeded",
            "prompt",
        )


@MODULE_LOOP
async def test_serving_with_cache_hits(served: tuple[Daemon, TestClient]) -> None:
    _, client = served
    assert (await client.get("/health")).status == 200
    prompt = list(range(10, 50))  # 40 tokens: 2 full pages are shareable, the 3rd page is partial
    first = await _complete(client, prompt)
    assert first["choices"][0]["text"] == _text(expected_output(prompt, 5))
    assert first["choices"][0]["finish_reason"] == "length"
    assert first["usage"] == {
        "prompt_tokens": 40,
        "completion_tokens": 5,
        "total_tokens": 45,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    second = await _complete(client, prompt)
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}


@MODULE_LOOP
async def test_choices_share_the_prompt_pages(served: tuple[Daemon, TestClient]) -> None:
    """n = 3: three requests on the daemon; the first computes the prompt's full pages, the other two wait
    for them and reuse them, and every choice is a complete answer."""
    daemon, client = served
    prompt = list(range(300, 340))  # 40 tokens: 2 full pages
    before = daemon.stats()["requests_finished"]
    hits_before = daemon.cache.stats().tokens_hit
    body = await _complete(client, prompt, n=3)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert {c["text"] for c in body["choices"]} == {_text(expected_output(prompt, 5))}
    assert body["usage"]["prompt_tokens"] == 40 and body["usage"]["completion_tokens"] == 15
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # nothing was cached before
    assert daemon.stats()["requests_finished"] == before + 3
    assert daemon.cache.stats().tokens_hit - hits_before >= 2 * 32  # both followers reused the 2 pages
    again = await _complete(client, prompt)  # the pages are in the tree now
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}


@MODULE_LOOP
async def test_cache_salt_isolates_tenants(served: tuple[Daemon, TestClient]) -> None:
    _, client = served
    prompt = list(range(100, 140))
    cached = []
    for salt in ("tenant-a", "tenant-b", "tenant-a", ""):
        body = await _complete(client, prompt, cache_salt=salt)
        cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached == [0, 0, 32, 0]


@MODULE_LOOP
async def test_openai_client_streaming_and_not(served: tuple[Daemon, TestClient]) -> None:
    _, client = served
    prompt = list(range(200, 240))
    api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    try:
        full = await api.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
        assert full.choices[0].text == _text(expected_output(prompt, 4))
        stream = await api.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        deltas, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.choices:
                deltas.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        chat_prompt = list(b"<user>hi\n<assistant>")
        assert "".join(deltas) == _text(expected_output(chat_prompt, 4))
        assert finish == "length"
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(chat_prompt), 4)
        with pytest.raises(openai.NotFoundError):
            await api.completions.create(model="other", prompt="x")
    finally:
        await api.close()


@MODULE_LOOP
async def test_client_disconnect_releases_the_request(served: tuple[Daemon, TestClient]) -> None:
    daemon, client = served
    r = await client.post("/v1/completions", json={"prompt": [7] * 40, "max_tokens": 400, "stream": True})
    assert (await r.content.readuntil(b"\n\n")).startswith(b"data: ")
    assert daemon.cache.stats().num_leases == 1
    r.close()
    await _until(lambda: daemon.cache.stats().num_leases == 0 and daemon.stats()["running"] == 0)
    daemon.cache.check()
