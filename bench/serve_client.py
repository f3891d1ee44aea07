"""The HTTP side of bench/serve_bench.py: one streamed /v1/completions request, and the workloads.

Requests send token ids (no tokenization on the way in) or, where a caller passes a string, text; greedy,
EOS ignored, streamed with usage, so one request yields: TTFT (send -> first chunk with text), the time
to the response headers (the daemon has parsed, tokenized, matched and dispatched the request), end
time, prompt and cached token counts (usage.prompt_tokens_details.cached_tokens) and the output text.
The JSON body is encoded before the clock starts: serializing a 10k-id list costs the client ~1 ms, which
is client work, not the server's.

Workloads:
- shared prefix: `prefix + question`, cold (a fresh cache_salt per request: its own namespace, nothing
  cached) vs hot (one salt whose prefix was computed once beforehand).
- multi-turn, in the shape of SGLang's bench_multiturn: C clients, R rounds; round r's prompt is the
  client's whole history (earlier prompts and answers) plus `new_tokens` fresh tokens; a client's next
  round is ready when its answer has arrived; ready requests go out at Poisson-distributed intervals
  (rate `request_rate`), at most `max_parallel` in flight. `--no-cache` = a fresh salt per request.
- shared groups (2 workers vs 1): G prefixes, each first computed by one seed request, then M followers
  with different questions sent concurrently across groups.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(frozen=True, slots=True)
class Result:
    ttft_s: float
    headers_s: float  # send -> response headers (request admitted and dispatched)
    latency_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    text: str


async def complete(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    prompt: Sequence[int] | str,
    max_tokens: int,
    salt: str,
    temperature: float = 0.0,
    top_p: float = 1.0,
    extra: Mapping[str, Any] | None = None,
) -> Result:
    """One streamed completion (greedy by default) of token ids or (a str) text; `extra`: more body
    fields (penalties, ...). Raises RuntimeError for an HTTP or in-band error."""
    body = {
        "model": model,
        "prompt": prompt if isinstance(prompt, str) else list(prompt),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "cache_salt": salt,
        **(extra or {}),
    }
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    start = time.perf_counter()
    ttft: float | None = None
    texts: list[str] = []
    usage: dict = {}
    async with session.post(url + "/v1/completions", data=data, headers=headers) as resp:
        headers_s = time.perf_counter() - start
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            for choice in chunk.get("choices") or ():
                if choice.get("text"):
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    texts.append(choice["text"])
            if chunk.get("usage"):
                usage = chunk["usage"]
    if ttft is None or not usage:
        raise RuntimeError("the stream ended without text or usage")
    return Result(
        ttft_s=ttft,
        headers_s=headers_s,
        latency_s=time.perf_counter() - start,
        prompt_tokens=int(usage["prompt_tokens"]),
        cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)),
        completion_tokens=int(usage["completion_tokens"]),
        text="".join(texts),
    )


def random_tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    """Ordinary tokens (ids 3.. are words in bench.random_model's tokenizer; 0-2 are special)."""
    return [rng.randrange(3, vocab_size) for _ in range(n)]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(results: Sequence[Result], wall_s: float) -> dict[str, float]:
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    output = sum(r.completion_tokens for r in results)
    ttfts = [r.ttft_s for r in results]
    return {
        "requests": len(results),
        "wall_s": round(wall_s, 3),
        "requests_per_s": round(len(results) / wall_s, 3),
        "input_tokens_per_s": round(prompt / wall_s, 1),
        "output_tokens_per_s": round(output / wall_s, 1),
        "total_tokens_per_s": round((prompt + output) / wall_s, 1),
        "token_hit_rate": round(cached / prompt, 4) if prompt else 0.0,
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p90_s": round(percentile(ttfts, 0.9), 4),
        "latency_p50_s": round(statistics.median(r.latency_s for r in results), 4),
    }


@dataclass(frozen=True, slots=True)
class MultiTurn:
    clients: int = 256
    rounds: int = 5
    new_tokens: int = 512
    output_tokens: int = 64
    request_rate: float = 64.0  # Poisson arrivals of ready requests, per second
    max_parallel: int = 256
    seed: int = 0
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    extra_body: tuple[tuple[str, Any], ...] = ()  # more sampling fields for every request

    def hit_rate_ceiling(self, page_size: int) -> float:
        """Best possible token hit rate: round r reuses the page-aligned part of everything before it
        whose K/V exists (the last answer token has none)."""
        total = reusable = 0
        for r in range(self.rounds):
            prompt = (r + 1) * self.new_tokens + r * self.output_tokens
            total += prompt
            if r:
                reusable += (prompt - self.new_tokens - 1) // page_size * page_size
        return reusable / total


async def run_multi_turn(
    url: str, model: str, spec: MultiTurn, vocab_size: int, encode: Callable[[str], list[int]], cache: bool
) -> dict[str, float]:
    """Run the workload; returns summarize() of every request. `encode` turns answer text back into
    ids (the next round's prompt includes the answer)."""
    rng = random.Random(spec.seed)
    histories = [random_tokens(rng, spec.new_tokens, vocab_size) for _ in range(spec.clients)]
    ready: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for client in range(spec.clients):
        ready.put_nowait((client, 0))
    results: list[Result] = []
    limit = asyncio.Semaphore(spec.max_parallel)
    total = spec.clients * spec.rounds
    done = asyncio.Event()
    salts = iter(range(10**9))
    timeout = aiohttp.ClientTimeout(total=3600)
    connector = aiohttp.TCPConnector(limit=spec.max_parallel)

    async def one(session: aiohttp.ClientSession, client: int, rnd: int) -> None:
        async with limit:
            salt = "multiturn" if cache else f"nocache-{next(salts)}"
            res = await complete(
                session,
                url,
                model,
                histories[client],
                spec.output_tokens,
                salt,
                spec.temperature,
                spec.top_p,
                dict(spec.extra_body),
            )
        results.append(res)
        if rnd + 1 < spec.rounds:
            histories[client] = (
                histories[client] + encode(res.text) + random_tokens(rng, spec.new_tokens, vocab_size)
            )
            ready.put_nowait((client, rnd + 1))
        if len(results) == total:
            done.set()

    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks: list[asyncio.Task[None]] = []
        while len(tasks) < total:
            client, rnd = await ready.get()
            tasks.append(asyncio.ensure_future(one(session, client, rnd)))
            await asyncio.sleep(rng.expovariate(spec.request_rate))
        await done.wait()
        for task in tasks:
            task.result()  # re-raise any failure
    return summarize(results, time.perf_counter() - start)


async def run_groups(
    url: str, model: str, groups: int, followers: int, prefix_len: int, question_len: int,
    output_tokens: int, vocab_size: int, salt: str,
) -> dict[str, float]:  # fmt: skip
    """G seed requests (one per prefix, concurrently), then G*M followers concurrently. Returns the
    followers' summary plus their minimum cached tokens (== prefix_len when every follower hit)."""
    rng = random.Random(1)
    prefixes = [random_tokens(rng, prefix_len, vocab_size) for _ in range(groups)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:

        async def ask(g: int) -> Result:
            return await complete(
                session,
                url,
                model,
                prefixes[g] + random_tokens(rng, question_len, vocab_size),
                output_tokens,
                salt,
            )

        await asyncio.gather(*(ask(g) for g in range(groups)))
        start = time.perf_counter()
        results = await asyncio.gather(*(ask(g) for _ in range(followers) for g in range(groups)))
        wall = time.perf_counter() - start
    out = summarize(results, wall)
    out["min_cached_tokens"] = min(r.cached_tokens for r in results)
    return out
