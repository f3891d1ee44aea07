"""Chaos: SIGKILL random workers under continuous multi-turn load and start replacements.

Every request must complete with exactly the output a cold run gives (the scripted worker's output is a
known function of the prompt: tests.helpers.scripted_worker.expected_output), every prefix page a
re-dispatched request reads must hold what its (maybe killed) writer committed, and once idle no page
is leaked and no lock is held.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest

from shared.protocol import FinishReason, SamplingParams
from tests.hardening.conftest import NS, assert_idle_baseline, collect, serving, until
from tests.hardening.figures import record
from tests.helpers.scripted_worker import expected_output

NUM_KILLS = 50
NUM_CONVERSATIONS = 12
MAX_TOKENS = 12


def _user_turn(conversation: int, turn: int) -> list[int]:
    rng = random.Random(conversation * 1000 + turn)
    return [rng.randrange(3, 1000) for _ in range(rng.randrange(5, 30))]


async def _conversation(stack: object, index: int, stop: asyncio.Event, results: list[tuple]) -> None:
    """Multi-turn: each turn's prompt is the whole history (prompt + reply) plus a new user message."""
    history: list[int] = []
    turn = 0
    while not stop.is_set():
        prompt = [*history, *_user_turn(index, turn)]
        stream = await stack.daemon.submit(  # type: ignore[attr-defined]
            NS, prompt, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        )
        tokens, reason = await collect(stream)
        results.append((prompt, tokens, reason, stream.cached_tokens))
        history = [*prompt, *tokens] if len(prompt) < 400 else []  # a fresh conversation now and then
        turn += 1


@pytest.mark.slow
async def test_fifty_sigkills_under_multi_turn_load(tmp_path: Path) -> None:
    rng = random.Random(5)
    async with serving(
        tmp_path,
        num_pages=512,
        heartbeat_interval_s=0.05,
        heartbeat_timeout_s=0.4,
        max_attempts=50,
        decode_page_chunk=1,
    ) as stack:
        daemon = stack.daemon
        procs: dict[int, object] = {}
        names = iter(range(10_000))

        def spawn() -> None:
            proc = stack.start_scripted(f"w{next(names)}", "--token-delay", "0.004", "--max-running", "4")
            procs[proc.pid] = proc  # type: ignore[attr-defined]

        for _ in range(4):
            spawn()
        await until(lambda: len(daemon.workers_info()) == 4, what="4 workers registered")

        stop = asyncio.Event()
        results: list[tuple] = []
        load = [
            asyncio.ensure_future(_conversation(stack, i, stop, results)) for i in range(NUM_CONVERSATIONS)
        ]
        started = time.monotonic()
        kills_in_flight = 0
        for _ in range(NUM_KILLS):
            # Kill only while at least 3 workers serve, so the load never stalls on spawn time.
            await until(lambda: sum(1 for w in daemon.workers_info() if w["pid"] in procs) >= 3, 30.0)
            await asyncio.sleep(rng.uniform(0.05, 0.25))
            live = [w for w in daemon.workers_info() if w["pid"] in procs]
            busy = [w for w in live if w["running"] > 0]
            victim = rng.choice(busy or live)
            kills_in_flight += victim["running"] > 0
            os.kill(victim["pid"], signal.SIGKILL)
            procs.pop(victim["pid"]).wait()  # type: ignore[attr-defined]
            spawn()
        chaos_s = time.monotonic() - started
        stop.set()
        await asyncio.wait_for(asyncio.gather(*load), 60.0)

        assert len(results) > 100
        for prompt, tokens, reason, _ in results:
            assert (tokens, reason) == (expected_output(prompt, MAX_TOKENS), FinishReason.LENGTH)
        counters = daemon.stats()
        assert counters["requests_failed"] == 0
        assert counters["redispatches"] >= kills_in_flight > NUM_KILLS // 2
        dispatches = [e for e in stack.procs.events() if e["event"] == "dispatch"]
        assert all(e["prefix_ok"] for e in dispatches)  # pages committed before a kill read back intact
        cached = sum(r[3] for r in results)
        assert cached > 0  # multi-turn prefixes were hits, also across kills
        await until(lambda: daemon.stats()["running"] == 0 and daemon.cache.stats().num_leases == 0, 10.0)
        assert_idle_baseline(daemon)
        record(
            "chaos_scripted",
            kills=NUM_KILLS,
            kills_hitting_running_requests=kills_in_flight,
            chaos_seconds=round(chaos_s, 1),
            requests=len(results),
            redispatches=counters["redispatches"],
            failed=counters["requests_failed"],
            wrong_outputs=0,
            cached_prompt_tokens=cached,
            prompt_tokens=sum(len(r[0]) for r in results),
        )
