"""Anchor workload of issue 2 through the real PrefixCache: microseconds per operation and the hit rate.

Workload (deterministic, seed 0): 64 system prompts of 2048 random token ids in [0, 32000); 512
conversations, each picks one; 8 turns each; turn 0 = system prompt + 128-token user message; turn k =
previous prompt + 64-token answer + 128-token user message; 32 conversations active at once, interleaved
at random; capacity 400k tokens; page size 16. Per request: match -> lock (open_lease) -> evict if short
-> allocate the rest -> commit the page-aligned prompt -> release.

Also measures match against a small (10k pages) and a large (1M pages) tree: the cost must not grow.

    python -m bench.tree_bench [--json] [--repeats 3] [--policy lru] [--skip-scaling]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from cachemgr.cache import Namespace, PrefixCache

PAGE_SIZE = 16
NS = Namespace("anchor")
OPS = ("match", "commit", "lock_release", "evict")


def anchor_requests(seed: int = 0) -> list[np.ndarray]:
    """The prompts of the anchor workload in arrival order (int32 arrays)."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, 32000, 2048, dtype=np.int32) for _ in range(64)]
    convs = [int(rng.integers(0, 64)) for _ in range(512)]
    next_conv, active, prompts, out = 32, list(range(32)), {}, []
    turns = dict.fromkeys(range(512), 0)
    while active:
        slot = int(rng.integers(0, len(active)))
        conv = active[slot]
        user = rng.integers(0, 32000, 128, dtype=np.int32)
        if turns[conv] == 0:
            prompt = np.concatenate([systems[convs[conv]], user])
        else:
            answer = rng.integers(0, 32000, 64, dtype=np.int32)
            prompt = np.concatenate([prompts[conv], answer, user])
        prompts[conv] = prompt
        out.append(prompt)
        turns[conv] += 1
        if turns[conv] == 8:
            del prompts[conv]
            if next_conv < 512:
                active[slot] = next_conv
                next_conv += 1
            else:
                active.pop(slot)
    return out


def run_anchor(requests: list[np.ndarray], policy: str) -> dict[str, object]:
    cache = PrefixCache(400_000 // PAGE_SIZE, PAGE_SIZE, policy=policy)
    times: dict[str, list[int]] = {"match": [], "commit": [], "lock_release": [], "evict": []}
    clock = time.perf_counter_ns
    prompt_tokens = hit_tokens = 0
    for prompt in requests:
        t0 = clock()
        m = cache.match(NS, prompt)
        t1 = clock()
        lease = cache.open_lease(NS, prompt, m)
        t2 = clock()
        need = len(prompt) // PAGE_SIZE - m.matched_len // PAGE_SIZE
        short = need - cache.stats().free if need > cache._alloc.num_free else 0
        if short > 0:
            t3 = clock()
            cache.evict(short)
            times["evict"].append(clock() - t3)
        pages = cache.allocate(lease.lease_id, need)
        assert pages is not None
        aligned = prompt[: len(prompt) // PAGE_SIZE * PAGE_SIZE]
        t4 = clock()
        cache.commit(lease.lease_id, aligned, np.concatenate([lease.prefix_page_ids, pages]))
        t5 = clock()
        cache.release(lease.lease_id)
        t6 = clock()
        times["match"].append(t1 - t0)
        times["commit"].append(t5 - t4)
        times["lock_release"].append((t2 - t1) + (t6 - t5))
        prompt_tokens += len(prompt)
        hit_tokens += m.matched_len
    cache.check()
    return {"hit_rate": round(hit_tokens / prompt_tokens, 4), "requests": len(requests), "times": times}


def op_stats(values: list[int]) -> dict[str, float | int | None]:
    """Mean / p50 / p99 in µs of per-call times in ns."""
    us = np.array(values, dtype=np.float64) / 1000.0
    if not len(us):
        return {"calls": 0, "mean_us": None, "p50_us": None, "p99_us": None}
    p50, p99 = np.percentile(us, [50, 99])
    return {"calls": len(us), "mean_us": round(float(us.mean()), 2), "p50_us": round(float(p50), 2),
            "p99_us": round(float(p99), 2)}  # fmt: skip


def summarize_runs(runs: list[dict[str, object]], policy: str) -> dict[str, object]:
    """Medians over repeated runs of each op's mean / p50 / p99; prints the table."""
    summary: dict[str, object] = {"policy": policy, "repeats": len(runs), "hit_rate": runs[0]["hit_rate"],
                                  "requests": runs[0]["requests"], "python": platform.python_version()}  # fmt: skip
    for op in OPS:
        stats = [op_stats(r["times"][op]) for r in runs]  # type: ignore[index]
        summary[op] = {
            key: float(np.median([s[key] for s in stats])) for key in ("mean_us", "p50_us", "p99_us")
        } | {"calls": stats[0]["calls"]}
    for op in OPS:
        s = summary[op]
        print(f"{op:13s} mean {s['mean_us']:7.2f} us  p50 {s['p50_us']:7.2f} us  p99 {s['p99_us']:7.2f} us"
              f"  ({s['calls']} calls)")  # fmt: skip
    print(f"hit rate {summary['hit_rate']:.4f} over {summary['requests']} requests (policy {policy})")
    return summary


def match_vs_tree_size(num_pages: int, repeats: int = 2000) -> float:
    """Median µs of matching a 2176-token prompt that hits 2048 tokens, in a tree of ``num_pages`` pages."""
    rng = np.random.default_rng(1)
    cache = PrefixCache(num_pages + 1024, PAGE_SIZE)
    chain_pages = 128
    probe = rng.integers(0, 32000, 2048, dtype=np.int32)
    filled = 0
    while filled + chain_pages <= num_pages:
        tokens = probe if filled == 0 else rng.integers(0, 32000, chain_pages * PAGE_SIZE, dtype=np.int32)
        lease = cache.open_lease(NS, tokens)
        pages = cache.allocate(lease.lease_id, chain_pages)
        assert pages is not None
        cache.commit(lease.lease_id, tokens, pages)
        cache.release(lease.lease_id)
        filled += chain_pages
    prompt = np.concatenate([probe, rng.integers(0, 32000, 128, dtype=np.int32)])
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        cache.match(NS, prompt)
        samples.append(time.perf_counter_ns() - t0)
    return round(float(np.median(samples)) / 1000.0, 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the anchor workload (medians taken)")
    parser.add_argument("--policy", default="lru")
    parser.add_argument("--skip-scaling", action="store_true", help="skip the 10k vs 1M pages match test")
    args = parser.parse_args(argv)
    requests = anchor_requests(0)
    runs = [run_anchor(requests, args.policy) for _ in range(args.repeats)]
    summary = summarize_runs(runs, args.policy)
    if not args.skip_scaling:
        summary["match_us_tree_10k_pages"] = match_vs_tree_size(10_000)
        summary["match_us_tree_1m_pages"] = match_vs_tree_size(1_000_000)
        print(f"match in a 10k-page tree {summary['match_us_tree_10k_pages']} us, "
              f"1M-page tree {summary['match_us_tree_1m_pages']} us (median)")  # fmt: skip
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
