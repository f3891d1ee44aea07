from __future__ import annotations

import pytest
import torch

from computeworker.engine.sampling import (
    RowSampling,
    make_generator,
    sample_batch,
    sample_row,
    top_k_top_p_mask,
)
from shared.protocol import SamplingParams


def _kept(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def test_greedy_is_argmax_per_row() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 1.0, 2.9, 0.0], [-5.0, -4.0, -6.0, -3.5]])
    greedy = SamplingParams(temperature=0.0)
    rows = [RowSampling(greedy, None)] * 3
    assert sample_batch(logits, rows) == [1, 0, 3]


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


def test_sampling_never_draws_a_masked_token() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 3.0])
    params = SamplingParams(temperature=5.0, top_k=2)
    gen = make_generator(params, torch.device("cpu"), fallback_seed=0)
    draws = {sample_row(logits, params, gen) for _ in range(300)}
    assert draws == {1, 4}


def test_seeded_requests_reproduce_and_seeds_differ() -> None:
    logits = torch.zeros(1000)
    params = SamplingParams(temperature=1.0, seed=1234)

    def draw(p: SamplingParams, fallback: int) -> list[int]:
        gen = make_generator(p, torch.device("cpu"), fallback_seed=fallback)
        return [sample_row(logits, p, gen) for _ in range(20)]

    first = draw(params, fallback=1)
    assert draw(params, fallback=2) == first  # the seed wins over the fallback
    assert draw(SamplingParams(temperature=1.0, seed=1235), fallback=1) != first
    assert draw(SamplingParams(temperature=1.0), fallback=7) == draw(
        SamplingParams(temperature=1.0), fallback=7
    )


def test_seeded_row_is_independent_of_batch_neighbours() -> None:
    logits = torch.zeros(3, 500)
    seeded = SamplingParams(temperature=1.0, seed=99)
    other = SamplingParams(temperature=1.0, seed=5)
    cpu = torch.device("cpu")
    alone = [sample_batch(logits[:1], [RowSampling(seeded, make_generator(seeded, cpu, 0))])[0]]
    gen_a, gen_b = make_generator(other, cpu, 0), make_generator(seeded, cpu, 0)
    greedy = SamplingParams(temperature=0.0)
    mixed = sample_batch(
        logits, [RowSampling(other, gen_a), RowSampling(greedy, None), RowSampling(seeded, gen_b)]
    )
    assert mixed[2] == alone[0]
    assert mixed[1] == 0


def test_low_temperature_approaches_greedy_and_high_flattens() -> None:
    logits = torch.tensor([0.0, 1.0, 0.0])
    cold = SamplingParams(temperature=0.01, seed=3)
    gen = make_generator(cold, torch.device("cpu"), 0)
    assert {sample_row(logits, cold, gen) for _ in range(100)} == {1}
    hot = SamplingParams(temperature=100.0, seed=3)
    gen = make_generator(hot, torch.device("cpu"), 0)
    assert {sample_row(logits, hot, gen) for _ in range(200)} == {0, 1, 2}


def test_misuse_raises() -> None:
    with pytest.raises(ValueError, match="generator"):
        sample_row(torch.zeros(4), SamplingParams(temperature=1.0), None)
    with pytest.raises(ValueError, match="rows"):
        sample_batch(torch.zeros(2, 4), [RowSampling(SamplingParams(temperature=0.0), None)])
    with pytest.raises(ValueError, match="one row"):
        top_k_top_p_mask(torch.zeros(2, 4), 1, 1.0)
    assert make_generator(SamplingParams(temperature=0.0), torch.device("cpu"), 0) is None
