"""The step's tokens, from the logits of the rows that sample: each request's logits processing
(computeworker.engine.logits_processing), its grammar's mask (.structured), the draw (.sampling) and the
logprobs it asked for (of the model's own logits, before any of that). Also the Generated frame that
carries tokens and their logprobs to the daemon."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from computeworker.engine.logits_processing import processed_logits, row_history
from computeworker.engine.request import Request
from computeworker.engine.sampling import RowSampling, TokenLogprobs, sample_batch, token_logprobs
from computeworker.engine.structured import StructuredDecoding
from shared.ids import ids_to_bytes
from shared.protocol import Generated


@dataclass(frozen=True, slots=True)
class Choices:
    tokens: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # per row: None unless the request asked
    stuck: frozenset[
        bytes
    ]  # requests whose grammar cannot go on (StructuredDecoding.mask): ended, token dropped


def choose_tokens(
    logits: torch.Tensor,
    reqs: Sequence[Request],
    eos_token_ids: Sequence[int],
    structured: StructuredDecoding | None,
) -> Choices:
    """One token per row of logits [len(reqs), vocab] (row i is reqs[i]'s next position)."""
    rows = [RowSampling(req.sampling, req.sample_seed, req.sample_offset + len(req.output)) for req in reqs]
    processed = logits
    if any(row.params.processes_logits for row in rows):  # else nothing to build per row
        vocab, device = logits.shape[-1], logits.device
        histories = [row_history(req, eos_token_ids, vocab, device) for req in reqs]
        processed = processed_logits(logits, [row.params for row in rows], histories)
    stuck: frozenset[bytes] = frozenset()
    if structured is not None and any(req.grammar is not None for req in reqs):
        grammars = [req.grammar for req in reqs]
        processed, stuck_rows = structured.mask(processed, grammars, owned=processed is not logits)
        stuck = frozenset(reqs[j].request_id for j in stuck_rows)
    tokens = sample_batch(processed, rows)
    ks = [row.params.logprobs for row in rows]
    logprobs = token_logprobs(logits, tokens, ks) if max(ks, default=-1) >= 0 else [None] * len(ks)
    return Choices(tokens, logprobs, stuck)


def generated_frame(req: Request, tokens: list[int]) -> Generated:
    """The Generated frame of `tokens`, the request's newest output, with their logprobs if it asked."""
    if req.sampling.logprobs < 0:
        return Generated(req.request_id, ids_to_bytes(tokens))
    entries = req.output_logprobs[req.num_emitted : req.num_emitted + len(tokens)]
    return Generated(
        req.request_id,
        ids_to_bytes(tokens),
        logprobs=np.array([e.logprob for e in entries], dtype="<f4").tobytes(),
        top_ids=np.array([e.top_ids for e in entries], dtype="<i4").tobytes(),
        top_logprobs=np.array([e.top_logprobs for e in entries], dtype="<f4").tobytes(),
    )
