"""What a request's sampling parameters do to the model's logits before temperature: logit_bias, the
min_tokens ban on EOS / stop tokens, and the repetition, frequency and presence penalties.

For one row (vLLM's order and formulas; OpenAI's for presence and frequency)::

    z = logits + logit_bias                                  (token id -> bias, any number of entries)
    z[banned] = -inf                                         (EOS and stop_token_ids, before min_tokens)
    seen = generated tokens | prompt tokens
    z[seen] = z / r where z > 0 else z * r                   (repetition_penalty r, 1 = off)
    z -= frequency_penalty * count + presence_penalty * (count > 0)   (count over generated tokens only)

"Generated" includes tokens an earlier attempt streamed before the request was re-dispatched, so a resumed
request penalises exactly what the first one did. The rows that ask for none of this are never copied;
the others are processed together: one [rows, vocab] count matrix built by scatter-add, a handful of
elementwise kernels, and no device sync. The raw logits stay untouched (logprobs report the model's own
distribution).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from computeworker.engine.request import Request
from computeworker.model.forward_batch import packed_to_device
from shared.protocol import SamplingParams


@dataclass(frozen=True, slots=True)
class RowHistory:
    """The tokens one row's processing looks at: generated so far (earlier attempts included), the
    prompt's distinct tokens (read only when repetition_penalty != 1) and the tokens banned this step."""

    generated: Sequence[int] | np.ndarray = ()
    prompt_tokens: np.ndarray | torch.Tensor | None = None  # a tensor on the logits' device: no copy per step
    banned: tuple[int, ...] = field(default=())


_NOTHING = RowHistory()


def row_history(
    req: Request, eos_token_ids: Sequence[int], vocab: int, device: torch.device | None = None
) -> RowHistory:
    """What `req`'s processing looks at this step (an empty history for a request that asks for none).
    vocab, device: the logits' width and device; the prompt's distinct tokens are kept there."""
    params = req.sampling
    if not params.processes_logits:
        return _NOTHING
    penalised = params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
    generated = req.generated_ids()
    banned: tuple[int, ...] = ()
    if req.num_output < params.min_tokens:  # this attempt's (a re-dispatch lowers min_tokens by the rest)
        banned = (*(() if params.ignore_eos else eos_token_ids), *params.stop_token_ids)
    return RowHistory(
        generated=generated if penalised else (),
        prompt_tokens=req.prompt_token_set(vocab, device) if params.repetition_penalty != 1.0 else None,
        banned=banned,
    )


def processed_logits(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[RowHistory]
) -> torch.Tensor:
    """logits [B, vocab] with every row's processing applied: the same tensor when no row asks for any,
    else a new float32 tensor. Token ids outside the vocabulary are ignored. Every decision is taken on
    the host (no device sync) and every index travels in one host-to-device copy."""
    if logits.dim() != 2 or not logits.shape[0] == len(params) == len(histories):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(params)} rows")
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    vocab, device = logits.shape[-1], logits.device
    picked = [params[i] for i in rows]
    hist = [histories[i] for i in rows]
    repeat = [j for j, p in enumerate(picked) if p.repetition_penalty != 1.0]
    penalised = [j for j, p in enumerate(picked) if p.frequency_penalty or p.presence_penalty]
    # Only the rows that have something of each kind cost a numpy call of that kind.
    generated = _flat([(j, h.generated) for j, h in enumerate(hist) if len(h.generated)], vocab)
    banned = _flat([(j, h.banned) for j, h in enumerate(hist) if h.banned], vocab)
    biased = [(j, p.logit_bias) for j, p in enumerate(picked) if p.logit_bias]
    bias_ids = _flat([(j, np.fromiter(b, np.int64, len(b))) for j, b in biased], vocab, keep_all=True)
    bias_values = (
        np.concatenate([np.fromiter(b.values(), np.float32, len(b)) for _, b in biased])
        if biased
        else np.zeros(0, dtype=np.float32)
    )
    inside = bias_ids >= 0  # _flat marks ids outside the vocabulary -1 when asked to keep them
    scalars = np.array(
        [(p.repetition_penalty, p.frequency_penalty, p.presence_penalty) for p in picked], dtype=np.float32
    )
    index, generated_t, banned_t, bias_t = packed_to_device(
        [np.array(rows), generated, banned, bias_ids[inside]], torch.int64, device
    )
    scalars_t, bias_values_t = packed_to_device([scalars, bias_values[inside]], torch.float32, device)
    repetition, frequency, presence = scalars_t.view(-1, 3).T[:, :, None]

    z = logits.index_select(0, index).float()
    flat = z.view(-1)
    if len(bias_t):
        flat.index_add_(0, bias_t, bias_values_t)
    if len(banned_t):
        flat.index_fill_(0, banned_t, -math.inf)
    counts = torch.zeros_like(z)
    if len(generated_t):
        counts.view(-1).index_add_(0, generated_t, torch.ones(len(generated_t), device=z.device))
    if repeat:
        seen = counts > 0
        prompt_t = _prompt_flat([(j, hist[j].prompt_tokens) for j in repeat], vocab, device)
        if len(prompt_t):
            seen.view(-1).index_fill_(0, prompt_t, True)
        z = torch.where(seen, torch.where(z > 0, z / repetition, z * repetition), z)
    if penalised:
        z = z - frequency * counts - presence * (counts > 0).float()

    out = logits.float().clone() if logits.dtype != torch.float32 else logits.clone()
    out.index_copy_(0, index, z)
    return out


def _prompt_flat(
    sets: Sequence[tuple[int, np.ndarray | torch.Tensor | None]], vocab: int, device: torch.device
) -> torch.Tensor:
    """Flat [rows, vocab] indices of (row, prompt token set) pairs, built on the device from each
    request's cached set (no per-step copy of the prompts; the sets hold ids below vocab only, see
    Request.prompt_token_set)."""
    parts = [(j, torch.as_tensor(ids, device=device)) for j, ids in sets if ids is not None and len(ids)]
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=device)
    sizes = [len(ids) for _, ids in parts]
    offsets = torch.repeat_interleave(
        torch.tensor([j * vocab for j, _ in parts], device=device),
        torch.tensor(sizes, device=device),
        output_size=sum(sizes),
    )
    return offsets + torch.cat([ids for _, ids in parts]).long()


def _flat(
    per_row: Sequence[tuple[int, Sequence[int] | np.ndarray]], vocab: int, *, keep_all: bool = False
) -> np.ndarray:
    """(row, token ids) pairs as flat indices into a [rows, vocab] tensor (row * vocab + id), in order.
    Ids outside [0, vocab) are dropped, or marked -1 with keep_all (to stay aligned with other arrays)."""
    if not per_row:
        return np.zeros(0, dtype=np.int64)
    ids = np.concatenate([np.asarray(t) for _, t in per_row]).astype(np.int64, copy=False)
    starts = np.array([j * vocab for j, _ in per_row], dtype=np.int64)
    flat = np.repeat(starts, [len(t) for _, t in per_row]) + ids
    inside = (ids >= 0) & (ids < vocab)
    if inside.all():
        return flat
    return np.where(inside, flat, -1) if keep_all else flat[inside]
