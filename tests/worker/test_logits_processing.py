from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch

from computeworker.engine import sampling
from computeworker.engine.logits_processing import RowHistory, processed_logits, row_history
from computeworker.engine.request import Request
from computeworker.engine.sampling import RowSampling, sample_batch
from shared.protocol import SamplingParams

VOCAB = 50


def _reference(logits: list[float], params: SamplingParams, history: RowHistory) -> list[float]:
    """One row, token by token, straight from the formulas in the module docstring."""
    z = list(logits)
    for token, bias in params.logit_bias.items():
        if 0 <= token < len(z):
            z[token] += bias
    for token in history.banned:
        if 0 <= token < len(z):
            z[token] = -math.inf
    generated = [t for t in history.generated if 0 <= t < len(z)]
    count = {t: generated.count(t) for t in set(generated)}
    seen = set(count)
    if params.repetition_penalty != 1.0 and history.prompt_tokens is not None:
        seen |= {int(t) for t in history.prompt_tokens if 0 <= t < len(z)}
    r = params.repetition_penalty
    for t in seen if r != 1.0 else ():
        z[t] = z[t] / r if z[t] > 0 else z[t] * r
    for t, c in count.items():
        z[t] -= params.frequency_penalty * c + params.presence_penalty
    return z


def _random_case(rng: random.Random) -> tuple[SamplingParams, RowHistory]:
    params = SamplingParams(
        presence_penalty=rng.choice([0.0, 0.5, -1.5, 2.0]),
        frequency_penalty=rng.choice([0.0, 0.3, -0.7, 2.0]),
        repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
        logit_bias={rng.randrange(VOCAB + 5): rng.uniform(-100, 100) for _ in range(rng.randrange(4))},
        min_tokens=rng.choice([0, 0, 3]),
    )
    generated = [rng.randrange(VOCAB + 3) for _ in range(rng.randrange(12))]  # a few ids past the vocabulary
    prompt = np.unique(np.array([rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))]))
    banned = tuple(rng.sample(range(VOCAB), rng.randrange(3)))
    return params, RowHistory(generated=generated, prompt_tokens=prompt, banned=banned)


def test_every_row_matches_the_formulas_token_by_token() -> None:
    rng = random.Random(3)
    for _ in range(20):
        cases = [_random_case(rng) for _ in range(6)]
        cases.append((SamplingParams(), RowHistory()))  # a row that asks for nothing in the same batch
        logits = torch.randn(len(cases), VOCAB) * 4
        raw = logits.clone()
        out = processed_logits(logits, [p for p, _ in cases], [h for _, h in cases])
        assert torch.equal(logits, raw)  # the raw logits are never written (logprobs read them)
        for i, (params, history) in enumerate(cases):
            expected = torch.tensor(_reference(logits[i].tolist(), params, history))
            if not params.processes_logits:
                expected = logits[i]
            torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-4)


def test_rows_that_ask_for_nothing_cost_nothing() -> None:
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(temperature=0.7, top_p=0.9, min_p=0.1)] * 3
    assert processed_logits(logits, params, [RowHistory()] * 3) is logits


def test_penalties_change_greedy_choices() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    greedy = SamplingParams(temperature=0.0)
    repeat = RowHistory(generated=[1, 1])

    def pick(params: SamplingParams, history: RowHistory) -> int:
        return sample_batch(processed_logits(logits, [params], [history]), [RowSampling(params)])[0]

    assert pick(greedy, repeat) == 1
    assert pick(SamplingParams(temperature=0.0, frequency_penalty=1.0), repeat) == 2  # 5 - 2 < 4
    assert pick(SamplingParams(temperature=0.0, presence_penalty=1.0), repeat) == 1  # 5 - 1 > 4
    assert pick(SamplingParams(temperature=0.0, repetition_penalty=1.5), repeat) == 2  # 5 / 1.5 < 4
    assert pick(SamplingParams(temperature=0.0, logit_bias={3: 10.0}), RowHistory()) == 3
    banned = SamplingParams(temperature=0.0, min_tokens=2)
    assert pick(banned, RowHistory(banned=(1,))) == 2


def test_min_p_drops_tokens_below_its_share_of_the_most_likely() -> None:
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    logits = torch.log(probs)
    params = SamplingParams(temperature=1.0, min_p=0.2)  # keeps p >= 0.1
    draws = sample_batch(logits.expand(2000, -1), [RowSampling(params, 5, s) for s in range(2000)])
    assert set(draws) == {0, 1, 2}
    freq = torch.bincount(torch.tensor(draws), minlength=4).double() / 2000
    expected = torch.tensor([0.5, 0.3, 0.12, 0.0], dtype=torch.float64) / 0.92
    assert torch.all((freq - expected).abs() < 0.04), freq
    hot = SamplingParams(temperature=4.0, min_p=0.2)  # after temperature the ratios flatten: all kept
    assert set(sample_batch(logits.expand(2000, -1), [RowSampling(hot, 6, s) for s in range(2000)])) == {
        0,
        1,
        2,
        3,
    }


def test_min_p_with_top_k_takes_the_same_token_through_the_candidate_shortcut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    logits = torch.randn(60, 3000) * 3
    rows = [
        RowSampling(SamplingParams(temperature=1.0, top_k=k, top_p=p, min_p=m), seed=i, step=i)
        for i, (k, p, m) in enumerate(
            [(k, p, m) for k in (0, 20, 500) for p in (1.0, 0.9) for m in (0.0, 0.05, 0.5)] * 3
        )
        if k or p < 1.0
    ]
    logits = logits[: len(rows)]
    full = sample_batch(logits, rows)
    monkeypatch.setattr(sampling, "CANDIDATES", 64)
    monkeypatch.setattr(sampling, "CANDIDATE_MIN_ROWS", 1)
    assert sample_batch(logits, rows) == full


def test_row_history_counts_earlier_attempts_and_bans_until_min_tokens() -> None:
    prompt = np.array([7, 3, 7, 9, 4, 4], dtype=np.int32)  # the last two were generated by an attempt before
    params = SamplingParams(frequency_penalty=1.0, repetition_penalty=1.2, min_tokens=4, stop_token_ids=[5])
    req = Request(
        request_id=b"r" * 16,
        prompt=prompt,
        prompt_len=6,
        matched_len=0,
        sampling=params,
        page_size=4,
        max_len=20,
        page_table=np.zeros(5, dtype=np.int32),
        num_computed=6,
        sample_offset=2,
    )
    history = row_history(req, eos_token_ids=(2,), vocab=8)
    assert history.generated.tolist() == [4, 4]
    assert history.prompt_tokens.tolist() == [3, 4, 7]  # distinct, sorted, below the vocabulary
    assert history.banned == (2, 5)
    for token in range(30):  # the mirror array grows past its first capacity
        req.output.append(token)
    history = row_history(req, eos_token_ids=(2,), vocab=8, device=torch.device("cpu"))
    assert history.generated.tolist() == [4, 4, *range(30)]
    assert isinstance(history.prompt_tokens, torch.Tensor) and history.prompt_tokens.tolist() == [3, 4, 7]
    assert history.banned == ()
    assert row_history(dataclasses.replace(req, sampling=SamplingParams()), (2,), 8) == RowHistory()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("min_p", 1.5),
        ("logit_bias", {1: 101.0}),
        ("logit_bias", {-1: 1.0}),
        ("min_tokens", 17),
    ],
)
def test_out_of_range_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()
