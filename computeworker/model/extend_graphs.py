"""Small prefills over cached prefixes ("extend" steps) replayed from CUDA graphs.

A 100-token question over a 10k-token cached prefix on the 8B model needs ~3.5 ms of weight reads on
the GPU, but ~400 launches issued from Python cost ~7 ms of host time: eager, the step is host-bound.
One graph per (number of sequences, padded token count) replays the whole fused forward with one launch.

    static inputs   input_ids [T_pad], positions [T_pad], K/V write rows [T_pad], qo_indptr [n+1], staged
                    by the host in one buffer that the graph's first node copies in (graph_inputs); a
                    kernel then converts qo_indptr into the int32 buffer the forward reads
    attention       a FlashInfer paged-prefill wrapper in CUDA-graph mode, fixed batch size n, fixed
                    qo / kv indptr, page-id and last-page-len buffers; plan() runs on the host before
                    each replay and rewrites them (and the work schedule in its int workspace)
    the pool        pool[layer] addresses: a new pool mapping needs a new capture
    output          logits [n, vocab] float32 (each sequence's last token), overwritten by the next replay

Padding: a step of T real tokens replays the graph of the smallest bucket >= T. The T_pad - T padding
tokens (id 0, position 0) lie past qo_indptr[n] = T, so the attention kernel never reads or computes them
(their rows of the attention output buffer keep whatever finite values an earlier layer or replay left);
their rows through the linear layers are independent of the real ones. Their K/V writes are aimed at the first real token's slot, and that token's
K/V is written again right after, so the pool ends up exactly as an eager step leaves it and no slot
outside the batch's own write slots is touched.

FlashInfer's constraints (0.7.2, BatchPrefillWithPagedKVCacheWrapper): in CUDA-graph mode the batch size
is fixed by the buffers, and the first plan() fixes the largest total row count; the query tensor given
to run() at capture has exactly that many rows. So each graph is planned first (and captured) with
T_pad rows, and later plans with T <= T_pad rows reuse the same launch shape.

Backend: "auto" by default. On Hopper: "fa3-split" for one sequence in the 128- and 256-token buckets,
fa2 for more sequences in the 128-token bucket, fa3 for the larger buckets; fa2 on other GPUs. fa3 runs
one work item per (sequence, query head, 128-row tile) and never splits the KV; fa2 packs a GQA group's
query heads into one tile and, in CUDA-graph mode, always splits the KV across CTAs and merges the
partial results (a second kernel), but runs on mma.sync at about half fa3's rate. fa3-split
(computeworker.model.split_extend) splits the cached prefix into chunks that fa3 runs side by side, plus
a causal call over the tail, merged by log-sum-exp: 4 chunks for one 128-row tile fill 128 of 132 SMs.
Measured on an H200 (bench/extend_attention_bench.py, attention alone, 32 layers, ms fa2 / fa3 /
fa3-split; runs 56 and 59):

    100 over 10k  2.46 / 4.56 / 1.55     100 over 2k 1.03 / 1.09 / 0.63    (bucket 128)
    200 over 10k  4.62 / 4.55 / 2.70     200 over 2k 1.68 / 1.15 / 0.85    (bucket 256)
    2 x 100 over 2k  1.67 / 1.10 / 1.53  (two sequences: split into 2 chunks loses to fa3, so "auto"
                                         keeps fa3-split to one sequence)

The cached 100-over-10k step of the 8B model: 7.30 ms with fa3-split against 8.18 ms with fa2 (run 57).
(A Triton split-KV kernel that needs no host plan, commit 260cb31, run 27, was correct but slower.)

Split-KV and graphs: a replay runs the kernels, grid sizes and workspace offsets the capture-time plan
chose; only the buffers plan() rewrites (indptrs, page ids, the work schedule in the int workspace, the
KV chunk size) change. fa2's planner (scheduler.cuh, PrefillSplitQOKVIndptr) in CUDA-graph mode always
takes the split-KV variant (merge kernel included) and pads the grid to max(2 CTAs per SM / KV heads,
the tile bound of T_pad rows), with a per-CTA valid mask; without a graph it splits only long KV. So the
launch configuration is fixed per graph, and a short prefix runs as one KV chunk per tile through the
same kernels. That is FlashInfer's behaviour, not a contract: every replay compares the plan's launch
record (PrefillPlanInfo: grid, tile size, split flag, workspace offsets) with the capture's, and a step
whose plan differs runs eagerly instead of replaying a graph that would read the wrong schedule.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from computeworker.model.attention_flashinfer import FlashInferAttention, qo_indptr_of
from computeworker.model.batch import ForwardBatch
from computeworker.model.cuda_graphs import ForwardFn, GraphAttention
from computeworker.model.graph_inputs import GraphInputs
from computeworker.model.split_extend import SplitExtendAttention, SplitGraphAttention
from computeworker.model.split_plan import split_chunks_for

log = logging.getLogger(__name__)

DEFAULT_TOKEN_BUCKETS = (128, 256, 512)
DEFAULT_BATCH_SIZES = (1, 2, 3, 4)
DEFAULT_BACKEND = "auto"
BACKENDS = ("auto", "fa2", "fa3", "fa3-split")
FA2_MAX_BUCKET = 128  # "auto": fa2 up to this many padded tokens, fa3 above (on sm90)
MAX_SPLIT_CHUNKS = 4  # fa3-split: at most this many prefix chunks (each a copy of q in the graph)


def graph_prefill_wrapper(
    attention: FlashInferAttention, backend: str, batch_size: int, max_pages: int
) -> object:
    """A FlashInfer paged-prefill wrapper in CUDA-graph mode on `attention`'s workspace: fixed buffers for
    `batch_size` sequences and at most `max_pages` pages in all."""
    import flashinfer

    i32 = dict(dtype=torch.int32, device=attention.device)
    return flashinfer.BatchPrefillWithPagedKVCacheWrapper(
        attention.workspace,
        "NHD",
        backend=backend,
        use_cuda_graph=True,
        qo_indptr_buf=torch.zeros(batch_size + 1, **i32),
        paged_kv_indptr_buf=torch.zeros(batch_size + 1, **i32),
        paged_kv_indices_buf=torch.zeros(max_pages, **i32),
        paged_kv_last_page_len_buf=torch.zeros(batch_size, **i32),
    )


def bucket_backend(
    backend: str, num_tokens: int, batch_size: int, num_qo_heads: int, device: torch.device
) -> tuple[str, int]:
    """(backend, prefix chunks) of the graph for `batch_size` sequences in `num_tokens` padded tokens.
    "fa2" and "fa3" are FlashInfer's (chunks 1); "fa3-split" is fa3 over prefix chunks (split_extend),
    taken only where splitting fills more SMs (split_chunks_for >= 2), plain fa3 elsewhere. "auto" on
    Hopper: fa3-split for one sequence where it applies, else fa2 up to FA2_MAX_BUCKET tokens and fa3
    above; fa2 on other GPUs."""
    hopper = torch.cuda.get_device_capability(device)[0] == 9
    if backend in ("fa3", "fa3-split") and not hopper:
        raise ValueError(f"extend attention {backend!r} needs a Hopper GPU (sm90); use 'auto' or 'fa2'")
    if backend in ("fa2", "fa3"):
        return backend, 1
    if backend == "auto" and not hopper:
        return "fa2", 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    chunks = split_chunks_for(batch_size, num_tokens, num_qo_heads, num_sms, MAX_SPLIT_CHUNKS)
    if backend == "fa3-split":
        return ("fa3-split", chunks) if chunks >= 2 else ("fa3", 1)
    if batch_size == 1 and chunks >= 2:
        return "fa3-split", chunks
    return ("fa2" if num_tokens <= FA2_MAX_BUCKET else "fa3"), 1


def pick_bucket(num_tokens: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= num_tokens (buckets ascending), or None if none is large enough."""
    return next((b for b in buckets if b >= num_tokens), None)


def extend_fits(
    batch: ForwardBatch,
    *,
    batch_sizes: tuple[int, ...],
    token_buckets: tuple[int, ...],
    page_size: int,
    max_pages_per_seq: int,
) -> bool:
    """Whether a captured extend graph can run `batch`: not a pure decode batch (decode graphs take
    those), a captured sequence count, a token count within the largest bucket, at least one new token
    per sequence, and every sequence's pages within the page buffer."""
    if batch.is_decode or batch.num_seqs not in batch_sizes:
        return False
    if min(batch.q_lens) < 1 or pick_bucket(sum(batch.q_lens), token_buckets) is None:
        return False
    return max(-(-n // page_size) for n in batch.kv_lens) <= max_pages_per_seq


@dataclass(slots=True)
class _Slot:
    """Everything one (batch size, token bucket) graph owns."""

    batch_size: int
    num_tokens: int  # the bucket: rows the graph computes
    backend: str  # "fa2", "fa3" or "fa3-split"
    wrapper: object  # a CUDA-graph-mode FlashInfer paged-prefill wrapper, or a SplitExtendAttention
    batch: ForwardBatch  # static inputs the graph reads: views of `inputs`, and qo_indptr (int32)
    inputs: GraphInputs  # staged per step; extra = qo_indptr, copied into batch.qo_indptr inside the graph
    out: torch.Tensor  # [num_tokens, heads, head_dim] the attention output buffer, shared by all layers
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None
    plan_key: tuple[int, ...] | None = None  # the capture-time plan's launch record

    @property
    def stages_pages(self) -> bool:
        """The split attention reads its page list from `inputs` (staged per step, not planned)."""
        return isinstance(self.wrapper, SplitExtendAttention)


class ExtendGraphs:
    """CUDA graphs of `forward` for prefill steps of a few sequences and few new tokens over one pool.

    State: one captured graph per (batch size, token bucket) after `capture`. Must hold: `pool` stays
    mapped while this object is used; `run` only for batches `can_run` accepts; the logits `run` returns
    are valid until the next `run` of any graph. Not thread-safe (one compute thread)."""

    def __init__(
        self,
        forward: ForwardFn,
        attention: FlashInferAttention,
        pool: torch.Tensor,
        *,
        max_pages_per_seq: int,
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
        token_buckets: tuple[int, ...] = DEFAULT_TOKEN_BUCKETS,
        backend: str = DEFAULT_BACKEND,
    ) -> None:
        """backend: FlashInfer's paged-prefill backend for these graphs, "fa2", "fa3" (sm90 only) or
        "auto" (per token bucket, see `bucket_backend`)."""
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_sizes}")
        if not token_buckets or min(token_buckets) < max(batch_sizes):
            raise ValueError(f"token buckets {token_buckets} must hold at least one token per sequence")
        if max_pages_per_seq < 1:
            raise ValueError("max_pages_per_seq must be >= 1")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self._forward = forward
        self._attention = attention
        self.pool = pool
        self.shape = attention.shape
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.token_buckets = tuple(sorted(set(token_buckets)))
        self.max_pages_per_seq = max_pages_per_seq
        self.backend = backend
        self.num_plan_mismatches = 0  # steps whose plan differed from the capture's (run eagerly)
        self._mempool = torch.cuda.graph_pool_handle()
        device = attention.device
        i32 = dict(dtype=torch.int32, device=device)
        self._slots: dict[tuple[int, int], _Slot] = {}
        with torch.inference_mode():
            for bs in self.batch_sizes:
                for num_tokens in self.token_buckets:
                    slot_backend, chunks = bucket_backend(
                        backend, num_tokens, bs, self.shape.num_qo_heads, device
                    )
                    wrapper: object
                    max_pages = bs * max_pages_per_seq
                    if slot_backend == "fa3-split":  # its page list is staged with the other inputs
                        inputs = GraphInputs(num_tokens, bs + 1, device, max_pages=max_pages)
                        wrapper = SplitExtendAttention(  # the tail call takes one of the parts
                            attention,
                            batch_size=bs,
                            num_rows=num_tokens,
                            num_chunks=chunks - 1,
                            max_pages=max_pages,
                            page_ids=inputs.pages,
                        )
                    else:
                        inputs = GraphInputs(num_tokens, bs + 1, device)
                        wrapper = graph_prefill_wrapper(attention, slot_backend, bs, max_pages)
                    zeros = torch.zeros(num_tokens, dtype=torch.int64, device=device)
                    q_lens = (num_tokens - bs + 1,) + (1,) * (bs - 1)  # the capture-time layout
                    batch = ForwardBatch(
                        input_ids=inputs.input_ids,
                        positions=inputs.positions,
                        qo_indptr=torch.zeros(bs + 1, **i32),
                        kv_indptr=torch.zeros(bs + 1, **i32),
                        kv_page_ids=torch.zeros(1, **i32),
                        kv_last_page_len=torch.ones(bs, **i32),
                        write_page_ids=zeros.clone(),
                        write_slots=zeros.clone(),
                        q_lens=q_lens,
                        kv_lens=q_lens,
                    )
                    out = torch.zeros(
                        (num_tokens, self.shape.num_qo_heads, self.shape.head_dim),
                        dtype=attention.dtype,
                        device=device,
                    )
                    slot = _Slot(bs, num_tokens, slot_backend, wrapper, batch, inputs, out)
                    self._slots[(bs, num_tokens)] = slot

    def can_run(self, batch: ForwardBatch) -> bool:
        return extend_fits(
            batch,
            batch_sizes=self.batch_sizes,
            token_buckets=self.token_buckets,
            page_size=self.shape.page_size,
            max_pages_per_seq=self.max_pages_per_seq,
        )

    @torch.inference_mode()
    def capture(self, scratch_pool: torch.Tensor) -> float:
        """Plan each graph with its full token count, run it once eagerly on `scratch_pool` (loads the
        kernels and lazily built buffers outside the capture), then capture it against the real pool.
        Capturing launches nothing, so the real pool is not touched. Returns seconds taken."""
        if scratch_pool.shape[0] != self.pool.shape[0] or scratch_pool.shape[2:] != self.pool.shape[2:]:
            raise ValueError("scratch pool layout differs from the pool's")
        start = time.perf_counter()
        num_scratch = int(scratch_pool.shape[1])
        side = torch.cuda.Stream(self._attention.device)
        for key in sorted(self._slots, key=lambda k: (-k[1], -k[0])):  # largest first: reuse its memory
            slot = self._slots[key]
            s = slot.batch
            num_pages = sum(-(-n // self.shape.page_size) for n in s.kv_lens)
            # Capture-time pages cycle through the scratch pool: reading repeats is harmless, and the
            # write rows (all zero here) only ever land in the scratch pool.
            page_ids = torch.arange(num_pages, dtype=torch.int32, device=self._attention.device) % num_scratch
            slot.inputs.stage(
                qo_indptr_of(s.q_lens).numpy(), page_ids.cpu().numpy() if slot.stages_pages else None
            )
            self._plan(slot, s.q_lens, s.kv_lens, page_ids)
            slot.plan_key = plan_launch_key(slot.wrapper)
            attn: GraphAttention
            kv_rows = slot.inputs.kv_rows
            if isinstance(slot.wrapper, SplitExtendAttention):
                attn = SplitGraphAttention(slot.wrapper, kv_rows, self.shape, out=slot.out)
            else:
                # fa2's kernel reads q through its row stride: the q slice of the QKV output needs no copy.
                attn = GraphAttention(
                    slot.wrapper, kv_rows, self.shape, strided_q=slot.backend == "fa2", out=slot.out
                )

            def forward(pool: torch.Tensor, slot: _Slot = slot, attn: GraphAttention = attn) -> torch.Tensor:
                slot.inputs.copy_in()
                slot.batch.qo_indptr.copy_(slot.inputs.extra)  # int64 -> int32, inside the graph
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
        log.info(
            "captured extend CUDA graphs for %s sequences x %s tokens in %.1f s",
            self.batch_sizes,
            self.token_buckets,
            seconds,
        )
        return seconds

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor | None:
        """Replay the graph of batch.num_seqs sequences and the smallest bucket >= batch.num_tokens.
        Returns [num_seqs, vocab] float32 logits of each sequence's last token (the graph's output
        buffer), or None, having written nothing to the pool, when the attention plan for `batch` chose a
        launch configuration other than the captured one (the caller then runs the step eagerly).
        Raises ValueError if `can_run` is False or the graphs were not captured."""
        slot = self.prepare(batch)
        if slot is None:
            return None
        self._stage_inputs(slot, batch)
        assert slot.graph is not None and slot.logits is not None
        slot.graph.replay()
        return slot.logits

    def prepare(self, batch: ForwardBatch) -> _Slot | None:
        """The slot whose graph runs `batch`, its attention planned for it; None (counted) when the plan
        chose a launch configuration other than the captured one. ValueError as for `run`."""
        if not self.can_run(batch):
            raise ValueError("batch does not fit the captured extend graphs")
        n, num_tokens = batch.num_seqs, sum(batch.q_lens)
        bucket = pick_bucket(num_tokens, self.token_buckets)
        assert bucket is not None
        slot = self._slots[(n, bucket)]
        if slot.graph is None or slot.logits is None:
            raise ValueError("capture() first")
        self._plan(slot, batch.q_lens, batch.kv_lens, None if slot.stages_pages else batch.kv_page_ids)
        if plan_launch_key(slot.wrapper) != slot.plan_key:
            self.num_plan_mismatches += 1
            if self.num_plan_mismatches == 1:
                log.warning(
                    "extend graph (%d seqs, %d tokens): FlashInfer planned %s, captured %s; running eagerly",
                    n,
                    bucket,
                    plan_launch_key(slot.wrapper),
                    slot.plan_key,
                )
            return None
        return slot

    def _stage_inputs(self, slot: _Slot, batch: ForwardBatch) -> None:
        """Stage `batch`'s inputs (and, for the split attention, its page list) for the slot's graph, which
        copies them in, padded as the module doc says."""
        host = batch.host_inputs
        pages = host.kv_page_ids if slot.stages_pages else None
        slot.inputs.load(host, self.shape.page_size, extra=host.qo_indptr, pages=pages)

    def _plan(
        self, slot: _Slot, q_lens: tuple[int, ...], kv_lens: tuple[int, ...], page_ids: torch.Tensor | None
    ) -> None:
        """Plan the slot's attention for this step; page_ids None (split attention only): they are staged
        with the inputs."""
        if page_ids is not None:
            page_ids = page_ids.to(torch.int32)
        if isinstance(slot.wrapper, SplitExtendAttention):
            slot.wrapper.plan(q_lens, kv_lens, page_ids)
        else:
            assert page_ids is not None
            self._attention.plan_prefill(slot.wrapper, qo_indptr_of(q_lens), kv_lens, page_ids)


def plan_launch_key(wrapper: object) -> tuple[int, ...]:
    """The launch record of the wrapper's last plan (FlashInfer's PrefillPlanInfo as integers: padded grid,
    tile size, split-KV flag, workspace offsets). A graph replay is valid only while it equals the
    capture's. Read from a private attribute: FlashInfer exposes no public view of the plan's decision."""
    if isinstance(wrapper, SplitExtendAttention):
        return wrapper.launch_key
    return tuple(int(x) for x in wrapper._plan_info)  # type: ignore[attr-defined]
