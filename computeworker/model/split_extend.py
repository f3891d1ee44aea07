"""Prefill over a long cached prefix with the KV split into chunks on fa3 (CUDA graphs; see split_plan).

`SplitExtendAttention` stands where a CUDA-graph-mode FlashInfer wrapper stands in an extend graph: the
host calls `plan` before each replay, the graph calls `run(q, kv_layer, out=...)` once per layer, which
launches four kernels:

    1. copy q into num_chunks row blocks          q_dup [C, R, H, D]
    2. fa3 paged prefill, no mask, C * B virtual sequences (chunk-major)   -> chunk_out, chunk_lse
    3. fa3 paged prefill, causal, the B real sequences over their tails     -> tail_out, tail_lse
    4. merge by log-sum-exp into `out` (split_merge, Triton)

Buffers: the q copy and the chunk results are scratch shared by every graph of one ExtendGraphs (graphs
replay one at a time), sized for the largest row count; the tail results and the small index tensors
(row -> sequence, chunk validity) belong to each instance. Plans are built on the host from the batch's
lengths; the page list is permuted on the device (one index_select), so planning never waits on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from computeworker.model.attention_flashinfer import FlashInferAttention
from computeworker.model.split_merge import merge_split_states
from computeworker.model.split_plan import plan_split


@dataclass(slots=True)
class SplitScratch:
    """Scratch shared by the split attention of every extend graph: [C * max_rows, ...] buffers."""

    q_dup: torch.Tensor  # [C * max_rows, H, D]
    chunk_out: torch.Tensor  # [C * max_rows, H, D]
    chunk_lse: torch.Tensor  # [C * max_rows, H] float32

    @classmethod
    def allocate(cls, attention: FlashInferAttention, num_chunks: int, max_rows: int) -> SplitScratch:
        s = attention.shape
        rows = num_chunks * max_rows
        kw = dict(dtype=attention.dtype, device=attention.device)
        return cls(
            q_dup=torch.zeros((rows, s.num_qo_heads, s.head_dim), **kw),
            chunk_out=torch.zeros((rows, s.num_qo_heads, s.head_dim), **kw),
            chunk_lse=torch.zeros((rows, s.num_qo_heads), dtype=torch.float32, device=attention.device),
        )


class SplitExtendAttention:
    """Split-KV paged prefill for `batch_size` sequences and `num_rows` padded query rows.

    State: two CUDA-graph-mode FlashInfer wrappers and their last plans. Must hold: `plan` before each
    `run` of a step; the q given to `run` has num_rows rows; one step at a time (the scratch is shared)."""

    def __init__(
        self,
        attention: FlashInferAttention,
        scratch: SplitScratch,
        *,
        batch_size: int,
        num_rows: int,
        num_chunks: int,
        max_pages_per_seq: int,
        backend: str = "fa3",
        parallel_tail: bool = False,
    ) -> None:
        """parallel_tail: run the tail call on a second stream beside the chunk call (a parallel branch
        in a captured graph): the tail is short and the chunk call leaves a few SMs idle."""
        import flashinfer

        if batch_size < 1 or num_chunks < 1 or num_rows < batch_size:
            raise ValueError("need batch_size >= 1, num_chunks >= 1 and num_rows >= batch_size")
        if scratch.q_dup.shape[0] < num_chunks * num_rows:
            raise ValueError("scratch buffers are smaller than num_chunks * num_rows rows")
        self._attention = attention
        self.shape = attention.shape
        self.batch_size = batch_size
        self.num_rows = num_rows
        self.num_chunks = num_chunks
        device = attention.device
        i32 = dict(dtype=torch.int32, device=device)
        num_virtual = num_chunks * batch_size
        max_pages = batch_size * max_pages_per_seq + num_virtual
        self._chunks = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            attention.workspace,
            "NHD",
            backend=backend,
            use_cuda_graph=True,
            qo_indptr_buf=torch.zeros(num_virtual + 1, **i32),
            paged_kv_indptr_buf=torch.zeros(num_virtual + 1, **i32),
            paged_kv_indices_buf=torch.zeros(max_pages, **i32),
            paged_kv_last_page_len_buf=torch.zeros(num_virtual, **i32),
        )
        self._tail = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            attention.workspace,
            "NHD",
            backend=backend,
            use_cuda_graph=True,
            qo_indptr_buf=torch.zeros(batch_size + 1, **i32),
            paged_kv_indptr_buf=torch.zeros(batch_size + 1, **i32),
            paged_kv_indices_buf=torch.zeros(max_pages, **i32),
            paged_kv_last_page_len_buf=torch.zeros(batch_size, **i32),
        )
        rows = num_chunks * num_rows
        heads, dim = self.shape.num_qo_heads, self.shape.head_dim
        self._q_dup = scratch.q_dup[:rows]
        self._chunk_out = scratch.chunk_out[:rows]
        self._chunk_lse = scratch.chunk_lse[:rows]
        self._tail_out = torch.zeros((num_rows, heads, dim), dtype=attention.dtype, device=device)
        self._tail_lse = torch.zeros((num_rows, heads), dtype=torch.float32, device=device)
        # [row_seq (num_rows) | chunk_valid (C * (B + 1))], staged through pinned memory in one copy
        num_index = num_rows + num_chunks * (batch_size + 1)
        self._index = torch.zeros(num_index, **i32)
        self._index_host = torch.zeros(num_index, dtype=torch.int32, pin_memory=True)
        self._page_pos = torch.zeros(
            max_pages + batch_size * max_pages_per_seq, dtype=torch.int64, device=device
        )
        self._page_pos_host = torch.zeros(self._page_pos.shape[0], dtype=torch.int64, pin_memory=True)
        self._pages = torch.zeros(self._page_pos.shape[0], **i32)
        self._side = torch.cuda.Stream(device) if parallel_tail else None

    @property
    def launch_key(self) -> tuple[int, ...]:
        """Both wrappers' launch records (FlashInfer's plan info): a graph is valid only while it equals
        the capture's. Read from a private attribute: FlashInfer exposes no public view of it."""
        chunks = tuple(int(x) for x in self._chunks._plan_info)  # type: ignore[attr-defined]
        return chunks + tuple(int(x) for x in self._tail._plan_info)  # type: ignore[attr-defined]

    def plan(self, q_lens: tuple[int, ...], kv_lens: tuple[int, ...], page_ids: torch.Tensor) -> None:
        """Plan both calls for sequences with q_lens new tokens over kv_lens tokens whose pages, in
        order, are `page_ids` (int32 on the device). ValueError if the batch does not fit."""
        if len(q_lens) != self.batch_size:
            raise ValueError(f"planned for {self.batch_size} sequences, got {len(q_lens)}")
        s = self.shape
        sp = plan_split(
            q_lens, kv_lens, page_size=s.page_size, num_chunks=self.num_chunks, num_rows=self.num_rows
        )
        num_chunk_pages, num_tail_pages = len(sp.chunk_page_pos), len(sp.tail_page_pos)
        num_pos = num_chunk_pages + num_tail_pages
        if num_pos > self._page_pos.shape[0]:
            raise ValueError(f"{num_pos} page positions exceed the buffers ({self._page_pos.shape[0]})")
        host = self._page_pos_host.numpy()
        host[:num_chunk_pages] = sp.chunk_page_pos
        host[num_chunk_pages:num_pos] = sp.tail_page_pos
        self._page_pos[:num_pos].copy_(self._page_pos_host[:num_pos], non_blocking=True)
        pages = self._pages[:num_pos]
        torch.index_select(page_ids, 0, self._page_pos[:num_pos], out=pages)
        index = self._index_host.numpy()
        index[: self.num_rows] = sp.row_seq
        index[self.num_rows :] = sp.chunk_valid.reshape(-1)
        self._index.copy_(self._index_host, non_blocking=True)
        common = dict(
            num_qo_heads=s.num_qo_heads,
            num_kv_heads=s.num_kv_heads,
            head_dim_qk=s.head_dim,
            page_size=s.page_size,
            sm_scale=self._attention.sm_scale,
            q_data_type=self._attention.dtype,
            kv_data_type=self._attention.dtype,
        )
        self._chunks.plan(
            torch.from_numpy(sp.chunk_qo_indptr),
            torch.from_numpy(sp.chunk_kv_indptr),
            pages[:num_chunk_pages],
            torch.from_numpy(sp.chunk_last_page_len),
            causal=False,
            **common,
        )
        qo_indptr = np.concatenate(([0], np.cumsum(q_lens))).astype(np.int32)
        self._tail.plan(
            torch.from_numpy(qo_indptr),
            torch.from_numpy(sp.tail_kv_indptr),
            pages[num_chunk_pages:num_pos],
            torch.from_numpy(sp.tail_last_page_len),
            causal=True,
            **common,
        )

    def run(self, q: torch.Tensor, kv_layer: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        """Attention of q [num_rows, H, D] (any row stride) over the planned KV of `kv_layer`; writes
        and returns `out` [num_rows, H, D]. Rows past the batch's tokens hold unspecified finite values."""
        c, r = self.num_chunks, self.num_rows
        heads, dim = self.shape.num_qo_heads, self.shape.head_dim
        q_dup = self._q_dup.view(c, r, heads, dim)
        q_dup.copy_(q.reshape(r, heads, dim).unsqueeze(0).expand(c, r, heads, dim))
        self._chunks.run(self._q_dup, kv_layer, out=self._chunk_out, lse=self._chunk_lse, return_lse=True)
        self._tail.run(q_dup[0], kv_layer, out=self._tail_out, lse=self._tail_lse, return_lse=True)
        row_seq = self._index[:r]
        chunk_valid = self._index[r:].view(c, self.batch_size + 1)
        return merge_split_states(
            self._tail_out,
            self._tail_lse,
            self._chunk_out.view(c, r, heads, dim),
            self._chunk_lse.view(c, r, heads),
            row_seq,
            chunk_valid,
            out,
        )
