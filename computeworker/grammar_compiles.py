"""Structured Dispatches held while their grammar compiles.

Compiling a grammar for a new spec takes milliseconds to seconds (the first one also loads the grammar
engine, ~2 s), so the worker runtime does not add such a Dispatch to the engine at once: it compiles the
spec on a thread and holds the Dispatch, the running requests stepping on meanwhile, then hands it over
(the engine finds the grammar compiled). An Abort that comes first drops the held Dispatch.
"""

from __future__ import annotations

import asyncio
from typing import Any

from computeworker.engine.structured import StructuredDecoding
from shared.protocol import Dispatch


class GrammarCompiles:
    """One session's held Dispatches. Runs on the event loop; compiling runs in its default executor."""

    def __init__(self, structured: StructuredDecoding | None) -> None:
        self._structured = structured
        self._held: dict[bytes, tuple[Dispatch, asyncio.Future[Any]]] = {}

    def hold(self, msg: Dispatch, wakeup: asyncio.Event) -> bool:
        """Start compiling `msg`'s grammar and hold it, when it has a spec not compiled yet (`wakeup` is
        set when the compile ends). Returns whether it was held."""
        spec = msg.sampling.structured
        if spec is None or self._structured is None or self._structured.is_compiled(spec):
            return False
        future = asyncio.get_running_loop().run_in_executor(None, self._structured.compiled, spec)
        future.add_done_callback(lambda _: wakeup.set())
        self._held[msg.request_id] = (msg, future)
        return True

    def drop(self, request_id: bytes) -> bool:
        """Forget a held Dispatch (aborted). Returns whether one was held."""
        return self._held.pop(request_id, None) is not None

    def ready(self) -> list[tuple[Dispatch, BaseException | None]]:
        """The held Dispatches whose compile ended, with its error (None: compiled), no longer held."""
        done = [(rid, msg, future) for rid, (msg, future) in self._held.items() if future.done()]
        for rid, _, _ in done:
            del self._held[rid]
        return [(msg, future.exception()) for _, msg, future in done]

    def clear(self) -> int:
        """Drop every held Dispatch (the session ended). Returns how many."""
        count = len(self._held)
        self._held.clear()
        return count
