"""Graceful stop: SIGTERM to `cachemgr serve` with a request streaming. The daemon refuses new requests
(503 shutting_down, /health 503 draining), lets the running one finish every token, then exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from bench.random_model import LlamaShape, write_model_dir
from cachemgr.launcher import free_port
from tests.helpers.procs import ProcessGroup

pytestmark = pytest.mark.slow  # a real daemon process and a scripted worker

SHAPE = LlamaShape(1024, 64, 128, 2, 4, 2, 16, 2048)
PROMPT = [(i * 37) % 500 + 3 for i in range(40)]


async def _health(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with http.get(url + "/health") as resp:
        return resp.status, await resp.json()


async def test_sigterm_drains_running_requests_and_refuses_new_ones(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", SHAPE, name="tiny-random")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ProcessGroup(tmp_path) as procs:
        daemon, info = procs.start_daemon(
            model, "--http-port", str(port), "--num-pages", "64", "--shutdown-grace", "20"
        )
        procs.start_worker(info["worker_endpoint"], "w", "--token-delay", "0.1")
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            while (await _health(http, url))[1]["workers"] != 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            body = {"prompt": PROMPT, "max_tokens": 20, "ignore_eos": True, "stream": True}
            async with http.post(url + "/v1/completions", json=body) as resp:
                lines = [await resp.content.readline()]  # the first token is out: the request is running
                daemon.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                assert await _health(http, url) == (
                    503,
                    {"status": "draining", "workers": 1, "ready_workers": 1, "model": "tiny-random"},
                )
                async with http.post(
                    url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}
                ) as refused:
                    assert (
                        refused.status == 503 and (await refused.json())["error"]["code"] == "shutting_down"
                    )
                lines += [line async for line in resp.content]
        events = [line for line in lines if line.startswith(b"data: {")]
        assert lines[-2].startswith(b"data: [DONE]") and b'"finish_reason":"length"' in events[-1].replace(
            b" ", b""
        )
        assert daemon.wait(15) == 0
        assert "drained: every accepted request finished" in procs.read_log("daemon.log")
