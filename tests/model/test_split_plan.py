"""split_plan + split_merge on the CPU: the chunk layout's exact arrays, and that attention computed per
virtual sequence as fa3 computes it (work lists from the layout: first page, key count, rows) and merged
by log-sum-exp equals plain causal attention over each sequence's pages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from computeworker.model.split_merge import merge_partial_states_reference
from computeworker.model.split_plan import split_chunks_for, split_layout

HEADS, KV_HEADS, DIM = 4, 2, 8


def test_exact_layout_two_sequences() -> None:
    # seq 0: 3 new over 40 (10 pages of 4, 9 whole prefix pages); seq 1: 2 new over 5 (pages 10-11,
    # no whole prefix page: its chunks are empty)
    lay = split_layout((3, 2), (40, 5), page_size=4, num_chunks=3, num_rows=8)
    assert lay.chunk_qo_indptr.tolist() == [0, 3, 8, 11, 16, 19, 24]
    assert lay.chunk_kv_start.tolist() == [0, 10, 3, 10, 6, 10, 0]
    assert lay.chunk_kv_len.tolist() == [12, 0, 12, 0, 12, 0]
    assert lay.tail_qo_indptr.tolist() == [0, 3, 5]
    assert lay.tail_kv_start.tolist() == [9, 10, 0]
    assert lay.tail_kv_len.tolist() == [4, 5]
    assert lay.num_rows_real == 5
    assert all(a.dtype == np.int32 for a in (lay.chunk_qo_indptr, lay.chunk_kv_start, lay.tail_kv_len))


def test_uneven_chunks_and_a_cold_sequence() -> None:
    # 10 prefix pages in 4 chunks: 2, 3, 2, 3 pages; a cold prompt has no prefix and all-empty chunks
    lay = split_layout((4,), (44,), page_size=4, num_chunks=4, num_rows=4)
    assert lay.chunk_kv_len.tolist() == [8, 12, 8, 12]
    assert lay.chunk_kv_start.tolist()[:4] == [0, 2, 5, 7]
    cold = split_layout((6,), (6,), page_size=4, num_chunks=2, num_rows=8)
    assert cold.chunk_kv_len.tolist() == [0, 0]
    assert (cold.tail_kv_start.tolist(), cold.tail_kv_len.tolist()) == ([0, 0], [6])


@pytest.mark.parametrize(
    ("q_lens", "kv_lens", "rows", "message"),
    [
        ((0,), (4,), 8, "1 <= q_len"),
        ((5,), (4,), 8, "1 <= q_len"),
        ((5, 5), (9, 9), 8, "do not fit"),
        ((1,), (1, 2), 8, "one kv_len per sequence"),
        ((), (), 8, "one kv_len per sequence"),
    ],
)
def test_bad_batches_raise(q_lens, kv_lens, rows, message) -> None:
    with pytest.raises(ValueError, match=message):
        split_layout(q_lens, kv_lens, page_size=4, num_chunks=2, num_rows=rows)


def test_the_tail_can_take_the_last_chunk() -> None:
    # 10 prefix pages in 3 + 1 parts: chunks of 2, 3, 2 pages, the causal call the last 3 and the tail
    lay = split_layout((4,), (44,), page_size=4, num_chunks=3, num_rows=4, tail_takes_a_chunk=True)
    assert lay.chunk_kv_len.tolist() == [8, 12, 8]
    assert lay.chunk_kv_start.tolist() == [0, 2, 5, 0]
    assert (lay.tail_kv_start.tolist(), lay.tail_kv_len.tolist()) == ([7, 0], [16])


def test_chunks_fill_the_sms_once() -> None:
    # 32 query heads, 132 SMs (H100 / H200): one 128-row tile -> 4 chunks, two tiles -> 2, four -> 1
    assert split_chunks_for(1, 128, 32, 132, 4) == 4
    assert split_chunks_for(1, 256, 32, 132, 4) == 2
    assert split_chunks_for(1, 512, 32, 132, 4) == 1
    assert split_chunks_for(2, 128, 32, 132, 4) == 2  # each sequence takes a tile of its own
    assert split_chunks_for(4, 128, 32, 132, 4) == 1
    assert split_chunks_for(1, 128, 8, 132, 4) == 4  # capped


def _fa3_call(q, kv, page_ids, qo_indptr, kv_start, kv_len, causal):
    """What one fa3 call computes for the layout: per virtual sequence i, rows [qo_indptr[i],
    qo_indptr[i+1]) of q attend to the first kv_len[i] keys of pages page_ids[kv_start[i]:]; no keys ->
    out 0, lse -inf. Returns (out, lse in log2)."""
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=q.dtype)
    ps = kv.shape[2]
    for i in range(len(kv_len)):
        lo, hi, n = int(qo_indptr[i]), int(qo_indptr[i + 1]), int(kv_len[i])
        if n == 0 or hi == lo:
            continue
        pages = page_ids[int(kv_start[i]) : int(kv_start[i]) + -(-n // ps)]
        k = kv[pages, 0].reshape(-1, KV_HEADS, DIM)[:n].repeat_interleave(HEADS // KV_HEADS, 1)
        v = kv[pages, 1].reshape(-1, KV_HEADS, DIM)[:n].repeat_interleave(HEADS // KV_HEADS, 1)
        scores = torch.einsum("qhd,khd->qhk", q[lo:hi], k) / math.sqrt(DIM)
        if causal:
            rows = hi - lo
            visible = torch.arange(n)[None, :] <= torch.arange(n - rows, n)[:, None]
            scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        out[lo:hi] = torch.einsum("qhk,khd->qhd", scores.softmax(-1), v)
        lse[lo:hi] = torch.logsumexp(scores, dim=-1) / math.log(2)
    return out, lse


def _check(q_lens, kv_lens, page_size, num_chunks, num_rows, seed, tail_takes_a_chunk=False) -> None:
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(pages_per_seq) + 3
    kv = torch.randn((num_pages, 2, page_size, KV_HEADS, DIM), dtype=torch.float64, generator=gen)
    page_ids = torch.randperm(num_pages, generator=gen)[: sum(pages_per_seq)]
    q = torch.randn((num_rows, HEADS, DIM), dtype=torch.float64, generator=gen)
    lay = split_layout(
        q_lens,
        kv_lens,
        page_size=page_size,
        num_chunks=num_chunks,
        num_rows=num_rows,
        tail_takes_a_chunk=tail_takes_a_chunk,
    )

    q_copies = q.unsqueeze(0).expand(num_chunks, -1, -1, -1).reshape(-1, HEADS, DIM)
    chunk_out, chunk_lse = _fa3_call(
        q_copies, kv, page_ids, lay.chunk_qo_indptr, lay.chunk_kv_start, lay.chunk_kv_len, causal=False
    )
    tail_out, tail_lse = _fa3_call(
        q, kv, page_ids, lay.tail_qo_indptr, lay.tail_kv_start, lay.tail_kv_len, causal=True
    )
    merged = merge_partial_states_reference(
        chunk_out.view(num_chunks, num_rows, HEADS, DIM),
        chunk_lse.view(num_chunks, num_rows, HEADS),
        tail_out,
        tail_lse,
        lay.num_rows_real,
    )
    # plain causal attention per sequence over all its pages
    starts = np.concatenate(([0], np.cumsum(pages_per_seq)))
    rows = np.concatenate(([0], np.cumsum(q_lens)))
    expected = torch.zeros_like(q)
    for s in range(len(q_lens)):
        out, _ = _fa3_call(q, kv, page_ids, [rows[s], rows[s + 1]], [starts[s]], [kv_lens[s]], causal=True)
        expected[rows[s] : rows[s + 1]] = out[rows[s] : rows[s + 1]]
    assert torch.allclose(merged, expected, atol=1e-10), (q_lens, kv_lens)
    assert not merged[lay.num_rows_real :].any()


@pytest.mark.parametrize(
    ("q_lens", "kv_lens", "page_size", "num_chunks", "num_rows"),
    [
        ((5,), (203,), 16, 4, 8),  # a long prefix, last prefix page partial
        ((5,), (165,), 16, 4, 8),  # prefix exactly 10 pages
        ((8,), (8,), 4, 4, 8),  # cold: no prefix, every chunk empty
        ((3,), (10,), 4, 4, 4),  # fewer prefix pages than chunks
        ((3, 2, 4), (40, 5, 77), 4, 2, 12),  # three sequences, padding after the last
    ],
)
@pytest.mark.parametrize("tail_takes_a_chunk", [False, True])
def test_split_attention_equals_causal_attention(
    q_lens, kv_lens, page_size, num_chunks, num_rows, tail_takes_a_chunk
) -> None:
    _check(q_lens, kv_lens, page_size, num_chunks, num_rows, 1, tail_takes_a_chunk)


@settings(max_examples=40, deadline=None)
@given(
    seqs=st.lists(
        st.tuples(st.integers(1, 6), st.integers(0, 60)), min_size=1, max_size=3
    ),  # (new tokens, cached prefix)
    page_size=st.sampled_from([1, 4, 16]),
    num_chunks=st.integers(1, 4),
    padding=st.integers(0, 5),
    seed=st.integers(0, 1000),
    tail_takes_a_chunk=st.booleans(),
)
def test_split_attention_random_layouts(
    seqs, page_size, num_chunks, padding, seed, tail_takes_a_chunk
) -> None:
    q_lens = tuple(n for n, _ in seqs)
    kv_lens = tuple(n + prefix for n, prefix in seqs)
    _check(q_lens, kv_lens, page_size, num_chunks, sum(q_lens) + padding, seed, tail_takes_a_chunk)
