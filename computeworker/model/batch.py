"""What one forward pass sees: the batch layout (FlashInfer's ragged/paged conventions) and the attention
backend interface that the model calls for every layer.

A batch mixes prefill chunks and decode steps. For sequence b::

    positions:   0 .......... kv_len[b]-q_len[b] ............ kv_len[b]-1
                 |<---- already in the pool ---->|<-- q_len[b] new -->|
    pages:       kv_page_ids[kv_indptr[b] : kv_indptr[b+1]]   (covering all kv_len[b] positions)

The new tokens' K/V go to (write_page_ids[t], write_slots[t]); the backend writes them before it attends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class HostInputs:
    """The per-token inputs of a batch as the host built them (integer numpy arrays, the same values as the
    ForwardBatch's device tensors): CUDA graphs stage them into their own buffers in one copy instead of
    a chain of small device ops."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    write_page_ids: np.ndarray  # [T]
    write_slots: np.ndarray  # [T]
    qo_indptr: np.ndarray  # [B+1]
    kv_page_ids: np.ndarray  # [P]

    @classmethod
    def of(cls, batch: ForwardBatch) -> HostInputs:
        """Read back from the device tensors (waits for them): for batches built without host arrays."""

        def host(t: torch.Tensor) -> np.ndarray:
            return t.to("cpu", torch.int64).numpy()

        return cls(
            host(batch.input_ids),
            host(batch.positions),
            host(batch.write_page_ids),
            host(batch.write_slots),
            host(batch.qo_indptr),
            host(batch.kv_page_ids),
        )


@dataclass(frozen=True, slots=True)
class DeviceFields:
    """A batch's tensors on the device (FlashInfer's conventions, see the module doc)."""

    input_ids: torch.Tensor  # [T] int64, the new tokens of every sequence, concatenated
    positions: torch.Tensor  # [T] int64, absolute positions (RoPE)
    qo_indptr: torch.Tensor  # [B+1] int32, cumulative new-token counts
    kv_indptr: torch.Tensor  # [B+1] int32, cumulative page counts
    kv_page_ids: torch.Tensor  # [P] int32, each sequence's pages in order
    kv_last_page_len: torch.Tensor  # [B] int32, tokens in each sequence's last page (1..page_size)
    write_page_ids: torch.Tensor  # [T] int64, page receiving each new token's K/V
    write_slots: torch.Tensor  # [T] int64, slot within that page


class _DeviceField:
    """A ForwardBatch attribute that reads the DeviceFields field of the same name (made on first use)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, batch: ForwardBatch | None, owner: type | None = None) -> torch.Tensor:
        if batch is None:  # looked up on the class
            return self  # type: ignore[return-value]
        return getattr(batch.device_fields, self._name)


class ForwardBatch:
    """One forward pass's batch: the DeviceFields tensors (as attributes), each sequence's new and total
    token counts on the host, and, where the builder kept them, the host arrays.

    A batch built by build_forward_batch copies its fields to the device only when one is first read
    (`deferred`): a step replayed from a CUDA graph stages the host arrays into the graph's own buffer
    and never reads them, so it pays for one host-to-device copy instead of two. Not thread-safe (one
    compute thread reads it)."""

    __slots__ = ("_device", "_make_device", "host", "kv_lens", "q_lens")

    def __init__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        qo_indptr: torch.Tensor,
        kv_indptr: torch.Tensor,
        kv_page_ids: torch.Tensor,
        kv_last_page_len: torch.Tensor,
        write_page_ids: torch.Tensor,
        write_slots: torch.Tensor,
        q_lens: tuple[int, ...],
        kv_lens: tuple[int, ...],
        host: HostInputs | None = None,
    ) -> None:
        self._device: DeviceFields | None = DeviceFields(
            input_ids,
            positions,
            qo_indptr,
            kv_indptr,
            kv_page_ids,
            kv_last_page_len,
            write_page_ids,
            write_slots,
        )
        self._make_device: Callable[[], DeviceFields] | None = None
        self.q_lens = q_lens  # host copies, for backends that loop on the host
        self.kv_lens = kv_lens
        self.host = host  # the per-token inputs on the host, where the builder kept them

    @classmethod
    def deferred(
        cls,
        make_device: Callable[[], DeviceFields],
        q_lens: tuple[int, ...],
        kv_lens: tuple[int, ...],
        host: HostInputs,
    ) -> ForwardBatch:
        """A batch whose device fields `make_device()` creates when one is first read."""
        batch = cls.__new__(cls)
        batch._device, batch._make_device = None, make_device
        batch.q_lens, batch.kv_lens, batch.host = q_lens, kv_lens, host
        return batch

    @property
    def device_fields(self) -> DeviceFields:
        if self._device is None:
            assert self._make_device is not None
            self._device, self._make_device = self._make_device(), None
        return self._device

    def replace(self, **changes: object) -> ForwardBatch:
        """A copy with some fields (device fields by name, q_lens, kv_lens, host) replaced."""
        d = self.device_fields
        values: dict[str, Any] = {f: getattr(d, f) for f in d.__slots__}  # type: ignore[attr-defined]
        values.update(q_lens=self.q_lens, kv_lens=self.kv_lens, host=self.host)
        values.update(changes)
        return ForwardBatch(**values)

    input_ids = _DeviceField()
    positions = _DeviceField()
    qo_indptr = _DeviceField()
    kv_indptr = _DeviceField()
    kv_page_ids = _DeviceField()
    kv_last_page_len = _DeviceField()
    write_page_ids = _DeviceField()
    write_slots = _DeviceField()

    @property
    def host_inputs(self) -> HostInputs:
        return self.host if self.host is not None else HostInputs.of(self)

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token (the decode kernel applies)."""
        return all(n == 1 for n in self.q_lens)


class AttentionBackend(Protocol):
    """Paged attention over the shared KV pool. One instance per worker; not thread-safe."""

    def begin(self, batch: ForwardBatch) -> None:
        """Prepare for a forward pass over `batch` (plan once; reused by every layer)."""
        ...

    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [T, num_qo_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_layer: torch.Tensor,  # pool[layer]: [pages, 2, page_size, num_kv_heads, head_dim]
    ) -> torch.Tensor:
        """Write k/v into kv_layer at the batch's write slots, then return causal attention of q over
        each sequence's whole KV (cached prefix + new tokens): [T, num_qo_heads, head_dim]."""
        ...
