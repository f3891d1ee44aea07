"""How a prefill over a long cached prefix is cut into KV chunks that run side by side (host side only).

FlashInfer's fa3 (Hopper, wgmma) paged prefill gives each (sequence, KV head, 128-row query tile) one
CTA and never splits the KV: 100 new tokens over a 10,000-token prefix keep 32 of 132 SMs busy. fa2
splits, but runs on the older mma.sync path at half fa3's rate. Split by hand instead: every sequence's
query rows attend, as `num_chunks` separate "virtual sequences", to equal slices of its cached prefix
(no mask: every prefix token precedes every new one), plus once, causally, to the tail (the prefix's
last partial page and the new tokens). A merge kernel then combines the partial results by their
log-sum-exp.

One sequence s with q_len new tokens over kv_len tokens, P = (kv_len - q_len) // page_size whole
prefix pages (pages before the first new token)::

    pages   | 0 .......................... P-1 | P ........... last |
            | chunk 0 | chunk 1 | ... | C-1     |      tail         |
              non-causal, all q rows               causal, bottom-right aligned
                                                   (q_len rows over kv_len - P * page_size keys)

Virtual sequences are chunk-major, and each chunk's block of query rows is `num_rows` long (the CUDA
graph's padded row count), so the row of (chunk c, token r) is simply c * num_rows + r::

    query rows   [ chunk 0: seq 0 rows | seq 1 rows | ... | padding ][ chunk 1: ... ] ...
                   qo start of (c, s) = c * num_rows + qo_indptr[s]
                   the last sequence of each chunk also takes the padding rows (their results are ignored)

A chunk that gets no page (a prefix shorter than num_chunks pages) still needs one key for the kernel:
it reads the sequence's first page with length 1 and is marked invalid, so the merge skips it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class SplitPlan:
    """Index arrays for one step; all int32 (page positions int64), on the host.

    chunk_*: the non-causal call over num_chunks * batch_size virtual sequences (chunk-major).
    tail_*: the causal call, one per real sequence. *_page_pos index the batch's page list (kv_page_ids).
    row_seq: [num_rows] the sequence of each query row; padding rows get batch_size.
    chunk_valid: [num_chunks, batch_size + 1] 1 where chunk c of sequence s holds prefix pages; the last
    column (padding rows) is 0."""

    chunk_qo_indptr: np.ndarray
    chunk_kv_indptr: np.ndarray
    chunk_last_page_len: np.ndarray
    chunk_page_pos: np.ndarray
    tail_kv_indptr: np.ndarray
    tail_last_page_len: np.ndarray
    tail_page_pos: np.ndarray
    row_seq: np.ndarray
    chunk_valid: np.ndarray


def plan_split(
    q_lens: tuple[int, ...],
    kv_lens: tuple[int, ...],
    *,
    page_size: int,
    num_chunks: int,
    num_rows: int,
) -> SplitPlan:
    """The chunk layout for sequences with q_lens new tokens over kv_lens tokens each (cached prefix
    included), padded to num_rows query rows. ValueError when a sequence has no new token, more new
    tokens than KV, or the rows do not fit num_rows."""
    if page_size < 1 or num_chunks < 1:
        raise ValueError("page_size and num_chunks must be >= 1")
    if not q_lens or len(q_lens) != len(kv_lens):
        raise ValueError(f"need one kv_len per sequence, got q_lens {q_lens} and kv_lens {kv_lens}")
    q = np.asarray(q_lens, dtype=np.int64)
    kv = np.asarray(kv_lens, dtype=np.int64)
    if (q < 1).any() or (q > kv).any():
        raise ValueError(f"every sequence needs 1 <= q_len <= kv_len, got {q_lens} over {kv_lens}")
    if int(q.sum()) > num_rows:
        raise ValueError(f"{int(q.sum())} query rows do not fit {num_rows}")
    bs, c_count = len(q_lens), num_chunks
    num_pages = -(-kv // page_size)
    page_start = np.concatenate(([0], np.cumsum(num_pages)[:-1]))
    prefix_pages = (kv - q) // page_size
    qo_indptr = np.concatenate(([0], np.cumsum(q)))

    # chunk c of sequence s: prefix pages [bounds[c, s], bounds[c + 1, s])
    bounds = (np.arange(c_count + 1)[:, None] * prefix_pages[None, :]) // c_count  # [C + 1, bs]
    sizes = np.diff(bounds, axis=0)  # [C, bs]
    valid = sizes > 0
    pages_used = np.where(valid, sizes, 1)
    chunk_kv_indptr = np.concatenate(([0], np.cumsum(pages_used.reshape(-1))))
    chunk_last = np.where(valid, page_size, 1).reshape(-1)
    first = np.where(valid, bounds[:-1], 0) + page_start[None, :]  # first page position per chunk
    chunk_page_pos = _ranges(first.reshape(-1), pages_used.reshape(-1))

    starts = np.arange(c_count)[:, None] * num_rows + qo_indptr[None, :-1]  # [C, bs]
    chunk_qo_indptr = np.concatenate((starts.reshape(-1), [c_count * num_rows]))

    tail_pages = num_pages - prefix_pages
    tail_kv_indptr = np.concatenate(([0], np.cumsum(tail_pages)))
    tail_last = kv - (num_pages - 1) * page_size
    tail_page_pos = _ranges(page_start + prefix_pages, tail_pages)

    row_seq = np.full(num_rows, bs, dtype=np.int32)
    row_seq[: int(q.sum())] = np.repeat(np.arange(bs), q)
    chunk_valid = np.zeros((c_count, bs + 1), dtype=np.int32)
    chunk_valid[:, :bs] = valid
    i32 = np.int32
    return SplitPlan(
        chunk_qo_indptr=chunk_qo_indptr.astype(i32),
        chunk_kv_indptr=chunk_kv_indptr.astype(i32),
        chunk_last_page_len=chunk_last.astype(i32),
        chunk_page_pos=chunk_page_pos,
        tail_kv_indptr=tail_kv_indptr.astype(i32),
        tail_last_page_len=tail_last.astype(i32),
        tail_page_pos=tail_page_pos,
        row_seq=row_seq,
        chunk_valid=chunk_valid,
    )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + length) for each pair, as int64."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return (np.repeat(starts, lengths) + np.arange(total) - offsets).astype(np.int64)
