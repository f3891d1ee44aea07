"""One running request on a worker: its tokens, its page table and where it stands.

Positions and pages (page_size 4 in the picture)::

    tokens:      | prompt ............................ | output ...... |
    positions:   0         matched_len            prompt_len      len(tokens)-1
                 |<-cached->|<---- computed here ---->|<- decoded ->|
    num_computed:                                           ^ K/V written for [0, num_computed)
    page_table:  [p0][p1]  [n0][n1][n2] ...  position i lives in page_table[i // page_size], slot i % page_size

The prompt is kept as the int32 array the Dispatch carried (a read-only view of its bytes: a 10k-token
prompt is never turned into Python ints) and the output as a list; the page table is an int32 array, so
building a batch or a commit from them costs array slices, not per-id Python work.

The last token of prompt + output is never fed to the model before the next step, so during decode
num_computed == num_tokens - 1. Pages before matched_len belong to the radix tree (read-only, shared);
the rest are this request's own until it commits them.

A full hit (matched_len == prompt_len) still needs logits for the last prompt token, so that token is
recomputed into a private copy of the last cached page (copy-on-write): the shared page is never written.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from computeworker.engine.sampling import TokenLogprobs
from computeworker.engine.stop import StopStringMatcher
from shared.ids import ID_DTYPE
from shared.protocol import FinishReason, SamplingParams

if TYPE_CHECKING:
    from computeworker.engine.prompt_scoring import PromptScores
    from computeworker.engine.structured import GrammarState


class Phase(enum.Enum):
    RUNNING = "running"  # prefilling or decoding
    AWAIT_COMMIT = "await_commit"  # prompt pages committed; their ids may change until CommitAck


class CommitRange(NamedTuple):
    """Full pages to commit: their tokens and page ids as wire bytes (little-endian int32)."""

    tokens: bytes
    page_ids: bytes
    num_pages: int


@dataclass(slots=True)
class Request:
    """Mutable state of one request. Only the engine (one thread at a time) touches it."""

    request_id: bytes
    prompt: np.ndarray  # int32 [prompt_len], read-only
    prompt_len: int
    matched_len: int
    sampling: SamplingParams
    page_size: int
    max_len: int  # the sequence never grows past this: min(prompt + max_tokens, context length)
    page_table: np.ndarray  # int32, writable: position i lives in page_table[i // page_size]
    num_computed: int
    output: list[int] = field(default_factory=list)  # tokens sampled so far (fed back one by one)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per output token, if asked
    sample_seed: int = 0  # the sampling stream: params.seed, or one the engine drew (see sampling.uniform)
    sample_offset: int = 0  # draws made by earlier attempts (Dispatch.num_generated)
    stop_matcher: StopStringMatcher | None = None
    grammar: GrammarState | None = None  # the structured output's matcher and pending token, if any
    cow_source: int | None = None  # shared page to copy into page_table[num_computed // page_size]
    phase: Phase = Phase.RUNNING
    num_committed_pages: int = 0  # prompt pages sent in Commit
    pages_requested: bool = False  # a PageRequest is in flight
    out_of_pages: bool = False  # the daemon said NO_ROOM: finish when the pages run out
    num_emitted: int = 0  # output tokens already sent in Generated frames
    last_flush_s: float = 0.0
    finish_reason: FinishReason | None = None
    stop_text: str = ""
    finish_sent: bool = False
    _output_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=ID_DTYPE))  # see generated_ids
    _num_output_ids: int = 0
    _prompt_token_set: tuple[tuple[int, str], Any] | None = None  # ((vocab, device), the set)
    prompt_scores: list[PromptScores] = field(default_factory=list)  # prompt logprobs, chunk by chunk

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens so far."""
        return self.prompt_len + len(self.output)

    @property
    def num_output(self) -> int:
        return len(self.output)

    def token_ids(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of prompt + output as int32 (a view when inside the prompt)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise ValueError(f"token range [{start}, {stop}) outside {self.num_tokens} tokens")
        p = self.prompt_len
        if stop <= p:
            return self.prompt[start:stop]
        tail = np.asarray(self.output[max(start - p, 0) : stop - p], dtype=ID_DTYPE)
        return tail if start >= p else np.concatenate([self.prompt[start:], tail])

    def generated_ids(self) -> np.ndarray:
        """Every token this request generated, as int32: those earlier attempts streamed (the prompt's last
        sample_offset tokens) and this attempt's output. The output is mirrored into a growing array, so a
        step costs the tokens sampled since the last call, not the whole output."""
        num = len(self.output)
        if num > len(self._output_ids):
            grown = np.zeros(max(num, 2 * len(self._output_ids), 16), dtype=ID_DTYPE)
            grown[: self._num_output_ids] = self._output_ids[: self._num_output_ids]
            self._output_ids = grown
        if num > self._num_output_ids:
            self._output_ids[self._num_output_ids : num] = self.output[self._num_output_ids :]
            self._num_output_ids = num
        own = self._output_ids[:num]
        if not self.sample_offset:
            return own
        return np.concatenate([self.prompt[self.prompt_len - self.sample_offset :], own])

    def prompt_token_set(self, vocab: int, device: torch.device | None = None) -> np.ndarray | torch.Tensor:
        """The distinct prompt tokens below `vocab`, sorted (repetition_penalty's "seen" set), as int64 on
        `device` (a numpy array for None); computed once and kept, so later steps copy nothing."""
        key = (vocab, str(device))
        if self._prompt_token_set is None or self._prompt_token_set[0] != key:
            ids = np.unique(self.prompt).astype(np.int64)
            ids = ids[(ids >= 0) & (ids < vocab)]
            self._prompt_token_set = (key, ids if device is None else torch.from_numpy(ids).to(device))
        return self._prompt_token_set[1]

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_free_slots(self) -> int:
        """Positions that can still be written without more pages."""
        return max(0, len(self.page_table) * self.page_size - self.num_computed)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens waiting to be fed: the rest of the prompt, or the one sampled token while decoding."""
        return self.num_tokens - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.prompt_len

    def pages_still_needed(self) -> int:
        """Pages beyond page_table needed to reach max_len (the final token's K/V is never written)."""
        total = -(-(self.max_len - 1) // self.page_size)
        return max(0, total - len(self.page_table))

    def can_step(self) -> bool:
        return (
            not self.is_finished
            and self.phase is Phase.RUNNING
            and self.num_pending_tokens > 0
            and self.num_free_slots > 0
        )

    def finish(self, reason: FinishReason, stop_text: str = "") -> None:
        """Decide the finish; the Finished frame goes out once no commit is in flight."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self.stop_text = stop_text

    def final_commit(self) -> CommitRange:
        """Every full page whose K/V is written (prompt + output)."""
        return self._commit_range(self.num_computed // self.page_size)

    def prompt_commit(self) -> CommitRange | None:
        """The prompt's full pages to commit after prefill, or None when none of them is new."""
        num_pages = self.prompt_len // self.page_size
        if num_pages * self.page_size <= self.matched_len:
            return None
        return self._commit_range(num_pages)

    def _commit_range(self, num_pages: int) -> CommitRange:
        tokens = self.token_ids(0, num_pages * self.page_size)
        pages = self.page_table[:num_pages]
        return CommitRange(tokens.astype(ID_DTYPE, copy=False).tobytes(), pages.tobytes(), num_pages)
