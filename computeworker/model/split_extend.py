"""Split-KV prefill on fa3 for the extend graphs: few new tokens over a long cached prefix (split_plan).

`SplitExtendAttention` stands where a CUDA-graph-mode FlashInfer wrapper stands in an extend graph: the
host calls `plan` before each replay; inside the graph each layer runs three kernels::

    fa3 paged prefill, no mask, C * B virtual sequences over q_copies [C, R, H, D]  -> chunk_out, chunk_lse
    fa3 paged prefill, causal, the B real sequences over their tails (q_copies[0])  -> tail_out, tail_lse
        (by default the tail call also takes the last prefix chunk and runs beside the chunk call)
    merge by log-sum-exp into the graph's attention output (split_merge, Triton)

and the RoPE kernel before them writes the rotated q straight into the C blocks of `q_copies`
(computeworker.model.rope_store), so no copy kernel runs.

Planning without FlashInfer's Python: fa3's plan() spends ~0.3-0.5 ms per call in Python around a C++
scheduler that takes a few microseconds (run 23 measured 0.7-1.3 ms of host time for the two calls, more
than the split saved on the GPU). The first plan (at capture) goes through plan(), which sets up the
wrapper; later plans call the same compiled scheduler directly with this step's lengths (host arrays),
write the page list into the one index buffer both calls read, and leave everything else as the capture
set it. The scheduler writes the work list into the wrapper's int workspace (a copy on the stream, as
plan() does); the offsets it returns must equal the capture's (`launch_key`, checked before each
replay, as for every extend graph). This reads three private attributes of FlashInfer 0.7's wrapper
(`_cached_module`, the two workspaces, `_max_total_num_rows`); the GPU tests pin the behaviour.
"""

from __future__ import annotations

import numpy as np
import torch

from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention
from computeworker.model.cuda_graphs import GraphAttention
from computeworker.model.split_merge import merge_partial_states
from computeworker.model.split_plan import split_layout


class SplitExtendAttention:
    """Split-KV paged prefill for `batch_size` sequences in `num_rows` padded query rows over
    `num_chunks` prefix chunks.

    State: two CUDA-graph-mode fa3 wrappers sharing one page-list buffer, the q copies, the partial
    results and the count of real rows (device). Must hold: `plan` before each `attend` of a step; one
    step at a time (the buffers are this object's own, not shared between graphs)."""

    def __init__(
        self,
        attention: FlashInferAttention,
        *,
        batch_size: int,
        num_rows: int,
        num_chunks: int,
        max_pages: int,
        tail_takes_a_chunk: bool = True,
        page_ids: torch.Tensor | None = None,
    ) -> None:
        """num_chunks: prefix chunks of the chunk call. tail_takes_a_chunk: the causal call also takes one
        more prefix chunk and runs beside the chunk call (a second stream, a parallel branch in a graph)
        rather than after it (split_plan). page_ids: the int32 [max_pages] buffer both calls read the
        batch's page list from (a caller that stages it there itself passes None to `plan`); by default
        one of its own."""
        import flashinfer

        if batch_size < 1 or num_chunks < 1 or num_rows < batch_size or max_pages < batch_size:
            raise ValueError("need batch_size >= 1, num_chunks >= 1, num_rows and max_pages >= batch_size")
        self._attention = attention
        self.shape: AttentionShape = attention.shape
        self.batch_size = batch_size
        self.num_rows = num_rows
        self.num_chunks = num_chunks
        self.tail_takes_a_chunk = tail_takes_a_chunk
        device, dtype = attention.device, attention.dtype
        self._side = torch.cuda.Stream(device) if tail_takes_a_chunk else None
        i32 = dict(dtype=torch.int32, device=device)
        if page_ids is not None and (page_ids.dtype != torch.int32 or page_ids.shape != (max_pages,)):
            raise ValueError(
                f"page_ids must be int32 [{max_pages}], got {page_ids.dtype} {tuple(page_ids.shape)}"
            )
        # the batch's page list, read by both calls
        self._page_ids = torch.zeros(max_pages, **i32) if page_ids is None else page_ids

        def wrapper(num_seqs: int) -> object:
            return flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                attention.workspace,
                "NHD",
                backend="fa3",
                use_cuda_graph=True,
                qo_indptr_buf=torch.zeros(num_seqs + 1, **i32),
                paged_kv_indptr_buf=torch.zeros(num_seqs + 1, **i32),
                paged_kv_indices_buf=self._page_ids,
                paged_kv_last_page_len_buf=torch.zeros(num_seqs, **i32),
            )

        self._chunks = wrapper(num_chunks * batch_size)
        self._tail = wrapper(batch_size)
        heads, dim = self.shape.num_qo_heads, self.shape.head_dim
        self.q_copies = torch.zeros((num_chunks, num_rows, heads, dim), dtype=dtype, device=device)
        self._chunk_out = torch.zeros_like(self.q_copies)
        self._chunk_lse = torch.zeros((num_chunks, num_rows, heads), dtype=torch.float32, device=device)
        self._tail_out = torch.zeros((num_rows, heads, dim), dtype=dtype, device=device)
        self._tail_lse = torch.zeros((num_rows, heads), dtype=torch.float32, device=device)
        self._num_rows_real = torch.zeros(1, **i32)
        self._last_rows_real = -1  # the value in _num_rows_real (a fill is a launch: skipped when equal)
        self._launch_key: tuple[int, ...] | None = None  # cached until a plan rewrites a plan info
        self._planned = False
        self._last_lens: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # of the last plan
        self._scheduled: dict[int, bytes] = {}  # per wrapper: the inputs of the work list in its workspace

    @property
    def launch_key(self) -> tuple[int, ...]:
        """Both calls' launch records (FlashInfer's plan info: workspace offsets of the work lists); a
        graph is valid only while it equals the capture's."""
        if self._launch_key is None:  # reading FlashInfer's plan info costs ~30 us: once per new plan
            chunks = tuple(int(x) for x in self._chunks._plan_info)  # type: ignore[attr-defined]
            self._launch_key = chunks + tuple(int(x) for x in self._tail._plan_info)  # type: ignore[attr-defined]
        return self._launch_key

    def plan(self, q_lens: tuple[int, ...], kv_lens: tuple[int, ...], page_ids: torch.Tensor | None) -> None:
        """Plan both calls for sequences of q_lens new tokens over kv_lens tokens whose pages, in order,
        are `page_ids` (int32 on the device; None: the caller writes them into the page buffer before the
        calls run). ValueError if the batch does not fit."""
        if len(q_lens) != self.batch_size:
            raise ValueError(f"planned for {self.batch_size} sequences, got {len(q_lens)}")
        if page_ids is not None and page_ids.shape[0] > self._page_ids.shape[0]:
            raise ValueError(f"{page_ids.shape[0]} pages exceed the page buffer ({self._page_ids.shape[0]})")
        if page_ids is None and self._planned and self._last_lens == (q_lens, kv_lens):
            return  # the same lengths as the last plan: its layout, row count and work lists all stand
        layout = split_layout(
            q_lens,
            kv_lens,
            page_size=self.shape.page_size,
            num_chunks=self.num_chunks,
            num_rows=self.num_rows,
            tail_takes_a_chunk=self.tail_takes_a_chunk,
        )
        if page_ids is not None:
            self._page_ids[: page_ids.shape[0]].copy_(page_ids, non_blocking=True)
        if layout.num_rows_real != self._last_rows_real:
            self._num_rows_real.fill_(layout.num_rows_real)
            self._last_rows_real = layout.num_rows_real
        plan = self._schedule if self._planned else self._first_plan
        plan(self._chunks, layout.chunk_qo_indptr, layout.chunk_kv_start, layout.chunk_kv_len, False)
        plan(self._tail, layout.tail_qo_indptr, layout.tail_kv_start, layout.tail_kv_len, True)
        self._planned = True
        self._last_lens = (q_lens, kv_lens)

    def attend(self, kv_layer: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Attention of the q in `q_copies` over the planned KV of `kv_layer`; writes and returns `out`
        [num_rows, H, D] (padding rows zero)."""
        c, r = self.num_chunks, self.num_rows
        heads, dim = self.shape.num_qo_heads, self.shape.head_dim

        def tail() -> None:
            self._tail.run(  # type: ignore[attr-defined]
                self.q_copies[0], kv_layer, out=self._tail_out, lse=self._tail_lse, return_lse=True
            )

        main = torch.cuda.current_stream(kv_layer.device)
        if self._side is not None:  # beside the chunk call: its CTAs take the SMs the chunk call leaves
            self._side.wait_stream(main)
            with torch.cuda.stream(self._side):
                tail()
        self._chunks.run(  # type: ignore[attr-defined]
            self.q_copies.view(c * r, heads, dim),
            kv_layer,
            out=self._chunk_out.view(c * r, heads, dim),
            lse=self._chunk_lse.view(c * r, heads),
            return_lse=True,
        )
        if self._side is None:
            tail()
        else:
            main.wait_stream(self._side)
        return merge_partial_states(
            self._chunk_out, self._chunk_lse, self._tail_out, self._tail_lse, self._num_rows_real, out
        )

    def _first_plan(
        self, wrapper: object, qo_indptr: np.ndarray, kv_start: np.ndarray, kv_len: np.ndarray, causal: bool
    ) -> None:
        """FlashInfer's plan(), which also sets the wrapper up (module, dtypes, scale, row bound)."""
        s, a = self.shape, self._attention
        num_seqs = len(kv_len)
        self._launch_key = None
        wrapper.plan(  # type: ignore[attr-defined]
            torch.from_numpy(qo_indptr),
            torch.from_numpy(kv_start),  # read as each sequence's first page, not as a cumulative sum
            self._page_ids[: int(kv_start[:num_seqs].max()) + 1],
            torch.ones(num_seqs, dtype=torch.int32),
            num_qo_heads=s.num_qo_heads,
            num_kv_heads=s.num_kv_heads,
            head_dim_qk=s.head_dim,
            page_size=s.page_size,
            causal=causal,
            sm_scale=a.sm_scale,
            q_data_type=a.dtype,
            kv_data_type=a.dtype,
            seq_lens=torch.from_numpy(kv_len),
        )

    def _schedule(
        self, wrapper: object, qo_indptr: np.ndarray, kv_start: np.ndarray, kv_len: np.ndarray, causal: bool
    ) -> None:
        """fa3's compiled scheduler alone, with the arguments plan() would pass it in CUDA-graph mode.
        Skipped when the inputs equal the last ones: the wrapper's workspace already holds that work list
        (only this wrapper's plans write it), and the offsets are the same."""
        key = qo_indptr.tobytes() + kv_start.tobytes() + kv_len.tobytes() + bytes([causal])
        if self._scheduled.get(id(wrapper)) == key:
            return
        s = self.shape
        w = wrapper
        self._launch_key = None
        w._plan_info = w._cached_module.plan(  # type: ignore[attr-defined]
            w._float_workspace_buffer,  # type: ignore[attr-defined]
            w._int_workspace_buffer,  # type: ignore[attr-defined]
            w._pin_memory_int_workspace_buffer,  # type: ignore[attr-defined]
            torch.from_numpy(qo_indptr),
            torch.from_numpy(kv_start),
            torch.from_numpy(kv_len),
            w._max_total_num_rows,  # type: ignore[attr-defined]
            len(kv_len),
            s.num_qo_heads,
            s.num_kv_heads,
            s.page_size,
            True,  # CUDA-graph mode: work lists sized for the capture's row bound
            s.head_dim,
            s.head_dim,
            causal,
            -1,  # no sliding window
        )
        self._scheduled[id(wrapper)] = key


class SplitGraphAttention(GraphAttention):
    """GraphAttention over a SplitExtendAttention: RoPE writes the rotated q into the split's per-chunk
    copies (the fused path), or q is copied there (RADIXKV_FUSED_ROPE_STORE=0), then the split runs."""

    def __init__(
        self, split: SplitExtendAttention, kv_rows: torch.Tensor, shape: AttentionShape, *, out: torch.Tensor
    ) -> None:
        super().__init__(split, kv_rows, shape, strided_q=True, out=out)
        self._split = split
        self._out_buf = out  # GraphAttention keeps it as optional; here it is always given
        self._rope_q_copies = split.q_copies  # the fused path's RoPE writes q straight into the copies

    def _attend_rotated(self, q: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
        return self._split.attend(kv_layer, self._out_buf)

    def _attend(self, q: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
        copies = self._split.q_copies
        t = q.shape[0]
        copies[:, :t].copy_(q.reshape(1, t, *copies.shape[2:]).expand(copies.shape[0], -1, -1, -1))
        return self._attend_rotated(q, kv_layer)
