"""The KV pool layout shared by the daemon (which owns the memory) and the workers (which map it).

One allocation per device, layer-major::

    pool[layer, page, kv, slot, kv_head, head_dim]      kv: 0 = K, 1 = V

so `pool[layer]` is exactly FlashInfer's paged NHD layout `[pages, 2, page_size, kv_heads, head_dim]`
with no copy, and a page id names the same slot in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_pages", "page_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_SIZES)}, got {self.dtype!r}")

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_layers, self.num_pages, 2, self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_page(self) -> int:
        """Bytes one page occupies across all layers (K and V)."""
        return (
            self.num_layers * 2 * self.page_size * self.num_kv_heads * self.head_dim * DTYPE_SIZES[self.dtype]
        )

    @property
    def num_bytes(self) -> int:
        return self.num_pages * self.bytes_per_page

    @classmethod
    def for_budget(
        cls,
        *,
        budget_bytes: int,
        num_layers: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: str,
    ) -> KVLayout:
        """The largest pool that fits in `budget_bytes`. Raises ValueError if not even one page fits."""
        probe = cls(num_layers, 1, page_size, num_kv_heads, head_dim, dtype)
        num_pages = budget_bytes // probe.bytes_per_page
        if num_pages < 1:
            raise ValueError(
                f"a KV budget of {budget_bytes} bytes holds no page ({probe.bytes_per_page} bytes per page)"
            )
        return cls(num_layers, int(num_pages), page_size, num_kv_heads, head_dim, dtype)
