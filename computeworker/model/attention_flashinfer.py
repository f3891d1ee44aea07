"""FlashInfer paged attention over the shared KV pool (CUDA workers).

One `FlashInferAttention` per worker. `begin(batch)` plans once per forward pass; every layer's
`forward` then (1) scatters the new tokens' K/V into the leased pages of that layer and (2) runs one
attention kernel over each sequence's whole KV, cached prefix pages included, read in place::

    kv_layer = pool[layer]            [pages, 2, page_size, kv_heads, head_dim]   (FlashInfer NHD)
    row(page, kv, slot) = (page * 2 + kv) * page_size + slot      in kv_layer.view(-1, heads, dim)

Which kernel:
    every sequence adds one token  -> BatchDecodeWithPagedKVCacheWrapper (tensor cores for GQA)
    anything else (mixed batches)  -> BatchPrefillWithPagedKVCacheWrapper, causal, bottom-right aligned
                                      (a sequence's q_len new tokens are the last q_len of its kv_len)
                                      "fa3" on Hopper (sm90), "fa2" elsewhere

The plan is built from the batch's host copies (q_lens, kv_lens), so begin() never waits on the GPU.
Both wrappers share one float workspace, allocated once: only one of them runs in a forward pass, and
the kernels of one stream run in order.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from computeworker.model.batch import ForwardBatch

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_BYTES = 128 * 1024 * 1024
_FA3_HEAD_DIMS = (64, 128, 256)


@dataclass(frozen=True, slots=True)
class AttentionShape:
    """Head geometry of one model, fixed for a worker's lifetime."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int

    def __post_init__(self) -> None:
        for name in ("num_qo_heads", "num_kv_heads", "head_dim", "page_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_qo_heads % self.num_kv_heads:
            raise ValueError(
                f"num_qo_heads ({self.num_qo_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads


def pick_prefill_backend(device: torch.device, head_dim: int) -> str:
    """ "fa3" on Hopper (compute capability 9.x) for the head dims FA3 instantiates, else "fa2"."""
    major, _ = torch.cuda.get_device_capability(device)
    return "fa3" if major == 9 and head_dim in _FA3_HEAD_DIMS else "fa2"


def qo_indptr_of(q_lens: tuple[int, ...]) -> torch.Tensor:
    """[len(q_lens) + 1] int32 host cumulative sums of the new-token counts, starting at 0."""
    out = [0]
    for n in q_lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def host_page_table(kv_lens: tuple[int, ...], page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_indptr [B+1], kv_last_page_len [B]) as int32 CPU tensors, from the kv lengths alone.

    Every sequence has at least one token, so it owns ceil(kv_len / page_size) >= 1 pages and its last
    page holds 1..page_size tokens."""
    if any(n <= 0 for n in kv_lens):
        raise ValueError(f"every sequence needs kv_len >= 1, got {kv_lens}")
    num_pages = [(n + page_size - 1) // page_size for n in kv_lens]
    indptr = [0]
    for n in num_pages:
        indptr.append(indptr[-1] + n)
    last = [n - (p - 1) * page_size for n, p in zip(kv_lens, num_pages, strict=True)]
    return torch.tensor(indptr, dtype=torch.int32), torch.tensor(last, dtype=torch.int32)


class FlashInferAttention:
    """AttentionBackend on FlashInfer kernels. One instance per worker; not thread-safe.

    State: the two wrappers' plans (replaced by every `begin`) and the write rows of the current batch.
    Must hold: `begin(batch)` before the layers' `forward` calls of that batch; q/k/v and the pool in
    `dtype` on `device`; the pool contiguous (it is: one allocation, layer-major)."""

    def __init__(
        self,
        shape: AttentionShape,
        *,
        device: torch.device | str | int,
        dtype: torch.dtype = torch.bfloat16,
        sm_scale: float | None = None,
        prefill_backend: str | None = None,
        decode_tensor_cores: bool | None = None,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    ) -> None:
        import flashinfer  # imported here: CPU-only installs never need it

        self.shape = shape
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"FlashInferAttention needs a CUDA device, got {self.device}")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"FlashInfer attention runs in float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self.sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(shape.head_dim)
        self.prefill_backend = prefill_backend or pick_prefill_backend(self.device, shape.head_dim)
        # Tensor-core decode packs a GQA group's query heads into one MMA tile: much faster than the
        # CUDA-core decode kernel once a group has several heads (measured on H200: 4.32 vs 2.88 TB/s).
        self.decode_tensor_cores = (
            shape.group_size >= 4 if decode_tensor_cores is None else decode_tensor_cores
        )
        self._workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self._workspace, "NHD", backend=self.prefill_backend
        )
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=self.decode_tensor_cores
        )
        self._planned_decode = False
        self._planned = False
        self._k_rows = torch.empty(0, dtype=torch.int64, device=self.device)
        self._v_rows = torch.empty(0, dtype=torch.int64, device=self.device)

    @property
    def workspace(self) -> torch.Tensor:
        """The float workspace, shared with other wrappers that never run concurrently with these
        (the CUDA-graph decode wrappers: one stream, one forward at a time)."""
        return self._workspace

    # ------------------------------------------------------------------ AttentionBackend

    def begin(self, batch: ForwardBatch) -> None:
        """Plan the kernels for `batch` (host work plus small host-to-device copies; no GPU sync)."""
        s = self.shape
        num_pages = sum(-(-n // s.page_size) for n in batch.kv_lens)
        if int(batch.kv_page_ids.shape[0]) != num_pages:
            raise ValueError(
                f"kv_page_ids holds {int(batch.kv_page_ids.shape[0])} pages, kv_lens need {num_pages}"
            )
        if any(q > kv for q, kv in zip(batch.q_lens, batch.kv_lens, strict=True)):
            raise ValueError(f"q_lens {batch.q_lens} exceed kv_lens {batch.kv_lens}")
        page_ids = batch.kv_page_ids.to(self.device, torch.int32, non_blocking=True)
        if batch.is_decode:
            self.plan_decode(self._decode, batch.kv_lens, page_ids)
        else:
            self.plan_prefill(self._prefill, qo_indptr_of(batch.q_lens), batch.kv_lens, page_ids)
        self._planned_decode = batch.is_decode
        self._planned = True
        write_pages = batch.write_page_ids.to(self.device, torch.int64, non_blocking=True)
        write_slots = batch.write_slots.to(self.device, torch.int64, non_blocking=True)
        self._k_rows = write_pages * (2 * s.page_size) + write_slots
        self._v_rows = self._k_rows + s.page_size

    def plan_decode(self, wrapper: Any, kv_lens: tuple[int, ...], page_ids: torch.Tensor) -> None:
        """Plan a decode wrapper (this backend's, or a CUDA-graph one sharing its settings) for one new
        token per sequence over ``page_ids`` (int32, on the device)."""
        s = self.shape
        kv_indptr, last_page_len = host_page_table(kv_lens, s.page_size)
        wrapper.plan(
            kv_indptr,
            page_ids,
            last_page_len,
            s.num_qo_heads,
            s.num_kv_heads,
            s.head_dim,
            s.page_size,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
            sm_scale=self.sm_scale,
        )

    def plan_prefill(
        self, wrapper: Any, qo_indptr: torch.Tensor, kv_lens: tuple[int, ...], page_ids: torch.Tensor
    ) -> None:
        """Plan a prefill wrapper (this backend's, or a CUDA-graph one) for causal attention of the new
        tokens (``qo_indptr``, int32 on the host) over each sequence's whole KV."""
        s = self.shape
        kv_indptr, last_page_len = host_page_table(kv_lens, s.page_size)
        wrapper.plan(
            qo_indptr,
            kv_indptr,
            page_ids,
            last_page_len,
            s.num_qo_heads,
            s.num_kv_heads,
            s.head_dim,
            s.page_size,
            causal=True,
            sm_scale=self.sm_scale,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
    ) -> torch.Tensor:
        """Write k/v of the new tokens into `kv_layer`, then attend q over each sequence's whole KV."""
        if not self._planned:
            raise ValueError("forward() before begin(): no batch is planned")
        s = self.shape
        if kv_layer.dtype != self.dtype or q.dtype != self.dtype:
            raise ValueError(f"expected {self.dtype}, got q {q.dtype} and pool {kv_layer.dtype}")
        if kv_layer.shape[1:] != (2, s.page_size, s.num_kv_heads, s.head_dim):
            raise ValueError(f"kv_layer shape {tuple(kv_layer.shape)} does not match {s}")
        rows = kv_layer.view(-1, s.num_kv_heads, s.head_dim)  # raises if the pool is not contiguous
        rows.index_copy_(0, self._k_rows, k.reshape(-1, s.num_kv_heads, s.head_dim))
        rows.index_copy_(0, self._v_rows, v.reshape(-1, s.num_kv_heads, s.head_dim))
        q = q.reshape(-1, s.num_qo_heads, s.head_dim)
        if not q.is_contiguous():
            q = q.contiguous()
        if self._planned_decode:
            return self._decode.run(q, kv_layer)
        return self._prefill.run(q, kv_layer)

    # ------------------------------------------------------------------ worker start

    def warmup(self, kinds: tuple[str, ...] = ("prefill", "decode"), num_pages: int = 8) -> float:
        """JIT-compile (first use on a machine) and load the kernels the worker runs: "prefill" (with a
        cached prefix) and "decode". Uses a scratch pool, never the shared one. Returns seconds taken."""
        if not set(kinds) <= {"prefill", "decode"}:
            raise ValueError(f"warmup kinds must be 'prefill' or 'decode', got {kinds}")
        s = self.shape
        q_lens = [
            n for kind, n in (("prefill", num_pages * s.page_size // 2), ("decode", 1)) if kind in kinds
        ]
        start = time.perf_counter()
        scratch = torch.randn(
            (num_pages, 2, s.page_size, s.num_kv_heads, s.head_dim), dtype=self.dtype, device=self.device
        )
        page_ids = torch.arange(num_pages, dtype=torch.int32, device=self.device)
        kv_len = num_pages * s.page_size
        for q_len in q_lens:
            positions = torch.arange(kv_len - q_len, kv_len, device=self.device)
            batch = ForwardBatch(
                input_ids=torch.zeros(q_len, dtype=torch.int64, device=self.device),
                positions=positions,
                qo_indptr=torch.tensor([0, q_len], dtype=torch.int32, device=self.device),
                kv_indptr=torch.tensor([0, num_pages], dtype=torch.int32, device=self.device),
                kv_page_ids=page_ids,
                kv_last_page_len=torch.tensor([s.page_size], dtype=torch.int32, device=self.device),
                write_page_ids=positions // s.page_size,
                write_slots=positions % s.page_size,
                q_lens=(q_len,),
                kv_lens=(kv_len,),
            )
            self.begin(batch)
            q = torch.randn((q_len, s.num_qo_heads, s.head_dim), dtype=self.dtype, device=self.device)
            kv = torch.randn((q_len, s.num_kv_heads, s.head_dim), dtype=self.dtype, device=self.device)
            self.forward(0, q, kv, kv, scratch)
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        log.info(
            "flashinfer kernels ready in %.1f s (prefill %s, decode tensor cores %s)",
            seconds,
            self.prefill_backend,
            self.decode_tensor_cores,
        )
        return seconds
