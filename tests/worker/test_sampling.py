from __future__ import annotations

import math

import pytest
import torch

from computeworker.engine import sampling
from computeworker.engine.sampling import (
    RowSampling,
    _draw,
    sample_batch,
    top_k_top_p_mask,
    uniform,
    uniforms,
)
from shared.protocol import SamplingParams


def _kept(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def _frequencies(logits: torch.Tensor, params: SamplingParams, draws: int, seed: int = 11) -> torch.Tensor:
    """Empirical distribution of `draws` tokens of one request (steps 0..draws-1), sampled as one batch."""
    rows = [RowSampling(params, seed, step) for step in range(draws)]
    tokens = sample_batch(logits.expand(draws, -1), rows)
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[0]).double() / draws


def test_greedy_is_argmax_per_row() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 1.0, 2.9, 0.0], [-5.0, -4.0, -6.0, -3.5]])
    greedy = SamplingParams(temperature=0.0)
    assert sample_batch(logits, [RowSampling(greedy)] * 3) == [1, 0, 3]


def test_top_k_keeps_exactly_k_with_index_tie_break() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 3.0])
    assert _kept(top_k_top_p_mask(logits, top_k=1, top_p=1.0)) == [1]
    assert _kept(top_k_top_p_mask(logits, top_k=2, top_p=1.0)) == [1, 4]
    assert _kept(top_k_top_p_mask(logits, top_k=3, top_p=1.0)) == [1, 2, 4]
    assert _kept(top_k_top_p_mask(logits, top_k=0, top_p=1.0)) == [0, 1, 2, 3, 4]
    assert _kept(top_k_top_p_mask(logits, top_k=9, top_p=1.0)) == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_token_that_crosses_the_threshold() -> None:
    logits = torch.log(torch.tensor([0.1, 0.5, 0.2, 0.2]))
    # sorted: 0.5 (id 1), 0.2 (id 2), 0.2 (id 3), 0.1 (id 0); mass before each: 0, 0.5, 0.7, 0.9
    assert _kept(top_k_top_p_mask(logits, top_k=0, top_p=0.3)) == [1]
    assert _kept(top_k_top_p_mask(logits, top_k=0, top_p=0.6)) == [1, 2]
    assert _kept(top_k_top_p_mask(logits, top_k=0, top_p=0.8)) == [1, 2, 3]
    assert _kept(top_k_top_p_mask(logits, top_k=0, top_p=0.95)) == [0, 1, 2, 3]


def test_top_p_applies_after_top_k_renormalizes() -> None:
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    # top-3 renormalized: 0.444, 0.333, 0.222; mass before: 0, 0.444, 0.778
    assert _kept(top_k_top_p_mask(logits, top_k=3, top_p=0.7)) == [0, 1]
    assert _kept(top_k_top_p_mask(logits, top_k=2, top_p=0.9)) == [0, 1]


def test_draws_follow_the_softmax_of_logits_over_temperature() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    expected = torch.softmax(logits.double() / 0.7, dim=0)
    freq = _frequencies(logits, SamplingParams(temperature=0.7), draws=20_000)
    sigma = torch.sqrt(expected * (1 - expected) / 20_000)
    assert torch.all((freq - expected).abs() < 4 * sigma + 1e-4), (freq, expected)


def test_truncated_draws_follow_the_renormalised_kept_set() -> None:
    logits = torch.log(torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1]))
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.8)
    mask = top_k_top_p_mask(logits, params.top_k, params.top_p)
    assert _kept(mask) == [1, 2, 3]  # top-4 renormalised: mass before 0, 0.42, 0.68, 0.89
    expected = torch.softmax(logits.double().masked_fill(~mask, -math.inf), dim=0)
    freq = _frequencies(logits, params, draws=20_000)
    sigma = torch.sqrt(expected * (1 - expected) / 20_000)
    assert torch.all((freq - expected).abs() < 4 * sigma + 1e-4), (freq, expected)


def test_sampling_never_draws_a_masked_or_impossible_token() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 3.0])
    params = SamplingParams(temperature=5.0, top_k=2)
    assert set(sample_batch(logits.expand(300, -1), [RowSampling(params, 1, s) for s in range(300)])) == {
        1,
        4,
    }
    blocked = torch.tensor([0.0, -math.inf, 0.0, -math.inf])
    hot = SamplingParams(temperature=50.0)
    assert set(sample_batch(blocked.expand(300, -1), [RowSampling(hot, 2, s) for s in range(300)])) == {0, 2}
    # The largest uniform the stream can produce lands on the last token with probability, not after it.
    cdf = torch.cumsum(torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64), dim=-1)
    assert _draw(cdf, torch.tensor([1.0 - 2.0**-53], dtype=torch.float64)).tolist() == [1]
    assert _draw(cdf, torch.tensor([0.0], dtype=torch.float64)).tolist() == [0]


def test_seeded_requests_reproduce_and_seeds_differ() -> None:
    logits = torch.zeros(20, 1000)

    def draw(seed: int, first_step: int = 0) -> list[int]:
        params = SamplingParams(temperature=1.0, seed=seed)
        return sample_batch(logits, [RowSampling(params, seed, first_step + s) for s in range(20)])

    first = draw(1234)
    assert draw(1234) == first
    assert draw(1235) != first
    # A re-dispatched request resumes its stream: steps 5.. of the same seed are the same draws.
    assert draw(1234, first_step=5)[:15] == first[5:]


def test_row_is_independent_of_batch_neighbours_and_position() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 500, generator=gen)
    target = RowSampling(SamplingParams(temperature=0.9, top_p=0.9, seed=99), 99, 7)
    alone = sample_batch(logits[2:3], [target])[0]
    neighbours = [
        RowSampling(SamplingParams(temperature=1.0, seed=5), 5, 0),
        RowSampling(SamplingParams(temperature=0.0)),
        RowSampling(SamplingParams(temperature=2.0, top_k=3), 8, 40),
    ]
    for position in range(4):
        rows = [*neighbours[:position], target, *neighbours[position:]]
        order = [*[0, 1, 3][:position], 2, *[0, 1, 3][position:]]
        assert sample_batch(logits[order], rows)[position] == alone


def test_low_temperature_approaches_greedy_and_high_flattens() -> None:
    logits = torch.tensor([0.0, 1.0, 0.0])
    cold = SamplingParams(temperature=0.01, seed=3)
    assert set(sample_batch(logits.expand(100, -1), [RowSampling(cold, 3, s) for s in range(100)])) == {1}
    hot = SamplingParams(temperature=100.0, seed=3)
    assert set(sample_batch(logits.expand(200, -1), [RowSampling(hot, 3, s) for s in range(200)])) == {
        0,
        1,
        2,
    }


def _splitmix64(x: int) -> int:  # the reference, in Python's exact integers
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_uniform_stream() -> None:
    for seed, step in ((0, 0), (42, 7), (-5, 3), (2**70 + 9, 12345)):
        want = (_splitmix64(_splitmix64(seed & ((1 << 64) - 1)) ^ step) >> 11) * 2.0**-53
        assert uniform(seed, step) == want  # numpy's wrapping uint64 arithmetic is splitmix64 exactly
    assert uniforms([1, 2, 1], [0, 0, 5]).tolist() == [uniform(1, 0), uniform(2, 0), uniform(1, 5)]
    values = [uniform(42, step) for step in range(1000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert len(set(values)) == 1000
    assert abs(sum(values) / 1000 - 0.5) < 0.05
    assert uniform(42, 3) == values[3]
    assert uniform(-1, 0) == uniform(2**64 - 1, 0)  # any int is a seed, reduced modulo 2**64
    assert uniform(1, 0) != uniform(2, 0)
    with pytest.raises(ValueError, match="step"):
        uniform(1, -1)


def test_misuse_raises() -> None:
    with pytest.raises(ValueError, match="rows"):
        sample_batch(torch.zeros(2, 4), [RowSampling(SamplingParams(temperature=0.0))])
    with pytest.raises(ValueError, match="one row"):
        top_k_top_p_mask(torch.zeros(2, 4), 1, 1.0)


def test_candidate_shortcut_draws_what_the_full_sort_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncated rows look at their largest CANDIDATES logits first; with ties everywhere (bf16-like
    coarse values) and kept sets both inside and past the candidates, every draw equals the full sort's."""
    monkeypatch.setattr(sampling, "CANDIDATES", 8)
    monkeypatch.setattr(sampling, "CANDIDATE_MIN_ROWS", 1)
    gen = torch.Generator().manual_seed(3)
    rows, vocab = 400, 300
    scaled = (torch.randn(rows, vocab, generator=gen) * 2).round() / 2  # many equal values
    top_k = [int(k) for k in torch.randint(0, 8, (rows,), generator=gen)]
    top_k[0] = 10  # past the candidates: the first batch takes the full sort for every row
    top_p = [float(p) ** 3 for p in torch.rand(rows, generator=gen).clamp(min=0.05)]
    top_p = [1.0 if i % 5 == 0 else p for i, p in enumerate(top_p)]
    uniforms = torch.rand(rows, generator=gen, dtype=torch.float64)
    for lo in range(0, rows, 50):  # batches with and without a row that needs the full sort
        sl = slice(lo, lo + 50)
        got = sampling._truncated_tokens(scaled[sl], top_k[sl], top_p[sl], uniforms[sl])
        order, probs, _ = sampling._sorted_keep(
            scaled[sl], torch.tensor(top_k[sl]), torch.tensor(top_p[sl], dtype=torch.float64)
        )
        want = order.gather(1, sampling._draw(torch.cumsum(probs, dim=-1), uniforms[sl])[:, None]).squeeze(1)
        assert got.tolist() == want.tolist()
