"""split_plan + split_merge on the CPU: the chunk layout, exact index arrays, and that attention computed
chunk by chunk (as the fa3 calls compute it) and merged equals plain causal attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from computeworker.model.split_merge import merge_split_states_reference
from computeworker.model.split_plan import plan_split

HEADS, KV_HEADS, DIM = 4, 2, 8


def test_exact_layout_two_sequences() -> None:
    # seq 0: 3 new over 40 (10 pages of 4, 9 whole prefix pages); seq 1: 2 new over 5 (no whole prefix page)
    p = plan_split((3, 2), (40, 5), page_size=4, num_chunks=3, num_rows=8)
    assert p.chunk_qo_indptr.tolist() == [0, 3, 8, 11, 16, 19, 24]
    assert p.chunk_kv_indptr.tolist() == [0, 3, 4, 7, 8, 11, 12]
    assert p.chunk_last_page_len.tolist() == [4, 1, 4, 1, 4, 1]
    assert p.chunk_page_pos.tolist() == [0, 1, 2, 10, 3, 4, 5, 10, 6, 7, 8, 10]
    assert p.tail_kv_indptr.tolist() == [0, 1, 3]
    assert p.tail_last_page_len.tolist() == [4, 1]
    assert p.tail_page_pos.tolist() == [9, 10, 11]
    assert p.row_seq.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert p.chunk_valid.tolist() == [[1, 0, 0]] * 3


@pytest.mark.parametrize(
    ("q_lens", "kv_lens", "rows", "message"),
    [
        ((0,), (4,), 8, "1 <= q_len"),
        ((5,), (4,), 8, "1 <= q_len"),
        ((5, 5), (9, 9), 8, "do not fit"),
        ((1,), (1, 2), 8, "one kv_len per sequence"),
    ],
)
def test_bad_batches_raise(q_lens, kv_lens, rows, message) -> None:
    with pytest.raises(ValueError, match=message):
        plan_split(q_lens, kv_lens, page_size=4, num_chunks=2, num_rows=rows)


def _paged_attention(q, kv, page_pos, kv_len, causal):
    """float64 attention of q [n, H, D] over the first kv_len tokens of pages kv[page_pos]; causal is
    bottom-right aligned. Returns (out [n, H, D], lse [n, H] in log2)."""
    k = kv[page_pos, 0].reshape(-1, KV_HEADS, DIM)[:kv_len].repeat_interleave(HEADS // KV_HEADS, 1)
    v = kv[page_pos, 1].reshape(-1, KV_HEADS, DIM)[:kv_len].repeat_interleave(HEADS // KV_HEADS, 1)
    scores = torch.einsum("qhd,khd->qhk", q, k) / math.sqrt(DIM)
    if causal:
        n = q.shape[0]
        visible = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - n, kv_len)[:, None]
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1) / math.log(2)
    return torch.einsum("qhk,khd->qhd", scores.softmax(-1), v), lse


@settings(max_examples=60, deadline=None)
@given(
    seqs=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 60)), min_size=1, max_size=3),
    page_size=st.sampled_from([1, 4, 16]),
    num_chunks=st.integers(1, 5),
    pad=st.integers(0, 5),
)
def test_chunks_merged_equal_causal_attention(seqs, page_size, num_chunks, pad) -> None:
    q_lens = tuple(q for q, _ in seqs)
    kv_lens = tuple(q + prefix for q, prefix in seqs)
    rows = sum(q_lens) + pad
    p = plan_split(q_lens, kv_lens, page_size=page_size, num_chunks=num_chunks, num_rows=rows)
    gen = torch.Generator().manual_seed(len(seqs) * 1000 + rows)
    num_pages = sum(-(-n // page_size) for n in kv_lens)
    kv = torch.randn((num_pages, 2, page_size, KV_HEADS, DIM), dtype=torch.float64, generator=gen)
    q = torch.randn((rows, HEADS, DIM), dtype=torch.float64, generator=gen)

    # what the chunk call computes: every virtual sequence, its query rows over its pages, no mask
    chunk_out = torch.full((num_chunks * rows, HEADS, DIM), 7.0, dtype=torch.float64)
    chunk_lse = torch.full((num_chunks * rows, HEADS), 3.0, dtype=torch.float64)
    kv_indptr, qo_indptr = p.chunk_kv_indptr, p.chunk_qo_indptr
    for i in range(len(qo_indptr) - 1):
        pos = p.chunk_page_pos[kv_indptr[i] : kv_indptr[i + 1]]
        kv_len = (len(pos) - 1) * page_size + int(p.chunk_last_page_len[i])
        q_dup = q[np.arange(qo_indptr[i], qo_indptr[i + 1]) % rows]
        o, lse = _paged_attention(q_dup, kv, pos, kv_len, causal=False)
        chunk_out[qo_indptr[i] : qo_indptr[i + 1]] = o
        chunk_lse[qo_indptr[i] : qo_indptr[i + 1]] = lse
    # the tail call: each real sequence, causal over its tail pages
    tail_out = torch.zeros((rows, HEADS, DIM), dtype=torch.float64)
    tail_lse = torch.zeros((rows, HEADS), dtype=torch.float64)
    q_start = np.concatenate(([0], np.cumsum(q_lens)))
    full = []
    page_start = np.concatenate(([0], np.cumsum([-(-n // page_size) for n in kv_lens])))
    for s, kv_len in enumerate(kv_lens):
        pos = p.tail_page_pos[p.tail_kv_indptr[s] : p.tail_kv_indptr[s + 1]]
        tail_len = (len(pos) - 1) * page_size + int(p.tail_last_page_len[s])
        rows_s = slice(int(q_start[s]), int(q_start[s + 1]))
        tail_out[rows_s], tail_lse[rows_s] = _paged_attention(q[rows_s], kv, pos, tail_len, causal=True)
        seq_pos = np.arange(page_start[s], page_start[s + 1])
        full.append(_paged_attention(q[rows_s], kv, seq_pos, kv_len, causal=True)[0])

    merged = merge_split_states_reference(
        tail_out,
        tail_lse,
        chunk_out.view(num_chunks, rows, HEADS, DIM),
        chunk_lse.view(num_chunks, rows, HEADS),
        torch.from_numpy(p.row_seq),
        torch.from_numpy(p.chunk_valid),
    )
    torch.testing.assert_close(merged[: sum(q_lens)], torch.cat(full), rtol=1e-9, atol=1e-9)
    # every valid chunk holds only prefix pages, and chunks + tail cover each sequence's pages once
    for s in range(len(q_lens)):
        owned = set(range(page_start[s], page_start[s + 1]))
        used = list(p.tail_page_pos[p.tail_kv_indptr[s] : p.tail_kv_indptr[s + 1]])
        for c in range(num_chunks):
            i = c * len(q_lens) + s
            if p.chunk_valid[c, s]:
                used += list(p.chunk_page_pos[kv_indptr[i] : kv_indptr[i + 1]])
        assert sorted(used) == sorted(owned)
