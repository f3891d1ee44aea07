"""Fixed pool of page ids: a LIFO free list, so recently freed (warm) pages are reused first."""

from __future__ import annotations

import numpy as np


class PageAllocator:
    """Hands out page ids in ``[0, num_pages)``. Knows only which pages are free, not who holds the rest."""

    def __init__(self, num_pages: int) -> None:
        # Reversed so that a fresh pool hands out 0, 1, 2, ... (tests assert exact ids).
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self.num_pages = num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, num: int) -> np.ndarray | None:
        """Remove ``num`` ids from the free list; None (and no change) when fewer are free."""
        if num > len(self._free):
            return None
        if num == 0:
            return np.empty(0, dtype=np.int32)
        taken = self._free[-num:]
        del self._free[-num:]
        taken.reverse()
        return np.array(taken, dtype=np.int32)

    def give_back(self, page_ids: list[int]) -> None:
        """Return ids to the free list. The caller guarantees they were taken and are not free already."""
        self._free.extend(reversed(page_ids))

    def free_ids(self) -> list[int]:
        """Copy of the free list (for the integrity check)."""
        return list(self._free)
