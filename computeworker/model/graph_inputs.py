"""The inputs a captured CUDA graph reads, staged on the host and copied to the device in one transfer.

A graph of R padded rows reads one int64 device buffer::

    input_ids [R] | positions [R] | K/V write rows [R, 2] | extra [E] | page ids [P] (int32, two a word)

extra: the extend graphs' qo_indptr (E = B+1). Page ids: the batch's page list, for attention that reads
it from a buffer of its own (split_extend); only the used part of that region is copied.

Before each replay the host writes the whole buffer into pinned memory with numpy (padding included) and
issues one asynchronous copy. Each device op costs the host a driver call (32-93 us apiece on the H200
hosts we measured, bench/results/gpu_notes.md runs 75-84), while numpy on a few hundred integers costs a few
microseconds: the chain of small copies, adds and fills that used to prepare a replay cost more host time
than the 100-token step's whole batch build.

Padding rows (R - T of them): token 0 at position 0, their K/V aimed at row 0's slots (the graph writes
row 0 last, so row 0's own K/V wins; see cuda_graphs.GraphAttention).
"""

from __future__ import annotations

import numpy as np
import torch

from computeworker.model.batch import HostInputs


class GraphInputs:
    """One graph's input buffer and its views. State: the device buffer the graph was captured with.
    Must hold: `load` is called on the stream the graph replays on, before the replay."""

    def __init__(self, rows: int, extra: int, device: torch.device, max_pages: int = 0) -> None:
        if rows < 1 or extra < 0 or max_pages < 0:
            raise ValueError(f"need rows >= 1, extra >= 0, max_pages >= 0, got {rows}, {extra}, {max_pages}")
        self.rows = rows
        self._fixed = 4 * rows + extra  # words before the page ids
        self.buffer = torch.zeros(self._fixed + (max_pages + 1) // 2, dtype=torch.int64, device=device)
        self.input_ids = self.buffer[:rows]
        self.positions = self.buffer[rows : 2 * rows]
        self.kv_rows = self.buffer[2 * rows : 4 * rows].view(rows, 2)  # [:, 0] K row, [:, 1] V row
        self.extra = self.buffer[4 * rows : self._fixed]
        self.pages = self.buffer[self._fixed :].view(torch.int32)[:max_pages]

    def load(
        self,
        host: HostInputs,
        page_size: int,
        extra: np.ndarray | None = None,
        pages: np.ndarray | None = None,
    ) -> None:
        """Stage `host`'s T <= rows tokens, `extra` (exactly the buffer's extra length) and `pages` (at most
        max_pages) and copy them to the device without blocking. ValueError if they do not fit."""
        num_pages = 0 if pages is None else len(pages)
        if num_pages > self.pages.shape[0]:
            raise ValueError(f"{num_pages} pages exceed the page buffer ({self.pages.shape[0]})")
        words = self._fixed + (num_pages + 1) // 2
        staged = torch.empty(words, dtype=torch.int64, pin_memory=True)
        out = staged.numpy()
        fill_inputs(out[: self._fixed], host, self.rows, page_size, extra)
        if pages is not None:
            out[self._fixed :].view(np.int32)[:num_pages] = pages
        # Non-blocking: torch's caching host allocator keeps `staged` until the copy has run.
        self.buffer[:words].copy_(staged, non_blocking=True)


def fill_inputs(
    out: np.ndarray, host: HostInputs, rows: int, page_size: int, extra: np.ndarray | None = None
) -> None:
    """Write the GraphInputs layout of `host` padded to `rows` rows into `out` (int64, 4 * rows + len(extra))."""
    t = len(host.input_ids)
    num_extra = out.shape[0] - 4 * rows
    if not 1 <= t <= rows or num_extra < 0 or (0 if extra is None else len(extra)) != num_extra:
        raise ValueError(f"{t} tokens and {0 if extra is None else len(extra)} extra values do not fit")
    out[:t] = host.input_ids
    out[rows : rows + t] = host.positions
    out[t:rows] = 0
    out[rows + t : 2 * rows] = 0
    kv = out[2 * rows : 4 * rows].reshape(rows, 2)
    np.multiply(host.write_page_ids, 2 * page_size, out=kv[:t, 0])
    kv[:t, 0] += host.write_slots
    kv[t:, 0] = kv[0, 0]
    np.add(kv[:, 0], page_size, out=kv[:, 1])
    if extra is not None:
        out[4 * rows :] = extra
