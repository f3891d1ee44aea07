"""The stall watchdog: a worker that keeps heartbeating but makes no progress on its requests (its
compute is stuck) is told to shut down and its requests finish on another worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cachemgr.daemon import DaemonSettings
from shared.pool import OwnedPool
from shared.protocol import PROTOCOL_VERSION, Heartbeat, Register, SamplingParams
from tests.daemon.conftest import NS, collect, make_daemon, wait_until
from tests.helpers.procs import ProcessGroup
from tests.helpers.scripted_worker import expected_output

PROMPT = list(range(10, 20))


async def test_stalled_worker_is_shut_down_and_its_request_finishes_elsewhere(
    pool: OwnedPool, tmp_path: Path, procs: ProcessGroup
) -> None:
    daemon = make_daemon(pool, tmp_path, worker_stall_timeout_s=0.8)
    await daemon.start()
    try:
        # w0 heartbeats all along but sits 30 s in "prefill" before any other message: stuck.
        stuck = procs.start_worker(daemon.endpoint, "w0", "--prefill-delay", "30")
        await wait_until(lambda: daemon.stats()["workers"] == 1)
        procs.start_worker(daemon.endpoint, "w1")
        await wait_until(lambda: daemon.stats()["workers"] == 2)
        stream = await daemon.submit(NS, PROMPT, SamplingParams(max_tokens=6))
        started = asyncio.get_running_loop().time()
        assert await collect(stream) == expected_output(PROMPT, 6)
        waited = asyncio.get_running_loop().time() - started
        assert 0.8 <= waited < 5.0
        events = [(e["event"], e["worker"]) for e in procs.events() if e["event"] in ("dispatch", "shutdown")]
        # The daemon sends w0 its Shutdown before re-dispatching to w1, but the two processes log what they
        # receive in whatever order they get the CPU: only w0's dispatch is ordered before both.
        assert events[0] == ("dispatch", "w0")
        assert sorted(events[1:]) == [("dispatch", "w1"), ("shutdown", "w0")]
        shutdown = next(e for e in procs.events() if e["event"] == "shutdown")
        assert "no progress for 0.8s with 1 requests (stalled)" in shutdown["reason"]
        assert await asyncio.to_thread(stuck.wait, 10) == 0  # it obeyed the Shutdown
        stats = daemon.stats()
        assert (stats["workers"], stats["redispatches"], stats["requests_finished"]) == (1, 1, 1)
        await wait_until(lambda: daemon.cache.stats().num_leases == 0)  # quarantine ends with the process
        daemon.check()
    finally:
        await daemon.stop()
    daemon.check()


async def test_a_worker_that_completes_steps_is_not_stalled(pool: OwnedPool, tmp_path: Path) -> None:
    """Progress is read from Heartbeat.steps_done: a worker silent apart from heartbeats whose step count
    moves is making progress (one long prefill, chunk by chunk); one whose count stands still is not."""
    daemon = make_daemon(pool, tmp_path, worker_stall_timeout_s=30.0)  # the reaper stays out of the way
    await daemon.start()
    try:
        workers = daemon._workers  # the registry is what the watchdog reads
        messages = daemon._messages
        messages.handle(
            b"w", Register(PROTOCOL_VERSION, pid=1, device="cpu", max_running=2, model="tiny-llama")
        )
        worker = workers.get(b"w")
        assert worker is not None
        worker.request_ids.add(b"r" * 16)  # as if a request were dispatched to it
        for steps in (1, 2, 3):
            await asyncio.sleep(0.15)
            messages.handle(b"w", Heartbeat(num_running=1, num_waiting=0, steps_done=steps))
            assert workers.stalled(0.3) == []
        for _ in range(3):
            await asyncio.sleep(0.15)
            messages.handle(b"w", Heartbeat(num_running=1, num_waiting=0, steps_done=3))
        assert workers.stalled(0.3) == [worker]
        worker.request_ids.clear()
        assert workers.stalled(0.3) == []  # an idle worker has nothing to make progress on
    finally:
        await daemon.stop()


def test_stall_timeout_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="worker_stall_timeout_s"):
        DaemonSettings(endpoint="ipc:///tmp/x.sock", worker_stall_timeout_s=-1.0)
    assert (
        DaemonSettings(endpoint="ipc:///tmp/x.sock", worker_stall_timeout_s=0.0).worker_stall_timeout_s == 0.0
    )
