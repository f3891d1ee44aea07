"""Decode steps replayed from CUDA graphs: one graph per padded batch size, captured once per pool.

A decode step of the 8B model is ~400 kernel launches; issued one by one from Python they cost more host
time than the GPU needs to run them. A graph replays them with one launch. What a graph bakes in, and
therefore what must stay put between capture and replay:

    static inputs   input_ids [bs], positions [bs], K/V write rows [bs]    (staged per step in host
                                                                            memory that the graph's first
                                                                            node copies in: graph_inputs)
    attention       a FlashInfer decode wrapper in CUDA-graph mode with fixed indptr / indices /
                    last-page-len buffers; plan() runs on the host before each replay and rewrites them
    the pool        pool[layer] addresses: a new pool mapping needs a new capture
    output          logits [bs, vocab] float32, overwritten by the next replay

A batch of n < bs sequences is padded with bs - n dummy sequences: token 0 at position 0, attending one
page (the first page of sequence 0; reading it is harmless). Their K/V writes are aimed at sequence 0's
write row and sequence 0's own K/V is written again right after, so the pool ends up exactly as an
eager step leaves it and no page outside the batch's own write slots is touched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention
from computeworker.model.batch import ForwardBatch
from computeworker.model.graph_inputs import GraphInputs
from computeworker.model.rope_store import fused_rope_store_enabled, rope_and_store

log = logging.getLogger(__name__)

# forward(batch, kv_pool, attention, all_logits) -> logits; the fused CUDA forward in practice.
ForwardFn = Callable[[ForwardBatch, torch.Tensor, object, bool], torch.Tensor]


def graph_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Padded batch sizes to capture: 1, 2, 4, 8, then steps of 8 to 32, steps of 16 to 128, steps of 32
    beyond, and max_batch itself. Raises ValueError for max_batch < 1."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = {1, 2, 4, 8, *range(16, 33, 8), *range(48, 129, 16), *range(160, max_batch + 1, 32), max_batch}
    return tuple(sorted(s for s in sizes if s <= max_batch))


@dataclass(slots=True)
class _Slot:
    """Everything one captured batch size owns."""

    batch_size: int
    wrapper: object  # flashinfer.BatchDecodeWithPagedKVCacheWrapper (CUDA-graph mode)
    batch: ForwardBatch  # static inputs the graph reads (input_ids and positions are views of `inputs`)
    inputs: GraphInputs  # staged per step; the graph copies them in
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class GraphAttention:
    """The attention backend inside a captured graph (decode or extend): planning happens outside, before
    each replay, so begin() does nothing. forward writes every row's K and V with one scatter through the
    static [rows, 2] index (padding rows aim at row 0's slot, and duplicate targets land in no defined
    order), writes row 0 again so it wins, then runs the CUDA-graph-mode wrapper. Where `fuses_rope` is
    True the fused forward calls forward_with_rope instead: RoPE and the K/V write in one Triton kernel
    that lets only token 0 write row 0's slots (computeworker.model.rope_store; -0.55 ms of a 9.3 ms cached
    step on an H200, bench/results/gpu_notes.md run 31).

    strided_q: pass q to the wrapper as the strided view it is (a slice of the fused QKV output) rather
    than a contiguous copy; only for wrappers whose kernel takes q's row stride (FlashInfer's fa2 paged
    prefill does). out: a [rows, heads, head_dim] buffer the wrapper writes instead of allocating and
    zeroing one per layer; rows the kernel does not compute (padding) keep earlier finite values, which
    only ever flow into padding rows."""

    def __init__(
        self,
        wrapper: object,
        kv_rows: torch.Tensor,
        shape: AttentionShape,
        *,
        strided_q: bool = False,
        out: torch.Tensor | None = None,
    ) -> None:
        if kv_rows.dim() != 2 or kv_rows.shape[1] != 2:
            raise ValueError(f"kv_rows must be [rows, 2] (K row, V row), got {tuple(kv_rows.shape)}")
        self._wrapper = wrapper
        self._kv_rows = kv_rows
        self._shape = shape
        self._strided_q = strided_q
        self._out = out
        # Where forward_with_rope's kernel writes the rotated q instead of q itself (None: in place).
        self._rope_q_copies: torch.Tensor | None = None
        # Read by the fused forward: when True it calls forward_with_rope instead of RoPE + forward.
        self.fuses_rope = fused_rope_store_enabled(shape.num_qo_heads, shape.num_kv_heads, shape.head_dim)

    def begin(self, batch: ForwardBatch) -> None:
        return None

    def forward_with_rope(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
    ) -> torch.Tensor:
        """forward() for q / k before RoPE: one kernel rotates q (in place, or into `_rope_q_copies`) and
        writes rotated K and V into the pool (computeworker.model.rope_store), then the attention runs."""
        rope_and_store(q, k, v, positions, cos_sin, self._kv_rows, kv_layer, q_copies=self._rope_q_copies)
        return self._attend_rotated(q, kv_layer)

    def _attend_rotated(self, q: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
        """The attention after forward_with_rope's kernel (a subclass whose q lives in copies overrides it)."""
        return self._attend(q, kv_layer)

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor
    ) -> torch.Tensor:
        s = self._shape
        rows = kv_layer.view(-1, s.num_kv_heads, s.head_dim)
        kv = kv_pairs(k.reshape(-1, s.num_kv_heads, s.head_dim), v.reshape(-1, s.num_kv_heads, s.head_dim))
        rows.index_put_((self._kv_rows,), kv)
        # Padding rows aimed at row 0's slot: write row 0 again, last, so it wins.
        rows.index_put_((self._kv_rows[:1],), kv[:1])
        return self._attend(q, kv_layer)

    def _attend(self, q: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
        s = self._shape
        q = q.reshape(-1, s.num_qo_heads, s.head_dim)
        if not (self._strided_q or q.is_contiguous()):
            q = q.contiguous()
        if self._out is None:
            return self._wrapper.run(q, kv_layer)  # type: ignore[attr-defined]
        return self._wrapper.run(q, kv_layer, out=self._out)  # type: ignore[attr-defined]


def kv_pairs(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[T, 2, heads, dim] with k in [:, 0] and v in [:, 1]. A view when v sits right after k in every
    row with the same strides (slices of the fused QKV output: [q | k | v] per token), else a copy."""
    t, heads, dim = k.shape
    if (
        v.shape == k.shape
        and v.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        and v.stride() == k.stride()
        and k.stride(2) == 1
        and k.stride(1) == dim
        and v.storage_offset() == k.storage_offset() + heads * dim
    ):
        return k.as_strided((t, 2, heads, dim), (k.stride(0), heads * dim, dim, 1))
    return torch.stack((k, v), dim=1)


class DecodeGraphs:
    """CUDA graphs of `forward` for decode batches of up to max(batch_sizes) sequences over one pool.

    State: one captured graph per batch size (after `capture`). Must hold: `pool` stays mapped while this
    object is used; `run` only for batches `can_run` accepts; the logits `run` returns are valid until the
    next `run`. Not thread-safe (one compute thread)."""

    def __init__(
        self,
        forward: ForwardFn,
        attention: FlashInferAttention,
        pool: torch.Tensor,
        *,
        batch_sizes: tuple[int, ...],
        max_pages_per_seq: int,
    ) -> None:
        import flashinfer

        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_sizes}")
        if max_pages_per_seq < 1:
            raise ValueError("max_pages_per_seq must be >= 1")
        self._forward = forward
        self._attention = attention
        self.pool = pool
        self.shape = attention.shape
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.max_pages_per_seq = max_pages_per_seq
        self._mempool = torch.cuda.graph_pool_handle()
        device = attention.device
        self._slots: dict[int, _Slot] = {}
        with torch.inference_mode():
            for bs in self.batch_sizes:
                i32 = dict(dtype=torch.int32, device=device)
                wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    attention.workspace,
                    "NHD",
                    use_cuda_graph=True,
                    use_tensor_cores=attention.decode_tensor_cores,
                    paged_kv_indptr_buffer=torch.zeros(bs + 1, **i32),
                    paged_kv_indices_buffer=torch.zeros(bs * max_pages_per_seq, **i32),
                    paged_kv_last_page_len_buffer=torch.zeros(bs, **i32),
                )
                zeros = torch.zeros(bs, dtype=torch.int64, device=device)
                inputs = GraphInputs(bs, 0, device)
                batch = ForwardBatch(
                    input_ids=inputs.input_ids,
                    positions=inputs.positions,
                    qo_indptr=torch.arange(bs + 1, **i32),
                    kv_indptr=torch.arange(bs + 1, **i32),
                    kv_page_ids=torch.zeros(bs, **i32),
                    kv_last_page_len=torch.ones(bs, **i32),
                    write_page_ids=zeros.clone(),
                    write_slots=zeros.clone(),
                    q_lens=(1,) * bs,
                    kv_lens=(1,) * bs,
                )
                self._slots[bs] = _Slot(bs, wrapper, batch, inputs)

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def can_run(self, batch: ForwardBatch) -> bool:
        """A decode batch small enough, whose sequences fit the page buffers."""
        if not batch.is_decode or batch.num_seqs > self.max_batch_size:
            return False
        ps = self.shape.page_size
        return max(-(-n // ps) for n in batch.kv_lens) <= self.max_pages_per_seq

    @torch.inference_mode()
    def capture(self, scratch_pool: torch.Tensor) -> float:
        """Warm up each batch size eagerly on `scratch_pool` (same layout as the pool, any page count),
        then capture it against the real pool. Capturing launches nothing, so the real pool is not
        touched. Returns seconds taken."""
        if scratch_pool.shape[0] != self.pool.shape[0] or scratch_pool.shape[2:] != self.pool.shape[2:]:
            raise ValueError("scratch pool layout differs from the pool's")
        start = time.perf_counter()
        side = torch.cuda.Stream(self._attention.device)
        for bs in sorted(self.batch_sizes, reverse=True):  # largest first: the others reuse its memory
            slot = self._slots[bs]
            attn = GraphAttention(slot.wrapper, slot.inputs.kv_rows, self.shape)
            self._plan(slot, (1,) * bs, slot.batch.kv_page_ids)
            slot.inputs.stage(np.zeros(0, dtype=np.int64))

            def forward(pool: torch.Tensor, slot: _Slot = slot, attn: GraphAttention = attn) -> torch.Tensor:
                slot.inputs.copy_in()
                return self._forward(slot.batch, pool, attn, False)

            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                forward(scratch_pool)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool, stream=side):
                slot.logits = forward(self.pool)
            slot.graph = graph
        torch.cuda.synchronize(self._attention.device)
        seconds = time.perf_counter() - start
        log.info("captured decode CUDA graphs for batch sizes %s in %.1f s", self.batch_sizes, seconds)
        return seconds

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Replay the graph of the smallest batch size >= batch.num_seqs. Returns [num_seqs, vocab]
        float32 logits (a view of the graph's output). Raises ValueError if `can_run` is False or the
        graphs were not captured."""
        if not self.can_run(batch):
            raise ValueError("batch does not fit the captured decode graphs")
        n = batch.num_seqs
        bs = next(b for b in self.batch_sizes if b >= n)
        slot = self._slots[bs]
        if slot.graph is None or slot.logits is None:
            raise ValueError("capture() first")
        pad = bs - n
        page_ids = batch.kv_page_ids.to(torch.int32)
        if pad:
            page_ids = torch.cat((page_ids, page_ids[:1].expand(pad)))
        self._plan(slot, batch.kv_lens + (1,) * pad, page_ids)
        slot.inputs.load(batch.host_inputs, self.shape.page_size)
        slot.graph.replay()
        return slot.logits[:n]

    def _plan(self, slot: _Slot, kv_lens: tuple[int, ...], page_ids: torch.Tensor) -> None:
        self._attention.plan_decode(slot.wrapper, kv_lens, page_ids)
