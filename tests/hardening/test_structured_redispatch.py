"""A structured request survives its worker's SIGKILL: the real daemon, two real `computeworker` processes
(tiny random-weight Llama, CPU), greedy decoding under a regex over the model's word tokens ("w3", "w4",
...). The worker that serves it is killed once tokens have streamed; the daemon re-dispatches it with the
tokens generated so far, the survivor replays them into a fresh grammar matcher and continues. The output
keeps to the grammar, equals an uninterrupted run, and nothing leaks.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from bench.random_model import write_model_dir
from cachemgr.cache import Namespace
from shared.protocol import FinishReason, SamplingParams, StructuredOutput
from tests.hardening.conftest import MODEL, NS, assert_idle_baseline, collect, serving, until
from tests.hardening.test_chaos_real import SHAPE

pytestmark = pytest.mark.slow  # real worker processes loading torch and the grammar engine

MAX_TOKENS = 400
# Only the tokens "w3", "w4" and "w5" can ever match (no other token is a prefix of these), and the
# pattern is longer than max_tokens, so the grammar never allows EOS: the request runs to its length.
PATTERN = StructuredOutput("regex", "(w3|w4|w5){1000}")
SAMPLING = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, structured=PATTERN)
PROMPT = [17, 250, 4, 999, 31, 8, 640, 12, 77, 300, 5, 19, 200, 41, 42, 43, 700, 3, 900, 11]


async def test_a_structured_request_resumes_its_grammar_on_another_worker(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", SHAPE, name=MODEL)
    async with serving(tmp_path, num_pages=256, heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0) as stack:
        daemon = stack.daemon
        procs = {}
        for name in ("w0", "w1"):
            argv = [
                "-m", "computeworker", "--daemon", daemon.endpoint, "--model", str(model),
                "--random-weights", "--threads", "1", "--name", name,
            ]  # fmt: skip
            proc = stack.procs.spawn(argv, f"worker-{name}.log")
            procs[proc.pid] = proc  # type: ignore[attr-defined]
        await until(lambda: len(daemon.workers_info()) == 2, 60.0, "2 workers registered")

        stream = await daemon.submit(NS, PROMPT, SAMPLING)
        tokens: list[int] = []
        reason = None
        killed = None
        async for event in stream:
            tokens.extend(event.token_ids)
            reason = event.finish_reason
            if killed is None and tokens:
                (busy,) = [w for w in daemon.workers_info() if w["running"] > 0]
                killed = busy["pid"]
                os.kill(killed, signal.SIGKILL)
                procs.pop(killed).wait()  # type: ignore[attr-defined]
        assert killed is not None and len(tokens) == MAX_TOKENS and reason is FinishReason.LENGTH
        stats = daemon.stats()
        assert (stats["redispatches"], stats["requests_failed"]) == (1, 0)
        assert set(tokens) <= {3, 4, 5} and len(set(tokens)) > 1  # the grammar's words, the model's choice

        cold = await daemon.submit(Namespace(MODEL, salt="cold"), PROMPT, SAMPLING)
        reference, cold_reason = await asyncio.wait_for(collect(cold), 60.0)
        assert (tokens, reason) == (reference, cold_reason)
        await until(lambda: daemon.cache.stats().num_leases == 0, 10.0, "leases released")
        assert_idle_baseline(daemon)
