"""Token sampling for a batch of requests with per-request parameters (OpenAI semantics).

Greedy (temperature 0) is an argmax. Otherwise the logits are divided by the temperature, masked by
top-k then top-p (the smallest set of most likely tokens whose probability reaches top_p; the token that
crosses the threshold is kept), and one token is drawn with the request's own torch.Generator, so a
seeded request reproduces its output whatever else shares the batch. Pure functions: nothing here keeps
state between steps except the generators the caller owns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shared.protocol import SamplingParams


@dataclass(frozen=True, slots=True)
class RowSampling:
    """What sampling needs from one request: its parameters and its generator (None when greedy)."""

    params: SamplingParams
    generator: torch.Generator | None


def make_generator(
    params: SamplingParams, device: torch.device, fallback_seed: int
) -> torch.Generator | None:
    """A generator for a non-greedy request: seeded by params.seed, else by `fallback_seed` (the caller
    draws it from its own entropy source). Greedy requests need none."""
    if params.temperature == 0.0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else fallback_seed)
    return gen


def top_k_top_p_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Boolean mask [vocab] of the tokens that survive top-k (0 = off) then top-p (1.0 = off) on one
    row of (temperature-scaled) logits. Ties at the k-th value are broken by index (lower index wins),
    so exactly min(top_k, vocab) tokens survive top-k."""
    if logits.dim() != 1:
        raise ValueError(f"logits must be one row [vocab], got shape {tuple(logits.shape)}")
    vocab = logits.shape[0]
    order = torch.argsort(logits, descending=True, stable=True)
    keep_sorted = torch.ones(vocab, dtype=torch.bool, device=logits.device)
    if 0 < top_k < vocab:
        keep_sorted[top_k:] = False
    if top_p < 1.0:
        sorted_logits = logits[order].masked_fill(~keep_sorted, float("-inf"))
        probs = torch.softmax(sorted_logits.float(), dim=0)
        # Mass strictly before each token: a token is kept while that mass is still below top_p, which
        # keeps the token that crosses the threshold and always keeps the most likely one.
        mass_before = torch.cumsum(probs, dim=0) - probs
        keep_sorted &= mass_before < top_p
    mask = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
    mask[order[keep_sorted]] = True
    return mask


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from one row of raw logits [vocab]. Uses `generator` iff temperature > 0."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits).item())
    if generator is None:
        raise ValueError("a non-greedy request needs a generator")
    scaled = logits.float() / params.temperature
    if params.top_k > 0 or params.top_p < 1.0:
        scaled = scaled.masked_fill(~top_k_top_p_mask(scaled, params.top_k, params.top_p), float("-inf"))
    probs = torch.softmax(scaled, dim=0)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample_batch(logits: torch.Tensor, rows: Sequence[RowSampling]) -> list[int]:
    """One token per row of logits [B, vocab]. Greedy rows share one batched argmax; the rest draw one
    at a time because each has its own generator."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
    out = [0] * len(rows)
    greedy = [i for i, r in enumerate(rows) if r.params.temperature == 0.0]
    if len(greedy) == len(rows):
        # The common case needs no row gather (on CUDA a list index is a host-to-device copy too):
        # one argmax kernel and the one device sync that reads its result.
        return torch.argmax(logits, dim=-1).tolist()
    if greedy:
        picked = torch.argmax(logits[greedy], dim=-1).tolist()
        for i, tok in zip(greedy, picked, strict=True):
            out[i] = int(tok)
    for i, row in enumerate(rows):
        if row.params.temperature != 0.0:
            out[i] = sample_row(logits[i], row.params, row.generator)
    return out
