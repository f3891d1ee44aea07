"""Prompt logprobs (SamplingParams.prompt_logprobs = k >= 0): every prompt token's log-probability given
the tokens before it, for legacy completions' ``echo`` with ``logprobs`` (how evaluation harnesses score
a text).

The logits at position p predict token p + 1, so a chunk of the prompt computed at positions
[start, start + n) scores tokens start + 1 .. start + n (those inside the prompt). A step holding such a
chunk runs with every token's logits (the model's ``all_logits``); this module takes the log-softmax of the
scoring rows, the chosen tokens' values and the top k, and the request keeps them until its prompt is
done, when one PromptLogprobs frame carries them all. Such a request computes its whole prompt (the daemon
gives it no cached prefix: cached positions have no logits), in chunks of at most SCORING_STEP_TOKENS
tokens so that a step's logits stay bounded (512 x 128k vocab x 4 bytes = 256 MiB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from computeworker.engine.request import Request
from shared.ids import ids_to_bytes
from shared.protocol import PromptLogprobs

SCORING_STEP_TOKENS = 512


@dataclass(frozen=True, slots=True)
class PromptScores:
    """Scores of consecutive prompt tokens: log-probabilities [m], top ids and values [m, k]."""

    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def scoring_rows(req: Request, start: int, num_tokens: int) -> int:
    """How many of a chunk's rows (positions start .. start + num_tokens - 1) score a prompt token."""
    if req.sampling.prompt_logprobs < 0:
        return 0
    return max(0, min(num_tokens, req.prompt_len - 1 - start))


def score_and_keep_last_rows(
    logits: torch.Tensor, chunks: Sequence[tuple[Request, int, int, int]], q_lens: Sequence[int]
) -> torch.Tensor:
    """A step run with every token's logits [tokens, vocab]: each scoring chunk's scores appended to its
    request, and the last row of every sequence returned (the rows sampling reads)."""
    for (req, *_), scores in zip(chunks, score_chunks(logits, chunks), strict=True):
        req.prompt_scores.append(scores)
    last_rows = torch.from_numpy(np.cumsum(q_lens) - 1).to(logits.device)
    return logits.index_select(0, last_rows)


def score_chunks(logits: torch.Tensor, chunks: Sequence[tuple[Request, int, int, int]]) -> list[PromptScores]:
    """For each (request, first logits row, first position, rows) chunk: the scores of prompt tokens
    position + 1 ... of its rows of `logits` [tokens, vocab] (every token's logits). One log-softmax and
    one top-k over all chunks' rows; one device sync."""
    if not chunks:
        return []
    device = logits.device
    rows = np.concatenate([np.arange(first, first + n) for _, first, _, n in chunks])
    targets = np.concatenate([req.prompt[pos + 1 : pos + 1 + n] for req, _, pos, n in chunks])
    picked = torch.from_numpy(np.stack([rows, targets.astype(np.int64)])).to(device)
    log_probs = torch.log_softmax(logits.index_select(0, picked[0]).float(), dim=-1)
    chosen = log_probs.gather(1, picked[1][:, None]).squeeze(1).cpu().numpy()
    widest = max(req.sampling.prompt_logprobs for req, *_ in chunks)
    top_values, top_ids = (
        torch.topk(log_probs, widest, dim=-1) if widest else (log_probs[:, :0], picked[1][:, None][:, :0])
    )
    top_values, top_ids = top_values.cpu().numpy(), top_ids.to(torch.int32).cpu().numpy()
    out, at = [], 0
    for req, _, _, n in chunks:
        k = req.sampling.prompt_logprobs
        out.append(PromptScores(chosen[at : at + n], top_ids[at : at + n, :k], top_values[at : at + n, :k]))
        at += n
    return out


def prompt_logprobs_frame(req: Request, scores: Sequence[PromptScores]) -> PromptLogprobs:
    """The PromptLogprobs frame of every score the request collected (prompt tokens 1 .. n-1, in order)."""
    k = req.sampling.prompt_logprobs
    logprobs = np.concatenate([s.logprobs for s in scores]) if scores else np.zeros(0, np.float32)
    if len(logprobs) != req.prompt_len - 1:
        raise AssertionError(f"scored {len(logprobs)} of {req.prompt_len - 1} prompt tokens")
    top_ids = np.concatenate([s.top_ids for s in scores]) if scores else np.zeros((0, k), np.int32)
    top_values = np.concatenate([s.top_logprobs for s in scores]) if scores else np.zeros((0, k), np.float32)
    return PromptLogprobs(
        req.request_id,
        logprobs.astype("<f4").tobytes(),
        ids_to_bytes(top_ids.ravel()) if k else b"",
        top_values.astype("<f4").tobytes() if k else b"",
    )
