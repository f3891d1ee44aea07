"""Chaos with the real worker: SIGKILL `computeworker` processes (tiny random-weight Llama, CPU) under
multi-turn load. Six workers start together (the load begins once two serve), a busy one is killed
every 0.3-0.8 s while at least two serve, five kills in all, and one replacement is started.

The daemon re-dispatches a killed worker's requests with the tokens generated so far, so a survivor
prefills prompt + partial output and continues: every greedy output must still equal a cold run of the
same prompt (computed afterwards in a salted namespace, so nothing is shared with the chaos run), and
once idle no page is leaked and no lock is held.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest

from bench.random_model import LlamaShape, write_model_dir
from cachemgr.cache import Namespace
from shared.protocol import FinishReason, SamplingParams
from tests.hardening.conftest import CONTEXT, MODEL, NS, VOCAB, assert_idle_baseline, collect, serving, until
from tests.hardening.figures import record

pytestmark = pytest.mark.slow  # real worker processes loading torch

NUM_KILLS = 5
NUM_CONVERSATIONS = 4
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# The serving() pool is 2 layers x 1 KV head x head dim 2; the model must have exactly that shape.
SHAPE = LlamaShape(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=2,
    max_position_embeddings=CONTEXT,
)


def _user_turn(conversation: int, turn: int) -> list[int]:
    rng = random.Random(conversation * 1000 + turn)
    return [rng.randrange(3, VOCAB) for _ in range(rng.randrange(5, 30))]


async def _conversation(daemon: object, index: int, stop: asyncio.Event, results: list[tuple]) -> None:
    """Each turn's prompt is the whole history (prompts and replies) plus a new user message."""
    history: list[int] = []
    turn = 0
    while not stop.is_set():
        prompt = [*history, *_user_turn(index, turn)]
        stream = await daemon.submit(NS, prompt, GREEDY)  # type: ignore[attr-defined]
        tokens, reason = await collect(stream)
        results.append((prompt, tokens, reason, stream.cached_tokens))
        history = [*prompt, *tokens] if len(prompt) < 250 else []
        turn += 1


async def test_five_sigkills_of_real_workers_under_multi_turn_load(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", SHAPE, name=MODEL)
    rng = random.Random(11)
    async with serving(
        tmp_path,
        num_pages=256,
        heartbeat_interval_s=0.1,
        heartbeat_timeout_s=1.0,
        max_attempts=20,
        decode_page_chunk=2,
    ) as stack:
        daemon = stack.daemon
        procs: dict[int, object] = {}
        names = iter(range(100))

        def spawn() -> None:
            name = f"w{next(names)}"
            argv = [
                "-m", "computeworker", "--daemon", daemon.endpoint, "--model", str(model),
                "--random-weights", "--threads", "1", "--max-running", "4", "--name", name,
            ]  # fmt: skip
            proc = stack.procs.spawn(argv, f"worker-{name}.log")
            procs[proc.pid] = proc  # type: ignore[attr-defined]

        def live() -> list[dict]:
            return [w for w in daemon.workers_info() if w["pid"] in procs]

        # Worker start-up (torch import) is most of this test's CPU: start 6 at once and begin the load
        # as soon as 2 serve, so start-up overlaps the chaos. One replacement keeps 2 alive at the end.
        for _ in range(6):
            spawn()
        await until(lambda: len(live()) >= 2, 60.0, "2 workers registered")

        stop = asyncio.Event()
        results: list[tuple] = []
        load = [
            asyncio.ensure_future(_conversation(daemon, i, stop, results)) for i in range(NUM_CONVERSATIONS)
        ]
        started = time.monotonic()
        kills_hitting_requests = 0
        for kill in range(NUM_KILLS):
            await until(lambda: len(live()) >= 2, 60.0, "2 workers serving")
            await asyncio.sleep(rng.uniform(0.3, 0.8))
            busy = [w for w in live() if w["running"] > 0]
            victim = rng.choice(busy or live())
            kills_hitting_requests += victim["running"] > 0
            os.kill(victim["pid"], signal.SIGKILL)
            procs.pop(victim["pid"]).wait()  # type: ignore[attr-defined]
            if kill == 0:
                spawn()
        await asyncio.sleep(1.5)  # the last kill's requests are re-dispatched (heartbeat timeout 1 s)
        chaos_s = time.monotonic() - started
        stop.set()
        await asyncio.wait_for(asyncio.gather(*load), 30.0)
        counters = daemon.stats()
        assert counters["requests_failed"] == 0
        assert counters["redispatches"] >= kills_hitting_requests >= NUM_KILLS - 1

        # Cold reference: every prompt again, each in its own salted namespace (no prefix to hit).
        gate = asyncio.Semaphore(8)

        async def cold(i: int, prompt: list[int]) -> tuple[list[int], FinishReason, int]:
            async with gate:
                stream = await daemon.submit(Namespace(MODEL, salt=f"cold-{i}"), prompt, GREEDY)
                tokens, reason = await collect(stream)
                return tokens, reason, stream.cached_tokens

        references = await asyncio.wait_for(
            asyncio.gather(*(cold(i, r[0]) for i, r in enumerate(results))), 60.0
        )
        wrong = [
            (r[0], r[1], ref[0])
            for r, ref in zip(results, references, strict=True)
            if (r[1], r[2]) != (ref[0], FinishReason.LENGTH)
        ]
        assert wrong == []
        assert all(ref[1:] == (FinishReason.LENGTH, 0) for ref in references)
        cached = sum(r[3] for r in results)
        assert cached > 0  # multi-turn prefixes were hits, written by workers killed since
        await until(lambda: daemon.stats()["running"] == 0 and daemon.cache.stats().num_leases == 0, 10.0)
        assert_idle_baseline(daemon)
    record(
        "chaos_real_worker",
        kills=NUM_KILLS,
        kills_hitting_running_requests=kills_hitting_requests,
        chaos_seconds=round(chaos_s, 1),
        requests=len(results),
        redispatches=counters["redispatches"],
        failed=counters["requests_failed"],
        wrong_outputs=len(wrong),
        cached_prompt_tokens=cached,
        prompt_tokens=sum(len(r[0]) for r in results),
    )
