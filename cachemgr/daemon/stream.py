"""RequestStream: what a caller of Daemon.submit iterates to receive a request's output tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from cachemgr.daemon.errors import RequestFailed
from shared.protocol import FinishReason

# One token's logprobs: (its log-probability, the top ids, their log-probabilities). None for a prompt's
# first token, which has no context (echo).
LogprobEntry = tuple[float | None, list[int], list[float]]


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """New output tokens; the last event of a stream has finish_reason set (and maybe no tokens)."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_text: str = ""
    logprobs: tuple[LogprobEntry, ...] = ()  # one per token, when the request asked for logprobs
    # Prompt tokens 1..n-1 (SamplingParams.prompt_logprobs): in one event of their own, before any token
    prompt_logprobs: tuple[LogprobEntry, ...] = ()


class RequestStream:
    """Async iterator of StreamEvent for one request, fed by the daemon on its event loop.

    Ends after the event with a finish_reason; raises RequestFailed if the request failed. ``abort()``
    cancels the request (the client went away): the stream ends with FinishReason.ABORT at once and the
    daemon tells the worker and releases the request's pages.
    """

    def __init__(self, request_id: bytes, prompt_len: int, on_abort: Callable[[], None]) -> None:
        self.request_id = request_id
        self.prompt_len = prompt_len
        self.cached_tokens = 0  # prefix tokens served from the cache, set when dispatched
        self._on_abort = on_abort
        self._queue: asyncio.Queue[StreamEvent | RequestFailed] = asyncio.Queue()
        self._dispatched = asyncio.Event()
        self._ended = False  # the daemon pushed its final event
        self._done = False  # the consumer read the final event

    # ------------------------------------------------------------------ daemon side

    def _mark_dispatched(self, cached_tokens: int) -> None:
        self.cached_tokens = cached_tokens
        self._dispatched.set()

    def _push(self, event: StreamEvent) -> None:
        if not self._ended:
            self._ended = event.finish_reason is not None
            self._queue.put_nowait(event)

    def _fail(self, error: RequestFailed) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put_nowait(error)
        self._dispatched.set()  # nobody waits forever on a request that will never run

    @property
    def finished(self) -> bool:
        """True once the daemon has ended this stream (finished, failed or aborted)."""
        return self._ended

    # ------------------------------------------------------------------ consumer side

    async def dispatched(self) -> None:
        """Wait until the request is on a worker (cached_tokens is then final) or has ended."""
        await self._dispatched.wait()

    def abort(self) -> None:
        """Cancel the request. Idempotent; a no-op once the stream has ended."""
        if not self._ended:
            self._on_abort()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, RequestFailed):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item
