"""The tokenizer as the HTTP layer uses it: encode (text, chat), validate token ids, and a fresh
incremental detokenizer per request. Encoding is called from the loop's executor, never on the loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cachemgr.http.errors import bad_request
from cachemgr.http.text import Detokenizer


class TokenizerAdapter:
    """Wraps shared.tokenizer.Tokenizer. Stateless apart from the wrapped tokenizer (thread-safe for
    encoding); `detokenizer()` makes per-request state."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = int(vocab_size if vocab_size is not None else tokenizer.vocab_size)
        if self.vocab_size <= 0:
            raise ValueError("vocab_size must be positive")

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Render the chat template (ending with the assistant's turn opener) and tokenize it."""
        try:
            return list(self._tokenizer.encode_chat(messages, add_generation_prompt=True))
        except ValueError as exc:  # no template, or it refused the conversation (e.g. roles out of order)
            raise bad_request(f"Invalid conversation: {exc}", param="messages") from None

    def check_ids(self, token_ids: Sequence[int], param: str) -> list[int]:
        """Raise APIError 400 unless every id is a valid token of the model's vocabulary."""
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(
                f"{param}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param=param
            )
        return list(token_ids)

    def detokenizer(self, prompt_ids: Sequence[int]) -> Detokenizer:
        """A new incremental detokenizer for one request's output; the prompt's last tokens give the
        first output token its context (leading spaces decode as they do mid-text)."""
        return self._tokenizer.detokenizer(prompt_ids)
