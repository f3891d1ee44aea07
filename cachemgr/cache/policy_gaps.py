"""Per-class reuse-gap statistics with censoring, and the per-class keep times they imply.

A *gap* is the logical-clock time from a leaf's last use to its next use. Each tracked leaf ends in one
observation: an event (it was used again after ``gap`` ticks) or a censoring (it was still unused at
age ``age``: the gap is longer, maybe infinite). Observations go into log-spaced buckets (two per
octave) per class; counts decay geometrically on every refresh so the estimate follows load changes.

From the buckets, a Kaplan-Meier survival S(t) per class gives, for a keep time T (a bucket edge):
hits F(T) = 1 - S(T) and occupancy M(T) = integral of S over [0, T] (page-ticks per leaf page). The keep
time that maximises F(T) - price * M(T) is the best use of the cache for that class when a page-tick
costs ``price`` hits (a TTL cache under a capacity constraint; the price is set by the caller). Sparse
classes borrow strength from their group and from all classes (shrinkage with ``prior`` pseudo-counts),
so an unseen class behaves like the average one instead of like "never used again".

Memory is O(classes * buckets), fixed at construction. Deterministic.
"""

from __future__ import annotations

import math

import numpy as np

NUM_BUCKETS = 56  # two per octave: edges 2**(b/2) - 1 ticks, up to 2**28


def bucket_of(ticks: float) -> int:
    """Index b of the bucket [edge(b), edge(b+1)) holding ``ticks`` >= 0."""
    b = int(2.0 * math.log2(ticks + 1.0))
    return b if b < NUM_BUCKETS else NUM_BUCKETS - 1


EDGES = 2.0 ** (np.arange(NUM_BUCKETS + 1) / 2.0) - 1.0  # EDGES[b] = start of bucket b


class GapStats:
    """Decayed event / censor counts per (class, bucket); ``groups[c]`` is the coarser group of class c."""

    def __init__(self, groups: list[int], prior: float = 4.0, decay: float = 0.98) -> None:
        if not groups or min(groups) < 0 or not (prior >= 0.0 and 0.0 < decay <= 1.0):
            raise ValueError("need classes with group ids >= 0, prior >= 0 and 0 < decay <= 1")
        self.groups = np.asarray(groups, dtype=np.int64)
        self.num_groups = int(self.groups.max()) + 1
        self.prior = prior
        self.decay = decay
        n = len(groups)
        self.events = np.zeros((n, NUM_BUCKETS))
        self.censored = np.zeros((n, NUM_BUCKETS))
        self.observations = 0  # ever recorded (not decayed): the model's warm-up gate

    def add(self, cls: int, ticks: float, event: bool) -> None:
        """Record that a leaf of class ``cls`` was used again after ``ticks`` (event) or not by then."""
        (self.events if event else self.censored)[cls, bucket_of(ticks)] += 1.0
        self.observations += 1

    def _shrunk(self, e: np.ndarray, c: np.ndarray, toward_e: np.ndarray, toward_c: np.ndarray):
        """Counts plus ``prior`` pseudo-observations shaped like the (already normalised) target rows."""
        return e + self.prior * toward_e, c + self.prior * toward_c

    @staticmethod
    def _normalised(e: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        total = e.sum(axis=-1, keepdims=True) + c.sum(axis=-1, keepdims=True)
        total = np.where(total > 0.0, total, 1.0)
        return e / total, c / total

    def curves(self) -> tuple[np.ndarray, np.ndarray]:
        """Per class at every bucket edge: hits F(T) and occupancy M(T) (shapes (classes, buckets + 1))."""
        e, c = self.events, self.censored
        ge, gc = self._normalised(e.sum(axis=0, keepdims=True), c.sum(axis=0, keepdims=True))
        grp_e = np.zeros((self.num_groups, NUM_BUCKETS))
        grp_c = np.zeros((self.num_groups, NUM_BUCKETS))
        np.add.at(grp_e, self.groups, e)
        np.add.at(grp_c, self.groups, c)
        grp_e, grp_c = self._normalised(*self._shrunk(grp_e, grp_c, ge, gc))
        ce, cc = self._shrunk(e, c, grp_e[self.groups], grp_c[self.groups])
        # Kaplan-Meier: at risk in bucket b = observations in buckets >= b; survival at the bucket edges.
        at_risk = np.cumsum((ce + cc)[:, ::-1], axis=1)[:, ::-1]
        hazard = np.divide(ce, at_risk, out=np.zeros_like(ce), where=at_risk > 0.0)
        surv = np.ones((len(ce), NUM_BUCKETS + 1))
        surv[:, 1:] = np.cumprod(1.0 - hazard, axis=1)
        occupancy = np.zeros_like(surv)
        occupancy[:, 1:] = np.cumsum(np.diff(EDGES) * (surv[:, :-1] + surv[:, 1:]) / 2.0, axis=1)
        return 1.0 - surv, occupancy

    def decay_all(self) -> None:
        """Age the statistics: every count is multiplied by ``decay``."""
        self.events *= self.decay
        self.censored *= self.decay


def occupancy_at(occupancy: np.ndarray, ticks: np.ndarray) -> np.ndarray:
    """Row-wise M(ticks[c]) by linear interpolation between the bucket edges (ticks >= 0)."""
    t = np.minimum(ticks, EDGES[-1])
    b = np.minimum((2.0 * np.log2(t + 1.0)).astype(np.int64), NUM_BUCKETS - 1)
    lo, hi = EDGES[b], EDGES[b + 1]
    rows = np.arange(len(occupancy))
    m0, m1 = occupancy[rows, b], occupancy[rows, b + 1]
    return m0 + (m1 - m0) * (t - lo) / (hi - lo)


def best_keep(hits: np.ndarray, occupancy: np.ndarray, weights: np.ndarray, budget: float) -> np.ndarray:
    """Keep times (bucket edges) maximising sum hits - price * occupancy, the price chosen by bisection
    so that sum(weights * occupancy at the keep times) is as close to ``budget`` as it gets from below."""
    lo, hi = -30.0, 5.0  # log2 of the price: a page-tick worth 2**-30 .. 32 hits
    best = np.zeros(len(hits), dtype=np.int64)
    rows = np.arange(len(hits))
    for _ in range(40):
        mid = (lo + hi) / 2.0
        choice = np.argmax(hits - 2.0**mid * occupancy, axis=1)
        if float(weights @ occupancy[rows, choice]) > budget:
            lo = mid  # too generous: raise the price
        else:
            hi, best = mid, choice
    return EDGES[best]


def uniform_keep(occupancy: np.ndarray, weights: np.ndarray, budget: float) -> float:
    """The one keep time for every class (LRU order) whose modelled occupancy is ``budget``."""
    lo, hi = 0.0, float(EDGES[-1])
    ones = np.ones(len(occupancy))
    for _ in range(40):
        mid = (lo + hi) / 2.0
        if float(weights @ occupancy_at(occupancy, mid * ones)) > budget:
            hi = mid
        else:
            lo = mid
    return lo
