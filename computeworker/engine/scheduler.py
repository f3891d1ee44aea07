"""Which requests run in the next step, and the ForwardBatch that runs them.

One step = one forward pass over a mixed batch: every decoding request contributes its one sampled
token, and prefilling requests contribute chunks of their uncached prompt suffix, oldest first, until
`prefill_chunk` prompt tokens are in the step. A request that has no free slot (waiting for
PagesGranted) or whose prompt commit is in flight sits the step out; the others go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from computeworker.engine.request import Request
from computeworker.model.batch import ForwardBatch


@dataclass(frozen=True, slots=True)
class StepEntry:
    """`num_tokens` tokens of `request`, starting at position request.num_computed."""

    request: Request
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this entry ends at the sequence's last token, so its logits give the next token."""
        return self.request.num_computed + self.num_tokens == len(self.request.tokens)


def plan_step(running: Sequence[Request], prefill_chunk: int) -> list[StepEntry]:
    """Pick the work for one step. Decodes first (they are cheap and keep latency flat), then prefill
    chunks within the token budget. Changes nothing."""
    if prefill_chunk < 1:
        raise ValueError("prefill_chunk must be at least 1")
    entries: list[StepEntry] = []
    budget = prefill_chunk
    for req in running:
        if req.can_step() and not req.is_prefilling:
            entries.append(StepEntry(req, 1))
    for req in running:
        if budget == 0:
            break
        if req.can_step() and req.is_prefilling:
            n = min(req.num_pending_tokens, req.num_free_slots, budget)
            entries.append(StepEntry(req, n))
            budget -= n
    return entries


def build_batch(entries: Sequence[StepEntry], page_size: int, device: torch.device) -> ForwardBatch:
    """The ForwardBatch for `entries` (FlashInfer conventions, see computeworker.model.batch)."""
    if not entries:
        raise ValueError("a batch needs at least one entry")
    input_ids: list[int] = []
    positions: list[int] = []
    write_pages: list[int] = []
    write_slots: list[int] = []
    kv_pages: list[int] = []
    qo_indptr = [0]
    kv_indptr = [0]
    last_page_lens: list[int] = []
    q_lens: list[int] = []
    kv_lens: list[int] = []
    for entry in entries:
        req = entry.request
        start = req.num_computed
        end = start + entry.num_tokens
        num_pages = -(-end // page_size)
        if num_pages > len(req.page_table):
            raise ValueError(f"request {req.request_id.hex()} has no page for position {end - 1}")
        input_ids.extend(req.tokens[start:end])
        for pos in range(start, end):
            positions.append(pos)
            write_pages.append(req.page_table[pos // page_size])
            write_slots.append(pos % page_size)
        kv_pages.extend(req.page_table[:num_pages])
        qo_indptr.append(qo_indptr[-1] + entry.num_tokens)
        kv_indptr.append(kv_indptr[-1] + num_pages)
        last_page_lens.append(end - (num_pages - 1) * page_size)
        q_lens.append(entry.num_tokens)
        kv_lens.append(end)

    def i64(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return ForwardBatch(
        input_ids=i64(input_ids),
        positions=i64(positions),
        qo_indptr=i32(qo_indptr),
        kv_indptr=i32(kv_indptr),
        kv_page_ids=i32(kv_pages),
        kv_last_page_len=i32(last_page_lens),
        write_page_ids=i64(write_pages),
        write_slots=i64(write_slots),
        q_lens=tuple(q_lens),
        kv_lens=tuple(kv_lens),
    )
