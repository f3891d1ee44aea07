"""Which requests run in the next step, and the ForwardBatch that runs them.

One step = one forward pass: every decoding request contributes its one sampled token, and prefilling
requests contribute chunks of their uncached prompt suffix, oldest first, until `prefill_chunk` prompt
tokens are in the step; in one mixed batch, or (on CUDA) in alternating prefill and decode steps. A
request that has no free slot (waiting for PagesGranted) or whose prompt commit is in flight sits the
step out; the others go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from computeworker.engine.prompt_scoring import SCORING_STEP_TOKENS, scoring_rows
from computeworker.engine.request import Request
from computeworker.model.batch import ForwardBatch
from computeworker.model.forward_batch import SeqChunk, build_forward_batch


@dataclass(frozen=True, slots=True)
class StepEntry:
    """`num_tokens` tokens of `request`, starting at position request.num_computed."""

    request: Request
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this entry ends at the sequence's last token, so its logits give the next token."""
        return self.request.num_computed + self.num_tokens == self.request.num_tokens


def plan_step(
    running: Sequence[Request], prefill_chunk: int, *, mixed: bool = True, after_prefill: bool = False
) -> list[StepEntry]:
    """Pick the work for one step. Changes nothing.

    mixed: decodes first (they are cheap and keep latency flat), then prefill chunks within the token
    budget, in one step. Separate (mixed=False, the CUDA default): a step is all prefill or all decode.
    On a GPU a decode row inside a prefill step costs a 128-row attention tile over its whole KV and
    keeps the step off the decode CUDA graph (measured on an H200: a step of 1.7k prefill tokens plus 118
    decodes took ~80 ms, while a pure prefill step runs ~23 ms per 1k tokens and a graphed decode step of
    128 sequences ~15 ms). Prefill goes first, but never twice in a row while decodes wait
    (`after_prefill`: the previous step was a prefill step), so a stream of arrivals cannot starve them.
    A step with a chunk that scores its prompt (prompt logprobs: every token's logits) holds at most
    SCORING_STEP_TOKENS prefill tokens."""
    if prefill_chunk < 1:
        raise ValueError("prefill_chunk must be at least 1")
    decodes = [StepEntry(req, 1) for req in running if req.can_step() and not req.is_prefilling]
    prefills: list[StepEntry] = []
    budget = prefill_chunk
    used = 0
    for req in running:
        if budget == 0:
            break
        if req.can_step() and req.is_prefilling:
            n = min(req.num_pending_tokens, req.num_free_slots, budget)
            if scoring_rows(req, req.num_computed, n):  # the step computes every token's logits
                n = min(n, SCORING_STEP_TOKENS - used)
                if n <= 0:
                    continue  # its turn comes when it is the oldest prefill
                budget = min(budget, SCORING_STEP_TOKENS - used)
            prefills.append(StepEntry(req, n))
            budget -= n
            used += n
    if mixed:
        return decodes + prefills
    if prefills and not (decodes and after_prefill):
        return prefills
    return decodes


def build_batch(entries: Sequence[StepEntry], page_size: int, device: torch.device) -> ForwardBatch:
    """The ForwardBatch for `entries` (FlashInfer conventions, see computeworker.model.batch). Tokens and
    page tables go in as the requests' int32 arrays, so no per-id Python work scales with the prefix."""
    chunks = []
    for entry in entries:
        req = entry.request
        start = req.num_computed
        chunks.append(SeqChunk(req.token_ids(start, start + entry.num_tokens), start, req.page_table))
    return build_forward_batch(chunks, page_size, device)


def scoring_chunks(entries: Sequence[StepEntry]) -> list[tuple[Request, int, int, int]]:
    """(request, first logits row, first position, scoring rows) of the step's chunks that score prompt
    tokens (see computeworker.engine.prompt_scoring); rows are numbered over the whole batch."""
    chunks, row = [], 0
    for entry in entries:
        req = entry.request
        n = scoring_rows(req, req.num_computed, entry.num_tokens)
        if n:
            chunks.append((req, row, req.num_computed, n))
        row += entry.num_tokens
    return chunks
