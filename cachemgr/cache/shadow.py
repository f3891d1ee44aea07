"""What plain LRU would hit on the traffic the cache actually sees, measured while another policy runs.

On a prefix tree, LRU by leaf is LRU by page: a request that uses a page uses every page before it, so a
page is never more recently used than its parent, and evicting the least recently used leaf evicts the
least recently used page. LRU's hits are therefore those of a per-page LRU over the stream of pages the
requests touch, and a spatial sample of that stream (SHARDS: the pages whose prefix key falls in a
``rate`` share of the key space, in an LRU of ``rate * capacity`` pages) estimates them without
simulating the whole cache. The same sampled pages, counted as hits when the real cache matched them, give the running
policy's figure on identical traffic, so the difference is a paired comparison: a policy that keeps
losing to it can back off to LRU.

A page's key is a random projection of its prefix: each page's tokens projected on a fixed vector
(one BLAS product for the whole prompt), weighted by position and summed along the prompt, offset by the
namespace. Distinct prefixes get distinct keys except by floating-point coincidence, which only makes
the estimate a little generous; the keys never touch the real tree. One inexactness the other way: BLAS
rounds the rows of a final partial block (OpenBLAS: the last len % 4 pages) differently, so those pages
of a prompt can get other keys inside a longer prompt, and the shadow then misses what LRU would hit
(4 of 86k hits in a page-size-16 test; page size 1, as in bench.replay, is exact).

Cost per request: about 14 numpy calls over the whole prompt (a few µs each inside a busy workload,
whatever the prompt's length; the per-page work is ~65 ns) plus an OrderedDict step per sampled page
(~0.5 µs): ~50 µs per lease on the anchor workload's 180-page prompts (bench/results/tree_bench.md).
Memory: at most max(target_pages, capacity/64) keys.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

_MIN_RATE = 1 / 64
_LOW_BITS = np.uint64((1 << 20) - 1)
_SEED = 0x5AD0


class ShadowLRU:
    """A sampled per-page LRU of the pool's size. Deterministic: key-based sampling, fixed projections."""

    def __init__(self, capacity_pages: int, page_size: int, target_pages: int = 4096) -> None:
        if capacity_pages < 1 or page_size < 1 or target_pages < 1:
            raise ValueError("capacity_pages, page_size and target_pages must be >= 1")
        self.rate = min(1.0, max(_MIN_RATE, target_pages / capacity_pages))
        self.capacity = max(1, round(self.rate * capacity_pages))
        self._threshold = np.uint64(round(self.rate * (1 << 20)))
        self._page_size = page_size
        # Fixed seeds: the same keys in every process and run, whatever order prompts arrive in.
        self._projection = np.random.default_rng(_SEED).random(page_size) + 0.5
        self._position = np.empty(0)
        self._pages: OrderedDict[float, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pages)

    def access(self, seed: int, tokens: np.ndarray, matched_pages: int) -> tuple[int, int, int]:
        """One request: ``tokens`` its full pages (int32, a page multiple), of which the real cache matched
        ``matched_pages``. Returns (sampled pages, hits the shadow LRU had, hits the real cache had)."""
        num_pages = len(tokens) // self._page_size
        while num_pages > len(self._position):  # position weights, 1024 pages per block, by block index
            block = np.random.default_rng((_SEED, len(self._position) // 1024)).random(1024) + 0.5
            self._position = np.concatenate([self._position, block])
        # The fewest numpy calls (each costs a few µs, whatever the prompt's length), all in place.
        keys_array = tokens.reshape(num_pages, self._page_size) @ self._projection
        keys_array *= self._position[:num_pages]
        np.add.accumulate(keys_array, out=keys_array)  # a running sum, page after page
        keys_array += float(seed % (1 << 20))
        if self.rate < 1.0:
            # The low mantissa bits of a key are as good as random: sample on them.
            index = np.flatnonzero((keys_array.view(np.uint64) & _LOW_BITS) < self._threshold)
            keys = keys_array[index].tolist()
            real = int(index.searchsorted(matched_pages))  # sampled pages before matched_pages
        else:
            keys = keys_array.tolist()
            real = min(matched_pages, len(keys))
        pages = self._pages
        move_to_end = pages.move_to_end
        shadow = 0
        # Deepest first, so each page ends up more recent than the pages after it: the shadow then
        # evicts a prompt's tail before its head, as the tree does.
        for key in reversed(keys):
            if key in pages:
                shadow += 1
                move_to_end(key)
            else:
                pages[key] = None
        while len(pages) > self.capacity:
            pages.popitem(last=False)
        return len(keys), shadow, real
