"""build_forward_batch's exact fields, and TorchAttention against dense masked attention written out by
hand (no SDPA), on a batch mixing a cold prefill, a prefill over cached pages and a decode step."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from computeworker.model.attention_torch import TorchAttention
from computeworker.model.forward_batch import SeqChunk, _many_sequences, build_forward_batch

PAGE, HEADS, KV_HEADS, DIM, PAGES = 4, 4, 2, 8, 16


def test_batch_fields_follow_flashinfer_conventions() -> None:
    # The module docstring's example (start 6, 3 tokens) plus a 1-token decode at position 4
    batch = build_forward_batch(
        [SeqChunk([11, 12, 13], 6, [7, 3, 9, 5]), SeqChunk([21], 4, [2, 8])], PAGE, "cpu"
    )
    assert batch.input_ids.tolist() == [11, 12, 13, 21]
    assert batch.positions.tolist() == [6, 7, 8, 4]
    assert batch.qo_indptr.tolist() == [0, 3, 4]
    assert batch.kv_indptr.tolist() == [0, 3, 5]
    assert batch.kv_page_ids.tolist() == [7, 3, 9, 2, 8]  # page 5 not needed yet
    assert batch.kv_last_page_len.tolist() == [1, 1]
    assert batch.write_page_ids.tolist() == [3, 3, 9, 8]
    assert batch.write_slots.tolist() == [2, 3, 0, 0]
    assert (batch.q_lens, batch.kv_lens) == ((3, 1), (9, 5))
    assert (batch.qo_indptr.dtype, batch.kv_page_ids.dtype, batch.input_ids.dtype) == (
        torch.int32,
        torch.int32,
        torch.int64,
    )
    assert not batch.is_decode
    assert build_forward_batch([SeqChunk([1], 15, [0, 1, 2, 3])], PAGE, "cpu").kv_last_page_len.tolist() == [
        4
    ]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 9), st.integers(0, 30), st.integers(0, 3)), min_size=1, max_size=6),
    st.sampled_from([1, 4, 16]),
)
def test_batch_fields_match_a_token_by_token_reference(shapes: list[tuple[int, int, int]], page: int) -> None:
    """Random mixes of decodes and prefill chunks, with spare pages beyond kv_len, against every field
    derived one token at a time."""
    chunks, next_page = [], 1000
    for q_len, start, spare in shapes:
        pages = list(range(next_page, next_page + -(-(start + q_len) // page) + spare))[::-1]
        next_page += 100
        chunks.append(SeqChunk([7 * next_page + t for t in range(q_len)], start, pages))
    batch = build_forward_batch(chunks, page, "cpu")
    ids, positions, write_pages, slots, kv_pages, indptr, last = [], [], [], [], [], [0], []
    for c in chunks:
        kv_len = c.start_pos + len(c.token_ids)
        used = list(c.page_ids[: -(-kv_len // page)])
        for t, token in enumerate(c.token_ids):
            pos = c.start_pos + t
            ids.append(token)
            positions.append(pos)
            write_pages.append(used[pos // page])
            slots.append(pos % page)
        kv_pages += used
        indptr.append(len(kv_pages))
        last.append(kv_len - (len(used) - 1) * page)
    assert batch.input_ids.tolist() == ids and batch.positions.tolist() == positions
    assert batch.write_page_ids.tolist() == write_pages and batch.write_slots.tolist() == slots
    assert batch.kv_page_ids.tolist() == kv_pages and batch.kv_indptr.tolist() == indptr
    assert batch.kv_last_page_len.tolist() == last
    assert batch.qo_indptr.tolist() == [0, *itertools.accumulate(len(c.token_ids) for c in chunks)]
    assert batch.q_lens == tuple(len(c.token_ids) for c in chunks)
    assert batch.kv_lens == tuple(c.start_pos + len(c.token_ids) for c in chunks)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(0, 200), st.integers(0, 3), st.sampled_from([1, 4, 16]), st.booleans())
def test_one_sequence_takes_a_shortcut_to_the_same_fields(
    q_len: int, start: int, spare: int, page: int, as_numpy: bool
) -> None:
    """A lone sequence skips the batch arithmetic (the latency-critical step); every field, dtype and
    length must equal the general path's."""
    pages = list(range(500, 500 + -(-(start + q_len) // page) + spare))[::-1]
    ids = [3 * t + 1 for t in range(q_len)]
    chunk = SeqChunk(np.asarray(ids) if as_numpy else ids, start, np.asarray(pages) if as_numpy else pages)
    fast, general = build_forward_batch([chunk], page, "cpu"), _many_sequences([chunk], page, "cpu")
    for name in ("input_ids", "positions", "qo_indptr", "kv_indptr", "kv_page_ids", "kv_last_page_len",
                 "write_page_ids", "write_slots"):  # fmt: skip
        a, b = getattr(fast, name), getattr(general, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (fast.q_lens, fast.kv_lens) == (general.q_lens, general.kv_lens)


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([], "at least one sequence"),
        ([SeqChunk([], 0, [1])], "needs >= 1 new token"),
        ([SeqChunk([1], -1, [1])], "needs >= 1 new token"),
        ([SeqChunk([1, 2], 3, [1])], "5 tokens need 2 pages, got 1"),
        ([SeqChunk([1], 0, [1]), SeqChunk([1, 2], 3, [1])], "sequence 1: 5 tokens need 2 pages, got 1"),
    ],
)
def test_batch_rejects_misuse(chunks: list[SeqChunk], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_forward_batch(chunks, PAGE, "cpu")


def _dense_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_len: int) -> torch.Tensor:
    """Causal attention with the queries at the last q_len positions, GQA by repeating K/V heads."""
    kv_len = keys.shape[0]
    group = HEADS // KV_HEADS
    k = keys.repeat_interleave(group, dim=1).double()  # [kv_len, heads, dim]
    v = values.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(DIM)
    q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    scores = scores.masked_fill(torch.arange(kv_len)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_torch_attention_writes_pages_then_attends_causally() -> None:
    gen = torch.Generator().manual_seed(0)
    kv_layer = torch.randn((PAGES, 2, PAGE, KV_HEADS, DIM), generator=gen)
    # seq 0: cold prefill of 7; seq 1: 5 new tokens over 6 cached; seq 2: decode at position 9
    chunks = [SeqChunk([0] * 7, 0, [4, 1]), SeqChunk([0] * 5, 6, [2, 12, 6]), SeqChunk([0], 9, [3, 10, 15])]
    batch = build_forward_batch(chunks, PAGE, "cpu")
    t = batch.num_tokens
    q = torch.randn((t, HEADS, DIM), generator=gen)
    k = torch.randn((t, KV_HEADS, DIM), generator=gen)
    v = torch.randn((t, KV_HEADS, DIM), generator=gen)
    before = kv_layer.clone()

    attn = TorchAttention()
    attn.begin(batch)
    out = attn.forward(0, q, k, v, kv_layer)

    expected = before.clone()
    expected[batch.write_page_ids, 0, batch.write_slots] = k
    expected[batch.write_page_ids, 1, batch.write_slots] = v
    assert torch.equal(kv_layer, expected)  # exactly the write slots changed

    start = 0
    for chunk in chunks:
        pages = torch.tensor(chunk.page_ids[: -(-chunk.kv_len // PAGE)])
        keys = expected[pages, 0].reshape(-1, KV_HEADS, DIM)[: chunk.kv_len]
        values = expected[pages, 1].reshape(-1, KV_HEADS, DIM)[: chunk.kv_len]
        ref = _dense_reference(q[start : start + chunk.q_len], keys, values, chunk.q_len)
        assert torch.allclose(out[start : start + chunk.q_len].double(), ref, rtol=1e-5, atol=1e-6)
        start += chunk.q_len


def test_torch_attention_needs_begin() -> None:
    with pytest.raises(ValueError, match=r"forward\(\) before begin\(\)"):
        TorchAttention().forward(
            0,
            torch.zeros(1, HEADS, DIM),
            torch.zeros(1, KV_HEADS, DIM),
            torch.zeros(1, KV_HEADS, DIM),
            torch.zeros(PAGES, 2, PAGE, KV_HEADS, DIM),
        )
