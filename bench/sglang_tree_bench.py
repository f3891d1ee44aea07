"""The issue-2 anchor workload through SGLang's pure-Python RadixCache: the baseline for bench.tree_bench.

Runs the same requests as bench.tree_bench (same generator, same order, page 16, capacity 400k tokens)
through ``sglang.srt.mem_cache.radix_cache.RadixCache`` with a minimal free-list allocator (appending a
freed tensor is O(1), so the allocator adds as little as possible to SGLang's evict time). Per request:
match_prefix -> inc_lock_ref -> evict if short -> allocate the rest -> insert the page-aligned prompt (its
duplicates freed as SGLang's scheduler does) -> dec_lock_ref. Prints µs per operation like tree_bench.

SGLang is not a dependency of this project: install it into a separate environment to run this, e.g.
``pip install --no-deps sglang==0.5.23`` plus the modules its import chain asks for (see
bench/results/tree_bench.md), then ``PYTHONPATH=. python -m bench.sglang_tree_bench [--json]``.
"""

from __future__ import annotations

import argparse
import json
import time
from array import array

import numpy as np

from bench.tree_bench import PAGE_SIZE, anchor_requests, summarize_runs

CAPACITY_TOKENS = 400_000


class FreeListAllocator:
    """Token slots handed out a page at a time; the interface RadixCache calls (device, free_segment)."""

    device = "cpu"

    def __init__(self, num_tokens: int) -> None:
        import torch

        self._torch = torch
        self._free: list[object] = [torch.arange(num_tokens, dtype=torch.int64)]
        self.num_free = num_tokens

    def alloc(self, n: int):
        torch = self._torch
        if len(self._free) > 1:
            self._free = [torch.cat(self._free)]
        pool = self._free[0]
        out, self._free[0] = pool[:n], pool[n:]
        self.num_free -= n
        return out

    def free_segment(self, value, start_pos: int = 0) -> None:
        part = value[start_pos:]
        self._free.append(part)
        self.num_free += len(part)

    def free(self, value) -> None:
        self.free_segment(value)


def run_sglang(requests: list[np.ndarray]) -> dict[str, object]:
    import torch
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    allocator = FreeListAllocator(CAPACITY_TOKENS)
    tree = RadixCache.create_simulated(mock_allocator=allocator, page_size=PAGE_SIZE)
    times: dict[str, list[int]] = {"match": [], "commit": [], "lock_release": [], "evict": []}
    clock = time.perf_counter_ns
    prompt_tokens = hit_tokens = 0
    for prompt in requests:
        tokens = array("i", prompt.tolist())
        aligned_len = len(tokens) // PAGE_SIZE * PAGE_SIZE
        t0 = clock()
        m = tree.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
        t1 = clock()
        tree.inc_lock_ref(m.last_device_node)
        t2 = clock()
        matched = m.device_prefix_len
        need = aligned_len - matched
        if need > allocator.num_free:
            t3 = clock()
            tree.evict(EvictParams(num_tokens=need - allocator.num_free))
            times["evict"].append(clock() - t3)
        new = allocator.alloc(need)
        assert len(new) == need, "eviction could not make room"
        # The prefix's slots, read off the locked path outside the timed match (SGLang's scheduler does it
        # later): SGLang's match is timed without building the page list ours returns.
        value = torch.cat([tree.path_device_indices(m.last_device_node)[:matched], new]) if matched else new
        t4 = clock()
        result = tree.insert(InsertParams(key=RadixKey(tokens[:aligned_len]), value=value))
        t5 = clock()
        if result.prefix_len > matched:  # the scheduler frees what the tree already held
            allocator.free_segment(value[matched : result.prefix_len])
        tree.dec_lock_ref(m.last_device_node)
        t6 = clock()
        times["match"].append(t1 - t0)
        times["commit"].append(t5 - t4)
        times["lock_release"].append((t2 - t1) + (t6 - t5))
        prompt_tokens += len(prompt)
        hit_tokens += matched
    return {"hit_rate": round(hit_tokens / prompt_tokens, 4), "requests": len(requests), "times": times}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the anchor workload (medians taken)")
    args = parser.parse_args(argv)
    import sglang

    requests = anchor_requests(0)
    runs = [run_sglang(requests) for _ in range(args.repeats)]
    summary = summarize_runs(runs, f"sglang {sglang.__version__} RadixCache (lru)")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
