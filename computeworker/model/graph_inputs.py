"""The inputs a captured CUDA graph reads, staged on the host and copied to the device by the graph itself.

A graph of R padded rows reads one int64 device buffer::

    input_ids [R] | positions [R] | K/V write rows [R, 2] | extra [E] | page ids [P] (int32, two a word)

extra: the extend graphs' qo_indptr (E = B+1). Page ids: the batch's page list, for attention that reads
it from a buffer of its own (split_extend).

Before each replay the host writes the buffer's image into page-locked host memory with numpy (padding
included); the graph's first node copies that image to the device (`copy_in`, captured with the graph).
So staging a step makes no copy call: each driver call costs the host 28-97 us on the H200 hosts we
measured (bench/results/gpu_notes.md runs 75-91), while numpy on a few hundred integers costs a few
microseconds. The host image is memory of our own, registered with CUDA (cudaHostRegister), not torch's
caching host allocator, which would record an event on every copy. Because one image serves every
replay, `load` first waits on an event the graph records right after its copy: the previous replay must
have read the image before the next step overwrites it (a wait that has always ended by then, since a
step's results are read before the next one is prepared: one driver call that returns at once; staging
took 19.6 us in all, numpy included, in run 91).

Padding rows (R - T of them): token 0 at position 0, their K/V aimed at row 0's slots (the graph writes
row 0 last, so row 0's own K/V wins; see cuda_graphs.GraphAttention).
"""

from __future__ import annotations

import mmap
import weakref

import numpy as np
import torch

from computeworker.model.batch import HostInputs


class GraphInputs:
    """One graph's input buffer, its views, and the page-locked host image it is copied from. State: the
    device buffer and host image the graph was captured with, the event marking the image read. Must
    hold: the graph calls `copy_in` before anything reads the buffer; `load` (or `stage` at capture)
    before each replay."""

    def __init__(self, rows: int, extra: int, device: torch.device, max_pages: int = 0) -> None:
        if rows < 1 or extra < 0 or max_pages < 0:
            raise ValueError(f"need rows >= 1, extra >= 0, max_pages >= 0, got {rows}, {extra}, {max_pages}")
        self.rows = rows
        self._fixed = 4 * rows + extra  # words before the page ids
        words = self._fixed + (max_pages + 1) // 2
        self.buffer = torch.zeros(words, dtype=torch.int64, device=device)
        self.input_ids = self.buffer[:rows]
        self.positions = self.buffer[rows : 2 * rows]
        self.kv_rows = self.buffer[2 * rows : 4 * rows].view(rows, 2)  # [:, 0] K row, [:, 1] V row
        self.extra = self.buffer[4 * rows : self._fixed]
        self.pages = self.buffer[self._fixed :].view(torch.int32)[:max_pages]
        self._image, self._image_tensor = page_locked_int64(words, owner=self)
        self._copied = torch.cuda.Event(external=True)  # recorded inside the graph, after the copy

    def copy_in(self) -> None:
        """The graph's first op: the host image to the device buffer, then the event that says it was read."""
        self.buffer.copy_(self._image_tensor, non_blocking=True)
        self._copied.record()

    def load(
        self,
        host: HostInputs,
        page_size: int,
        extra: np.ndarray | None = None,
        pages: np.ndarray | None = None,
    ) -> None:
        """Write `host`'s T <= rows tokens, `extra` (exactly the buffer's extra length) and `pages` (at most
        max_pages) into the host image the next replay copies in. ValueError if they do not fit."""
        self._check_pages(pages)
        self._copied.synchronize()  # the last replay has copied the image
        fill_inputs(self._image[: self._fixed], host, self.rows, page_size, extra)
        self._write_pages(pages)

    def stage(self, extra: np.ndarray, pages: np.ndarray | None = None) -> None:
        """At capture: zero rows (token 0, position 0, K/V rows 0), `extra` and `pages` into the host image."""
        self._check_pages(pages)
        if len(extra) != self._fixed - 4 * self.rows:
            raise ValueError(f"{len(extra)} extra values for {self._fixed - 4 * self.rows}")
        self._copied.synchronize()
        self._image[: 4 * self.rows] = 0
        self._image[4 * self.rows : self._fixed] = extra
        self._write_pages(pages)

    def _check_pages(self, pages: np.ndarray | None) -> None:
        if pages is not None and len(pages) > self.pages.shape[0]:
            raise ValueError(f"{len(pages)} pages exceed the page buffer ({self.pages.shape[0]})")

    def _write_pages(self, pages: np.ndarray | None) -> None:
        if pages is not None:
            self._image[self._fixed :].view(np.int32)[: len(pages)] = pages


def page_locked_int64(words: int, owner: object) -> tuple[np.ndarray, torch.Tensor]:
    """`words` int64 of host memory registered with CUDA as page-locked, as a numpy array and a torch
    tensor over the same bytes (zeroed); unregistered when `owner` is collected."""
    nbytes = max(8, words * 8)
    memory = mmap.mmap(-1, nbytes)  # page-aligned, zero-filled
    array = np.frombuffer(memory, dtype=np.int64, count=words)
    tensor = torch.from_numpy(array)
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 0)
    if int(error) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed: {error}")
    weakref.finalize(owner, _unregister, cudart, tensor.data_ptr(), memory)
    return array, tensor


def _unregister(cudart: object, pointer: int, memory: mmap.mmap) -> None:
    """Holds `memory` (the finalizer's argument) until its registration has ended."""
    cudart.cudaHostUnregister(pointer)  # type: ignore[attr-defined]


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
