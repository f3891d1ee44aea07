"""Stop strings over a token stream: incremental detokenization and first-match detection.

The tokenizer's incremental detokenizer (shared.detokenizer) turns each new token into final text; the
search covers only the text that could hold a new match::

    output text:  "The answer is 42.\n\nUser:"      stops: ["\n\nUser:"]
                                   ^ match: the request finishes with stop_text "\n\nUser:"

The worker streams every token up to and including the one that completed the stop string and names it
in Finished.stop_text; the text side (cachemgr.http.text.TextAssembler) holds back a possible stop
prefix and cuts the text at the stop string, so a client never sees it, even when the stop ends in the
middle of a token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Detokenizer(Protocol):
    """shared.detokenizer.IncrementalDetokenizer: `add(ids)` returns the text those ids complete."""

    def add(self, token_ids: Sequence[int]) -> str: ...


class DetokenizerSource(Protocol):
    """shared.tokenizer.Tokenizer: a fresh streaming detokenizer per request."""

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> Detokenizer: ...


class StopStringMatcher:
    """Detects the first occurrence of any stop string in a request's output text. Not thread-safe;
    one per request."""

    def __init__(self, stops: Sequence[str], detokenizer: Detokenizer) -> None:
        if not stops or any(not s for s in stops):
            raise ValueError("stops must be a non-empty list of non-empty strings")
        self._stops = list(stops)
        self._max_len = max(len(s) for s in stops)
        self._detok = detokenizer
        self._text = ""
        self._stopped: str | None = None

    @property
    def text(self) -> str:
        return self._text

    def push(self, token_id: int) -> str | None:
        """Append one output token; return the stop string it completed, if any (the earliest match;
        on a tie, the first in the list). Raises ValueError once a stop string has matched."""
        if self._stopped is not None:
            raise ValueError("the stop string already matched")
        delta = self._detok.add((token_id,))
        if not delta:
            return None
        search_from = max(0, len(self._text) - self._max_len + 1)
        self._text += delta
        best: tuple[int, str] | None = None
        for stop in self._stops:
            idx = self._text.find(stop, search_from)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is not None:
            self._stopped = best[1]
        return self._stopped
