"""How a small prefill over a long cached prefix is cut into KV chunks that run side by side (host side).

FlashInfer's fa3 (Hopper, wgmma) paged prefill runs one work item per (query head, sequence, 128-row
query tile) on a persistent grid of one CTA per SM, and never splits a sequence's KV: 100 new tokens
over a 10,000-token prefix are 32 work items for 132 SMs. fa2 splits the KV but runs on mma.sync at
about half fa3's rate. So split by hand: the query rows of each sequence attend, as `num_chunks`
"virtual sequences", to equal slices of its cached prefix (no mask: every prefix token precedes every
new token), and once, causally, to the tail (the prefix's last partial page and the new tokens). A
merge kernel combines the partial results by their log-sum-exp (split_merge).

One sequence s with q_len new tokens over kv_len tokens has P = (kv_len - q_len) // page_size whole
prefix pages::

    its pages  | 0 ......................... P-1 | P ............ last |
               | chunk 0 | chunk 1 | ... | C-1    |        tail        |
                 no mask, every query row           causal, bottom-right aligned

The virtual sequences are chunk-major. Chunk c reads its query rows from block c of a [C, rows, H, D]
copy of q (rows = the graph's padded row count), so its output lands in block c of a same-shaped buffer;
the last sequence of every block also takes the padding rows (computed, never read). fa3's scheduler
takes, per virtual sequence, where its pages start in the page list and how many keys it has, so
chunks are ranges of each sequence's own page list: no page list is rebuilt. A chunk with no pages (a
prefix shorter than C pages) has zero keys; the kernel writes 0 and a log-sum-exp of -inf for it, which
the merge weighs as nothing.

Variant (`tail_takes_a_chunk`): cut the prefix into C + 1 parts, give C to the chunk call and the last one
to the causal call along with the tail. The two calls then hold works of about the same size and run side
by side on the GPU (C * H + H works for 132 SMs), instead of the short causal call running after the
chunk call as a launch of its own (8 us a layer on an H200, mostly fixed cost).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class SplitLayout:
    """fa3 schedule inputs for the two calls of one step, int32 on the host.

    chunk_*: num_chunks * batch_size virtual sequences, chunk-major; qo_indptr [C*B + 1] are rows of
    the [C * rows] q copy, kv_start [C*B + 1] the first page of each (an index into the batch's page
    list; the last entry is unused), kv_len [C*B] keys. tail_*: the same for the B real sequences over
    rows of one q block. num_rows_real: the batch's real rows (the rest are padding)."""

    chunk_qo_indptr: np.ndarray
    chunk_kv_start: np.ndarray
    chunk_kv_len: np.ndarray
    tail_qo_indptr: np.ndarray
    tail_kv_start: np.ndarray
    tail_kv_len: np.ndarray
    num_rows_real: int


def split_layout(
    q_lens: tuple[int, ...] | list[int],
    kv_lens: tuple[int, ...] | list[int],
    *,
    page_size: int,
    num_chunks: int,
    num_rows: int,
    tail_takes_a_chunk: bool = False,
) -> SplitLayout:
    """The chunk layout for sequences with q_lens new tokens over kv_lens tokens each (their cached
    prefix included), padded to num_rows query rows. With tail_takes_a_chunk the prefix is cut into
    num_chunks + 1 equal parts and the causal tail call takes the last one with the tail (so it can run
    beside the chunk call as a work of the same size, instead of after it). ValueError when a sequence has
    no new token or more new tokens than keys, or the rows do not fit num_rows."""
    if page_size < 1 or num_chunks < 1:
        raise ValueError("page_size and num_chunks must be >= 1")
    if len(q_lens) == 0 or len(q_lens) != len(kv_lens):
        raise ValueError(f"need one kv_len per sequence, got q_lens {q_lens} and kv_lens {kv_lens}")
    if any(not 1 <= q <= kv for q, kv in zip(q_lens, kv_lens, strict=True)):
        raise ValueError(f"every sequence needs 1 <= q_len <= kv_len, got {q_lens} over {kv_lens}")
    total = sum(q_lens)
    if total > num_rows:
        raise ValueError(f"{total} query rows do not fit {num_rows}")
    # Plain Python over at most a few sequences and chunks: ~10 us, where numpy's per-call overhead made
    # the same arithmetic ~80 us of every step's host time.
    chunk_qo, chunk_start, chunk_len = [], [], []
    tail_qo, tail_start, tail_len = [0], [], []
    seq_starts = []  # (first page, first row, whole prefix pages) per sequence
    page, row = 0, 0
    parts = num_chunks + 1 if tail_takes_a_chunk else num_chunks
    for q, kv in zip(q_lens, kv_lens, strict=True):
        prefix_pages = (kv - q) // page_size
        seq_starts.append((page, row, prefix_pages))
        tail_pages = prefix_pages - num_chunks * prefix_pages // parts  # where the last chunk ends
        tail_start.append(page + prefix_pages - tail_pages)
        tail_len.append(kv - (prefix_pages - tail_pages) * page_size)
        row += q
        tail_qo.append(row)
        page += -(-kv // page_size)
    for c in range(num_chunks):  # chunk-major: chunk c of sequence s holds prefix pages [lo, hi)
        for first_page, first_row, prefix_pages in seq_starts:
            lo = c * prefix_pages // parts
            hi = (c + 1) * prefix_pages // parts
            chunk_qo.append(c * num_rows + first_row)
            chunk_start.append(first_page + lo)
            chunk_len.append((hi - lo) * page_size)
    chunk_qo.append(num_chunks * num_rows)
    i32 = np.int32
    return SplitLayout(
        chunk_qo_indptr=np.array(chunk_qo, dtype=i32),
        chunk_kv_start=np.array([*chunk_start, 0], dtype=i32),
        chunk_kv_len=np.array(chunk_len, dtype=i32),
        tail_qo_indptr=np.array(tail_qo, dtype=i32),
        tail_kv_start=np.array([*tail_start, 0], dtype=i32),
        tail_kv_len=np.array(tail_len, dtype=i32),
        num_rows_real=total,
    )


def split_chunks_for(batch_size: int, num_rows: int, num_qo_heads: int, num_sms: int, max_chunks: int) -> int:
    """How many prefix chunks fill the GPU once: fa3 runs one work item per (query head, sequence,
    128-row tile), each of the batch's sequences taking at least one tile; one chunk per free multiple
    of that, at most max_chunks, at least 1."""
    tiles = max(batch_size, -(-num_rows // 128))
    return max(1, min(max_chunks, num_sms // (num_qo_heads * tiles)))
