from __future__ import annotations

import asyncio
import threading
import time

import pytest

from computeworker.compute_thread import ComputeThread


async def test_calls_run_in_order_on_one_thread_and_errors_reach_the_caller() -> None:
    compute = ComputeThread()
    try:
        seen: list[tuple[int, str]] = []

        def job(i: int) -> int:
            seen.append((i, threading.current_thread().name))
            return i * i

        results = await asyncio.gather(*(compute.submit(job, i) for i in range(5)))
        assert results == [0, 1, 4, 9, 16]
        assert [i for i, _ in seen] == list(range(5)) and {name for _, name in seen} == {"compute"}

        def fail() -> None:
            raise ValueError("step failed")

        with pytest.raises(ValueError, match="step failed"):
            await compute.submit(fail)
        assert await compute.submit(job, 7) == 49  # the thread survives a failed call
    finally:
        compute.shutdown()


async def test_a_cancelled_waiter_leaves_the_call_running_to_its_end() -> None:
    compute = ComputeThread()
    finished = threading.Event()

    def slow() -> str:
        time.sleep(0.05)
        finished.set()
        return "done"

    call = compute.submit(slow)
    waiter = asyncio.ensure_future(asyncio.shield(call))
    await asyncio.sleep(0.01)
    waiter.cancel()
    assert await call == "done" and finished.is_set()
    compute.shutdown()


def test_shutdown_finishes_queued_calls_and_a_closed_loop_is_ignored() -> None:
    compute = ComputeThread()
    done: list[int] = []

    async def queue_two() -> None:
        compute.submit(lambda: time.sleep(0.02) or done.append(1))
        compute.submit(lambda: done.append(2))

    asyncio.run(queue_two())  # the loop closes before the calls end: their results have nowhere to go
    compute.shutdown()
    assert done == [1, 2]
