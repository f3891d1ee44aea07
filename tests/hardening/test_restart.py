"""Daemon restart: SIGKILL `cachemgr serve` under load and start a new one on the same endpoint.

Real processes throughout: the daemon (`python -m cachemgr serve`, HTTP on a fixed port) and two
`computeworker` processes on a tiny random-weight Llama. When the daemon dies,

- in-flight HTTP requests end with a connection error at once (no hang: each is bounded below),
- the workers see the disconnect, drop their requests (the leases died with the daemon), register again
  with backoff, and map the new daemon's pool (a new /dev/shm file),
- within 5 s of the new daemon being up the stack serves again, with the same greedy output as before
  the kill (the new pool really is the one the workers compute in), and cache hits work on it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from bench.random_model import LlamaShape, write_model_dir
from cachemgr.launcher import free_port
from tests.hardening.figures import record
from tests.helpers.procs import ProcessGroup

pytestmark = pytest.mark.slow  # three real processes loading torch, twice for the daemon

SHAPE = LlamaShape(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
)
PROMPT = [(i * 37) % 500 + 3 for i in range(40)]  # 2 full pages of 16 + 8 tokens
SERVE_AGAIN_S = 5.0
IN_FLIGHT_BOUND_S = 10.0
DOWN_S = 2.2  # longer than the workers' Welcome timeout, so they retry with backoff


def worker_argv(endpoint: str, model: Path, name: str) -> list[str]:
    return [
        "-m", "computeworker", "--daemon", endpoint, "--model", str(model), "--random-weights",
        "--threads", "1", "--max-running", "8", "--name", name,
    ]  # fmt: skip


def daemon_flags(port: int) -> list[str]:
    return [
        "--http-port", str(port), "--num-pages", "128", "--page-size", "16",
        "--heartbeat-interval", "0.2", "--heartbeat-timeout", "1.5", "--worker-wait-timeout", "5",
    ]  # fmt: skip


async def health_workers(http: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with http.get(url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return int((await resp.json())["workers"])
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
        return None


async def complete(http: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int = 8) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with http.post(url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=30)) as r:
        data = await r.json()
        assert r.status == 200, data
        return data


async def stream_until_cut(
    http: aiohttp.ClientSession, url: str, prompt: list[int], started: asyncio.Event
) -> str:
    """A long streaming request: sets `started` at its first token, returns how it ended."""
    body = {"prompt": prompt, "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}
    try:
        async with http.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: {") and b'"error"' in line:
                    return "error event"
                if line.startswith(b"data: {"):
                    started.set()
                if line.startswith(b"data: [DONE]"):
                    return "done"  # the daemon died after all? then this request was not in flight
        return "eof"  # the connection closed without [DONE]: the client sees a truncated stream
    except aiohttp.ClientError as exc:
        return f"connection error ({type(exc).__name__})"


async def wait_serving(http: aiohttp.ClientSession, url: str, num_workers: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while await health_workers(http, url) != num_workers:
        assert time.monotonic() < deadline, f"{num_workers} workers not registered within {timeout_s}s"
        await asyncio.sleep(0.05)


async def test_daemon_sigkill_and_restart_on_the_same_endpoint(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", SHAPE, name="tiny-random")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ProcessGroup(tmp_path) as procs:
        daemon, info = procs.start_daemon(model, *daemon_flags(port))
        endpoint = info["worker_endpoint"]
        for name in ("a", "b"):
            procs.spawn(worker_argv(endpoint, model, name), f"worker-{name}.log")
        async with aiohttp.ClientSession() as http:
            await wait_serving(http, url, 2, timeout_s=60.0)
            before = await complete(http, url, PROMPT)
            reference = before["choices"][0]["text"]

            # Long streams in flight on both workers, then the daemon dies.
            started = [asyncio.Event() for _ in range(4)]
            streams = [
                asyncio.ensure_future(stream_until_cut(http, url, [7 + i, *PROMPT], started[i]))
                for i in range(4)
            ]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 30.0)
            old_pool = Path(info["pool_path"])
            daemon.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            assert daemon.wait(10) == -signal.SIGKILL
            endings = await asyncio.wait_for(asyncio.gather(*streams), IN_FLIGHT_BOUND_S)
            cut_s = time.monotonic() - killed_at
            assert all(e.startswith("connection error") or e in ("eof", "error event") for e in endings), (
                endings
            )

            # While it is down, a new request is refused at once (nothing listens), and the workers go
            # through failed registrations (Welcome timeout 2 s, then backoff) before it comes back.
            with pytest.raises(aiohttp.ClientConnectorError):
                await complete(http, url, PROMPT)
            await asyncio.sleep(DOWN_S)

            # A SIGKILLed daemon cleans nothing up: its ready file and pool stay. The supervisor
            # (`cachemgr up`) removes the pool; here the test does.
            assert old_pool.exists()
            old_pool.unlink()
            (tmp_path / "ready.json").unlink()
            daemon, info = procs.start_daemon(model, *daemon_flags(port))
            up_at = time.monotonic()
            assert info["worker_endpoint"] == endpoint and info["pool_path"] != str(old_pool)
            after = None
            while after is None:
                # The first request may find no worker yet (503 no_workers): retry until it serves.
                try:
                    if await health_workers(http, url) == 2:
                        after = await complete(http, url, PROMPT)
                except AssertionError:
                    pass
                assert time.monotonic() - up_at < SERVE_AGAIN_S, "the stack did not serve again in 5 s"
                await asyncio.sleep(0.02)
            served_s = time.monotonic() - up_at
            assert after["choices"][0]["text"] == reference  # computed in the new pool, same weights
            assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # the cache died
            again = await complete(http, url, PROMPT)
            assert again["choices"][0]["text"] == reference
            assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 32  # hits in the new pool

            logs = procs.read_log("worker-a.log") + procs.read_log("worker-b.log")
            assert logs.count("daemon connection lost") >= 2
            assert logs.count("registered as worker") >= 4
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(15) == 0
            assert not Path(info["pool_path"]).exists()
    record(
        "daemon_restart",
        in_flight_endings=sorted(endings),
        in_flight_cut_seconds=round(cut_s, 2),
        daemon_down_seconds_on_purpose=DOWN_S,
        kill_to_new_daemon_ready_seconds=round(up_at - killed_at, 2),
        new_daemon_ready_to_served_seconds=round(served_s, 2),
        kill_to_served_seconds=round(up_at - killed_at + served_s, 2),
    )
