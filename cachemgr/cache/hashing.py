"""Chained 64-bit page hashes, computed for a whole prompt at once with numpy.

For a namespace seed ``s`` and full pages ``p_1 .. p_n`` the prefix hash of the first ``k`` pages is

    H_0 = s,   H_k = H_{k-1} * Q + mix(page_hash(p_k))      (all arithmetic mod 2**64)

so ``H_k`` depends on the namespace and on every token before the end of page ``k``. The tree itself is
keyed by token bytes; these hashes name blocks in KV events (vLLM's BlockStored / BlockRemoved). The recurrence is
evaluated without a Python loop through the closed form ``H_k = Q**k * (s + sum_{j<=k} m_j * Q**-j)``
(``Q`` is odd, hence invertible mod 2**64, and numpy's uint64 arithmetic wraps). ``page_hash`` is a
polynomial over the page's tokens. The values are deterministic across processes and restarts (no use
of Python's salted ``hash()``), which the KV events need. Nothing in
the tree trusts them for matching, so a collision can never return wrong pages.
"""

from __future__ import annotations

import hashlib

import numpy as np

_Q = np.uint64(0x9E3779B97F4A7C15)  # odd
_Q_INV = np.uint64(pow(int(_Q), -1, 2**64))
_R = 0xBF58476D1CE4E5B9  # odd multiplier of the in-page polynomial
_MASK63 = np.uint64(0x7FFFFFFFFFFFFFFF)


def _powers(base: int, count: int) -> np.ndarray:
    out = np.empty(count, dtype=np.uint64)
    value = 1
    for i in range(count):
        out[i] = value
        value = (value * base) % 2**64
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the word (in place on a fresh array)."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def namespace_seed(model: str, salt: str) -> int:
    """Stable 64-bit seed of a namespace (blake2b of model and salt; the separator keeps them apart)."""
    digest = hashlib.blake2b(f"{model}\x00{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class PageHasher:
    """Prefix hashes of full pages for one page size. Holds only constant power tables (grown on demand)."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._in_page = _powers(_R, page_size)
        self._q_pow = _powers(int(_Q), 1)
        self._q_inv_pow = _powers(int(_Q_INV), 1)

    def _grow(self, num_pages: int) -> None:
        size = max(num_pages + 1, 2 * len(self._q_pow))
        self._q_pow = _powers(int(_Q), size)
        self._q_inv_pow = _powers(int(_Q_INV), size)

    def prefix_hashes(self, seed: int, tokens: np.ndarray) -> np.ndarray:
        """uint64 array: entry ``k`` is the chained hash of pages ``0..k`` of ``tokens``, continuing ``seed``.

        ``tokens`` is int32 and its length a multiple of the page size (the caller trims the partial page).
        Continuing from the hash of an earlier prefix gives the same values as hashing from the start.
        """
        num_pages = len(tokens) // self.page_size
        if num_pages == 0:
            return np.empty(0, dtype=np.uint64)
        if num_pages >= len(self._q_pow):
            self._grow(num_pages)
        pages = tokens.reshape(num_pages, self.page_size).astype(np.uint64)
        mixed = _mix(pages @ self._in_page)
        mixed *= self._q_inv_pow[1 : num_pages + 1]
        mixed[:1] += np.uint64(seed)
        np.cumsum(mixed, out=mixed)
        mixed *= self._q_pow[1 : num_pages + 1]
        return mixed


def block_hashes(prefix_hashes: np.ndarray) -> list[int]:
    """Event block hashes: the prefix hashes re-mixed and cut to 63 bits, so they fit a signed int64."""
    return (_mix(prefix_hashes.copy()) & _MASK63).tolist()
