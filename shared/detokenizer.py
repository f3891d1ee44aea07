"""Streaming detokenization: turn a growing list of token ids into text pieces that are safe to send.

Decoding token by token is wrong for two reasons: a byte-level token may hold only part of a UTF-8
character (decoding it alone yields U+FFFD), and SentencePiece decoders drop or add a leading space
depending on context. So we decode a short window twice and emit the difference::

    ids:   ...  [prefix_offset ........ read_offset) [read_offset ...... len(ids))
                 |<- already emitted, kept as context ->|<- new, not yet emitted ->|

    emitted += decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])

Text ending in U+FFFD is held back until the bytes that complete the character arrive (or `finish`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Per-request streaming state. `decode` is the tokenizer's decode (special tokens skipped)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt_context: Sequence[int] = ()) -> None:
        # A few prompt tokens as context make the first generated piece decode as it does mid-text
        self._decode = decode
        self._ids: list[int] = list(prompt_context[-4:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""  # everything emitted so far

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated ids; return the newly completed text (possibly ""). Changes the state."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if full_text.endswith(_REPLACEMENT) or len(full_text) <= len(prefix_text):
            return ""
        piece = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += piece
        return piece

    def finish(self) -> str:
        """Flush text held back (an incomplete character at the very end decodes to U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        piece = full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += piece
        return piece
