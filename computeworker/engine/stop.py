"""Stop strings over a token stream: incremental detokenization and first-match detection.

Only the new tokens are decoded each step, with a few tokens of left context so that word-initial
spaces and multi-byte characters come out right, and the search covers only the text that could hold a
new match::

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


class TextDecoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas. A delta is held while the decoded tail ends
    in an incomplete UTF-8 sequence (U+FFFD), so every delta is final text."""

    def __init__(self, decoder: TextDecoder, context_ids: Sequence[int] = ()) -> None:
        self._decoder = decoder
        self._ids: list[int] = list(context_ids)
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = len(self._ids)  # ids before this have been turned into text

    def push(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly "" while a character is split)."""
        self._ids.append(token_id)
        prefix_text = self._decoder.decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decoder.decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]


class StopStringMatcher:
    """Detects the first occurrence of any stop string in a request's output text. Not thread-safe;
    one per request."""

    def __init__(self, stops: Sequence[str], decoder: TextDecoder, context_ids: Sequence[int] = ()) -> None:
        if not stops or any(not s for s in stops):
            raise ValueError("stops must be a non-empty list of non-empty strings")
        self._stops = list(stops)
        self._max_len = max(len(s) for s in stops)
        self._detok = IncrementalDetokenizer(decoder, context_ids)
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
        delta = self._detok.push(token_id)
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
