"""The engine's page bookkeeping and message flow, driven by a counting model over a real shm pool."""

from __future__ import annotations

import pytest
import torch

from computeworker.engine.engine import Engine, EngineConfig
from computeworker.engine.structured import StructuredDecoding
from shared.ids import bytes_to_ids, ids_to_bytes
from shared.pool import MappedPool
from shared.protocol import (
    Commit,
    CommitAck,
    Dispatch,
    ErrorCode,
    ErrorReply,
    Finished,
    FinishReason,
    Generated,
    PageRequest,
    PagesGranted,
    SamplingParams,
)

from .conftest import CountingModel, LetterTokenizer

RID = b"r" * 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=5)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _engine(
    pool: MappedPool,
    model: CountingModel,
    clock: FakeClock | None = None,
    structured: StructuredDecoding | None = None,
    **overrides: object,
) -> Engine:
    settings: dict[str, object] = dict(
        page_size=4,
        context_len=64,
        eos_token_ids=(63,),
        max_running=4,
        prefill_chunk=8,
        decode_page_chunk=2,
        stream_max_tokens=1,
        stream_interval_s=0.0,
    )
    settings.update(overrides)
    return Engine(
        model,  # type: ignore[arg-type]
        object(),  # type: ignore[arg-type]
        pool.tensor,
        LetterTokenizer(),
        EngineConfig(**settings),  # type: ignore[arg-type]
        clock=clock or FakeClock(),
        structured=structured,
    )


def _dispatch(
    tokens: list[int],
    matched: int,
    prefix: list[int],
    new: list[int],
    sampling: SamplingParams = GREEDY,
    rid: bytes = RID,
) -> Dispatch:
    return Dispatch(rid, ids_to_bytes(tokens), matched, ids_to_bytes(prefix), ids_to_bytes(new), sampling)


def _describe(msgs: list[object]) -> list[tuple[object, ...]]:
    """Messages as plain tuples, ids decoded, for exact comparisons."""
    out: list[tuple[object, ...]] = []
    for m in msgs:
        if isinstance(m, Generated):
            out.append(("gen", bytes_to_ids(m.tokens).tolist()))
        elif isinstance(m, Commit):
            out.append(("commit", bytes_to_ids(m.tokens).tolist(), bytes_to_ids(m.page_ids).tolist()))
        elif isinstance(m, PageRequest):
            out.append(("pages?", m.num_pages))
        elif isinstance(m, Finished):
            toks, pages = bytes_to_ids(m.tokens).tolist(), bytes_to_ids(m.page_ids).tolist()
            out.append(("finished", m.reason, toks, pages, m.stop_text))
        else:
            out.append((type(m).__name__,))
    return out


def test_cold_request_chunked_prefill_commit_pages_and_finish(shm_pool: MappedPool) -> None:
    model = CountingModel()
    eng = _engine(shm_pool, model)
    prompt = list(range(1, 11))  # 10 tokens: pages 5, 6 full, page 7 holds 2
    eng.add(_dispatch(prompt, 0, [], [5, 6, 7]))
    # 10 prompt + 5 output needs K/V for 14 positions = 4 pages: one more, asked for at once
    assert _describe(eng.take_messages()) == [("pages?", 1)]

    assert eng.step() == 8  # chunk 1: positions 0..7
    b = model.batches[-1]
    assert b.positions.tolist() == list(range(8))
    assert b.write_page_ids.tolist() == [5, 5, 5, 5, 6, 6, 6, 6]
    assert b.write_slots.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert b.kv_page_ids.tolist() == [5, 6] and b.kv_last_page_len.tolist() == [4]
    assert eng.take_messages() == []

    assert eng.step() == 2  # chunk 2: positions 8, 9, then the first token
    b = model.batches[-1]
    assert (
        b.positions.tolist() == [8, 9]
        and b.write_page_ids.tolist() == [7, 7]
        and b.write_slots.tolist() == [0, 1]
    )
    assert b.kv_page_ids.tolist() == [5, 6, 7] and b.kv_lens == (10,) and b.kv_last_page_len.tolist() == [2]
    assert _describe(eng.take_messages()) == [("gen", [11]), ("commit", prompt[:8], [5, 6])]

    assert not eng.has_work()  # the committed pages may be replaced: wait for the ack
    eng.on_commit_ack(CommitAck(RID, ids_to_bytes([20, 6])))  # page 5 was a duplicate of tree page 20
    eng.on_pages_granted(PagesGranted(RID, ids_to_bytes([9])))
    assert eng.take_messages() == []

    assert eng.step() == 1
    b = model.batches[-1]
    assert b.input_ids.tolist() == [11] and b.positions.tolist() == [10]
    assert (
        b.kv_page_ids.tolist() == [20, 6, 7]
        and b.write_page_ids.tolist() == [7]
        and b.write_slots.tolist() == [2]
    )
    while eng.has_work():
        eng.step()
    assert model.batches[-1].write_page_ids.tolist() == [9] and model.batches[-1].positions.tolist() == [13]
    # 14 positions written: 3 full pages (12 tokens) are committed at finish
    assert _describe(eng.take_messages()) == [
        ("gen", [12]),
        ("gen", [13]),
        ("gen", [14]),
        ("gen", [15]),
        ("finished", FinishReason.LENGTH, [*prompt, 11, 12], [20, 6, 7], ""),
    ]
    assert eng.num_running == 0


def test_full_hit_copies_the_last_shared_page_and_recomputes_one_token(shm_pool: MappedPool) -> None:
    pool = shm_pool.tensor
    pool[:, 4] = torch.arange(pool[:, 4].numel(), dtype=pool.dtype).view(pool[:, 4].shape)
    model = CountingModel()
    eng = _engine(shm_pool, model)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    eng.add(_dispatch(prompt, 8, [3, 4], [9], SamplingParams(temperature=0.0, max_tokens=2)))
    assert _describe(eng.take_messages()) == [("pages?", 1)]  # decoding position 8 needs a third page
    assert eng.step() == 1
    b = model.batches[-1]
    assert b.input_ids.tolist() == [8] and b.positions.tolist() == [7]
    assert (
        b.kv_page_ids.tolist() == [3, 9]
        and b.write_page_ids.tolist() == [9]
        and b.write_slots.tolist() == [3]
    )
    assert torch.equal(pool[:, 9], pool[:, 4])  # private copy; the shared page is only read
    assert _describe(eng.take_messages()) == [("gen", [9])]  # nothing new in the prompt: no Commit


def test_no_room_finishes_with_length_when_pages_run_out(shm_pool: MappedPool) -> None:
    model = CountingModel()
    eng = _engine(shm_pool, model)
    eng.add(_dispatch([1, 2, 3], 0, [], [2], SamplingParams(temperature=0.0, max_tokens=10)))
    assert _describe(eng.take_messages()) == [("pages?", 2)]
    eng.on_error(ErrorReply(ErrorCode.NO_ROOM, "pool full", RID))
    eng.step()  # prompt -> 4
    eng.step()  # position 3 (the last slot) -> 5
    assert not eng.has_work()
    assert _describe(eng.take_messages()) == [
        ("gen", [4]),
        ("gen", [5]),
        ("finished", FinishReason.LENGTH, [1, 2, 3, 4], [2], ""),
    ]


def test_eos_and_stop_token_ids_end_the_request_without_being_emitted(shm_pool: MappedPool) -> None:
    eng = _engine(shm_pool, CountingModel())
    eng.add(_dispatch([60], 0, [], [1, 2], SamplingParams(temperature=0.0, max_tokens=9)))
    while eng.has_work():
        eng.step()
    assert _describe(eng.take_messages()) == [
        ("gen", [61]),
        ("gen", [62]),
        ("finished", FinishReason.STOP, [], [], ""),
    ]
    eng.add(
        _dispatch(
            [60],
            0,
            [],
            [1, 2],
            SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, stop_token_ids=[0]),
        )
    )
    while eng.has_work():
        eng.step()
    msgs = _describe(eng.take_messages())
    assert [m[1] for m in msgs[:-1]] == [[61], [62], [63]]
    assert msgs[-1] == ("finished", FinishReason.STOP, [60, 61, 62, 63], [1], "")


def test_stop_string_names_the_stop_and_nothing_follows(shm_pool: MappedPool) -> None:
    eng = _engine(shm_pool, CountingModel())
    # letters: 10 = 'k', so the output is l m n o ...; stop "mn" completes at the third token
    eng.add(
        _dispatch([10], 0, [], [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=9, stop=["zz", "mn"]))
    )
    while eng.has_work():
        eng.step()
    assert _describe(eng.take_messages()) == [
        ("gen", [11]),
        ("gen", [12]),
        ("gen", [13]),
        ("finished", FinishReason.STOP, [], [], "mn"),
    ]


def test_generated_frames_batch_tokens_but_send_the_first_at_once(shm_pool: MappedPool) -> None:
    clock = FakeClock()
    eng = _engine(shm_pool, CountingModel(), clock, stream_max_tokens=3, stream_interval_s=1.0)
    eng.add(_dispatch([1, 2], 0, [], [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=7)))
    steps = []
    while eng.has_work():
        eng.step()
        clock.now += 0.01
        steps.append(_describe(eng.take_messages()))
    assert steps == [
        [("gen", [3])],
        [],
        [],
        [("gen", [4, 5, 6])],
        [],
        [],
        [("gen", [7, 8, 9]), ("finished", FinishReason.LENGTH, [1, 2, 3, 4, 5, 6, 7, 8], [1, 2], "")],
    ]


def test_max_running_queues_and_abort_drops(shm_pool: MappedPool) -> None:
    model = CountingModel()
    eng = _engine(shm_pool, model, max_running=1)
    a, b = b"a" * 16, b"b" * 16
    eng.add(_dispatch([1, 2], 0, [], [1], SamplingParams(temperature=0.0, max_tokens=2), rid=a))
    eng.add(_dispatch([7, 8], 0, [], [2], SamplingParams(temperature=0.0, max_tokens=2), rid=b))
    assert (eng.num_running, eng.num_waiting) == (1, 1)
    eng.step()
    assert model.batches[-1].input_ids.tolist() == [1, 2]
    assert eng.abort(a)
    assert (eng.num_running, eng.num_waiting) == (1, 0)
    eng.take_messages()
    eng.step()
    assert model.batches[-1].input_ids.tolist() == [7, 8]
    assert not eng.abort(a)


def test_mixed_step_batches_decodes_with_a_prefill_chunk(shm_pool: MappedPool) -> None:
    model = CountingModel()
    eng = _engine(shm_pool, model, prefill_chunk=4)
    a, b = b"a" * 16, b"b" * 16
    eng.add(_dispatch([1, 2], 0, [], [1, 2], SamplingParams(temperature=0.0, max_tokens=5), rid=a))
    eng.step()
    eng.add(
        _dispatch(
            [20, 21, 22, 23, 24, 25], 0, [], [3, 4], SamplingParams(temperature=0.0, max_tokens=2), rid=b
        )
    )
    eng.step()
    batch = model.batches[-1]
    assert batch.q_lens == (1, 4) and batch.kv_lens == (3, 4)
    assert batch.input_ids.tolist() == [3, 20, 21, 22, 23]
    assert batch.qo_indptr.tolist() == [0, 1, 5] and batch.kv_indptr.tolist() == [0, 1, 2]
    assert batch.kv_page_ids.tolist() == [1, 3]


def test_separate_steps_alternate_prefill_and_decode(shm_pool: MappedPool) -> None:
    """mixed_steps=False (the CUDA default): a step is all prefill or all decode; prefill goes first but
    never twice in a row while decodes wait."""
    model = CountingModel()
    eng = _engine(shm_pool, model, prefill_chunk=4, mixed_steps=False)
    a, b, c = b"a" * 16, b"b" * 16, b"c" * 16
    eng.add(_dispatch([1, 2], 0, [], [1, 2], SamplingParams(temperature=0.0, max_tokens=6), rid=a))
    eng.step()  # a's prefill
    eng.add(_dispatch([20, 21, 22], 0, [], [3, 4], SamplingParams(temperature=0.0, max_tokens=2), rid=b))
    eng.step()  # a waits one step: b's prefill would be a second prefill step in a row -> a decodes
    eng.step()  # now b's prefill
    eng.add(_dispatch([30, 31, 32], 0, [], [5, 6], SamplingParams(temperature=0.0, max_tokens=2), rid=c))
    eng.step()  # decodes (a and b), since the last step prefilled
    eng.step()  # c's prefill
    shapes = [(batch.q_lens, batch.input_ids.tolist()) for batch in model.batches]
    assert shapes == [
        ((2,), [1, 2]),
        ((1,), [3]),
        ((3,), [20, 21, 22]),
        ((1, 1), [4, 23]),
        ((3,), [30, 31, 32]),
    ]


def test_separate_steps_never_starve_decodes(shm_pool: MappedPool) -> None:
    """A new prefill before every step still leaves every other step to the decodes."""
    model = CountingModel()
    eng = _engine(shm_pool, model, prefill_chunk=4, mixed_steps=False, max_running=8)
    eng.add(_dispatch([1, 2], 0, [], [1, 2], SamplingParams(temperature=0.0, max_tokens=4), rid=b"a" * 16))
    for i in range(6):
        eng.step()
        if i < 5:
            rid = bytes([65 + i]) * 16
            eng.add(
                _dispatch(
                    [40 + i, 41], 0, [], [3 + i], SamplingParams(temperature=0.0, max_tokens=1), rid=rid
                )
            )
    kinds = ["decode" if b.is_decode else "prefill" for b in model.batches]
    assert kinds == ["prefill", "decode", "prefill", "decode", "prefill", "decode"]


def test_bad_dispatch_raises_and_changes_nothing(shm_pool: MappedPool) -> None:
    eng = _engine(shm_pool, CountingModel())
    with pytest.raises(ValueError, match="page boundary"):
        eng.add(_dispatch([1, 2, 3, 4, 5], 3, [1], [2]))
    with pytest.raises(ValueError, match="prefix pages"):
        eng.add(_dispatch([1, 2, 3, 4, 5], 4, [], [2]))
    with pytest.raises(ValueError, match="outside the pool"):
        eng.add(_dispatch([1, 2, 3], 0, [], [32]))
    with pytest.raises(ValueError, match="duplicate"):
        eng.add(_dispatch([1, 2, 3, 4, 5], 4, [2], [2]))
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add(_dispatch([], 0, [], [2]))
    with pytest.raises(ValueError, match="num_generated"):
        eng.add(Dispatch(RID, ids_to_bytes([1, 2]), 0, b"", ids_to_bytes([2]), GREEDY, num_generated=2))
    eng.add(_dispatch([1], 0, [], [2]))
    with pytest.raises(ValueError, match="already here"):
        eng.add(_dispatch([1], 0, [], [3]))
    with pytest.raises(ValueError, match="unexpected CommitAck"):
        eng.on_commit_ack(CommitAck(RID, ids_to_bytes([4])))
    assert (eng.num_running, eng.num_waiting) == (1, 0)
