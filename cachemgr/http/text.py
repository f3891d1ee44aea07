"""Output text of one request: incremental detokenization plus stop-string trimming.

Tokens arrive a few at a time; the text a client sees must never contain a stop string, not even
briefly in a stream. So the assembler holds back the tail of the decoded text that could still turn
into a stop string, and cuts the text at the first stop string that appears::

    decoded:  "... the answer is 42.\n\nUser: hi"      stop = ["\n\nUser:"]
    emitted:  "... the answer is 42."                 (everything before the stop string)

The worker applies the same stop strings and ends the request; cutting here as well keeps the API
exact even when a stop string ends in the middle of a token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Detokenizer(Protocol):
    """shared.detokenizer.IncrementalDetokenizer: text completed by new tokens; finish() flushes."""

    def add(self, token_ids: Sequence[int]) -> str: ...

    def finish(self) -> str: ...


class TextAssembler:
    """Turns a request's output tokens into the text to send. Not thread-safe; one per request.

    `detokenizer` is the tokenizer's incremental detokenizer for this request (it holds back partial
    UTF-8 sequences itself).
    """

    def __init__(self, detokenizer: Detokenizer, stop: Sequence[str] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._detokenizer = detokenizer
        self._stop = tuple(stop)
        self._text = ""  # everything decoded so far
        self._emitted = 0  # chars of _text already handed out
        self._stopped_at: int | None = None  # index in _text where a stop string begins
        self.stop_text = ""  # the stop string that ended the output, if any

    @property
    def stopped(self) -> bool:
        """True once a stop string has appeared: no more text will ever be emitted."""
        return self._stopped_at is not None

    @property
    def text(self) -> str:
        """The final text so far (cut at the stop string, if one appeared)."""
        return self._text if self._stopped_at is None else self._text[: self._stopped_at]

    def push(self, token_ids: Sequence[int]) -> str:
        """Add new output tokens; return the text that is now safe to send (maybe "")."""
        if self.stopped:
            return ""
        if not token_ids:
            return ""
        search_from = max(0, self._emitted - self._longest_stop() + 1)
        self._text += self._detokenizer.add(token_ids)
        hit = self._find_stop(search_from)
        if hit is not None:
            self._stopped_at, self.stop_text = hit
            return self._take(self._stopped_at)
        return self._take(len(self._text) - self._held_back())

    def finish(self) -> str:
        """The request ended: release the held-back tail (unless a stop string cut the text)."""
        if self.stopped:
            return ""
        self._text += self._detokenizer.finish()
        hit = self._find_stop(max(0, self._emitted - self._longest_stop() + 1))
        if hit is not None:
            self._stopped_at, self.stop_text = hit
            return self._take(self._stopped_at)
        return self._take(len(self._text))

    def _take(self, end: int) -> str:
        out = self._text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return out

    def _longest_stop(self) -> int:
        return max((len(s) for s in self._stop), default=1)

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self._stop:
            index = self._text.find(s, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, s)
        return best

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._text)), longest, -1):
                if self._text.endswith(s[:n]):
                    longest = n
                    break
        return longest
