"""Replay a Mooncake-format trace through the real PrefixCache and report the prefix hit rate.

Each ``hash_id`` becomes one page of one token whose id is the hash id (page_size 1): Mooncake ids are
already chained (equal leading ids = shared prefix), so the tree sees exactly the trace's sharing, and
``--capacity-blocks`` is the pool size in pages. Per request: match -> open_lease -> allocate the
missing blocks (evicting by policy) -> commit -> release. Hit rate = matched blocks / requested blocks.

The offline optimum runs through the same tree with a Belady policy: evict the unlocked leaf whose tail
block is next used farthest in the future (never again first).

    python -m bench.replay TRACE.jsonl --capacity-blocks N [--block-tokens 512] [--policy NAME] [--json]
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict

import numpy as np

from cachemgr.cache import POLICIES, Namespace, PrefixCache
from cachemgr.cache.node import TreeNode
from cachemgr.cache.policy import EvictionPolicy

NS = Namespace("replay")


def load_trace(path: str) -> list[np.ndarray]:
    """hash_ids of every request, in timestamp order (stable for equal timestamps)."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                row = json.loads(line)
                rows.append((row["timestamp"], i, np.asarray(row["hash_ids"], dtype=np.int64)))
    rows.sort(key=lambda r: (r[0], r[1]))
    out = []
    for _, _, ids in rows:
        if len(ids) and (ids.min() < 0 or ids.max() > 2**31 - 1):
            raise ValueError("hash_ids must fit in int32 for this replay")
        out.append(ids.astype(np.int32))
    return out


class BeladyPolicy(EvictionPolicy):
    """Offline optimum: a leaf's priority is minus the next request index that uses its tail block."""

    name = "belady"

    def __init__(self, requests: list[np.ndarray]) -> None:
        uses: dict[int, list[int]] = defaultdict(list)
        for index, ids in enumerate(requests):
            for block in ids.tolist():
                uses[block].append(index)
        self._uses = uses
        self.now_index = 0  # the replay sets this before each request

    def priority(self, node: TreeNode) -> float:
        tail = int(np.frombuffer(node.token_bytes[-4:], dtype=np.int32)[0])
        uses = self._uses.get(tail, [])
        pos = bisect.bisect_right(uses, self.now_index)
        return -float(uses[pos]) if pos < len(uses) else -float("inf")


def replay(
    requests: list[np.ndarray], capacity_blocks: int, policy: str | EvictionPolicy
) -> dict[str, float]:
    cache = PrefixCache(capacity_blocks, page_size=1, policy=policy)
    requested = matched = skipped = 0
    for index, ids in enumerate(requests):
        if isinstance(policy, BeladyPolicy):
            policy.now_index = index
        m = cache.match(NS, ids)
        lease = cache.open_lease(NS, ids, m)
        requested += len(ids)
        matched += m.matched_len
        pages = cache.allocate(lease.lease_id, len(ids) - lease.matched_len)
        if pages is None:  # longer than the whole pool: served uncached
            skipped += 1
        else:
            cache.commit(lease.lease_id, ids, np.concatenate([lease.prefix_page_ids, pages]))
        cache.release(lease.lease_id)
    return {"hit_rate": matched / requested if requested else 0.0, "uncacheable_requests": skipped}


def infinite_hit_rate(requests: list[np.ndarray]) -> float:
    seen: set[int] = set()
    requested = matched = 0
    for ids in requests:
        blocks = ids.tolist()
        hit = 0
        while hit < len(blocks) and blocks[hit] in seen:
            hit += 1
        seen.update(blocks)
        requested += len(blocks)
        matched += hit
    return matched / requested if requested else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trace")
    parser.add_argument("--capacity-blocks", type=int, required=True)
    parser.add_argument("--block-tokens", type=int, default=512, help="tokens per block (reported only)")
    parser.add_argument("--policy", default=None, choices=sorted(POLICIES), help="default: the cache's")
    parser.add_argument("--no-belady", action="store_true")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    if args.capacity_blocks < 1:
        parser.error("--capacity-blocks must be positive")
    requests = load_trace(args.trace)
    policy = args.policy or PrefixCache(1).policy.name
    result = replay(requests, args.capacity_blocks, policy)
    out: dict[str, object] = {
        "trace": args.trace,
        "policy": policy,
        "capacity_blocks": args.capacity_blocks,
        "block_tokens": args.block_tokens,
        "requests": len(requests),
        "hit_rate": round(result["hit_rate"], 4),
        "infinite_hit_rate": round(infinite_hit_rate(requests), 4),
    }
    if not args.no_belady:
        out["belady_hit_rate"] = round(
            replay(requests, args.capacity_blocks, BeladyPolicy(requests))["hit_rate"], 4
        )
    print(
        f"{out['requests']} requests, capacity {args.capacity_blocks} blocks ({args.block_tokens} tokens each)"
    )
    print(f"hit rate {out['hit_rate']:.4f} ({policy})  belady {out.get('belady_hit_rate', '-')}  "
          f"infinite {out['infinite_hit_rate']:.4f}")  # fmt: skip
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
