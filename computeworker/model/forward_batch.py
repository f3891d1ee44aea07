"""Build a ForwardBatch from per-sequence chunks. Everything is computed on the host with numpy into one
packed int64 array (PackedFields); the batch copies it to the device in one pinned, non-blocking transfer
when a device field is first read (a pageable copy would make the host wait for the GPU's previous step).
A step replayed from an extend graph with the split attention reads only the host arrays and never pays
for that copy (computeworker.model.graph_inputs).

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

from computeworker.model.batch import DeviceFields, ForwardBatch, HostInputs


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
    start position, or too few pages to hold kv_len tokens.

    Per sequence, only its token and page slices are gathered in Python; every derived field is one
    numpy operation over the whole batch (128 decode sequences on an H200 host: 0.33 ms instead of 1.31)."""
    if not seqs:
        raise ValueError("a forward batch needs at least one sequence")
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    if len(seqs) == 1:
        return _one_sequence(seqs[0], page_size, device)
    return _many_sequences(seqs, page_size, device)


def _many_sequences(seqs: Sequence[SeqChunk], page_size: int, device: torch.device | str) -> ForwardBatch:
    n = len(seqs)
    per_seq = np.array([(len(s.token_ids), s.start_pos, len(s.page_ids)) for s in seqs], dtype=np.int64)
    q_lens, starts, have = per_seq.T
    kv_lens = starts + q_lens
    need = -(-kv_lens // page_size)
    if q_lens.min() < 1 or starts.min() < 0 or (have < need).any():
        i = int(np.flatnonzero((q_lens < 1) | (starts < 0) | (have < need))[0])
        if q_lens[i] < 1 or starts[i] < 0:
            raise ValueError(
                f"sequence {i}: needs >= 1 new token and start_pos >= 0 (got {q_lens[i]}, {starts[i]})"
            )
        raise ValueError(f"sequence {i}: {kv_lens[i]} tokens need {need[i]} pages, got {have[i]}")

    input_ids = np.concatenate([np.asarray(s.token_ids) for s in seqs])
    kv_page_ids = np.concatenate(
        [np.asarray(s.page_ids[:k]) for s, k in zip(seqs, need.tolist(), strict=True)]
    )
    qo_indptr = np.concatenate(([0], np.cumsum(q_lens)))
    kv_indptr = np.concatenate(([0], np.cumsum(need)))
    kv_last_page_len = kv_lens - (need - 1) * page_size
    num_tokens = int(qo_indptr[-1])
    # Token t of sequence s sits at position starts[s] + (t - qo_indptr[s]).
    if num_tokens == n:  # decode: one token per sequence
        positions = starts.copy()
        first_pages = kv_indptr[:-1]
    else:
        seq_of_token = np.repeat(np.arange(n), q_lens)
        positions = np.arange(num_tokens, dtype=np.int64) + (starts - qo_indptr[:-1])[seq_of_token]
        first_pages = kv_indptr[:-1][seq_of_token]
    write_page_ids = kv_page_ids[first_pages + positions // page_size]
    write_slots = positions % page_size
    packed = PackedFields.of(
        [input_ids, positions, write_page_ids, write_slots],
        [qo_indptr, kv_indptr, kv_page_ids, kv_last_page_len],
    )
    return packed.batch(tuple(q_lens.tolist()), tuple(kv_lens.tolist()), device)


def _one_sequence(seq: SeqChunk, page_size: int, device: torch.device | str) -> ForwardBatch:
    """build_forward_batch for one sequence (a lone request's prefill, the latency-critical step): the
    same fields with a handful of numpy calls (~40 us instead of ~150 us on a CPU like CI's)."""
    q_len, start = len(seq.token_ids), seq.start_pos
    kv_len = start + q_len
    need = -(-kv_len // page_size)
    if q_len < 1 or start < 0 or len(seq.page_ids) < need:
        return _many_sequences([seq], page_size, device)  # raises, with the batch path's messages
    positions = np.arange(start, kv_len, dtype=np.int64)
    kv_page_ids = np.asarray(seq.page_ids[:need], dtype=np.int64)
    packed = PackedFields.empty((q_len,) * 4, (2, 2, need, 1))
    wide, narrow = packed.wide, packed.narrow
    wide[:q_len] = seq.token_ids
    wide[q_len : 2 * q_len] = positions
    wide[2 * q_len : 3 * q_len] = kv_page_ids[positions // page_size]
    wide[3 * q_len :] = positions % page_size
    narrow[:4] = (0, q_len, 0, need)
    narrow[4 : 4 + need] = kv_page_ids
    narrow[-1] = kv_len - (need - 1) * page_size
    return packed.batch((q_len,), (kv_len,), device)


@dataclass(frozen=True, slots=True)
class PackedFields:
    """A batch's fields in one int64 host array: input_ids, positions, write pages, write slots (int64),
    then qo_indptr, kv_indptr, kv_page_ids, kv_last_page_len as int32 two to a word. One copy moves all
    of it to the device (each copy costs the host a driver call, 32-93 us on the H200 hosts we measured,
    bench/results/gpu_notes.md runs 75-84, which dominated building a small batch), and the fields are views of that one tensor."""

    packed: np.ndarray
    wide_sizes: tuple[int, ...]
    narrow_sizes: tuple[int, ...]

    @classmethod
    def empty(cls, wide_sizes: tuple[int, ...], narrow_sizes: tuple[int, ...]) -> PackedFields:
        num_wide, num_narrow = sum(wide_sizes), sum(narrow_sizes)
        return cls(np.empty(num_wide + (num_narrow + 1) // 2, dtype=np.int64), wide_sizes, narrow_sizes)

    @classmethod
    def of(cls, wide: list[np.ndarray], narrow: list[np.ndarray]) -> PackedFields:
        fields = cls.empty(tuple(a.size for a in wide), tuple(a.size for a in narrow))
        np.concatenate([np.asarray(a).ravel() for a in wide], out=fields.wide, casting="unsafe")
        np.concatenate([np.asarray(a).ravel() for a in narrow], out=fields.narrow, casting="unsafe")
        return fields

    @property
    def wide(self) -> np.ndarray:
        return self.packed[: sum(self.wide_sizes)]

    @property
    def narrow(self) -> np.ndarray:
        return self.packed[sum(self.wide_sizes) :].view(np.int32)[: sum(self.narrow_sizes)]

    def batch(
        self, q_lens: tuple[int, ...], kv_lens: tuple[int, ...], device: torch.device | str
    ) -> ForwardBatch:
        """The ForwardBatch of these fields, copied to `device` when a device field is first read."""
        wide = _slices(self.wide, self.wide_sizes)
        narrow = _slices(self.narrow, self.narrow_sizes)
        host = HostInputs(wide[0], wide[1], wide[2], wide[3], narrow[0], narrow[2])
        return ForwardBatch.deferred(lambda: self.to_device(device), q_lens, kv_lens, host)

    def to_device(self, device: torch.device | str) -> DeviceFields:
        on_device = host_to_device(self.packed, device)
        num_wide = sum(self.wide_sizes)
        wide = torch.split(on_device[:num_wide], list(self.wide_sizes))
        narrow = torch.split(
            on_device[num_wide:].view(torch.int32)[: sum(self.narrow_sizes)], list(self.narrow_sizes)
        )
        return DeviceFields(
            input_ids=wide[0],
            positions=wide[1],
            qo_indptr=narrow[0],
            kv_indptr=narrow[1],
            kv_page_ids=narrow[2],
            kv_last_page_len=narrow[3],
            write_page_ids=wide[2],
            write_slots=wide[3],
        )


def _slices(array: np.ndarray, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """Consecutive views of `array` of these sizes (np.split costs ~20 us a call in its generality)."""
    views, at = [], 0
    for size in sizes:
        views.append(array[at : at + size])
        at += size
    return views


def packed_to_device(
    parts: list[np.ndarray], dtype: torch.dtype, device: torch.device | str
) -> list[torch.Tensor]:
    """``parts`` packed into one host array of ``dtype``, copied to ``device`` once, split into views."""
    packed = np.concatenate([np.asarray(a).ravel() for a in parts]).astype(_NUMPY_OF[dtype], copy=False)
    on_device = host_to_device(packed, device)
    return list(torch.split(on_device, [a.size for a in parts]))


def host_to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """`array` on `device`. To CUDA: staged in pinned memory (torch's caching host allocator, which keeps
    the block until the copy has run) and copied without blocking the host; elsewhere a plain copy."""
    host = torch.from_numpy(array)
    if torch.device(device).type != "cuda":
        return host.to(device=device)
    return host.pin_memory().to(device=device, non_blocking=True)


_NUMPY_OF = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}
