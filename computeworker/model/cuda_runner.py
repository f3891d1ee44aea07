"""The model as a CUDA worker runs it: the fused forward (FlashInfer norm / RoPE / activation kernels)
where it applies, decode steps and small prefills over cached prefixes through CUDA graphs, and every
kernel warmed before the first request.

    engine.step ──► CudaModelRunner.forward ──┬─ decode batch that fits a graph ─► DecodeGraphs.run
                                              ├─ small extend that fits a graph ─► ExtendGraphs.run
                                              ├─ fused path applies ─────────────► LlamaCudaForward
                                              └─ otherwise ──────────────────────► LlamaModel.forward

`bind(pool, attention, page_size)` runs once per pool mapping (the runtime calls it after mapping the
pool a Welcome names): it JIT-loads the attention kernels, runs one eager prefill and one decode on a
scratch pool (never the shared one: its pages belong to the daemon), reserves the RoPE table for the
whole context, and captures the decode and extend graphs against the mapped pool.
"""

from __future__ import annotations

import logging
import time

import torch

from computeworker.model.batch import AttentionBackend, ForwardBatch
from computeworker.model.cuda_graphs import DecodeGraphs, graph_batch_sizes
from computeworker.model.extend_graphs import (
    DEFAULT_BACKEND,
    DEFAULT_BATCH_SIZES,
    DEFAULT_TOKEN_BUCKETS,
    ExtendGraphs,
)
from computeworker.model.forward_batch import SeqChunk, build_forward_batch
from computeworker.model.llama import LlamaModel
from computeworker.model.llama_cuda import LlamaCudaForward, fused_path_applies

log = logging.getLogger(__name__)

_SCRATCH_PAGES = 8


class CudaModelRunner:
    """A PagedModel (see computeworker.engine.engine) over a LlamaModel on CUDA.

    State: the captured decode and extend graphs of the current pool (replaced by every `bind`). Must
    hold: `bind` before serving from a pool, for graphs to be used; one thread at a time.

    extend_batch_sizes / extend_token_buckets: the (sequences, padded new tokens) shapes captured for
    prefill steps; () for either turns extend graphs off. extend_backend: FlashInfer's prefill backend in
    those graphs ("auto" by default: fa2 for the 128-token bucket, fa3 above it on Hopper; see extend_graphs)."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        cuda_graphs: bool = True,
        max_graph_batch: int = 16,
        extend_batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
        extend_token_buckets: tuple[int, ...] = DEFAULT_TOKEN_BUCKETS,
        extend_backend: str = DEFAULT_BACKEND,
    ) -> None:
        if max_graph_batch < 1:
            raise ValueError(f"max_graph_batch must be >= 1, got {max_graph_batch}")
        self.model = model
        self._fused = LlamaCudaForward(model) if fused_path_applies(model.device, model.dtype) else None
        self.cuda_graphs = cuda_graphs and self._fused is not None
        self.max_graph_batch = max_graph_batch
        self.extend_batch_sizes = extend_batch_sizes
        self.extend_token_buckets = extend_token_buckets
        self.extend_backend = extend_backend
        self._graphs: DecodeGraphs | None = None
        self._extend: ExtendGraphs | None = None
        self.num_graph_steps = 0  # decode steps replayed from a graph (tests and logs read it)
        self.num_extend_graph_steps = 0  # prefill steps replayed from a graph
        self.num_eager_steps = 0

    @property
    def fused(self) -> bool:
        return self._fused is not None

    def forward(
        self,
        batch: ForwardBatch,
        kv_pool: torch.Tensor,
        attention: AttentionBackend,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Same contract as LlamaModel.forward; graph logits are valid until the next call."""
        graphs = self._graphs
        if (
            graphs is not None
            and not all_logits
            and kv_pool.data_ptr() == graphs.pool.data_ptr()
            and graphs.can_run(batch)
        ):
            self.num_graph_steps += 1
            return graphs.run(batch)
        extend = self._extend
        if (
            extend is not None
            and not all_logits
            and kv_pool.data_ptr() == extend.pool.data_ptr()
            and extend.can_run(batch)
        ):
            logits = extend.run(batch)
            if logits is not None:
                self.num_extend_graph_steps += 1
                return logits
        self.num_eager_steps += 1
        if self._fused is not None:
            return self._fused(batch, kv_pool, attention, all_logits)
        return self.model.forward(batch, kv_pool, attention, all_logits)

    def bind(self, pool: torch.Tensor, attention: AttentionBackend) -> float:
        """Warm every kernel the worker will run and capture the decode graphs for `pool` ([layers,
        pages, 2, page_size, kv_heads, head_dim]). Writes only to a scratch pool. Returns seconds."""
        from computeworker.model.attention_flashinfer import FlashInferAttention

        start = time.perf_counter()
        self._graphs = None
        self._extend = None
        spec = self.model.spec
        page_size = int(pool.shape[3])
        attention_s = attention.warmup() if isinstance(attention, FlashInferAttention) else 0.0
        scratch = torch.zeros(
            (pool.shape[0], _SCRATCH_PAGES, *pool.shape[2:]), dtype=pool.dtype, device=pool.device
        )
        forward_start = time.perf_counter()
        if self._fused is not None:
            self._fused.reserve_positions(spec.max_position_embeddings)
        self._warm_forward(scratch, attention, page_size)
        forward_s = time.perf_counter() - forward_start
        graphs_s = 0.0
        if self.cuda_graphs and isinstance(attention, FlashInferAttention):
            assert self._fused is not None
            graphs = DecodeGraphs(
                self._fused,
                attention,
                pool,
                batch_sizes=graph_batch_sizes(self.max_graph_batch),
                max_pages_per_seq=-(-spec.max_position_embeddings // page_size) + 1,
            )
            graphs_s = graphs.capture(scratch)
            self._graphs = graphs
            if self.extend_batch_sizes and self.extend_token_buckets:
                extend = ExtendGraphs(
                    self._fused,
                    attention,
                    pool,
                    max_pages_per_seq=-(-spec.max_position_embeddings // page_size) + 1,
                    batch_sizes=self.extend_batch_sizes,
                    token_buckets=self.extend_token_buckets,
                    backend=self.extend_backend,
                )
                graphs_s += extend.capture(scratch)
                self._extend = extend
        del scratch
        seconds = time.perf_counter() - start
        log.info(
            "kernels warmed in %.1f s (attention %.1f s, %s forward %.1f s, decode + extend graphs %.1f s%s)",
            seconds,
            attention_s,
            "fused" if self._fused is not None else "torch",
            forward_s,
            graphs_s,
            f" for batch sizes up to {self.max_graph_batch}" if self._graphs is not None else ": off",
        )
        return seconds

    def _warm_forward(self, scratch: torch.Tensor, attention: AttentionBackend, page_size: int) -> None:
        """One prefill (two sequences, one over a cached page) and one decode step on the scratch pool:
        loads the norm / RoPE / activation kernels and the matmul heuristics for both shapes."""
        device = scratch.device
        pages = list(range(_SCRATCH_PAGES))
        n = page_size * 2 + 3
        prefill = build_forward_batch(
            [SeqChunk([1] * n, 0, pages[:4]), SeqChunk([2] * 5, page_size, pages[4:])], page_size, device
        )
        self.forward(prefill, scratch, attention)
        decode = build_forward_batch(
            [SeqChunk([3], n, pages[:4]), SeqChunk([4], page_size + 5, pages[4:])], page_size, device
        )
        self.forward(decode, scratch, attention)
        torch.cuda.synchronize(device)
        self.num_eager_steps -= 2  # warm-up passes are not served steps
