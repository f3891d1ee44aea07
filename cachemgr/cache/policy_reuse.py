"""The ``reuse`` policy: a Belady approximation that learns, per class of leaf, how long keeping it pays.

Every evictable leaf falls in a class from features known online (see :func:`leaf_class`): its kind
(new branch beside siblings, continuation of a path it alone extends, or used again 1 / 2-3 / 4+ times),
a log bucket of its depth and a log2 bucket of its size in pages. Per class, :class:`GapStats` learns the
distribution of reuse gaps with censoring and turns it into a keep time T(class): the TTL that maximises
hits minus ``price`` times page-ticks of occupancy. The heap key is ``last_access + T(class)``: the clock
time at which the leaf stops paying for its pages; the leaf evicted first is the one whose time ran out
first. Classes whose leaves are rarely used again (one-off bodies, abandoned conversations) get short keep
times; classes that come back (live conversations, agent loops) get long ones. With equal keep times for
all classes the order is exactly LRU, which is also what the policy does until it has ``warmup``
observations.

Observations: a tracked leaf (pushed on the heap) used again gives an event with its gap; an evicted leaf
goes into a ghost record, ``(depth, first evicted page) -> (class, last use, pages)``, bounded to the
pool's page count (oldest dropped first). A miss whose first missing page is a ghost gives an event with
the true gap; a ghost dropped unused gives a censoring at its age then.

Every ``refresh`` evictions the keep times are refitted for the occupancy the cache actually held: the
budget is M at the realised keep times (keep offset + the mean of age minus offset over the window's
evictions), smoothed by ``smooth``. ``keep_flat`` is the one keep time for all classes (LRU order) with
that budget; the heap key is ``last_access + trust * min(keep(class) - keep_flat, max_scale * keep_flat)``,
an offset from LRU order, so a drifting absolute level never reorders leaves already on the heap.
``trust`` (starts at ``trust``, 0 = exact LRU) moves by ``step`` toward the measured outcome: pages hit
that LRU order would have evicted (gap > keep_flat) against ``loss_weight`` times pages missed that it
would have kept (a ghost hit with gap <= keep_flat), damped by ``evidence`` pages.

State: the tracked-leaf map (at most the live evictable leaves plus leaves dropped by ``flush``, pruned when
it doubles), the ghost record (at most ``num_pages`` pages), the class statistics (fixed size). O(1) per
hook besides the path walk in ``on_use``; the refit is O(classes * buckets * 40) numpy work every
``refresh`` evictions. Deterministic: no randomness, no hashing of ids.
"""

from __future__ import annotations

import numpy as np

from cachemgr.cache.node import TreeNode
from cachemgr.cache.policy_base import EvictionPolicy
from cachemgr.cache.policy_gaps import GapStats, best_keep, occupancy_at, uniform_keep

NUM_KINDS = 5  # 0 branch, 1 continuation, 2 used once, 3 used 2-3 times, 4 used 4+ times
NUM_DEPTHS = 7  # log4 buckets of the depth in pages: 0-1, 2-7, 8-31, ..., 2048+
NUM_SIZES = 6  # log2 buckets of the size in pages: 1, 2-3, 4-7, 8-15, 16-31, 32+
NUM_CLASSES = NUM_KINDS * NUM_DEPTHS * NUM_SIZES


def leaf_class(node: TreeNode) -> int:
    """Class id in [0, NUM_CLASSES) of a leaf from its kind, depth and size."""
    hits = node.hits
    if hits == 0:
        parent = node.parent
        kind = 1 if parent is not None and parent.parent is not None and len(parent.children) == 1 else 0
    else:
        kind = 2 if hits == 1 else (3 if hits < 4 else 4)
    depth = min(NUM_DEPTHS - 1, node.depth_pages.bit_length() // 2)
    size = min(NUM_SIZES - 1, max(0, len(node.page_ids).bit_length() - 1))
    return (kind * NUM_DEPTHS + depth) * NUM_SIZES + size


class ReusePolicy(EvictionPolicy):
    """Per-class learned keep times on top of LRU order (see the module docstring)."""

    name = "reuse"

    def __init__(
        self,
        warmup: int = 256,
        refresh: int = 64,
        prior: float = 4.0,
        decay: float = 0.98,
        smooth: float = 0.2,
        step: float = 0.2,
        trust: float = 0.0,
        loss_weight: float = 2.0,
        evidence: float = 256.0,
        max_scale: float = 1.0,
    ) -> None:
        if not (warmup >= 0 and refresh >= 1 and 0.0 < smooth <= 1.0 and step >= 0.0 and 0.0 <= trust <= 1.0
                and loss_weight >= 0.0 and evidence >= 0.0 and max_scale >= 0.0):  # fmt: skip
            raise ValueError("bad reuse policy parameters (see ReusePolicy's docstring for the ranges)")
        self.warmup = warmup
        self.refresh = refresh
        groups = [c // (NUM_DEPTHS * NUM_SIZES) for c in range(NUM_CLASSES)]  # shrink toward the kind
        self.stats = GapStats(groups, prior=prior, decay=decay)
        self.keep = np.zeros(NUM_CLASSES)  # heap-key offset per class from LRU order, ticks; all 0 = LRU
        self._keep_list: list[float] = [0.0] * NUM_CLASSES
        self._pushed_list: list[float] = [0.0] * NUM_CLASSES  # decayed pages pushed per class
        self._budget = 0.0  # modelled occupancy the cache holds (weights @ M(keep)), smoothed
        self.smooth = smooth
        self.step = step
        self.loss_weight = loss_weight
        self.evidence = evidence
        self.max_scale = max_scale
        self.trust = trust  # weight of the learned keep times against LRU order (0 = exactly LRU)
        self._flat = float("inf")  # keep time of LRU order at the same occupancy
        self._won = 0.0  # decayed pages hit that LRU order would have evicted
        self._lost = 0.0  # decayed pages missed that LRU order would have kept
        self._late = 0.0  # sum over this window's evictions of (now - key): slack beyond keep times
        self._evictions = 0
        self._now = 0
        self._tracked: dict[TreeNode, tuple[int, int]] = {}  # pushed leaf -> (class, last_access)
        self._prune_at = 1024
        self._ghost_limit = 1
        self._ghost_pages = 0
        self._page_bytes = 4
        self._ghosts: dict[tuple[int, bytes], tuple[int, int, int]] = {}  # key -> (class, last use, pages)

    @property
    def num_ghost_pages(self) -> int:
        """Evicted pages the ghost record stands for; never more than the pool's page count."""
        return self._ghost_pages

    @property
    def num_tracked(self) -> int:
        return len(self._tracked)

    def attach(self, num_pages: int, page_size: int) -> None:
        self._ghost_limit = num_pages
        self._page_bytes = 4 * page_size
        self._prune_at = 2 * num_pages + 1024

    def on_insert(self, node: TreeNode, now: int) -> None:
        self._now = now

    def on_use(self, path: list[TreeNode], now: int) -> None:
        self._now = now
        tracked = self._tracked
        if tracked:
            stats = self.stats
            for node in path:
                entry = tracked.pop(node, None)
                if entry is not None:
                    gap = now - entry[1]
                    stats.add(entry[0], gap, True)
                    if gap > self._flat:  # LRU at the same occupancy would have evicted it: a win
                        self._won += len(node.page_ids)

    def priority(self, node: TreeNode) -> float:
        cls = leaf_class(node)
        tracked = self._tracked
        tracked[node] = (cls, node.last_access)
        if len(tracked) > self._prune_at:
            # Leaves dropped by flush are detached (parent None) and never reported: forget them here.
            for gone in [n for n in tracked if n.parent is None]:
                del tracked[gone]
            self._prune_at = 2 * len(tracked) + 1024
        self._pushed_list[cls] += len(node.page_ids)
        return node.last_access + self._keep_list[cls]

    def on_evict_tail(self, node: TreeNode, keep: int) -> None:
        now = self._now
        entry = self._tracked.get(node) if keep else self._tracked.pop(node, None)
        cls = entry[0] if entry is not None else leaf_class(node)
        self._late += now - node.last_access - self._keep_list[cls]
        pb = self._page_bytes
        key = (node.depth_pages + keep, node.token_bytes[keep * pb : (keep + 1) * pb])
        ghosts = self._ghosts
        old = ghosts.pop(key, None)
        if old is not None:
            self._ghost_pages -= old[2]
            self.stats.add(old[0], now - old[1], False)
        pages = len(node.page_ids) - keep
        ghosts[key] = (cls, node.last_access, pages)
        self._ghost_pages += pages
        while self._ghost_pages > self._ghost_limit:
            old_cls, last, old_pages = ghosts.pop(next(iter(ghosts)))
            self._ghost_pages -= old_pages
            self.stats.add(old_cls, now - last, False)

    def on_evict(self, node: TreeNode, priority: float) -> None:
        self._evictions += 1
        if self._evictions % self.refresh == 0:
            self._refit()

    def _refit(self) -> None:
        """New keep times holding the same modelled occupancy as the ones just realised (keep + slack)."""
        late = self._late / self.refresh
        self._late = 0.0
        weights = np.asarray(self._pushed_list)
        if self.stats.observations >= self.warmup:
            hits, occupancy = self.stats.curves()
            realised = np.maximum(self.keep + late, 0.0)  # keep holds offsets from LRU order
            budget = float(weights @ occupancy_at(occupancy, realised))
            self._budget = (
                budget if self._budget == 0.0 else (1.0 - self.smooth) * self._budget + self.smooth * budget
            )
            budget = self._budget
            keep = best_keep(hits, occupancy, weights, budget)
            flat = uniform_keep(occupancy, weights, budget)
            self._flat = flat
            total = self._won + self._lost
            if total > 0.0:
                self.trust = min(
                    1.0,
                    max(
                        0.0,
                        self.trust
                        + self.step * (self._won - self.loss_weight * self._lost) / (total + self.evidence),
                    ),
                )
            self._won *= 0.8
            self._lost *= 0.8
            # Offsets from LRU order, bounded so a leaf never stays more than max_scale horizons.
            self.keep = self.trust * np.minimum(keep - flat, self.max_scale * flat)
            self._keep_list = self.keep.tolist()
        self.stats.decay_all()
        self._pushed_list = (weights * self.stats.decay).tolist()

    def on_miss(self, end: TreeNode, token_bytes: bytes) -> None:
        pb = self._page_bytes
        start = end.end_pages * pb
        ghost = self._ghosts.pop((end.end_pages, token_bytes[start : start + pb]), None)
        if ghost is not None:
            self._ghost_pages -= ghost[2]
            gap = self._now - ghost[1]
            self.stats.add(ghost[0], gap, True)
            if gap <= self._flat:  # LRU at the same occupancy would still have had it: a loss
                self._lost += ghost[2]
