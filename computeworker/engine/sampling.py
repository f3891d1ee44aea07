"""Token sampling for a batch of requests with per-request parameters (OpenAI semantics), batched.

Greedy rows (temperature 0) are an argmax. Random rows are drawn by inverse transform: the logits divided
by the row's temperature, min_p (tokens less likely than min_p x the most likely are dropped), softmax,
top-k then top-p applied in sorted order (the smallest set of most
likely tokens whose probability reaches top_p; the token that crosses the threshold is kept; ties in
value go to the lower token id), the cumulative distribution, and one uniform number per row located in
it. Every row of a step runs through the same few batched kernels and the step ends in one device sync,
whatever the mix of parameters (a per-row loop costs a softmax, a draw and a sync per row: 42-58 ms per
step at 256 rows on an H200, bench/results/gpu_notes.md runs 33 and 35).

The uniform number comes from a counter-based stream: ``uniform(seed, step)`` hashes the request's seed
and the number of tokens it has sampled before. A request's draws therefore depend on its own logits,
parameters, seed and position only, never on which other requests share the batch or its row, and a
request re-dispatched to another worker continues the same stream. Pure functions: nothing here keeps
state between steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared.protocol import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class RowSampling:
    """What sampling needs from one request: its parameters, its stream's seed (``params.seed``, or one
    the worker drew for an unseeded request) and how many tokens it has sampled before this one."""

    params: SamplingParams
    seed: int = 0
    step: int = 0


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """A sampled token's log-probability under the model and the k most likely tokens at its position
    (most likely first)."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], ks: Sequence[int]
) -> list[TokenLogprobs | None]:
    """For each row i with ks[i] >= 0: the log-softmax of its raw logits [B, vocab] (the model's own
    distribution, before temperature, top-k and top-p, as vLLM reports by default) at tokens[i], and its
    ks[i] most likely tokens. None for rows with ks[i] < 0. One extra device sync, only when asked."""
    out: list[TokenLogprobs | None] = [None] * len(ks)
    rows = [i for i, k in enumerate(ks) if k >= 0]
    if not rows:
        return out
    device = logits.device
    log_probs = torch.log_softmax(logits.index_select(0, torch.tensor(rows, device=device)).float(), dim=-1)
    picked = torch.tensor([tokens[i] for i in rows], device=device)
    chosen = log_probs.gather(1, picked[:, None]).squeeze(1).tolist()
    widest = max(ks[i] for i in rows)
    top_values, top_ids = (
        torch.topk(log_probs, widest, dim=-1) if widest else (log_probs[:, :0], picked[:, None][:, :0])
    )
    values, ids = top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        out[i] = TokenLogprobs(chosen[j], ids[j][: ks[i]], values[j][: ks[i]])
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of every element (uint64 arrays wrap modulo 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seeds: Sequence[int], steps: Sequence[int]) -> np.ndarray:
    """The streams' numbers: element i is draw ``steps[i]`` of the request seeded ``seeds[i]``, in [0, 1)
    with 53 random bits (float64). Any Python int is a valid seed (reduced modulo 2**64); steps must be
    >= 0. One numpy pass for the whole batch."""
    if any(step < 0 for step in steps):
        raise ValueError(f"steps must be >= 0, got {min(steps)}")
    mixed = _splitmix64(np.array([seed & _MASK64 for seed in seeds], dtype=np.uint64))
    bits = _splitmix64(mixed ^ np.array(steps, dtype=np.uint64)) >> np.uint64(11)
    return bits.astype(np.float64) * 2.0**-53


def uniform(seed: int, step: int) -> float:
    """`uniforms` for one draw."""
    return float(uniforms([seed], [step])[0])


def top_k_top_p_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Boolean mask [vocab] of the tokens that survive top-k (0 = off) then top-p (1.0 = off) on one
    row of (temperature-scaled) logits: the one-row reference of what `sample_batch` keeps."""
    if logits.dim() != 1:
        raise ValueError(f"logits must be one row [vocab], got shape {tuple(logits.shape)}")
    device = logits.device
    order, _, keep = _sorted_keep(
        logits[None].float(),
        torch.tensor([top_k], device=device),
        torch.tensor([top_p], dtype=torch.float64, device=device),
    )
    mask = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    mask[order[0][keep[0]]] = True
    return mask


def _sorted_keep(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of scaled logits [R, V] sorted by value (descending; ties: lower id first): the order
    [R, V], the renormalised probabilities in that order [R, V] (float64, zero where dropped) and the
    kept mask in that order. top_k [R] (0 = off), top_p [R] (1.0 = off)."""
    values, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    probs, keep = _keep_in_order(values, top_k, top_p, None)
    return order, probs, keep


def _keep_in_order(
    values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, log_norm: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p over values [R, C] in stable sorted order: (probabilities, float64, zero where
    dropped; kept mask). log_norm: each row's log softmax normaliser over its whole vocabulary when the
    C values are only its largest (rows with top-k renormalise over their first k, all among them);
    None when they are the whole row."""
    width = values.shape[-1]
    rank = torch.arange(width, device=values.device)
    k = torch.where((top_k > 0) & (top_k < width), top_k, width)
    keep = rank[None, :] < k[:, None]
    masked = values.double().masked_fill(~keep, float("-inf"))
    if log_norm is None:
        probs = torch.softmax(masked, dim=-1)
    else:
        norm = torch.where(top_k > 0, torch.logsumexp(masked, dim=-1), log_norm)
        probs = torch.exp(masked - norm[:, None])
    # Mass strictly before each token: kept while still below top_p, so the token that crosses the
    # threshold stays and the most likely token always does. Rows with top_p 1.0 keep everything.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    return probs * keep, keep


# With many truncated rows, each looks at its largest CANDIDATES logits first (torch.topk) and a row whose
# kept set might reach past them is redone with the full sort. topk over a 128k vocabulary has a fixed
# cost of ~2 ms on an H200, so below CANDIDATE_MIN_ROWS rows the full stable sort is cheaper (run 33/34:
# 64 rows 2.1 ms sorted vs 2.5 ms with candidates, 256 rows 5.5 vs 3.4 ms).
CANDIDATES = 1024
CANDIDATE_MIN_ROWS = 128


def _truncated_tokens(
    scaled: torch.Tensor, top_k: list[int], top_p: list[float], draws: torch.Tensor
) -> torch.Tensor:
    """One token per row of scaled logits [R, V] under top-k / top-p: the same token as the full stable
    sort (`_sorted_keep`) gives for these uniform draws [R]."""
    device = scaled.device
    vocab = scaled.shape[-1]
    k_t = torch.tensor(top_k, device=device)
    p_t = torch.tensor(top_p, dtype=torch.float64, device=device)
    width = min(vocab, CANDIDATES)
    if width == vocab or len(top_k) < CANDIDATE_MIN_ROWS or any(k >= width for k in top_k):
        order, probs, _ = _sorted_keep(scaled, k_t, p_t)
        return order.gather(1, _draw(torch.cumsum(probs, dim=-1), draws)[:, None]).squeeze(1)
    values, ids = torch.topk(scaled, width, dim=-1, sorted=False)
    by_id = torch.argsort(ids, dim=-1)  # then a stable sort by value leaves ties in id order
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    values, perm = torch.sort(values, dim=-1, descending=True, stable=True)
    ids = ids.gather(1, perm)
    probs, keep = _keep_in_order(values, k_t, p_t, torch.logsumexp(scaled.double(), dim=-1))
    # Exact when the last kept value is above the smallest candidate: then every token at least that
    # likely is a candidate, in the full sort's order.
    last_kept = values.gather(1, (keep.sum(dim=-1, keepdim=True) - 1).clamp(min=0))
    # A smallest candidate of -inf (min_p, a banned token) means every other token is -inf too: never drawn.
    exact = ((last_kept > values[:, -1:]) | (values[:, -1:] == -math.inf)).squeeze(1)
    tokens = ids.gather(1, _draw(torch.cumsum(probs, dim=-1), draws)[:, None]).squeeze(1)
    if not bool(exact.all()):
        redo = torch.nonzero(~exact).squeeze(1)
        order, full, _ = _sorted_keep(scaled.index_select(0, redo), k_t[redo], p_t[redo])
        at = _draw(torch.cumsum(full, dim=-1), draws.index_select(0, redo))
        tokens[redo] = order.gather(1, at[:, None]).squeeze(1)
    return tokens


def _draw(cdf: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Index [R] where each row's uniform draw lands in its unnormalised CDF [R, V] (float64): the first
    position whose CDF exceeds u * total, never a position of zero probability."""
    total = cdf[:, -1:].contiguous()
    idx = torch.searchsorted(cdf, draws[:, None] * total, right=True)
    # u * total can round up to total: the last position that adds probability is the cap.
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(idx, last).squeeze(1)


def sample_batch(logits: torch.Tensor, rows: Sequence[RowSampling]) -> list[int]:
    """One token per row of logits [B, vocab] (already processed: see
    computeworker.engine.logits_processing)."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
    tokens = torch.argmax(logits, dim=-1)
    random_rows = [i for i, r in enumerate(rows) if r.params.temperature != 0.0]
    if not random_rows:
        return tokens.tolist()  # one argmax kernel and the one device sync that reads it
    device = logits.device
    params = [rows[i].params for i in random_rows]
    index = torch.tensor(random_rows, device=device)
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    scaled = logits.index_select(0, index).float() / temperature[:, None]
    if any(p.min_p > 0.0 for p in params):  # min_p: drop tokens below min_p x the most likely one
        floor = torch.tensor(
            [math.log(p.min_p) if p.min_p > 0.0 else -math.inf for p in params], device=device
        )
        threshold = scaled.max(dim=-1, keepdim=True).values + floor[:, None]
        scaled = scaled.masked_fill(scaled < threshold, -math.inf)
    draws = torch.from_numpy(
        uniforms([rows[i].seed for i in random_rows], [rows[i].step for i in random_rows])
    ).to(device)
    truncated = [j for j, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
    untruncated = [j for j, p in enumerate(params) if not (p.top_k > 0 or p.top_p < 1.0)]
    if untruncated:  # temperature alone: no sort needed
        plain = torch.tensor(untruncated, device=device)
        probs = torch.softmax(scaled.index_select(0, plain).double(), dim=-1)
        picked = _draw(torch.cumsum(probs, dim=-1), draws.index_select(0, plain))
        tokens[index.index_select(0, plain)] = picked
    if truncated:
        trunc = torch.tensor(truncated, device=device)
        tokens[index.index_select(0, trunc)] = _truncated_tokens(
            scaled.index_select(0, trunc),
            [params[j].top_k for j in truncated],
            [params[j].top_p for j in truncated],
            draws.index_select(0, trunc),
        )
    return tokens.tolist()
