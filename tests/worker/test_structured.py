"""Structured output in the engine: the counting model's wishes masked by a grammar, sampled rows, a batch
mixing constrained and free rows, a re-dispatched request resuming its grammar, and refusals."""

from __future__ import annotations

import re

import msgspec
import pytest
import torch

from computeworker.engine.structured import NO_TOKEN, StructuredDecoding
from shared.ids import bytes_to_ids
from shared.pool import MappedPool
from shared.protocol import Dispatch, Finished, FinishReason, Generated, SamplingParams, StructuredOutput

from .conftest import CountingModel
from .test_engine import _dispatch, _engine

EOS = 63
# The counting model's vocabulary as LetterTokenizer spells it: token i is the letter i % 26, EOS apart.
LETTERS = [chr(ord("a") + i % 26) for i in range(EOS)] + ["</s>"]
PATTERN = "b[cd]{3}z"
REGEX = StructuredOutput("regex", PATTERN)


@pytest.fixture(scope="module")
def grammars() -> StructuredDecoding:
    return StructuredDecoding.for_vocabulary(LETTERS, [EOS])


def _run(eng: object, *dispatches: Dispatch) -> dict[bytes, tuple[list[int], Finished]]:
    for msg in dispatches:
        eng.add(msg)  # type: ignore[attr-defined]
    while eng.has_work():  # type: ignore[attr-defined]
        eng.step()  # type: ignore[attr-defined]
    out: dict[bytes, list[int]] = {}
    done: dict[bytes, Finished] = {}
    for msg in eng.take_messages():  # type: ignore[attr-defined]
        if isinstance(msg, Generated):
            out.setdefault(msg.request_id, []).extend(bytes_to_ids(msg.tokens).tolist())
        elif isinstance(msg, Finished):
            done[msg.request_id] = msg
    return {rid: (out.get(rid, []), fin) for rid, fin in done.items()}


def _text(tokens: list[int]) -> str:
    return "".join(LETTERS[t] for t in tokens)


def test_the_grammar_overrides_the_model_and_ends_the_request(
    shm_pool: MappedPool, grammars: StructuredDecoding
) -> None:
    eng = _engine(shm_pool, CountingModel(), structured=grammars)
    # The model counts a, b, c, d, e, ...; after "bcd" the grammar allows only c or d (the first of the
    # equally likely ids wins: c), then only z, then only EOS.
    sampling = SamplingParams(temperature=0.0, max_tokens=20, structured=REGEX)
    ((tokens, fin),) = _run(eng, _dispatch([0], 0, [], [1, 2], sampling)).values()
    assert tokens == [1, 2, 3, 2, 25] and _text(tokens) == "bcdcz"
    assert fin.reason is FinishReason.STOP


def test_an_engine_refuses_a_grammar_whose_stop_tokens_it_would_not_end_on(
    shm_pool: MappedPool, grammars: StructuredDecoding
) -> None:
    with pytest.raises(ValueError, match="stop tokens"):
        _engine(shm_pool, CountingModel(), structured=grammars, eos_token_ids=())


def test_sampled_rows_always_match_and_free_rows_are_untouched(
    shm_pool: MappedPool, grammars: StructuredDecoding
) -> None:
    eng = _engine(shm_pool, CountingModel(), structured=grammars)
    sampled = [
        _dispatch(
            [0],
            0,
            [],
            [2 * i + 1, 2 * i + 2],
            SamplingParams(temperature=1.5, seed=i, max_tokens=20, structured=REGEX),
            rid=bytes([i]) * 16,
        )
        for i in range(3)
    ]
    free = _dispatch([0], 0, [], [7, 8], SamplingParams(temperature=0.0, max_tokens=5), rid=b"f" * 16)
    results = _run(eng, *sampled, free)
    for i in range(3):
        tokens, fin = results[bytes([i]) * 16]
        assert re.fullmatch(PATTERN, _text(tokens)) and fin.reason is FinishReason.STOP
    assert results[b"f" * 16][0] == [1, 2, 3, 4, 5]  # same steps, no grammar: the model's own tokens


def test_a_redispatched_request_resumes_its_grammar(
    shm_pool: MappedPool, grammars: StructuredDecoding
) -> None:
    eng = _engine(shm_pool, CountingModel(), structured=grammars)
    sampling = SamplingParams(temperature=0.0, max_tokens=18, structured=REGEX)
    # An earlier attempt generated "bc": the prompt carries it, num_generated says so.
    resumed = _dispatch([0, 1, 2], 0, [], [1, 2], sampling)
    resumed = msgspec.structs.replace(resumed, num_generated=2)
    ((tokens, fin),) = _run(eng, resumed).values()
    assert _text([1, 2, *tokens]) == "bcdcz" and fin.reason is FinishReason.STOP


def test_refused_dispatches_change_nothing(shm_pool: MappedPool, grammars: StructuredDecoding) -> None:
    sampling = SamplingParams(temperature=0.0, max_tokens=18, structured=REGEX)
    eng = _engine(shm_pool, CountingModel(), structured=grammars)
    bad = _dispatch([0, 1, 25], 0, [], [1, 2], sampling)  # "bz" was never allowed
    bad = msgspec.structs.replace(bad, num_generated=2)
    with pytest.raises(ValueError, match="do not match the grammar"):
        eng.add(bad)
    assert eng.num_running == eng.num_waiting == 0 and eng.take_messages() == []
    without = _engine(shm_pool, CountingModel())
    with pytest.raises(ValueError, match="no grammar engine"):
        without.add(_dispatch([0], 0, [], [1, 2], sampling))
    assert without.num_running == 0
    with pytest.raises(ValueError, match="invalid regex"):
        grammars.compiled(StructuredOutput("regex", "(b"))


def test_sampling_params_refuse_what_would_fight_the_grammar() -> None:
    for bad, field in (
        (dict(min_tokens=2), "min_tokens"),
        (dict(ignore_eos=True), "ignore_eos"),
        (dict(structured=StructuredOutput("xml", "<a/>")), "kind"),
        (dict(structured=StructuredOutput("regex", "")), "characters"),
    ):
        params = SamplingParams(max_tokens=4, **{"structured": REGEX, **bad})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=field):
            params.validate()


def test_many_rows_are_masked_in_parallel_exactly_as_one_thread_does() -> None:
    serial = StructuredDecoding.for_vocabulary(LETTERS, [EOS], fill_threads=1)
    parallel = StructuredDecoding.for_vocabulary(LETTERS, [EOS], fill_threads=4)
    done = [[], [1], [1, 2], [1, 3, 3], [1, 2, 3, 2], [1, 2, 2, 2, 25]]  # "", "b", "bc", "bdd", ...
    rows = [None if i % 4 == 3 else done[i % len(done)] for i in range(12)]  # 9 constrained, 3 free
    logits = torch.randn(len(rows), len(LETTERS), generator=torch.Generator().manual_seed(1))
    states = [[None if r is None else g.start(REGEX, r) for r in rows] for g in (serial, parallel)]
    masked = [g.mask(logits, st, owned=False) for g, st in zip((serial, parallel), states, strict=True)]
    assert torch.equal(masked[0][0], masked[1][0]) and masked[0][1] == masked[1][1] == []
    allowed = [set(torch.nonzero(row > -torch.inf).flatten().tolist()) for row in masked[0][0]]
    assert allowed[0] == {1, 27, 53} and allowed[4] == {25, 51} and allowed[5] == {EOS}  # b / z / EOS
    assert allowed[3] == set(range(len(LETTERS)))  # a free row keeps everything
    # The next step feeds each row's pending token first: "c" continues "b" and "bc"; "z" after ""
    # is refused (the mask above would never let it through), and that row is reported.
    for st in states:
        for r, state in zip(rows, st, strict=True):
            if state is not None:
                state.pending = 2 if r in ([1], [1, 2]) else 25 if r == [] else NO_TOKEN
    again = [g.mask(logits, st, owned=False) for g, st in zip((serial, parallel), states, strict=True)]
    assert torch.equal(again[0][0], again[1][0])
    assert again[0][1] == again[1][1] == [i for i, r in enumerate(rows) if r == []]
    allowed = [set(torch.nonzero(row > -torch.inf).flatten().tolist()) for row in again[0][0]]
    assert allowed[1] == allowed[2] == {2, 3, 28, 29, 54, 55}  # "bc" / "bcc": c or d


def test_a_failing_grammar_engine_refuses_the_request_not_the_worker() -> None:
    def broken() -> object:
        raise RuntimeError("[08:00:00] /x/tokenizer_info.cc:12: cannot read the vocabulary")

    grammars = StructuredDecoding(broken, 64, [EOS])
    with pytest.raises(ValueError, match="unavailable: cannot read the vocabulary"):
        grammars.compiled(REGEX)


def test_a_match_no_token_can_continue_ends_the_request(shm_pool: MappedPool) -> None:
    """A vocabulary without single-character tokens can strand a partial match: here "bq" starts "bqr"
    but no token holds an "r". The row is left unmasked, its request ends with what it had."""
    vocab = [("bq" if i == 1 else "R" if t in "br" else t) for i, t in enumerate(LETTERS)]
    grammars = StructuredDecoding.for_vocabulary(vocab, [EOS])
    state = grammars.start(StructuredOutput("regex", "bqr"))
    logits = torch.zeros(1, len(vocab))
    masked, stuck = grammars.mask(logits, [state], owned=False)
    assert stuck == [] and set(torch.nonzero(masked[0] > -torch.inf).flatten().tolist()) == {1}
    state.pending = 1
    masked, stuck = grammars.mask(logits, [state], owned=False)
    assert stuck == [0] and torch.equal(masked, logits)  # nothing allowed: left alone, reported

    eng = _engine(shm_pool, CountingModel(), structured=grammars)
    sampling = SamplingParams(
        temperature=1.0, seed=5, max_tokens=20, structured=StructuredOutput("regex", "bqr")
    )
    ((tokens, fin),) = _run(eng, _dispatch([0], 0, [], [1, 2], sampling)).values()
    assert tokens == [1] and fin.reason is FinishReason.STOP
