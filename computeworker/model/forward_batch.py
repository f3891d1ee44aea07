"""Build a ForwardBatch from per-sequence chunks. Everything is computed on the host with numpy and each
field crosses to the device once.

One chunk = the new tokens of one sequence, the absolute position of the first of them, and the pages
holding that sequence (cached prefix first). Only the pages covering start_pos + len(token_ids) positions
enter the batch; extra pages handed out ahead of time (decode chunks) are ignored::

    page_ids:   [ p0 ][ p1 ][ p2 ][ p3 ]          page_size = 4, start_pos = 6, 3 new tokens
    positions:   0..3  4..7  8..11                kv_len = 9 -> pages p0..p2, last page holds 1
    writes:            (p1,2) (p1,3) (p2,0)       p3 unused
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from computeworker.model.batch import ForwardBatch


@dataclass(frozen=True, slots=True)
class SeqChunk:
    token_ids: Sequence[int] | np.ndarray  # the new tokens (>= 1)
    start_pos: int  # position of token_ids[0] == number of tokens already in the pages
    page_ids: Sequence[int] | np.ndarray  # pages of the sequence in order, covering at least kv_len

    @property
    def q_len(self) -> int:
        return len(self.token_ids)

    @property
    def kv_len(self) -> int:
        return self.start_pos + len(self.token_ids)


def build_forward_batch(seqs: Sequence[SeqChunk], page_size: int, device: torch.device | str) -> ForwardBatch:
    """The batch for `seqs`. Raises ValueError for an empty batch, a chunk without tokens, a negative
    start position, or too few pages to hold kv_len tokens."""
    if not seqs:
        raise ValueError("a forward batch needs at least one sequence")
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    q_lens = tuple(s.q_len for s in seqs)
    kv_lens = tuple(s.kv_len for s in seqs)
    pages_used = []
    for i, s in enumerate(seqs):
        if s.q_len == 0 or s.start_pos < 0:
            raise ValueError(
                f"sequence {i}: needs >= 1 new token and start_pos >= 0 (got {s.q_len}, {s.start_pos})"
            )
        need = -(-s.kv_len // page_size)
        if len(s.page_ids) < need:
            raise ValueError(f"sequence {i}: {s.kv_len} tokens need {need} pages, got {len(s.page_ids)}")
        pages_used.append(np.asarray(s.page_ids[:need], dtype=np.int64))

    input_ids = np.concatenate([np.asarray(s.token_ids, dtype=np.int64) for s in seqs])
    positions = np.concatenate([np.arange(s.start_pos, s.kv_len, dtype=np.int64) for s in seqs])
    qo_indptr = np.zeros(len(seqs) + 1, dtype=np.int32)
    qo_indptr[1:] = np.cumsum(q_lens)
    kv_indptr = np.zeros(len(seqs) + 1, dtype=np.int32)
    kv_indptr[1:] = np.cumsum([len(p) for p in pages_used])
    kv_page_ids = np.concatenate(pages_used)
    kv_last_page_len = np.array(
        [n - (len(p) - 1) * page_size for n, p in zip(kv_lens, pages_used, strict=True)]
    )
    write_page_ids = np.concatenate(
        [p[pos // page_size] for p, pos in zip(pages_used, _split(positions, q_lens), strict=True)]
    )
    write_slots = positions % page_size

    def put(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    return ForwardBatch(
        input_ids=put(input_ids, torch.int64),
        positions=put(positions, torch.int64),
        qo_indptr=put(qo_indptr, torch.int32),
        kv_indptr=put(kv_indptr, torch.int32),
        kv_page_ids=put(kv_page_ids, torch.int32),
        kv_last_page_len=put(kv_last_page_len, torch.int32),
        write_page_ids=put(write_page_ids, torch.int64),
        write_slots=put(write_slots, torch.int64),
        q_lens=q_lens,
        kv_lens=kv_lens,
    )


def _split(values: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    return np.split(values, np.cumsum(lengths)[:-1])
