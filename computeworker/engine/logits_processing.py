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

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from computeworker.engine.request import Request
from shared.protocol import SamplingParams


@dataclass(frozen=True, slots=True)
class RowHistory:
    """The tokens one row's processing looks at: generated so far (earlier attempts included), the
    prompt's distinct tokens (read only when repetition_penalty != 1) and the tokens banned this step."""

    generated: Sequence[int] | np.ndarray = ()
    prompt_tokens: np.ndarray | None = None
    banned: tuple[int, ...] = field(default=())


_NOTHING = RowHistory()


def row_history(req: Request, eos_token_ids: Sequence[int]) -> RowHistory:
    """What `req`'s processing looks at this step (an empty history for a request that asks for none)."""
    params = req.sampling
    if not params.processes_logits:
        return _NOTHING
    penalised = params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
    generated = req.generated_ids()
    banned: tuple[int, ...] = ()
    if len(generated) < params.min_tokens:
        banned = (*(() if params.ignore_eos else eos_token_ids), *params.stop_token_ids)
    return RowHistory(
        generated=generated if penalised else (),
        prompt_tokens=req.prompt_token_set() if params.repetition_penalty != 1.0 else None,
        banned=banned,
    )


def processed_logits(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[RowHistory]
) -> torch.Tensor:
    """logits [B, vocab] with every row's processing applied: the same tensor when no row asks for any,
    else a new float32 tensor. Token ids outside the vocabulary are ignored."""
    if logits.dim() != 2 or not logits.shape[0] == len(params) == len(histories):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(params)} rows")
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    index = torch.tensor(rows, device=device)
    z = logits.index_select(0, index).float()
    picked = [params[i] for i in rows]
    hist = [histories[i] for i in rows]

    bias = [p.logit_bias for p in picked]
    if any(bias):
        ids = np.fromiter((t for b in bias for t in b), np.int64)
        values = np.fromiter((v for b in bias for v in b.values()), np.float32)
        bias_rows = np.repeat(np.arange(len(bias), dtype=np.int64), [len(b) for b in bias])
        inside = (ids >= 0) & (ids < vocab)
        z.index_put_(
            _on(device, bias_rows[inside], ids[inside]),
            torch.from_numpy(values[inside]).to(device),
            accumulate=True,
        )
    ban_rows, ban_ids = _flatten([np.asarray(h.banned, dtype=np.int64) for h in hist], vocab)
    if len(ban_ids):
        z.index_put_(_on(device, ban_rows, ban_ids), torch.tensor(float("-inf"), device=device))

    counts = _counts(hist, len(rows), vocab, device)
    repetition = torch.tensor([p.repetition_penalty for p in picked], device=device)[:, None]
    if bool((repetition != 1.0).any()):
        seen = counts > 0
        empty = np.zeros(0, dtype=np.int64)
        prompt_rows, prompt_ids = _flatten(
            [
                h.prompt_tokens if p.repetition_penalty != 1.0 and h.prompt_tokens is not None else empty
                for p, h in zip(picked, hist, strict=True)
            ],
            vocab,
        )
        if len(prompt_ids):
            seen.index_put_(_on(device, prompt_rows, prompt_ids), torch.tensor(True, device=device))
        penalised = torch.where(z > 0, z / repetition, z * repetition)
        z = torch.where(seen, penalised, z)
    frequency = torch.tensor([p.frequency_penalty for p in picked], device=device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in picked], device=device)[:, None]
    z = z - frequency * counts - presence * (counts > 0).float()

    out = logits.float().clone() if logits.dtype != torch.float32 else logits.clone()
    out.index_copy_(0, index, z)
    return out


def _counts(hist: Sequence[RowHistory], num_rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] float32: how often each token occurs among each row's generated tokens."""
    counts = torch.zeros((num_rows, vocab), dtype=torch.float32, device=device)
    rows, ids = _flatten([np.asarray(h.generated, dtype=np.int64) for h in hist], vocab)
    if len(ids):
        counts.index_put_(_on(device, rows, ids), torch.ones(len(ids), device=device), accumulate=True)
    return counts


def _flatten(per_row: Sequence[np.ndarray], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(row index, token id) arrays over every row's ids, in order; ids outside [0, vocab) dropped."""
    sizes = [len(ids) for ids in per_row]
    if not sum(sizes):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    rows = np.repeat(np.arange(len(per_row), dtype=np.int64), sizes)
    ids = np.concatenate(per_row).astype(np.int64, copy=False)
    inside = (ids >= 0) & (ids < vocab)
    if not inside.all():
        return rows[inside], ids[inside]
    return rows, ids


def _on(device: torch.device, rows: np.ndarray, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and id index tensors on `device`, in one host-to-device copy."""
    both = torch.from_numpy(np.stack([rows, ids])).to(device)
    return both[0], both[1]
