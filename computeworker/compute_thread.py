"""The worker's compute thread: runs steps (and the kernel warm-up) off the event loop, one at a time.

    loop: submit(fn) ──► SimpleQueue ──► compute thread: fn() ──► loop.call_soon_threadsafe(settle)

One queue hop in and one callback out. A ThreadPoolExecutor awaited through `asyncio.wrap_future` does the
same work with a concurrent future in between (its lock and condition, then a second hand-off to the loop);
on the dev box that path costs 0.38-0.53 ms per call against 0.18-0.34 ms for this one, and on an H200 host
the executor path measured ~0.5 ms per step (bench/results/gpu_notes.md, run 40): 4% of a cached-prefix
step's time to first token.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class ComputeThread:
    """A single long-lived thread running submitted calls in order. Not reusable after `shutdown`."""

    def __init__(self, name: str = "compute") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue fn(*args); the returned future (of the running loop) gets its result or exception. The
        call runs to its end even if the future is cancelled: await it through `asyncio.shield` where the
        end of the call matters (the pool must outlive a step)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def shutdown(self) -> None:
        """Finish the queued calls, then stop the thread (waits for it)."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            try:
                outcome: tuple[Any, BaseException | None] = (fn(*args), None)
            except BaseException as exc:  # handed to the awaiting task, which decides
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, future, *outcome)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
