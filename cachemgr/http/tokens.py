"""The tokenizer as the HTTP layer uses it: encode (text, chat), validate token ids, and a fresh
incremental detokenizer per request. Encoding is called from the loop's executor, never on the loop.

Prompts leave here as one int32 numpy array, the form the daemon keeps and sends (no list round trips).
With a tokenizer that supports it (shared.tokenizer.Tokenizer), text is tokenized piece by piece between
special tokens through a bounded cache (shared.tokenize_cache), so a repeated system prompt is
tokenized once; the ids are exactly those of whole-text tokenization.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from cachemgr.http.errors import bad_request
from cachemgr.http.text import Detokenizer
from shared.tokenize_cache import CacheStats, SegmentEncoder

log = logging.getLogger(__name__)

# Prompt tokens handed to the detokenizer as context for the first output token (it uses the last 4).
_DETOKENIZER_CONTEXT = 8


class TokenizerAdapter:
    """Wraps shared.tokenizer.Tokenizer (or any object with encode / encode_chat / detokenizer /
    vocab_size). Thread-safe for encoding; `detokenizer()` makes per-request state.

    cache_bytes > 0 turns on the piece cache where the tokenizer allows it (`segment_encoder` exists and
    finds pieces independent); 0 always tokenizes whole texts."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None, cache_bytes: int = 0) -> None:
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self._tokenizer = tokenizer
        self.vocab_size = int(vocab_size if vocab_size is not None else tokenizer.vocab_size)
        if self.vocab_size <= 0:
            raise ValueError("vocab_size must be positive")
        self._segments: SegmentEncoder | None = None
        if cache_bytes and hasattr(tokenizer, "segment_encoder"):
            self._segments, why = tokenizer.segment_encoder(cache_bytes)
            if self._segments is None:
                log.info("tokenize cache off for this tokenizer: %s", why)

    @property
    def cache_stats(self) -> CacheStats | None:
        """The piece cache's counters, or None when it is off."""
        return self._segments.stats() if self._segments is not None else None

    def encode(self, text: str) -> np.ndarray:
        """Token ids of a text prompt (with the model's BOS etc.), int32."""
        if self._segments is not None:
            return self._segments.encode(text, add_special_tokens=True)
        return np.asarray(self._tokenizer.encode(text), dtype=np.int32)

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> np.ndarray:
        """Render the chat template (ending with the assistant's turn opener; `tools` for templates that
        show them to the model) and tokenize it, int32."""
        extra = {"tools": tools} if tools else {}  # tokenizers without tool support are called as before
        try:
            if self._segments is not None:
                text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
                return self._segments.encode(text, add_special_tokens=False)
            return np.asarray(
                self._tokenizer.encode_chat(messages, add_generation_prompt=True, **extra), dtype=np.int32
            )
        except ValueError as exc:  # no template, or it refused the conversation (e.g. roles out of order)
            raise bad_request(f"Invalid conversation: {exc}", param="messages") from None

    def check_ids(self, token_ids: Sequence[int] | np.ndarray, param: str) -> np.ndarray:
        """The ids as int32. Raise APIError 400 unless every id is a valid token of the vocabulary."""
        if isinstance(token_ids, np.ndarray):
            outside = (token_ids < 0) | (token_ids >= self.vocab_size)
            first = int(np.argmax(outside)) if len(token_ids) else 0
            bad = [int(token_ids[first])] if len(token_ids) and outside[first] else []
        else:  # Python ints of any size (a plain dict body, or a few stop_token_ids)
            bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(
                f"{param}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param=param
            )
        return np.asarray(token_ids, dtype=np.int32)

    def decode(self, token_ids: np.ndarray) -> str:
        """The text of checked token ids (special tokens dropped, as in completions)."""
        return self._tokenizer.decode([int(t) for t in token_ids])

    def token_text(self, token_id: int) -> str:
        """One token alone as text (for logprobs). A token holding part of a multi-byte character decodes
        to U+FFFD, as it does in other servers' logprobs."""
        return self._tokenizer.decode([token_id])

    def detokenizer(self, prompt_ids: Sequence[int] | np.ndarray) -> Detokenizer:
        """A new incremental detokenizer for one request's output; the prompt's last tokens give the
        first output token its context (leading spaces decode as they do mid-text)."""
        return self._tokenizer.detokenizer([int(t) for t in prompt_ids[-_DETOKENIZER_CONTEXT:]])
